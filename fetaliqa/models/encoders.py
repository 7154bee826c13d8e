"""Image towers by name: open_clip configs, pretrained weights, LoRA, preprocessing.

This is the one place that touches open_clip's and peft's internals (timm's are in `baselines.py`, which
reuses the weight reader and LoRA injection here). A model name is the name of a
config under `fetaliqa/model_configs/` (or any open_clip ViT config); the factory keeps only the image
tower (`open_clip.transformer.VisionTransformer`) and drops the text tower.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from peft import LoraConfig, inject_adapter_in_model

from fetaliqa.errors import InputError, WeightsError
from fetaliqa.inputs.storage import StorageOptions, local_copy
from fetaliqa.preprocess import resize_by

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # once, at import: `fetalclip` and `fetalclip-tiny` by name

MODEL_NAMES: tuple[str, ...] = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))

# Blocks whose patch tokens feed the SEG decoder, 1-based, for a 24-block tower (the paper's choice).
SEG_BLOCKS_OF_24 = (6, 8, 12, 24)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """LoRA placement and size. `targets` are module names: `attn` (nn.MultiheadAttention: q, k, v via
    in_proj and out_proj), `c_fc` and `c_proj` (the MLP's Linear layers). `linear_only` (timm encoders):
    adapt only nn.Linear layers named as a target (fetaliqa's placement); False: any layer peft adapts whose
    name ends in a target, as peft's own suffix match does (the paper's code, whose `proj` also caught the
    Conv2d `patch_embed.proj`). Written to checkpoints only when False, so older checkpoints read as before."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    targets: tuple[str, ...] = ("attn", "c_fc", "c_proj")
    linear_only: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}
        return out if self.linear_only else out | {"linear_only": False}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraSpec:
        return cls(r=int(d["r"]), alpha=int(d["alpha"]), dropout=float(d["dropout"]), targets=tuple(d["targets"]),
                   linear_only=bool(d.get("linear_only", True)))


# The paper's code's LoRA on FetalCLIP: c_fc, c_proj and out_proj, not the attention module. MHA reads
# out_proj.weight directly, so the out_proj adapters (393,216 of its 2,359,296) never change the output.
PAPER_FETALCLIP_LORA = LoraSpec(targets=("c_fc", "c_proj", "out_proj"))


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How a frame becomes the model's input: pad to a square (`pad`), resize to `image_size` with
    `interpolation`, gray to 3 channels, then (x / 255 - mean) / std per channel.

    `interpolation` names the resize the model was trained on, a key of `fetaliqa.preprocess.RESIZES`; the
    training recipe sets it ("bicubic" unless `--recipe paper`) and scoring applies it. A model config's
    own interpolation (open_clip's, timm's) is not used: fetaliqa resizes the frames of every model alike.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    pad: str = "centre-zero"

    def __post_init__(self):
        resize_by(self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "pad": self.pad}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        return cls(image_size=int(d["image_size"]), mean=tuple(map(float, d["mean"])),
                   std=tuple(map(float, d["std"])), interpolation=str(d["interpolation"]), pad=str(d["pad"]))


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config dict of `name`; ValueError naming the known models if there is none."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model {name!r}; fetaliqa models: {', '.join(MODEL_NAMES)}")
    return cfg


def create_image_tower(name: str) -> VisionTransformer:
    """A randomly initialised image tower of the named open_clip model (float32, CPU, train mode).

    The caller owns the RNG (see `build_model`, which seeds it). The text tower is built by open_clip and
    dropped at once.
    """
    model_config(name)  # a clear error for an unknown name before open_clip's own
    with _quiet_open_clip():
        clip = open_clip.create_model(name, pretrained=None, device="cpu")
    visual = clip.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"model {name!r}: image tower is {type(visual).__name__}, fetaliqa needs an open_clip ViT")
    return visual


def preprocess_spec(visual: VisionTransformer) -> PreprocessSpec:
    """The tower's preprocessing: mean and std as open_clip set them (OPENAI's unless configured)."""
    cfg = getattr(visual, "preprocess_cfg", {})
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    mean = tuple(float(m) for m in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(s) for s in cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return PreprocessSpec(image_size=int(size), mean=mean, std=std)


def seg_block_indices(depth: int) -> list[int]:
    """1-based indices of the blocks that feed the SEG decoder: [6, 8, 12, 24] for depth 24, scaled
    as round(i * depth / 24) (at least 1) for other depths; repeats are possible for shallow towers."""
    return [max(1, round(i * depth / 24)) for i in SEG_BLOCKS_OF_24]


# ---------------------------------------------------------------------------------------------------
# Pretrained weights


def load_tower_weights(visual: VisionTransformer, url: str, storage_options: StorageOptions = None) -> None:
    """Load an open_clip state dict (full CLIP with `visual.*` keys, or image tower only) into `visual`.

    Reads `.safetensors` with safetensors and anything else with `torch.load(weights_only=True)`, so a
    file can never run code. Every key of the tower must be present with its shape and no other
    `visual.*` key may appear (text-tower keys are ignored); otherwise WeightsError naming keys and file.
    """
    state = tower_state(read_state_dict(url, storage_options), url)
    load_state_checked(visual, state, url, "the image tower")


def load_state_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], url: str, what: str) -> None:
    """`module.load_state_dict(state, strict=True)` after `state_problems`: WeightsError (one line naming
    `url` and `what`) listing missing keys, unexpected keys and wrong shapes."""
    problems = state_problems(module.state_dict(), state, "keys")
    if problems:
        raise WeightsError(f"{url}: weights do not fit {what} ({'; '.join(problems)})")
    module.load_state_dict(state, strict=True)


