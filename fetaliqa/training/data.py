"""Ray Data datasets of labelled frames, from the archive reader and the preprocessing the scorer uses.

One row per frame of an AC sweep:
    case_id str, sweep int8 (1-based), frame int32 (index in the stack), label uint8 (1: mask present),
    image (S, S) uint8 (padded square, PIL-exact bicubic resize), mask (S, S) uint8 {0, 1} (SEG only).
Cases are decoded and resized once (`frame_datasets` materialises them). In the "fetaliqa" recipe the
train set is then shuffled and augmented on the fly in CPU map tasks every epoch (`train_dataset`). In the
"paper" recipe (`read_paper_frames`) frames are resized with cv2 (cubic; masks nearest) and labelled from
the resized mask, and each train frame comes twice, materialised once per run: `copy` 0 as it is, `copy` 1
augmented at native size (`augment.paper_copies`); epochs only reshuffle them.
"""

from __future__ import annotations

import zlib

import numpy as np
import ray
from ray.data import Dataset, RandomSeedConfig

from fetaliqa.errors import FetaliqaError, MissingMaskError
from fetaliqa.inputs import layout
from fetaliqa.inputs.cases import read_case
from fetaliqa.inputs.listing import CaseRef
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.preprocess import mask_to_model, resize_frames
from fetaliqa.training.augment import augment_batch, paper_copies
from fetaliqa.training.protocol import PARTS, Split, frame_targets, selected_frames

AUGMENT_BATCH = 64  # frames per augmentation task: a few MB, enough to amortise the task overhead


def case_items(cases: list[CaseRef], split: Split, part: str) -> list[dict]:
    """Rows of the cases of one part that have at least one AC sweep: {"case": its `CaseRef`, "sweeps"}.

    Raises MissingMaskError for a case without a mask: training needs every label.
    """
    by_id = {case.case_id: case for case in cases}
    items = []
    for case_id in split.part(part):
        case, sweeps = by_id[case_id], split.sweeps[case_id]
        if case.mask_uri is None:
            raise MissingMaskError(case.source, f"no mask for case {case_id!r}: training needs masks for every case")
        if sweeps:
            items.append({"case": case, "sweeps": sweeps})
    return items


def read_frames(batch: dict[str, np.ndarray], with_masks: bool, storage_options: StorageOptions = None) -> dict[str, np.ndarray]:
    """Ray Data UDF over ONE case row (batch_size=1): decode it, keep the frames of its AC sweeps, resize.

    Returns N rows (the frames of the case's AC sweeps) in the columns of the module docstring.
    """
    case = batch["case"][0]
    stack, masks = read_case(case, storage_options, with_mask=True)
    n_frames = len(stack.frames)
    frames = selected_frames(list(batch["sweeps"][0]), n_frames)
    out = {
        "case_id": np.full(len(frames), case.case_id, dtype=object),
        "sweep": (frames // (n_frames // layout.SWEEPS_PER_CASE) + 1).astype(np.int8),
        "frame": frames.astype(np.int32),
        "label": frame_targets(masks[frames]),
        "image": resize_frames(stack.frames[frames]),
    }
    if with_masks:
        out["mask"] = mask_to_model(masks[frames])
    return out


def read_paper_frames(batch: dict[str, np.ndarray], with_masks: bool, copies: int, seed: int,
                      storage_options: StorageOptions = None) -> dict[str, np.ndarray]:
    """Ray Data UDF over ONE case row (batch_size=1), the paper's preprocessing: every frame of the case's AC
    sweeps as `copies` rows (`augment.paper_copies`: 2 for train, 1 otherwise), with `copy` int8 (0: as it is).

    The draws come from a generator seeded by `seed` and the case id, so a case's copies are the same
    whichever task reads it, and a rerun of the same command rebuilds the same train set. Columns as the
    module docstring, plus `copy`; label = the copy's resized mask has a pixel > 0.
    """
    case = batch["case"][0]
    stack, masks = read_case(case, storage_options, with_mask=True)
    n_frames = len(stack.frames)
    frames = selected_frames(list(batch["sweeps"][0]), n_frames)
    rng = np.random.default_rng([seed, zlib.crc32(case.case_id.encode())])
    rows = [(f, k, *made) for f in frames
            for k, made in enumerate(paper_copies(stack.frames[f], masks[f], copies, rng))]
    out = {
        "case_id": np.full(len(rows), case.case_id, dtype=object),
        "sweep": np.array([f // (n_frames // layout.SWEEPS_PER_CASE) + 1 for f, *_ in rows], np.int8),
        "frame": np.array([f for f, *_ in rows], np.int32),
        "copy": np.array([k for _, k, *_ in rows], np.int8),
        "label": np.array([label for *_, label in rows], np.uint8),
        "image": np.stack([image for _, _, image, _, _ in rows]) if rows else np.zeros((0, 224, 224), np.uint8),
    }
    if with_masks:
        out["mask"] = np.stack([mask for _, _, _, mask, _ in rows]) if rows else np.zeros((0, 224, 224), np.uint8)
    return out


def frame_datasets(cases: list[CaseRef], split: Split, task: str, storage_options: StorageOptions = None,
                   paper_copies_seed: int | None = None) -> dict[str, Dataset]:
    """{"train", "val", "test": materialised Datasets of frames} (one read task per case).

    `paper_copies_seed`: None reads as the "fetaliqa" recipe (`read_frames`); an int reads as the paper's
    (`read_paper_frames`: two copies of each train frame, drawn from this seed). Materialising decodes each
    case once: a compressed stack is far slower to read than to train on.
    """
    items = {part: case_items(cases, split, part) for part in PARTS}
    empty = [part for part in PARTS if not items[part]]
    if empty:  # checked before any work: a run needs frames in every part
        raise FetaliqaError(f"no case with an AC sweep in the {' and '.join(empty)} part of the split of "
                            f"{len(cases)} cases: too few annotated cases to train")
    datasets = {}
    for part in PARTS:
        kwargs = {"with_masks": task == "seg", "storage_options": storage_options}
        if paper_copies_seed is None:
            read = read_frames
        else:
            read = read_paper_frames
            kwargs |= {"copies": 2 if part == "train" else 1, "seed": paper_copies_seed}
        ds = ray.data.from_items(items[part], override_num_blocks=len(items[part]))
        datasets[part] = ds.map_batches(read, batch_size=1, fn_kwargs=kwargs).materialize()
    return datasets


def train_dataset(frames: Dataset, seed: int, augment: bool = True) -> Dataset:
    """The train frames, reshuffled every epoch (reproducibly from `seed`) and, with `augment`, augmented on
    the fly (the "fetaliqa" recipe; the paper's copies are made once, in `read_paper_frames`).

    Returns only the columns the loop uses (image, label and, for SEG, mask): tensors, no strings.
    """
    # Ray Data's shuffle seed kept to 32 bits, which any RNG takes; the paper's seed exceeds even int64.
    shuffled = frames.random_shuffle(seed=RandomSeedConfig(seed=seed % 2**32, reseed_after_execution=True))
    if augment:
        shuffled = shuffled.map_batches(augment_batch, batch_size=AUGMENT_BATCH, fn_kwargs={"seed": seed})
    return shuffled.select_columns(tensor_columns(frames))


def tensor_columns(frames: Dataset) -> list[str]:
    """The columns a training loop consumes: image, label and, when present, mask."""
    return [c for c in ("image", "label", "mask") if c in frames.columns()]
