"""Checkpoints: a folder at any fsspec URL holding `weights.safetensors` and `fetaliqa.json`.

`weights.safetensors` holds the trained tensors only (LoRA adapters and head, incl. the SEG decoder),
plus the encoder when it was trained ("full" mode) or built without pretrained weights: a random init
cannot be trusted to come out the same on another machine or torch version. `fetaliqa.json` says how to
rebuild the rest, including the training mode (`trainable`; absent in older checkpoints, which load as
before: LoRA if `lora` is set, else a linear probe) and, for SEG, the decoder (`decoder`, fetaliqa's or the
paper's; absent in older checkpoints, which hold fetaliqa's). Weights are written first and fetaliqa.json last,
so a folder with fetaliqa.json is complete. Loading never unpickles.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from typing import Any

import torch

import fetaliqa
from fetaliqa.errors import BadUrlError, CheckpointError
from fetaliqa.inputs.storage import StorageOptions, describe_io_error, filesystem, join
from fetaliqa.models.baselines import check_model_name
from fetaliqa.models.encoders import LoraSpec, PreprocessSpec, is_lora_key, state_problems
from fetaliqa.models.iqa import DECODERS, TASKS, TRAINABLE, IQAModel, ModelSpec, build_model

FORMAT_VERSION = 1
META_FILE = "fetaliqa.json"
WEIGHTS_FILE = "weights.safetensors"
_REQUIRED = ("format_version", "checkpoint_id", "model", "task", "lora", "seed", "includes_encoder",
             "threshold", "preprocess")


def save_checkpoint(
    model: IQAModel,
    url: str,
    *,
    threshold: float,
    preprocess: PreprocessSpec,
    metrics: dict | None = None,
    base_weights: str | None = None,
    storage_options: StorageOptions = None,
) -> None:
    """Write `model`'s trained tensors and its description to the folder `url` (created if needed).

    `base_weights`: where the frozen encoder weights can be found at load time (default: the URL the
    model was built from). `metrics`: any JSON-serialisable dict (numpy scalars are converted).
    """
    if model.merged:
        raise ValueError("a model whose adapters were merged cannot be saved; save before merge_adapters()")
    threshold = float(threshold)
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    includes_encoder = model.spec.weights is None or model.spec.trainable == "full"
    tensors = {k: v.detach().cpu().contiguous() for k, v in checkpoint_tensors(model, includes_encoder).items()}
    from safetensors.torch import save

    # One metadata key only: safetensors writes a map in random order, and the id hashes these bytes.
    data = save(tensors, metadata={"format": "pt"})
    meta = _meta(model, threshold, preprocess, metrics, base_weights or model.spec.weights, includes_encoder,
                 checkpoint_id=_digest(data))
    meta_json = json.dumps(meta, indent=2, default=_jsonable).encode()  # fails here, before any write
    fs, root = filesystem(url, storage_options)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join(root, WEIGHTS_FILE), "wb") as f:
        f.write(data)
    with fs.open(join(root, META_FILE), "wb") as f:  # last: its presence marks a complete checkpoint
        f.write(meta_json)


def load_checkpoint(
    url: str,
    storage_options: StorageOptions = None,
    base_weights: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[IQAModel, dict[str, Any]]:
    """Rebuild the model saved at `url` -> (model in eval mode on `device`, the fetaliqa.json dict).

    The frozen encoder comes from the checkpoint itself if it includes it, else from `base_weights`
    (default: the checkpoint's recorded `base_weights`). CheckpointError (one line naming `url`) for a
    missing or corrupt checkpoint or one whose tensors do not fit the model it names; WeightsError for
    unusable base weights.
    """
    meta, tensors = _read_checkpoint(url, storage_options)
    spec = _spec(meta, url)
    weights = None
    if not meta["includes_encoder"]:
        weights = base_weights or meta.get("base_weights")
        if not weights:
            raise CheckpointError(f"{url}: holds adapters only and records no base_weights; pass base_weights="
                                  "(the pretrained image-tower weights it was trained on)")
    model, _ = build_model(spec.name, spec.task, weights, spec.lora, storage_options, spec.seed,
                           decoder_channels=spec.decoder_channels, trainable=spec.trainable, decoder=spec.decoder)
    _load_tensors(model, tensors, meta["includes_encoder"], url)
    return model.to(device).eval(), meta


def load_trained_tensors(model: IQAModel, url: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """Copy the tensors of the checkpoint at `url` into `model`, which is already built as the checkpoint
    describes (training resumes this way); returns the fetaliqa.json dict.

    The same reading and the same key and shape checks as `load_checkpoint`: CheckpointError naming `url`
    for a missing, corrupt or mismatched checkpoint, or one of another model or task.
    """
    meta, tensors = _read_checkpoint(url, storage_options)
    if (meta["model"], meta["task"]) != (model.name, model.task):
        raise CheckpointError(f"{url}: a checkpoint of {meta['model']} {meta['task']}, not {model.name} {model.task}")
    decoder = _spec(meta, url).decoder
    if decoder != model.spec.decoder:
        raise CheckpointError(f"{url}: a checkpoint of {meta['model']} with the {decoder} decoder, not the "
                              f"{model.spec.decoder} one")
    _load_tensors(model, tensors, meta["includes_encoder"], url)
    return meta


def checkpoint_tensors(model: IQAModel, include_encoder: bool) -> dict[str, torch.Tensor]:
    """The state-dict entries a checkpoint stores: LoRA adapters and head, or everything."""
    state = model.state_dict()
    if include_encoder:
        return state
    return {k: v for k, v in state.items() if k.startswith("head.") or is_lora_key(k)}


# ---------------------------------------------------------------------------------------------------
# Writing


def _meta(model: IQAModel, threshold: float, preprocess: PreprocessSpec, metrics: dict | None,
          base_weights: str | None, includes_encoder: bool, checkpoint_id: str) -> dict[str, Any]:
    spec = model.spec
    return {
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "model": spec.name,
        "task": spec.task,
        "lora": spec.lora.to_dict() if spec.lora else None,
        "trainable": spec.trainable,
        "decoder": spec.decoder,
        "decoder_channels": spec.decoder_channels,
        "seed": spec.seed,
        "base_weights": base_weights,
        "includes_encoder": includes_encoder,
        "threshold": threshold,
        "preprocess": preprocess.to_dict(),
        "metrics": metrics or {},
        "fetaliqa_version": fetaliqa.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _digest(data: bytes) -> str:
    """Checkpoint id: the first 16 hex digits of the weights file's sha256."""
    return hashlib.sha256(data).hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy and torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"metrics value of type {type(obj).__name__} is not JSON-serialisable")


