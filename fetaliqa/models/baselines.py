"""Baseline encoders from timm, named `timm:<arch>[.<tag>]`: creation, weights, LoRA placement, preprocessing.

The paper compares FetalCLIP with six encoders trained with the same recipe (`PAPER_BASELINES`): the
CNNs fully fine-tuned, the transformers frozen with LoRA on their attention (`qkv`, `proj`) and MLP
(`fc1`, `fc2`) Linear layers. This is the one place that touches timm. A pretrained tag (`.laion2b`)
selects timm's preprocessing config for those weights; weights are never downloaded (`pretrained=False`)
but given as a file or URL, as for FetalCLIP.
"""

from __future__ import annotations

import dataclasses

import open_clip
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from fetaliqa.models.encoders import (
    MODEL_NAMES,
    LoraSpec,
    PreprocessSpec,
    inject_lora,
    load_state_checked,
    read_state_dict,
    tower_state,
)
from fetaliqa.inputs.storage import StorageOptions

TIMM_PREFIX = "timm:"

# The paper's baselines and how it trained each: "full" fine-tuning for CNNs, "lora" for transformers.
PAPER_BASELINES: dict[str, str] = {
    "timm:densenet121": "full",
    "timm:efficientnet_b0": "full",
    "timm:vgg16": "full",
    "timm:swin_large_patch4_window7_224": "lora",
    "timm:deit3_large_patch16_224": "lora",
    "timm:vit_large_patch14_clip_224.laion2b": "lora",
}

# The paper's code's LoRA on timm transformers: peft's suffix match on proj, fc1, fc2 (no qkv), which also
# adapts the Conv2d patch_embed.proj of ViTs and Swin.
PAPER_TIMM_LORA = LoraSpec(targets=("proj", "fc1", "fc2"), linear_only=False)

# open_clip LoRA targets -> their timm counterparts (timm's Attention.qkv / .proj, Mlp.fc1 / .fc2);
# other names pass through, so a LoraSpec written with timm names is used as is.
TIMM_LORA_TARGETS = {"attn": ("qkv", "proj"), "c_fc": ("fc1",), "c_proj": ("fc2",)}


def is_timm_name(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def is_known_model(name: str) -> bool:
    """Whether `build_model` accepts `name`: an open_clip config name (`fetalclip`, ...) or `timm:` and a
    timm architecture, optionally with one of its pretrained tags (`timm:vit_large_patch14_clip_224.laion2b`)."""
    if not is_timm_name(name):
        return open_clip.get_model_config(name) is not None
    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        return False
    try:
        timm.models.get_pretrained_cfg(arch)  # raises for a tag the architecture does not have
    except RuntimeError:
        return False
    return True


def check_model_name(name: str) -> None:
    """ValueError saying which names are accepted, unless `is_known_model(name)`."""
    if not is_known_model(name):
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODEL_NAMES)} (or another open_clip ViT "
                         f"config), or 'timm:<arch>[.<tag>]' for a timm architecture, such as the paper's "
                         f"baselines {', '.join(PAPER_BASELINES)}")


def create_timm_encoder(name: str) -> nn.Module:
    """A randomly initialised timm model without its classifier (`num_classes=0`: it returns pooled
    features (N, `feature_dim`)), float32, CPU, train mode. The caller owns the RNG."""
    check_model_name(name)
    return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=0)


def feature_dim(encoder: nn.Module) -> int:
    """Width of the pooled features (`head_hidden_size`: 4096 for VGG's fc7, else `num_features`)."""
    return int(getattr(encoder, "head_hidden_size", None) or encoder.num_features)


def timm_preprocess_spec(encoder: nn.Module) -> PreprocessSpec:
    """Mean, std and input size from `timm.data.resolve_data_config` (the pretrained tag's config); timm's
    centre crop and interpolation are not used: frames are padded and resized as for FetalCLIP."""
    cfg = timm.data.resolve_data_config({}, model=encoder)
    _, height, width = cfg["input_size"]
    if height != width:
        raise ValueError(f"fetaliqa needs a square input size, timm model has {height} x {width}")
    return PreprocessSpec(image_size=int(height), mean=tuple(float(m) for m in cfg["mean"]),
                          std=tuple(float(s) for s in cfg["std"]))


