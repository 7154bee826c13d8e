"""The IQA model: an image encoder (FetalCLIP's tower or a timm baseline) with a CLS or SEG head, built
by one factory, in one of three training modes (`TRAINABLE`): LoRA, linear probe, full fine-tuning.

Images are (N, 3, S, S) float32, already preprocessed per the `PreprocessSpec` that `build_model`
returns with the model (S = 224 for the fetalclip models and the paper's baselines).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from fetaliqa.models.baselines import (
    PAPER_TIMM_LORA,
    check_model_name,
    create_timm_encoder,
    feature_dim,
    has_attention,
    inject_timm_lora,
    is_timm_name,
    load_timm_weights,
    timm_block_tokens,
    timm_config,
    timm_preprocess_spec,
    timm_seg_geometry,
    timm_vit_depth,
)
from fetaliqa.models.encoders import (
    PAPER_FETALCLIP_LORA,
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
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.models.heads import UnetrDecoder
from fetaliqa.models.paper_unetr import PAPER_BASE_FILTERS, PaperUnetrDecoder

TASKS = ("cls", "seg")
# "lora": frozen encoder + LoRA + head; "linear": frozen encoder + head; "full": everything trains.
TRAINABLE = ("lora", "linear", "full")
# CLS: p >= 0.5. SEG: the score is the mask's area fraction; positive above 1% of the image (ARCHITECTURE.md).
DEFAULT_THRESHOLD = {"cls": 0.5, "seg": 0.01}
# SEG decoder base width: UNETR's feature_size 16 for the full model (2.2M decoder parameters);
# 8 for the tiny one, whose full-resolution convolutions would otherwise cost more than its encoder.
DECODER_CHANNELS = {"fetalclip": 16, "fetalclip-tiny": 8}
# SEG decoders: fetaliqa's UNETR (`heads.UnetrDecoder`; the encoder trains as its mode says) or the paper's
# (`paper_unetr.PaperUnetrDecoder`; the encoder runs under no_grad, as in the paper's code: only the decoder trains).
DECODERS = ("fetaliqa", "paper")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture and frozen weights (goes into checkpoints)."""

    name: str
    task: str
    lora: LoraSpec | None
    seed: int
    weights: str | None  # pretrained image-tower weights it was built from; None: random init (seeded)
    decoder_channels: int | None  # SEG only: base width (fetaliqa) or base filters (paper)
    # One of TRAINABLE as built; None only in a spec read from a checkpoint older than the field, which
    # build_model resolves as it always did (LoRA if `lora` is set, else linear).
    trainable: str | None = None
    # SEG: one of DECODERS (a checkpoint older than the field reads as "fetaliqa"); CLS: None.
    decoder: str | None = None

    @property
    def encoder_trains(self) -> bool:
        """Whether any encoder parameter (LoRA or its own) trains. The paper's SEG model runs the encoder
        under no_grad, so its mode's LoRA (or, in "full", the whole encoder) is built, and counted by the
        paper's code as trainable, but never trained."""
        return self.decoder != "paper" and (self.trainable == "full" or self.lora is not None)