# ---------------------------------------------------------------------------------------------------
# Reading


def _read_checkpoint(url: str, storage_options: StorageOptions) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(fetaliqa.json dict, tensors of weights.safetensors on CPU) of the checkpoint folder `url`, the
    weights checked against the recorded checkpoint_id; CheckpointError naming `url` otherwise."""
    try:
        fs, root = filesystem(url, storage_options)
    except BadUrlError as err:
        raise CheckpointError(str(err)) from err
    meta = _parse_meta(_read(fs, join(root, META_FILE), url), url)
    data = _read(fs, join(root, WEIGHTS_FILE), url)
    if _digest(data) != meta["checkpoint_id"]:
        raise CheckpointError(f"{url}: {WEIGHTS_FILE} does not match checkpoint_id {meta['checkpoint_id']} "
                              "(corrupt, truncated or replaced)")
    return meta, _parse_tensors(data, url)


def _read(fs: Any, path: str, url: str) -> bytes:
    name = path.rsplit("/", 1)[-1]
    try:
        return fs.cat_file(path)
    except FileNotFoundError as err:
        raise CheckpointError(f"{url}: no {name} (not a checkpoint folder, or an incomplete one)") from err
    except Exception as err:  # noqa: BLE001 - every backend raises its own types
        raise CheckpointError(f"{url}: cannot read {name} ({describe_io_error(path, err).problem})") from err


def _parse_meta(data: bytes, url: str) -> dict[str, Any]:
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{url}: {META_FILE} is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{url}: {META_FILE} is not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{url}: format_version {meta.get('format_version')!r} is not supported "
                              f"(this fetaliqa reads {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{url}: {META_FILE} lacks {', '.join(missing)}")
    return meta


def _spec(meta: dict[str, Any], url: str) -> ModelSpec:
    """The ModelSpec recorded in `meta`, validated; CheckpointError naming `url` otherwise."""
    try:
        check_model_name(meta["model"])
        if meta["task"] not in TASKS:
            raise ValueError(f"unknown task {meta['task']!r}")
        if not isinstance(meta["includes_encoder"], bool):
            raise TypeError("includes_encoder is not a boolean")
        trainable = meta.get("trainable")  # absent before training modes: resolved from `lora` as then
        if trainable is not None and trainable not in TRAINABLE:
            raise ValueError(f"unknown trainable {trainable!r}")
        if trainable == "full" and not meta["includes_encoder"]:
            raise ValueError("a fully fine-tuned model must include its encoder")
        PreprocessSpec.from_dict(meta["preprocess"])
        lora = LoraSpec.from_dict(meta["lora"]) if meta["lora"] is not None else None
        channels = meta.get("decoder_channels")
        spec = ModelSpec(name=meta["model"], task=meta["task"], lora=lora, seed=int(meta["seed"]),
                         weights=meta.get("base_weights"),
                         decoder_channels=int(channels) if channels is not None else None, trainable=trainable,
                         decoder=_decoder(meta))
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{url}: {META_FILE} describes no buildable model ({err})") from err
    return spec


def _decoder(meta: dict[str, Any]) -> str | None:
    """The recorded SEG decoder ("fetaliqa" where a checkpoint predates the field), None for CLS;
    ValueError for an unknown one or a CLS checkpoint that names one."""
    decoder = meta.get("decoder")
    if meta["task"] == "cls":
        if decoder is not None:
            raise ValueError(f"a CLS model has no decoder, got {decoder!r}")
        return None
    if decoder not in (None, *DECODERS):
        raise ValueError(f"unknown decoder {decoder!r}")
    return decoder or "fetaliqa"


def _parse_tensors(data: bytes, url: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends
        raise CheckpointError(f"{url}: {WEIGHTS_FILE} is not a valid safetensors file ({err})") from err


def _load_tensors(model: IQAModel, tensors: dict[str, torch.Tensor], includes_encoder: bool, url: str) -> None:
    """Copy `tensors` into `model` after checking that keys and shapes match exactly (`state_problems`)."""
    problems = state_problems(checkpoint_tensors(model, includes_encoder), tensors, "tensors")
    if problems:
        raise CheckpointError(f"{url}: {WEIGHTS_FILE} does not fit model {model.name!r} ({'; '.join(problems)})")
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above
