"""The scoring step that needs torch: `ScoreFrames`, the Ray Data actor that holds a checkpoint's model."""

from __future__ import annotations

import os

import numpy as np

from fetaliqa.inference import FrameModel
from fetaliqa.storage import StorageOptions

# Fault injection for tests: when set to a path that does not exist yet, the predictor creates it and
# kills its own process in the middle of a batch, once, so a test can see Ray replace the actor.
KILL_ONCE_ENV = "FETALIQA_FAULT_KILL_PREDICTOR_ONCE"


class ScoreFrames:
    """Holds the model (one per Ray actor) and scores the frames of each case of a batch.

    Input batch: `read_case_row`'s columns, one entry per case, `images` (T, S, S) uint8 each. Output: the
    same without `images`, plus `scores` (T,) float32 in [0, 1] and, for SEG, `masks` (T, S*S/8) uint8:
    each frame's (S, S) mask (p > 0.5) bit-packed by `np.packbits`, 8x smaller on its way to `summarise_cases`.
    A plain callable: it scores a dict of numpy arrays without Ray.
    """

    def __init__(self, checkpoint: str, batch_size: int = 32, storage_options: StorageOptions = None):
        self.model = FrameModel(checkpoint, storage_options)
        self.task = self.model.task
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [np.asarray(case) for case in batch["images"]]
        lengths = [len(case) for case in images]
        scores, masks = self._score_frames(np.concatenate(images) if images else np.zeros((0, 1, 1), np.uint8))
        bounds = np.cumsum(lengths)[:-1]
        out = {key: value for key, value in batch.items() if key != "images"}
        out["scores"] = _ragged(np.split(scores, bounds))
        if self.task == "seg":
            out["masks"] = _ragged([np.packbits(m.reshape(len(m), -1), axis=1) for m in np.split(masks, bounds)])
        return out

    def _score_frames(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """images (N, S, S) uint8, the frames of every case of a batch end to end, so that the micro-batches of
        `batch_size` frames stay full across small cases -> scores (N,) float32 and, for SEG, masks (N, S, S) bool."""
        scores, masks = [np.zeros(0, np.float32)], [np.zeros((0, *images.shape[1:]), bool)]
        for start in range(0, len(images), self.batch_size):
            _maybe_die_once()
            chunk_scores, chunk_masks = self.model(images[start:start + self.batch_size])
            scores.append(chunk_scores)
            if chunk_masks is not None:
                masks.append(chunk_masks)
        return np.concatenate(scores).astype(np.float32), (np.concatenate(masks) if self.task == "seg" else None)


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