class IQAModel(nn.Module):
    """Frame quality model. `encoder`: open_clip VisionTransformer or timm model (`num_classes=0`), frozen
    with LoRA adapters, frozen, or trainable per `spec.trainable` (frozen whatever the mode under the paper's
    SEG decoder); `head`: nn.Linear(features, 1) for CLS, `UnetrDecoder` or `PaperUnetrDecoder` for SEG (ViT
    encoders only)."""

    def __init__(self, spec: ModelSpec, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.spec = spec
        self.name, self.task = spec.name, spec.task
        self.encoder = encoder
        self.head = head
        self.merged = False
        depth = _vit_depth(encoder)  # None for encoders without one token grid (CNNs, Swin): CLS only
        self.seg_blocks = seg_block_indices(depth) if depth else []  # 1-based
        self._take = sorted({i - 1 for i in self.seg_blocks})  # 0-based, unique, for forward_intermediates

    def train(self, mode: bool = True) -> IQAModel:
        """As nn.Module.train, except that a frozen encoder's BatchNorm layers stay in eval mode: their
        running statistics are part of the frozen weights (and not in an adapter-only checkpoint)."""
        super().train(mode)
        if mode and self.spec.trainable != "full":
            for module in self.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) float -> CLS: logits (N,) in the head's dtype; SEG: mask logits (N, 1, S, S)."""
        # A linear probe (no LoRA), a merged model and the paper's SEG model need no graph through the encoder.
        adapted = self.spec.encoder_trains and not self.merged
        with torch.set_grad_enabled(torch.is_grad_enabled() and adapted):
            if self.task == "cls":
                features = self.encoder(images)  # (N, embed_dim): pooled CLS token, projected
            else:
                features = self._block_tokens(images)
        if self.task == "cls":  # in the head's dtype: FrameModel keeps a float32 head on a reduced-precision encoder
            return self.head(features.to(self.head.weight.dtype)).squeeze(1)
        return self.head(images, features)

    def _block_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens (N, D, g, g) of the blocks in `seg_blocks`, in that order, from one encoder pass."""
        if isinstance(self.encoder, VisionTransformer):
            out = self.encoder.forward_intermediates(images, indices=self._take, stop_early=True,
                                                     intermediates_only=True, output_fmt="NCHW")
            out = out["image_intermediates"]
        else:
            out = timm_block_tokens(self.encoder, images, self._take)
        by_block = dict(zip(self._take, out))
        return [by_block[i - 1] for i in self.seg_blocks]

    def frame_scores(self, output: torch.Tensor) -> torch.Tensor:
        """Model output -> (N,) float32 score in [0, 1]: CLS sigmoid(logit); SEG fraction of pixels with
        p > 0.5 (logit > 0). Compare with `DEFAULT_THRESHOLD[task]` or a checkpoint's threshold."""
        if self.task == "cls":
            return torch.sigmoid(output.float())
        return (output > 0).flatten(1).float().mean(dim=1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimizer should see: LoRA adapters and head, the head alone, or everything (per mode)."""
        return [p for p in self.parameters() if p.requires_grad]

    def merge_adapters(self) -> IQAModel:
        """Fold LoRA into the encoder weights for inference (faster; no per-forward merge drift, which peft's
        MultiheadAttention LoRA has). Irreversible: a merged model can be scored but not saved or trained.
        A model without LoRA ("linear", "full") is returned unchanged and stays savable and trainable."""
        if self.spec.lora is None:
            return self
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
    trainable: str | None = None,
    decoder: str | None = None,
) -> tuple[IQAModel, PreprocessSpec]:
    """Build the named model for `task` ("cls" or "seg") in train mode, float32, on CPU.

    `name`: an open_clip config (`fetalclip`, `fetalclip-tiny`) or `timm:<arch>[.<tag>]` (see
    `is_known_model`, `PAPER_BASELINES`). `weights`: path or fsspec URL of the encoder's state dict (open_clip
    or timm format; None: random init). `trainable`: "lora" (frozen encoder + LoRA per `lora` + head),
    "linear" (frozen encoder + head), "full" (every parameter trains); None: the paper's recipe, i.e.
    "linear" if `lora` is None, else "full" for timm CNNs and "lora" for transformers. In timm models
    LoRA's open_clip target names are translated (attn -> qkv, proj; c_fc -> fc1; c_proj -> fc2).
    `decoder` (SEG only, one of DECODERS; None: "fetaliqa"): with "paper" the encoder is built as `trainable`
    says (its LoRA included) and then frozen, as the paper's forward pass leaves it; `decoder_channels`
    defaults to the paper's 32 filters there, and to `DECODER_CHANNELS` for fetaliqa's decoder.
    All random init (encoder, LoRA A, head) happens under `seed` in a forked RNG, so a model built twice
    with the same arguments is identical and the caller's RNG state is untouched.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if trainable not in (None, *TRAINABLE):
        raise ValueError(f"trainable must be one of {TRAINABLE} (or None: the paper's recipe), got {trainable!r}")
    check_model_name(name)
    timm_model = is_timm_name(name)
    decoder = _resolve_decoder(task, decoder)
    default_channels = PAPER_BASE_FILTERS if decoder == "paper" else DECODER_CHANNELS.get(name, 16)
    decoder_channels = (decoder_channels or default_channels) if task == "seg" else None
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(torch_seed(seed))  # CPU only: leaves CUDA RNG state alone
        encoder = create_timm_encoder(name) if timm_model else create_image_tower(name)
        if weights is not None:
            (load_timm_weights if timm_model else load_tower_weights)(encoder, weights, storage_options)
        mode = _resolve_trainable(encoder, trainable, lora)
        encoder.requires_grad_(mode == "full")
        if task == "seg" and isinstance(encoder, VisionTransformer):
            # SEG reads block tokens only: the pooled output's LayerNorm and projection get no gradient, and
            # DDP fails on trainable parameters that get none. Frozen, they keep their (seeded) init.
            for unused in (encoder.ln_post, getattr(encoder, "attn_pool", None), encoder.proj):
                if unused is not None:
                    unused.requires_grad_(False)
        if mode != "lora":
            lora = None
        elif timm_model:
            lora = inject_timm_lora(encoder, lora, name)
        else:
            inject_lora(encoder, lora)
        if decoder == "paper":
            # The paper's forward pass reads the encoder under no_grad: its LoRA never gets a gradient. Frozen
            # here, so that the optimizer and DDP see the decoder alone.
            encoder.requires_grad_(False)
        head = _make_head(encoder, task, decoder_channels, name, decoder)
    spec = ModelSpec(name=name, task=task, lora=lora, seed=seed, weights=weights, decoder_channels=decoder_channels,
                     trainable=mode, decoder=decoder)
    preprocess = timm_preprocess_spec(encoder) if timm_model else preprocess_spec(encoder)
    return IQAModel(spec, encoder, head), preprocess