def load_timm_weights(encoder: nn.Module, url: str, storage_options: StorageOptions = None) -> None:
    """Load a timm state dict (what `timm.create_model(name, pretrained=True).state_dict()` holds, as a
    .safetensors or torch file) into `encoder`, through the same reader and key check as FetalCLIP's.

    The classifier's keys (the pretrained config's `classifier`: `head.*`, `classifier.*`, ...) are
    dropped: fetaliqa puts its own head on the features. Any other mismatch: WeightsError naming keys.
    """
    state = tower_state(read_state_dict(url, storage_options), url)
    expected = encoder.state_dict()
    classifiers = encoder.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    state = {k: v for k, v in state.items()
             if k in expected or not any(k.startswith(c + ".") for c in classifiers)}
    load_state_checked(encoder, state, url, f"timm model {encoder.pretrained_cfg.get('architecture')!r}")


def has_attention(encoder: nn.Module) -> bool:
    """Whether a timm model is a transformer (has attention `qkv` Linear layers): the paper trains those
    with LoRA and fully fine-tunes the others (CNNs)."""
    return any(isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] == "qkv" for n, m in encoder.named_modules())


def timm_lora_targets(spec: LoraSpec) -> tuple[str, ...]:
    """`spec.targets` in timm's names: `attn` -> qkv, proj; `c_fc` -> fc1; `c_proj` -> fc2."""
    out: list[str] = []
    for target in spec.targets:
        out += [t for t in TIMM_LORA_TARGETS.get(target, (target,)) if t not in out]
    return tuple(out)


def inject_timm_lora(encoder: nn.Module, spec: LoraSpec, name: str) -> LoraSpec:
    """Freeze `encoder` and put LoRA on its layers named (last component) as the targets; returns the spec
    with timm target names, as recorded in checkpoints. With `spec.linear_only` (the default) only nn.Linear
    is adapted and a ViT's `patch_embed.proj` (a Conv2d) keeps its pretrained weights; without it, every
    layer so named (the paper's code). ValueError if nothing matches."""
    targets = timm_lora_targets(spec)
    modules = [n for n, m in encoder.named_modules() if n.rsplit(".", 1)[-1] in targets
               and (isinstance(m, nn.Linear) or (not spec.linear_only and isinstance(m, (nn.Linear, nn.Conv2d))))]
    if not modules:
        raise ValueError(f"{name}: no Linear layer named {', '.join(targets)} to put LoRA on; train this "
                         "encoder with trainable='full' (the paper's recipe for CNNs) or 'linear'")
    inject_lora(encoder, spec, target_modules=modules)
    return dataclasses.replace(spec, targets=targets)


# ---------------------------------------------------------------------------------------------------
# SEG: patch tokens of plain timm ViTs (ViT, DeiT-III, CLIP ViT); Swin and CNNs have no single token grid


def timm_vit_depth(encoder: nn.Module) -> int | None:
    """Number of blocks of a timm ViT, None for any other timm model."""
    return len(encoder.blocks) if isinstance(encoder, TimmViT) else None


def timm_seg_geometry(encoder: nn.Module, name: str) -> tuple[int, int]:
    """(token width, image size) for the SEG decoder; ValueError unless a timm ViT with a square grid."""
    if not isinstance(encoder, TimmViT) or encoder.patch_embed is None:
        raise ValueError(f"SEG needs a ViT encoder with patch tokens: {name} is {type(encoder).__name__}, "
                         "which has none; use task='cls', a timm ViT (vit_*, deit3_*) or fetalclip")
    height, width = encoder.patch_embed.img_size
    if height != width:
        raise ValueError(f"SEG needs a square input, {name} takes {height} x {width}")
    return int(encoder.embed_dim), int(height)


def timm_block_tokens(encoder: nn.Module, images: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """Patch tokens (N, D, g, g) after the 0-based blocks `indices` (sorted), one pass, no prefix tokens."""
    return encoder.forward_intermediates(images, indices=indices, stop_early=True, intermediates_only=True,
                                         output_fmt="NCHW")


def timm_config(encoder: nn.Module) -> dict[str, object]:
    """What `model_info` reports of a timm encoder: architecture, pretrained tag, feature width."""
    cfg = encoder.pretrained_cfg
    return {"architecture": cfg.get("architecture"), "tag": cfg.get("tag"), "feature_dim": feature_dim(encoder)}