def state_problems(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], noun: str) -> list[str]:
    """What keeps `given` from loading as exactly `expected` (both name -> tensor): missing `noun`,
    unexpected `noun` and wrong shapes, each a short text naming a few; [] when they fit. The one key and
    shape check of pretrained weights (here) and of checkpoints (`checkpoint.py`)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k} {tuple(given[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in given and tuple(given[k].shape) != tuple(v.shape)]
    return [f"{label}: {some_items(keys)}" for label, keys in
            ((f"missing {noun}", missing), (f"unexpected {noun}", unexpected), ("wrong shapes", wrong)) if keys]


def read_state_dict(url: str, storage_options: StorageOptions) -> dict[str, Any]:
    """The raw mapping stored at `url`; WeightsError naming `url` if it cannot be read safely."""
    try:
        with local_copy(url, storage_options) as path:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                obj = load_file(path, device="cpu")
            else:
                obj = _torch_load(path)
    except InputError as err:
        raise WeightsError(f"{url}: {err.problem}") from err
    except pickle.UnpicklingError as err:
        # torch's own text suggests weights_only=False; fetaliqa never does that, so keep only the cause.
        cause = re.search(r"(unsupported GLOBAL \S+|Unsupported global: \S+|Unsupported operand \S+)", str(err))
        detail = f" ({cause.group(1)})" if cause else ""
        raise WeightsError(f"{url}: refused by torch.load(weights_only=True): not a plain state dict of "
                           f"tensors{detail}") from err
    except Exception as err:  # noqa: BLE001 - zipfile, safetensors and OS errors all mean "unreadable"
        message = f"{url}: not a readable weights file ({type(err).__name__}: {err})"
        raise WeightsError(" ".join(message.split())) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a training checkpoint that wraps the state dict, as open_clip accepts
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{url}: not a state dict (found {type(obj).__name__})")
    return dict(obj)


def _torch_load(path: str) -> Any:
    # weights_only=True: a pickle may hold only tensors and plain containers; anything else is refused,
    # never executed. mmap avoids a second in-memory copy of a 1.7 GB CLIP file.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def tower_state(state: dict[str, Any], url: str) -> dict[str, torch.Tensor]:
    """The image-tower part of a state dict: `visual.*` keys without the prefix, or all keys if none has
    it; a `module.` prefix (DDP) is dropped first."""
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{url}: values that are not tensors: {some_items(not_tensors)}")
    return state


def some_items(items: list[str], n: int = 5) -> str:
    """At most `n` items joined, and how many more: error messages stay one readable line."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ---------------------------------------------------------------------------------------------------
# LoRA


def inject_lora(visual: torch.nn.Module, spec: LoraSpec, target_modules: list[str] | None = None) -> None:
    """Freeze `visual` and add LoRA adapters in place (B = 0, so the output is unchanged until trained).

    Targeting `attn` (nn.MultiheadAttention) adapts in_proj (q, k, v) and out_proj together: MHA reads
    `out_proj.weight` directly, so a LoRA on `out_proj` alone would never change the output.
    `target_modules`: full module names to adapt instead of peft's suffix match on `spec.targets`.
    """
    visual.requires_grad_(False)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                        target_modules=target_modules or list(spec.targets))
    inject_adapter_in_model(config, visual)
    for name, param in visual.named_parameters():
        param.requires_grad_(is_lora_key(name))


def is_lora_key(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to a LoRA adapter."""
    return ".lora_" in name or name.startswith("lora_")


def merge_lora(visual: torch.nn.Module) -> None:
    """Fold every LoRA update into its base weight and remove the adapters, in place.

    peft's MultiheadAttention LoRA merges before and unmerges after every forward (W + d - d), which
    drifts the frozen weights by rounding, badly so in bf16; inference should merge once instead.
    """
    from peft.tuners.lora import LoraLayer

    tops: list[str] = []
    for name, module in visual.named_modules():
        if isinstance(module, LoraLayer) and not any(name.startswith(t + ".") for t in tops):
            tops.append(name)  # nested layers (MHA's out_proj) are merged by their parent
    for name in tops:
        parent_name, _, child_name = name.rpartition(".")
        parent = visual.get_submodule(parent_name)
        layer = getattr(parent, child_name)
        if hasattr(layer, "unload_and_optionally_merge_module"):  # MultiheadAttention
            base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        else:
            layer.merge()
            base = layer.get_base_layer()
        setattr(parent, child_name, base)


# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning: fetaliqa loads
    weights itself, after creation, so the warning would be wrong in every log."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