def torch_seed(seed: int) -> int:
    """`seed` as torch's generators take it: modulo 2**63. The paper's seed (9872398152123123767126) and the
    trial seeds derived from it do not fit in int64; numpy's generators take them whole, torch's do not."""
    return seed % 2**63


def paper_lora(name: str) -> LoraSpec:
    """The LoRA the paper's code put on `name`'s encoder: c_fc, c_proj, out_proj on open_clip towers;
    proj, fc1, fc2 by peft's suffix match (Conv2d included) on timm models."""
    return PAPER_TIMM_LORA if is_timm_name(name) else PAPER_FETALCLIP_LORA


def default_trainable(name: str) -> str:
    """The mode `build_model(trainable=None)` gives `name` with a LoraSpec: "lora" for transformers, "full"
    for CNNs. Decided without weights or memory (timm models are built on the meta device)."""
    if not is_timm_name(name):
        return "lora"  # open_clip towers here are ViTs
    with torch.device("meta"):
        return "lora" if has_attention(create_timm_encoder(name)) else "full"


def _resolve_trainable(encoder: nn.Module, trainable: str | None, lora: LoraSpec | None) -> str:
    """The training mode `build_model` uses; ValueError where `trainable` and `lora` contradict."""
    if trainable is None:
        if lora is None:
            return "linear"  # lora=None has always meant a linear probe
        transformer = isinstance(encoder, VisionTransformer) or has_attention(encoder)
        trainable = "lora" if transformer else "full"
    if trainable == "lora" and lora is None:
        raise ValueError("trainable='lora' needs a LoraSpec (lora=None)")
    if trainable != "lora" and lora not in (None, LoraSpec()):
        raise ValueError(f"lora={lora} contradicts trainable={trainable!r}, which puts no LoRA on the encoder")
    return trainable


def _resolve_decoder(task: str, decoder: str | None) -> str | None:
    """The SEG decoder `build_model` uses ("fetaliqa" unless named), None for CLS; ValueError otherwise."""
    if task == "cls":
        if decoder is not None:
            raise ValueError(f"decoder={decoder!r}: only SEG has a decoder")
        return None
    if decoder not in (None, *DECODERS):
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    return decoder or "fetaliqa"


def _vit_depth(encoder: nn.Module) -> int | None:
    if isinstance(encoder, VisionTransformer):
        return len(encoder.transformer.resblocks)
    return timm_vit_depth(encoder)


def _make_head(encoder: nn.Module, task: str, decoder_channels: int | None, name: str,
               decoder: str | None) -> nn.Module:
    if task == "cls":
        dim = encoder.output_dim if isinstance(encoder, VisionTransformer) else feature_dim(encoder)
        return nn.Linear(dim, 1)
    if isinstance(encoder, VisionTransformer):
        width = encoder.transformer.width
        size = encoder.image_size[0] if isinstance(encoder.image_size, (tuple, list)) else encoder.image_size
    else:
        width, size = timm_seg_geometry(encoder, name)
    if decoder == "paper":
        return PaperUnetrDecoder(token_dim=width, filters=decoder_channels, image_size=size)
    return UnetrDecoder(token_dim=width, channels=decoder_channels, image_size=size)


