"""The protocol: a case-level 70/10/20 split with a fixed seed, AC sweeps only, label = mask present.

Two splits: fetaliqa's (`split_cases`: independent of the ids' order) and the paper's code's
(`paper_split_cases`: a permutation of the csv's uuid column in file order, with its seed). A `Split` is
plain data (case ids and the 0-based sweeps selected per case) written to `<output>/split.json` so that a
run can be audited and a rerun can check that it trains on the same cases.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from fetaliqa.errors import FetaliqaError
from fetaliqa.inputs import layout
from fetaliqa.inputs.storage import StorageOptions, filesystem, join

SPLIT_FILE = "split.json"
FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test (the paper's)
PARTS = ("train", "val", "test")
PAPER_SEED = 9872398152123123767126  # the paper's preprocess.py; beyond int64, numpy takes it whole


@dataclass(frozen=True)
class Split:
    """Case ids per part and, per case, the 0-based sweeps that have an AC value. The parts are sorted in
    the "fetaliqa" recipe and in the paper's permuted order in the "paper" recipe."""

    seed: int
    train: list[str]
    val: list[str]
    test: list[str]
    sweeps: dict[str, list[int]]
    recipe: str = "fetaliqa"

    def part(self, name: str) -> list[str]:
        return getattr(self, name)


def split_cases(case_ids: list[str], seed: int, fractions: tuple[float, float, float] = FRACTIONS) -> dict[str, list[str]]:
    """Deal case ids into train/val/test: a seeded permutation of the sorted ids, cut at the fractions.

    Depends only on the set of ids and `seed` (not on their order). Sizes: val = round(n * fractions[1]),
    test = round(n * fractions[2]), train = the rest (21/3/6 for 30 cases, 7/1/2 for 10).
    Returns {"train", "val", "test": sorted id lists}, disjoint, covering every id.
    """
    ids = sorted(set(case_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val, n_test = round(len(ids) * fractions[1]), round(len(ids) * fractions[2])
    shuffled = [ids[i] for i in order]
    parts = {"val": shuffled[:n_val], "test": shuffled[n_val:n_val + n_test], "train": shuffled[n_val + n_test:]}
    return {name: sorted(parts[name]) for name in PARTS}


def ac_sweeps(circumferences: dict[str, list[float | None]], case_ids: list[str]) -> dict[str, list[int]]:
    """0-based sweeps that have an AC value in the csv, per case (a case missing from the csv has none).

    circumferences: {case_id: 6 values in mm or None}, as `archive.read_circumferences` returns.
    """
    return {case: [s for s, ac in enumerate(circumferences.get(case, [])) if ac is not None] for case in case_ids}


def paper_split_cases(csv_ids: list[str], seed: int = PAPER_SEED) -> dict[str, list[str]]:
    """The paper's code's split: `np.random.default_rng(seed).permutation` of the csv's uuid column in file
    order, cut at int(0.7 n) and int((1 - 0.2) n) into train / val / test (210/30/60 of 300).

    csv_ids: the uuid column as it stands in the file (its order changes the split, as in the paper's code).
    Returns {"train", "val", "test": id lists in permuted order}.
    """
    names = np.random.default_rng(seed).permutation(np.array(csv_ids, dtype=object))
    train_end, val_end = int(0.7 * len(names)), int((1 - 0.2) * len(names))  # the paper's expressions
    return {"train": names[:train_end].tolist(), "val": names[train_end:val_end].tolist(),
            "test": names[val_end:].tolist()}


def make_split(case_ids: list[str], circumferences: dict[str, list[float | None]], seed: int,
               recipe: str = "fetaliqa") -> Split:
    """The recipe's split of `case_ids` with the AC sweeps of every case.

    "paper" splits the csv's uuids (`circumferences` keeps the csv's row order) as its code did: a listed
    case without a csv row is in no part (its code iterated the csv), and a csv row without a listed case is
    an error, before any work (its code would have failed to read the image).
    """
    if recipe != "paper":
        parts = split_cases(case_ids, seed)
        return Split(seed=seed, **parts, sweeps=ac_sweeps(circumferences, sorted(case_ids)))
    absent = [case for case in circumferences if case not in set(case_ids)]
    if absent:
        raise FetaliqaError(f"the paper's split takes every uuid of the csv, but {len(absent)} have no image "
                            f"in the archive, e.g. {absent[0]!r}")
    parts = paper_split_cases(list(circumferences), seed)
    return Split(seed=seed, **parts, sweeps=ac_sweeps(circumferences, list(circumferences)), recipe=recipe)


def selected_frames(sweeps: list[int], n_frames: int) -> np.ndarray:
    """Frame indices (M,) int64, ascending, of the given 0-based sweeps of a stack of `n_frames` frames."""
    per_sweep = n_frames // layout.SWEEPS_PER_CASE
    if not sweeps:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(s * per_sweep, (s + 1) * per_sweep, dtype=np.int64) for s in sorted(sweeps)])


def frame_targets(masks: np.ndarray) -> np.ndarray:
    """Label per frame: (N, H, W) uint8 mask stack -> (N,) uint8, 1 where the mask holds any abdomen (> 0)."""
    return masks.reshape(len(masks), -1).any(axis=1).astype(np.uint8)


def save_split(split: Split, output: str, storage_options: StorageOptions = None) -> None:
    """Write `<output>/split.json`; a different split already there is an error (the run would mix data).

    The sweeps are written 1-based (as reported everywhere else); `load_split` turns them back.
    """
    existing = load_split(output, storage_options)
    if existing is not None and existing != split:
        raise FetaliqaError(f"{join(output, SPLIT_FILE)} holds a different split (other seed or cases); "
                            "use a new --output")
    data = asdict(split) | {"fractions": list(FRACTIONS),
                            "sweeps": {case: [s + 1 for s in sweeps] for case, sweeps in split.sweeps.items()}}
    fs, root = filesystem(output, storage_options)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join(root, SPLIT_FILE), "w") as f:
        json.dump(data, f, indent=2)


def load_split(output: str, storage_options: StorageOptions = None) -> Split | None:
    """The split in `<output>/split.json`, or None when there is none."""
    fs, root = filesystem(output, storage_options)
    path = join(root, SPLIT_FILE)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        data = json.load(f)
    sweeps = {case: [s - 1 for s in values] for case, values in data["sweeps"].items()}
    return Split(seed=data["seed"], train=data["train"], val=data["val"], test=data["test"], sweeps=sweeps,
                 recipe=data.get("recipe", "fetaliqa"))
