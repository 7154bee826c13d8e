"""Models by name (open_clip configs), one factory, weights and checkpoints loaded in one place.

    model, preprocess = build_model("fetalclip", "cls", weights="s3://bucket/FetalCLIP_weights.pt")
    logits = model(images)                        # (N, 3, 224, 224) float32 -> (N,)
    scores = model.frame_scores(logits)           # (N,) in [0, 1]
    save_checkpoint(model, "s3://bucket/run1", threshold=DEFAULT_THRESHOLD["cls"], preprocess=preprocess)
    model, meta = load_checkpoint("s3://bucket/run1")

`fetalclip` is FetalCLIP's ViT-L/14 image tower; `fetalclip-tiny` has the same classes, small enough for
CPU tests and demos. The paper's baselines are timm models by name, trained in the paper's mode:

    model, preprocess = build_model("timm:densenet121", "cls", weights="densenet121.safetensors")  # full
    model, preprocess = build_model("timm:deit3_large_patch16_224", "cls", weights=...)  # frozen + LoRA
    model, preprocess = build_model("fetalclip", "cls", weights=..., trainable="linear")  # head only
    model, preprocess = build_model("fetalclip", "seg", weights=..., lora=paper_lora("fetalclip"),
                                    decoder="paper")  # the paper's SEG model: its decoder trains, nothing else
"""

from fetaliqa.models.checkpoint import (
    FORMAT_VERSION,
    checkpoint_tensors,
    load_checkpoint,
    load_trained_tensors,
    save_checkpoint,
)
from fetaliqa.models.baselines import PAPER_BASELINES, is_known_model
from fetaliqa.models.encoders import MODEL_NAMES, LoraSpec, PreprocessSpec, seg_block_indices
from fetaliqa.models.iqa import (
    DECODERS,
    DEFAULT_THRESHOLD,
    TASKS,
    TRAINABLE,
    IQAModel,
    ModelSpec,
    build_model,
    default_trainable,
    model_info,
    paper_lora,
    torch_seed,
)

__all__ = [
    "DECODERS",
    "DEFAULT_THRESHOLD",
    "FORMAT_VERSION",
    "MODEL_NAMES",
    "PAPER_BASELINES",
    "TASKS",
    "TRAINABLE",
    "IQAModel",
    "LoraSpec",
    "ModelSpec",
    "PreprocessSpec",
    "build_model",
    "default_trainable",
    "checkpoint_tensors",
    "is_known_model",
    "load_checkpoint",
    "load_trained_tensors",
    "model_info",
    "paper_lora",
    "save_checkpoint",
    "seg_block_indices",
    "torch_seed",
]