def model_info(
    name: str,
    task: str = "cls",
    lora: LoraSpec | None = LoraSpec(),  # noqa: B008
    *,
    trainable: str | None = None,
    decoder: str | None = None,
) -> dict[str, Any]:
    """Parameter counts and config of a model, built without weights (JSON-serialisable ints and dicts).

    `image_tower_parameters`: the encoder alone (no LoRA, no head). `trainable_parameters`: in the mode
    built (`config["trainable"]`; `trainable=None`: the paper's recipe); `trainable_parameters_by_mode`:
    in each mode (its "lora" is None where the encoder has no LoRA targets, as in a CNN). With the paper's
    SEG decoder (`decoder="paper"`) only the decoder trains in every mode, and
    `counted_trainable_never_trained` gives the encoder parameters the paper's code counted as trainable
    (its LoRA, or the whole encoder in "full") although its no_grad forward pass never trains them.
    """
    # timm models count on the meta device (no memory, no init: VGG-16 or a ViT-L in a second); open_clip
    # moves its model to the CPU explicitly, so FetalCLIP is built for real.
    with torch.device("meta") if is_timm_name(name) else contextlib.nullcontext():
        # `lora` also sizes the "lora" entry of trainable_parameters_by_mode, whatever mode is built
        model, preprocess = build_model(name, task, lora=lora if trainable in (None, "lora") else None,
                                        trainable=trainable, decoder=decoder)
    counts: dict[str, Any] = {"parameters": 0, "trainable_parameters": 0, "image_tower_parameters": 0,
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
    head = counts["head_parameters"]
    lora_count = _lora_parameter_count(model, lora) if model.spec.lora is None else counts["lora_parameters"]
    counts["trainable_parameters_by_mode"] = {"lora": None if lora_count is None else lora_count + head,
                                              "linear": head, "full": counts["image_tower_parameters"] + head}
    if model.spec.decoder == "paper":
        counts |= _never_trained(counts, model.spec.trainable, lora_count)
    config = {"model": name, "task": task, "trainable": model.spec.trainable,
              "lora": model.spec.lora.to_dict() if model.spec.lora else None, "preprocess": preprocess.to_dict()}
    config |= {"timm": timm_config(model.encoder)} if is_timm_name(name) else {"open_clip": model_config(name)}
    if task == "seg":
        config |= {"decoder": model.spec.decoder, "decoder_channels": model.spec.decoder_channels,
                   "seg_blocks": model.seg_blocks}
    return counts | {"config": config}


def _never_trained(counts: dict[str, Any], mode: str, lora_count: int | None) -> dict[str, Any]:
    """model_info's entries for the paper's SEG model: the decoder alone trains in every mode, and what
    the paper's code counted as trainable (requires_grad) in `mode` without ever training it."""
    head = counts["head_parameters"]
    by_mode = {"lora": None if lora_count is None else head, "linear": head, "full": head}
    never = {"lora": counts["lora_parameters"], "linear": 0, "full": counts["image_tower_parameters"]}[mode]
    note = (f"the paper's SEG decoder trains alone ({head:,} parameters): the paper's code runs the encoder "
            "under no_grad")
    if never:
        what = "its LoRA adapters" if mode == "lora" else "the whole encoder"
        note += (f", so {what} ({never:,} parameters), counted as trainable by the paper's code, never received a "
                 "gradient; fetaliqa freezes them")
    return {"trainable_parameters_by_mode": by_mode, "counted_trainable_never_trained": never, "note": note}


def _lora_parameter_count(model: IQAModel, lora: LoraSpec | None) -> int | None:
    """LoRA parameters that `lora` (default LoraSpec()) would add to `model`'s encoder; None if it has no
    targets. Counted on the meta device: this empties `model`'s encoder, so call it on a throwaway model."""
    encoder = model.encoder.to("meta")
    try:
        if is_timm_name(model.name):
            inject_timm_lora(encoder, lora or LoraSpec(), model.name)
        else:
            inject_lora(encoder, lora or LoraSpec())
    except ValueError:
        return None
    return sum(p.numel() for key, p in encoder.named_parameters() if is_lora_key(key))
