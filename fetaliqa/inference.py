"""A checkpoint's model ready to score frames: the one forward path of scoring (`fetaliqa.score.predict`)
and of training's evaluation."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fetaliqa.models import load_checkpoint
from fetaliqa.models.normalize import fold_normalization, normalize_frames
from fetaliqa.storage import StorageOptions

# Frames per forward pass when none is given. On one H200, FetalCLIP CLS ran 20% faster at 256 than at 32
# (ARCHITECTURE.md section 6); on CPU a larger batch gains nothing and holds more memory.
DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 32}


def default_batch_size(device: torch.device) -> int:
    """Frames per forward pass on `device`: 256 on a GPU, 32 elsewhere."""
    return DEFAULT_BATCH_SIZE["cuda" if device.type == "cuda" else "cpu"]


class FrameModel:
    """Loads a checkpoint onto a device and scores stacks of preprocessed frames.

    Adapters are merged once: peft's attention LoRA otherwise merges and unmerges on every forward pass,
    which costs time and leaves rounding drift in the frozen weights. The merged model is then cast once to
    `dtype`: bf16 on CUDA (on an H200, FetalCLIP CLS ran 1.4x faster in bf16 weights than in float32 weights
    under bf16 autocast), float32 elsewhere; a CPU test passes bf16 to check the tolerance. The SEG decoder
    runs in channels_last on CUDA (there, in bf16, it took 0.147 ms a frame against 1.70 in NCHW under
    autocast). Neither changes a parameter: every checkpoint loads as before. Frames are normalised with the
    checkpoint's own mean and std in float32, then cast to `dtype`, except in CLS ViTs (`folded`): there the
    normalisation is folded into the patch convolution before the cast (`fold_normalization`, exact up to
    float rounding) and the model takes (B, 1, S, S) raw pixel values, because on CPU nodes building the
    (B, 3, S, S) float tensor was most of a small model's predictor time. SEG keeps the 3-channel input,
    which its decoder also reads, and so do timm encoders, whose convolutions pad.

    On CUDA each call makes one host-to-device copy of all its frames (through pinned memory), slices the
    micro-batches on the device, keeps the results there and copies them back once. Each calling thread has
    its own CUDA stream, so two concurrent calls (a Ray actor with two concurrent calls) overlap one's copies
    and host work with the other's compute.
    """

    def __init__(self, checkpoint: str, storage_options: StorageOptions = None, *,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 channels_last: bool | None = None, batch_size: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_gpu = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
        self.batch_size = batch_size or default_batch_size(self.device)
        self.model, self.meta = load_checkpoint(checkpoint, storage_options=storage_options, device=self.device)
        self.task = self.meta["task"]
        self.channels_last = (on_gpu and self.task == "seg") if channels_last is None else channels_last
        self.model.merge_adapters()
        self.mean, self.std = self.meta["preprocess"]["mean"], self.meta["preprocess"]["std"]
        self.folded = self.task == "cls" and fold_normalization(self.model.encoder, self.mean, self.std)
        self.model.to(self.dtype)  # after merging and folding: both are done at float32
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
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
                    masks[chunk] = pack_masks(positive) if packed_masks else positive
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
        values 0..255 (exact in bf16) where `folded`, else (B, 3, S, S) normalised."""
        if self.folded:
            x = pixels.unsqueeze(1).to(self.dtype)
        else:
            x = normalize_frames(pixels, self.mean, self.std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @contextlib.contextmanager
    def _stream(self) -> Iterator[None]:
        """On CUDA, this thread's own stream (created on first use); elsewhere nothing."""
        if self.device.type != "cuda":
            yield
            return
        if not hasattr(self._streams, "stream"):
            self._streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._streams.stream):
            yield


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, S, S) bool -> (N, ceil(S*S/8)) uint8 on the same device, each row `np.packbits` of the flattened
    mask (most significant bit first, zero-padded at the end): 8x less to copy back to the host."""
    flat = masks.flatten(1).to(torch.uint8)
    pad = -flat.shape[1] % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    bit_values = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=masks.device)
    return (flat.view(len(flat), -1, 8) * bit_values).sum(-1, dtype=torch.uint8)
