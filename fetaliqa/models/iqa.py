"""The IQA model: a LoRA-adapted image tower with a CLS or SEG head, built by one factory.

Images are (N, 3, S, S) float32, already preprocessed per the `PreprocessSpec` that `build_model`
returns with the model (S = 224 for the fetalclip models).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from fetaliqa.models.encoders import (
    LoraSpec,
    PreprocessSpec,
    create_image_tower,
    inject_lora,
    is_lora_key,
    load_tower_weights,
    merge_lora,
    model_config,
    preprocess_spec,
    seg_block_indices,
)
from fetaliqa.models.heads import UnetrDecoder
from fetaliqa.storage import StorageOptions

TASKS = ("cls", "seg")
# CLS: p >= 0.5. SEG: the score is the mask's area fraction; positive above 1% of the image (ARCHITECTURE.md).
DEFAULT_THRESHOLD = {"cls": 0.5, "seg": 0.01}
# SEG decoder base width: UNETR's feature_size 16 for the full model (2.2M decoder parameters);
# 8 for the tiny one, whose full-resolution convolutions would otherwise cost more than its encoder.
DECODER_CHANNELS = {"fetalclip": 16, "fetalclip-tiny": 8}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture and frozen weights (goes into checkpoints)."""

    name: str
    task: str
    lora: LoraSpec | None
    seed: int
    weights: str | None  # pretrained image-tower weights it was built from; None: random init (seeded)
    decoder_channels: int | None  # SEG only


class IQAModel(nn.Module):
    """Frame quality model. `encoder`: open_clip VisionTransformer (frozen, with LoRA adapters);
    `head`: nn.Linear(embed_dim, 1) for CLS, `UnetrDecoder` for SEG."""

    def __init__(self, spec: ModelSpec, encoder: VisionTransformer, head: nn.Module):
        super().__init__()
        self.spec = spec
        self.name, self.task = spec.name, spec.task
        self.encoder = encoder
        self.head = head
        self.merged = False
        depth = len(encoder.transformer.resblocks)
        self.seg_blocks = seg_block_indices(depth)  # 1-based
        self._take = sorted({i - 1 for i in self.seg_blocks})  # 0-based, unique, for forward_intermediates

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) float -> CLS: logits (N,); SEG: mask logits (N, 1, S, S)."""
        # A linear probe (no LoRA) needs no graph through the frozen encoder.
        adapted = self.spec.lora is not None and not self.merged
        with torch.set_grad_enabled(torch.is_grad_enabled() and adapted):
            if self.task == "cls":
                features = self.encoder(images)  # (N, embed_dim): pooled CLS token, projected
            else:
                features = self._block_tokens(images)
        if self.task == "cls":
            return self.head(features).squeeze(1)
        return self.head(images, features)

    def _block_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens (N, D, g, g) of the blocks in `seg_blocks`, in that order, from one encoder pass."""
        out = self.encoder.forward_intermediates(images, indices=self._take, stop_early=True,
                                                 intermediates_only=True, output_fmt="NCHW")
        by_block = dict(zip(self._take, out["image_intermediates"]))
        return [by_block[i - 1] for i in self.seg_blocks]

    def frame_scores(self, output: torch.Tensor) -> torch.Tensor:
        """Model output -> (N,) float32 score in [0, 1]: CLS sigmoid(logit); SEG fraction of pixels with
        p > 0.5 (logit > 0). Compare with `DEFAULT_THRESHOLD[task]` or a checkpoint's threshold."""
        if self.task == "cls":
            return torch.sigmoid(output.float())
        return (output > 0).flatten(1).float().mean(dim=1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA adapters and head: what an optimizer should see."""
        return [p for p in self.parameters() if p.requires_grad]

    def merge_adapters(self) -> IQAModel:
        """Fold LoRA into the encoder weights for inference (faster; no per-forward merge drift, which peft's
        MultiheadAttention LoRA has). Irreversible: a merged model can be scored but not saved or trained."""
        merge_lora(self.encoder)
        self.merged = True
        return self


def build_model(
    name: str,
    task: str = "cls",
    weights: str | None = None,
    lora: LoraSpec | None = LoraSpec(),  # noqa: B008 - frozen dataclass, safe as a default
    storage_options: StorageOptions = None,
    seed: int = 0,
    *,
    decoder_channels: int | None = None,
) -> tuple[IQAModel, PreprocessSpec]:
    """Build the named model for `task` ("cls" or "seg") in train mode, float32, on CPU.

    `weights`: path or fsspec URL of an open_clip state dict for the image tower (None: random init).
    The encoder is frozen; `lora=None` gives a linear probe (CLS) or a frozen-encoder decoder (SEG).
    All random init (tower, LoRA A, head) happens under `seed` in a forked RNG, so a model built twice
    with the same arguments is identical and the caller's RNG state is untouched.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "seg":
        decoder_channels = decoder_channels or DECODER_CHANNELS.get(name, 16)
    else:
        decoder_channels = None
    spec = ModelSpec(name=name, task=task, lora=lora, seed=seed, weights=weights, decoder_channels=decoder_channels)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: leaves CUDA RNG state alone
        encoder = create_image_tower(name)
        if weights is not None:
            load_tower_weights(encoder, weights, storage_options)
        encoder.requires_grad_(False)
        if lora is not None:
            inject_lora(encoder, lora)
        head = _make_head(encoder, task, decoder_channels)
    return IQAModel(spec, encoder, head), preprocess_spec(encoder)


def _make_head(encoder: VisionTransformer, task: str, decoder_channels: int | None) -> nn.Module:
    if task == "cls":
        return nn.Linear(encoder.output_dim, 1)
    width = encoder.transformer.width
    size = encoder.image_size[0] if isinstance(encoder.image_size, (tuple, list)) else encoder.image_size
    return UnetrDecoder(token_dim=width, channels=decoder_channels, image_size=size)


def model_info(name: str, task: str = "cls", lora: LoraSpec | None = LoraSpec()) -> dict[str, Any]:  # noqa: B008
    """Parameter counts and config of a model, built without weights (JSON-serialisable ints and dicts).

    `image_tower_parameters`: the open_clip image tower alone (no LoRA, no head).
    """
    model, preprocess = build_model(name, task, lora=lora)
    counts = {"parameters": 0, "trainable_parameters": 0, "image_tower_parameters": 0,
              "lora_parameters": 0, "head_parameters": 0}
    for key, param in model.named_parameters():
        n = param.numel()
        counts["parameters"] += n
        counts["trainable_parameters"] += n if param.requires_grad else 0
        if key.startswith("head."):
            counts["head_parameters"] += n
        elif is_lora_key(key):
            counts["lora_parameters"] += n
        else:
            counts["image_tower_parameters"] += n
    config = {"model": name, "task": task, "open_clip": model_config(name),
              "lora": lora.to_dict() if lora else None, "preprocess": preprocess.to_dict()}
    if task == "seg":
        config |= {"decoder_channels": model.spec.decoder_channels, "seg_blocks": model.seg_blocks}
    return counts | {"config": config}
