"""A checkpoint's model ready to score frames: the one forward path of scoring (`fetaliqa.score.predict`)
and of training's evaluation, and where it runs.

Device: `scoring_device` is the one place scoring picks one. CUDA only where Ray gave this worker a GPU
(`ray.get_gpu_ids()`) or the caller names a device, never merely because the node has one: a CPU actor
(`score --num-gpus-per-actor 0`) or training's evaluation without `--use-gpu` on a GPU node would otherwise
load a model onto GPU 0 beside the actors that reserved it. Precision: `inference_dtype`. Ray Train workers
take theirs from `ray.train.torch.get_device()` (`fetaliqa.training.loop`): CPU unless `--use-gpu`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.models import load_checkpoint
from fetaliqa.models.normalize import fold_normalization, normalize_frames

# Frames per forward pass when none is given. On one H200, FetalCLIP CLS ran 20% faster at 256 than at 32
# (ARCHITECTURE.md section 6); on CPU a larger batch gains nothing and holds more memory.
DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 32}


# bf16 has native tensor-core support from compute capability 8.0 (Ampere) on; older GPUs emulate it slowly.
BF16_CAPABILITY = (8, 0)
# float16 tensor cores arrive with 7.0 (Volta, Turing); Pascal and older run float16 at a fraction of float32's
# rate, or no faster (sm 6.1: 1/64), so float32 is the better choice there.
FLOAT16_CAPABILITY = (7, 0)

log = logging.getLogger("fetaliqa")


def default_batch_size(device: torch.device) -> int:
    """Frames per forward pass on `device`: 256 on a GPU, 32 elsewhere."""
    return DEFAULT_BATCH_SIZE["cuda" if device.type == "cuda" else "cpu"]


def scoring_device(device: str | torch.device | None = None) -> torch.device:
    """The device this process scores on: `device` when the caller names one; else the first GPU Ray assigned
    this worker when torch sees CUDA (`device_for_ray_gpus`); else the CPU. Outside a Ray task or actor
    nothing is assigned: the CPU (pass `device` to use a GPU there, as `benchmarks/gpu_throughput.py` does)."""
    if device is not None:
        return torch.device(device)
    # Never imported here: scoring also runs where Ray is absent (the GPU benchmark on a bare machine). In a
    # Ray worker it is imported already; in a driver get_gpu_ids() is empty.
    ray = sys.modules.get("ray")
    gpu_ids = ray.get_gpu_ids() if ray is not None and ray.is_initialized() else []
    chosen = device_for_ray_gpus(gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available())
    if gpu_ids and chosen.type == "cpu":
        log.warning("Ray assigned GPU %s but torch sees no CUDA device: scoring on the CPU", gpu_ids[0])
    return chosen


def device_for_ray_gpus(gpu_ids: Sequence[int | str], visible_devices: str | None,
                        cuda_available: bool) -> torch.device:
    """The torch device of the first of `gpu_ids` (what `ray.get_gpu_ids()` returns in a worker), given the
    worker's CUDA_VISIBLE_DEVICES and whether torch sees CUDA; the CPU when no GPU was assigned or CUDA is
    unavailable. Ray restricts a GPU worker's CUDA_VISIBLE_DEVICES to its GPUs, so torch numbers them from 0
    in that list's order; with no list (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES) torch's index is Ray's
    id. RuntimeError when the list does not hold the assigned GPU: CUDA_VISIBLE_DEVICES was overridden."""
    if not gpu_ids or not cuda_available:
        return torch.device("cpu")
    first = str(gpu_ids[0])
    visible = [entry.strip() for entry in (visible_devices or "").split(",") if entry.strip()]
    if first in visible:
        return torch.device("cuda", visible.index(first))
    if not visible and first.isdigit():
        return torch.device("cuda", int(first))
    raise RuntimeError(f"Ray assigned GPU {first} but CUDA_VISIBLE_DEVICES={visible_devices!r} does not list it")


def inference_dtype(device_type: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """The weights' dtype for scoring on a device of `device_type` ("cuda", "cpu", ...) whose CUDA compute
    capability is `capability` (major, minor; None off CUDA): bf16 where the GPU has it natively (>= 8.0),
    float16 on Volta and Turing (7.x: float16 tensor cores, and ViT inference in float16 is the common
    practice CLIP's own weights were released for), float32 on older GPUs and everywhere else."""
    if device_type != "cuda" or capability is None:
        return torch.float32
    if tuple(capability) >= BF16_CAPABILITY:
        return torch.bfloat16
    return torch.float16 if tuple(capability) >= FLOAT16_CAPABILITY else torch.float32


class FrameModel:
    """Loads a checkpoint onto a device and scores stacks of preprocessed frames.

    The device is `scoring_device(device)`: a GPU only where Ray assigned one or the caller names it. Adapters
    are merged once: peft's attention LoRA otherwise merges and unmerges on every forward pass, which costs
    time and leaves rounding drift in the frozen weights. The merged model is then cast once to `dtype`
    (default `inference_dtype` of the device: bf16 on GPUs of compute capability >= 8.0, float16 on 7.x,
    float32 elsewhere; on an H200, FetalCLIP CLS ran 1.4x faster in bf16 weights than in float32 weights
    under bf16 autocast); a CPU test passes bf16 to check the tolerance. The CLS head (one linear layer)
    stays float32 and takes the encoder's features cast up: its logits, whose order picks a case's
    best_frame, keep float32 resolution instead of tying in bf16's 8-bit mantissa. The SEG decoder runs in
    `dtype` (its score and masks read only the logits' sign) and in channels_last on CUDA (there, in bf16, it
    took 0.147 ms a frame against 1.70 in NCHW under autocast). None of this changes a parameter's value:
    every checkpoint loads as before. Frames are normalised with the checkpoint's own mean and std in
    float32, then cast to `dtype`, except in CLS ViTs (`folded`): there the normalisation is folded into the
    patch convolution before the cast (`fold_normalization`, exact up to float rounding) and the model takes
    (B, 1, S, S) raw pixel values, because on CPU nodes building the (B, 3, S, S) float tensor was most of a
    small model's predictor time. SEG keeps the 3-channel input, which its decoder also reads, and so do timm
    encoders, whose convolutions pad.

    On CUDA each call makes one host-to-device copy of all its frames (through pinned memory), slices the
    micro-batches on the device, keeps the results there and copies them back once; the constants a
    micro-batch needs (mean, std, mask bit values) are made on the device once, here, so no micro-batch
    waits for a host-to-device copy. Each calling thread has its own CUDA stream, so two concurrent calls (a
    Ray actor with two concurrent calls) overlap one's copies and host work with the other's compute; each
    new stream first waits for an event recorded after the weights' cast and the constants, which ran on
    the constructing thread's stream. Calls share no mutable state: two threads may call at once, on CPU too.
    """

    def __init__(self, checkpoint: str, storage_options: StorageOptions = None, *,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 channels_last: bool | None = None, batch_size: int | None = None):
        self.device = scoring_device(device)
        on_gpu = self.device.type == "cuda"
        capability = torch.cuda.get_device_capability(self.device) if on_gpu else None
        self.dtype = dtype or inference_dtype(self.device.type, capability)
        self.batch_size = batch_size or default_batch_size(self.device)
        self.model, self.meta = load_checkpoint(checkpoint, storage_options=storage_options, device=self.device)
        self.task = self.meta["task"]
        self.channels_last = (on_gpu and self.task == "seg") if channels_last is None else channels_last
        self.model.merge_adapters()
        self.mean, self.std = self.meta["preprocess"]["mean"], self.meta["preprocess"]["std"]
        self.folded = self.task == "cls" and fold_normalization(self.model.encoder, self.mean, self.std)
        self.model.to(self.dtype)  # after merging and folding: both are done at float32
        if self.task == "cls":
            self.model.head.float()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device)
        self._bit_values = mask_bit_values(self.device)
        self._ready = None
        if on_gpu:  # torch's side streams do not wait for the default stream by themselves
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(self.device))
        self._streams = threading.local()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | Sequence[np.ndarray], *,
                 packed_masks: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Score frames in micro-batches of `batch_size`.

        images: (N, S, S) uint8, or a sequence of (T_i, S, S) uint8 stacks scored end to end (N = sum T_i),
        so that micro-batches stay full across small cases. Returns scores (N,) float32 in [0, 1] and, for
        SEG, masks (p > 0.5): (N, S, S) bool, or with `packed_masks` each frame's mask flattened and
        bit-packed as `np.packbits(mask.reshape(N, -1), axis=1)` does, (N, ceil(S*S/8)) uint8.
        """
        with self._stream():
            pixels = self._to_device([images] if isinstance(images, np.ndarray) else [np.asarray(s) for s in images])
            n, side = len(pixels), pixels.shape[-1]
            scores = torch.empty(n, dtype=torch.float32, device=self.device)
            masks = None
            if self.task == "seg":
                shape = (n, (side * side + 7) // 8) if packed_masks else (n, side, side)
                masks = torch.empty(shape, dtype=torch.uint8 if packed_masks else torch.bool, device=self.device)
            for start in range(0, n, self.batch_size):
                chunk = slice(start, start + self.batch_size)
                output = self.model(self.model_input(pixels[chunk]))
                scores[chunk] = self.model.frame_scores(output)
                if masks is not None:
                    positive = output.squeeze(1) > 0  # logit > 0 <=> p > 0.5
                    masks[chunk] = pack_masks(positive, self._bit_values) if packed_masks else positive
            # .cpu() waits for this stream only: one copy back per result.
            return scores.cpu().numpy(), (masks.cpu().numpy() if masks is not None else None)

    def _to_device(self, stacks: list[np.ndarray]) -> torch.Tensor:
        """The stacks end to end as one (N, S, S) uint8 tensor on the device: one copy on CPU (none for a
        single writable array), one into pinned memory and one host-to-device transfer on CUDA."""
        if not stacks or any(s.dtype != np.uint8 or s.ndim != 3 for s in stacks):
            found = ", ".join(f"{s.shape} {s.dtype}" for s in stacks[:3]) or "nothing"
            raise ValueError(f"expected (T, S, S) uint8 stacks, got {found}")
        if self.device.type != "cuda":
            # Ray hands out read-only arrays, which torch.from_numpy warns about: copy those only.
            joined = np.concatenate(stacks) if len(stacks) > 1 else np.require(stacks[0], requirements=["C", "W"])
            return torch.from_numpy(joined).to(self.device)
        n = sum(len(s) for s in stacks)
        host = torch.empty((n, *stacks[0].shape[1:]), dtype=torch.uint8, pin_memory=True)
        np.concatenate(stacks, out=host.numpy())
        # The caching host allocator keeps `host` alive until this copy has run, though it leaves scope.
        return host.to(self.device, non_blocking=True)

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S) uint8 on the device -> in `dtype` and memory format of the model: (B, 1, S, S) pixel
        values 0..255 (exact in bf16 and float16) where `folded`, else (B, 3, S, S) normalised."""
        if self.folded:
            x = pixels.unsqueeze(1).to(self.dtype)
        else:
            x = normalize_frames(pixels, self._mean, self._std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @contextlib.contextmanager
    def _stream(self) -> Iterator[None]:
        """On CUDA, this thread's own stream (created on first use, after the weights are ready); elsewhere
        nothing."""
        if self.device.type != "cuda":
            yield
            return
        if not hasattr(self._streams, "stream"):
            stream = torch.cuda.Stream(self.device)
            stream.wait_event(self._ready)
            self._streams.stream = stream
        with torch.cuda.stream(self._streams.stream):
            yield


def mask_bit_values(device: torch.device) -> torch.Tensor:
    """(8,) uint8 on `device`: the value of each bit of a byte of `pack_masks`, most significant first."""
    return torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)


def pack_masks(masks: torch.Tensor, bit_values: torch.Tensor | None = None) -> torch.Tensor:
    """(N, S, S) bool -> (N, ceil(S*S/8)) uint8 on the same device, each row `np.packbits` of the flattened
    mask (most significant bit first, zero-padded at the end): 8x less to copy back to the host.
    `bit_values`: `mask_bit_values` of that device, made once by a caller that packs often (else here, a
    host-to-device copy on CUDA)."""
    flat = masks.flatten(1).to(torch.uint8)
    pad = -flat.shape[1] % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    if bit_values is None:
        bit_values = mask_bit_values(masks.device)
    return (flat.view(len(flat), -1, 8) * bit_values).sum(-1, dtype=torch.uint8)
