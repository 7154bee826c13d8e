"""The scoring step that needs torch: `ScoreFrames`, the Ray Data actor that holds a checkpoint's model."""

from __future__ import annotations

import os

import numpy as np

from fetaliqa.inference import FrameModel
from fetaliqa.storage import StorageOptions

# Fault injection for tests: when set to a path that does not exist yet, the predictor creates it and
# kills its own process in the middle of a batch (received, not yet returned), once, so a test can see Ray
# replace the actor.
KILL_ONCE_ENV = "FETALIQA_FAULT_KILL_PREDICTOR_ONCE"


class ScoreFrames:
    """Holds the model (one per Ray actor) and scores the frames of each case of a batch.

    Input batch: `read_case_row`'s columns, one entry per case, `images` (T, S, S) uint8 each. Output: the
    same without `images`, plus `scores` (T,) float32 in [0, 1] and, for SEG, `masks` (T, S*S/8) uint8:
    each frame's (S, S) mask (p > 0.5) bit-packed as by `np.packbits` (on the model's device), 8x smaller
    on its way to `summarise_cases`. The frames of all cases of a batch are scored end to end in
    micro-batches of `batch_size` (None: 256 on a GPU, 32 on CPU, resolved on the actor, whose device the
    driver may not have); see `FrameModel` for the one copy to the device and back per batch.
    A plain callable: it scores a dict of numpy arrays without Ray.
    """

    def __init__(self, checkpoint: str, batch_size: int | None = None, storage_options: StorageOptions = None):
        self.model = FrameModel(checkpoint, storage_options, batch_size=batch_size)
        self.task = self.model.task

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _maybe_die_once()
        images = [np.asarray(case) for case in batch["images"]]
        lengths = [len(case) for case in images]
        scores, masks = self.model(images or [np.zeros((0, 1, 1), np.uint8)], packed_masks=True)
        bounds = np.cumsum(lengths)[:-1]
        out = {key: value for key, value in batch.items() if key != "images"}
        out["scores"] = _ragged(np.split(scores, bounds))
        if self.task == "seg":
            out["masks"] = _ragged(np.split(masks, bounds))
        return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array of per-case arrays, so cases with different T share one column."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _maybe_die_once() -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
