"""The scoring step that needs torch: `ScoreFrames`, the Ray Data actor that holds a checkpoint's model."""

from __future__ import annotations

import json
import os
import sys
import threading

import numpy as np

from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.models.frame_model import FrameModel

# Fault injection for tests: when set to a path that does not exist yet, the predictor creates it and
# kills its own process in the middle of a batch (received, not yet returned), once, so a test can see Ray
# replace the actor.
KILL_ONCE_ENV = "FETALIQA_FAULT_KILL_PREDICTOR_ONCE"
# Test hook: when set to a folder, the first two calls of each predictor wait for each other (at most
# `MEETING_SECONDS`) and every call writes a JSON record there (process, thread, whether it met the other
# call, Ray's GPU ids, the model's device and dtype), so a test can see one actor run two calls at once on
# two threads, and where it scored.
CALL_LOG_ENV = "FETALIQA_TEST_PREDICTOR_CALL_LOG"
MEETING_SECONDS = 120


class ScoreFrames:
    """Holds the model (one per Ray actor) and scores the frames of each case of a batch.

    Input batch: `read_case_row`'s columns, one entry per case, `images` (T, S, S) uint8 each. Output: the
    same without `images`, plus `scores` (T,) float32 in [0, 1], `best_image` (S, S) uint8: the frame of
    highest score as the model received it (zeros when T = 0; of the stack, only it goes on, to the review
    image in `cases/`) and, for SEG, `masks` (T, S*S/8) uint8:
    each frame's (S, S) mask (p > 0.5) bit-packed as by `np.packbits` (on the model's device), 8x smaller
    on its way to `summarise_cases`. The frames of all cases of a batch are scored end to end in
    micro-batches of `batch_size` (None: 256 on a GPU, 32 on CPU, resolved on the actor, whose device the
    driver may not have); see `FrameModel` for the one copy to the device and back per batch. `device`: None
    scores on the GPU Ray assigned this actor, if any, else on the CPU (`fetaliqa.models.frame_model.scoring_device`).
    A plain callable: it scores a dict of numpy arrays without Ray; two threads may call it at once.
    """

    def __init__(self, checkpoint: str, batch_size: int | None = None, storage_options: StorageOptions = None,
                 device: str | None = None):
        self.model = FrameModel(checkpoint, storage_options, device=device, batch_size=batch_size)
        self.task = self.model.task
        log_folder = os.environ.get(CALL_LOG_ENV)
        self._call_log = _CallLog(log_folder) if log_folder else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _maybe_die_once()
        if self._call_log:
            self._call_log.enter(self.model)
        images = [np.asarray(case) for case in batch["images"]]
        lengths = [len(case) for case in images]
        scores, masks = self.model(images or [np.zeros((0, 1, 1), np.uint8)], packed_masks=True)
        bounds = np.cumsum(lengths)[:-1]
        out = {key: value for key, value in batch.items() if key != "images"}
        out["scores"] = _ragged(np.split(scores, bounds))
        out["best_image"] = _ragged([case[np.argmax(s)] if len(case) else np.zeros(case.shape[1:], np.uint8)
                                     for case, s in zip(images, out["scores"])])
        if self.task == "seg":
            out["masks"] = _ragged(np.split(masks, bounds))
        return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array of per-case arrays, so cases with different T share one column."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


class _CallLog:
    """The `CALL_LOG_ENV` hook of one predictor: see there."""

    def __init__(self, folder: str):
        self.folder = folder
        self.calls = 0
        self.lock = threading.Lock()
        self.meeting = threading.Barrier(2, timeout=MEETING_SECONDS)

    def enter(self, model: FrameModel) -> None:
        with self.lock:
            self.calls += 1
            call = self.calls
        met = False
        if call <= 2:
            try:
                self.meeting.wait()
                met = True
            except threading.BrokenBarrierError:  # the other call never came
                pass
        ray = sys.modules.get("ray")  # never imported here: the predictor also runs without Ray
        gpu_ids = ray.get_gpu_ids() if ray is not None and ray.is_initialized() else []
        entry = {"pid": os.getpid(), "thread": threading.get_ident(), "call": call, "met": met,
                 "gpu_ids": [str(i) for i in gpu_ids], "device": str(model.device),
                 "dtype": str(model.dtype).removeprefix("torch.")}
        with open(os.path.join(self.folder, f"{entry['pid']}-{call}.json"), "w") as out:
            json.dump(entry, out)


def _maybe_die_once() -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
