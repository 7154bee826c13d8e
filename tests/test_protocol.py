"""The paper's protocol: case-level split, AC sweeps only, label = mask present (no Ray needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fetaliqa.errors import FetaliqaError
from fetaliqa.inputs.cases import read_case
from fetaliqa.inputs.listing import list_cases
from fetaliqa.inputs.stacks import read_circumferences
from fetaliqa.training.data import case_items, read_frames
from fetaliqa.training.protocol import (
    SPLIT_FILE,
    frame_targets,
    load_split,
    PAPER_SEED,
    make_split,
    paper_split_cases,
    save_split,
    selected_frames,
    split_cases,
)

IDS = [f"case-{i:02d}" for i in range(30)]


def test_split_is_70_10_20_disjoint_and_covers_every_case():
    parts = split_cases(IDS, seed=0)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [21, 3, 6]
    together = parts["train"] + parts["val"] + parts["test"]
    assert sorted(together) == IDS and len(set(together)) == 30
    assert [len(split_cases(IDS[:10], seed=0)[p]) for p in ("train", "val", "test")] == [7, 1, 2]


def test_split_depends_on_the_seed_and_the_ids_only():
    assert split_cases(IDS, seed=3) == split_cases(IDS[::-1], seed=3) == split_cases(IDS, seed=3)
    assert split_cases(IDS, seed=3) != split_cases(IDS, seed=4)


def test_frame_labels_are_mask_present():
    masks = np.zeros((4, 5, 6), np.uint8)
    masks[1, 2, 3] = 1  # optimal, one pixel
    masks[3, :, :] = 2  # suboptimal, everywhere
    assert frame_targets(masks).tolist() == [0, 1, 0, 1]
    assert frame_targets(masks).dtype == np.uint8


def test_selected_frames_are_the_frames_of_the_given_sweeps():
    assert selected_frames([4, 1], 6 * 3).tolist() == [3, 4, 5, 12, 13, 14]
    assert selected_frames([], 12).tolist() == []


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from fetaliqa.synthetic.archive import write_synthetic_archive

    root = tmp_path_factory.mktemp("protocol-archive")
    write_synthetic_archive(str(root), cases=6, frames_per_sweep=5, height=48, width=64, seed=5)
    return str(root)


def test_only_sweeps_with_an_ac_value_are_selected_and_labels_follow_the_masks(archive):
    circumferences = read_circumferences(archive)
    cases = list_cases(archive)
    split = make_split([c.case_id for c in cases], circumferences, seed=0)
    for case_id, sweeps in split.sweeps.items():
        assert sweeps == [s for s in range(6) if circumferences[case_id][s] is not None]
    assert any(len(s) < 6 for s in split.sweeps.values())  # the archive has sweeps without AC
    for part in ("train", "val", "test"):
        for item in case_items(cases, split, part):
            batch = {key: np.array([value], dtype=object) for key, value in item.items()}
            rows = read_frames(batch, with_masks=True)
            _, masks = read_case(item["case"], with_mask=True)
            expected = selected_frames(item["sweeps"], len(masks))
            assert rows["frame"].tolist() == expected.tolist()
            assert rows["sweep"].tolist() == [f // 5 + 1 for f in expected]
            assert set(rows["sweep"] - 1) <= set(item["sweeps"])
            assert rows["label"].tolist() == [int((masks[f] > 0).any()) for f in expected]
            assert rows["image"].shape == rows["mask"].shape == (len(expected), 224, 224)
            assert rows["image"].dtype == rows["mask"].dtype == np.uint8
            # a frame with an abdomen keeps some of it at model resolution, and only those frames do
            assert rows["mask"].reshape(len(expected), -1).any(axis=1).tolist() == rows["label"].astype(bool).tolist()


def test_split_json_round_trips_and_a_different_split_is_refused(tmp_path):
    circumferences = {case: [None, 12.5, None, None, 20.0, None] for case in IDS}
    split = make_split(IDS, circumferences, seed=1)
    save_split(split, str(tmp_path))
    written = json.loads((tmp_path / SPLIT_FILE).read_text())
    assert written["sweeps"][IDS[0]] == [2, 5]  # 1-based in the file
    assert written["fractions"] == [0.7, 0.1, 0.2]
    assert load_split(str(tmp_path)) == split
    save_split(split, str(tmp_path))  # the same split again: fine (a rerun)
    with pytest.raises(FetaliqaError, match="different split"):
        save_split(make_split(IDS, circumferences, seed=2), str(tmp_path))


def test_a_split_with_an_empty_part_is_refused_before_any_work(archive):
    from fetaliqa.training.data import frame_datasets

    cases = list_cases(archive)[:3]  # 3 cases: round(0.3) = 0 validation cases
    split = make_split([c.case_id for c in cases], read_circumferences(archive), seed=0)
    with pytest.raises(FetaliqaError, match="val part"):
        frame_datasets(cases, split, "cls")


def paper_rule(csv_ids: list[str], seed: int) -> dict[str, list[str]]:
    """The paper's preprocess.py rule, written out here: permute the uuid column, cut at int(0.7 n), int(0.8 n)."""
    order = np.random.default_rng(seed).permutation(len(csv_ids))
    names = [csv_ids[i] for i in order]
    n = len(names)
    return {"train": names[:int(0.7 * n)], "val": names[int(0.7 * n):int((1 - 0.2) * n)], "test": names[int((1 - 0.2) * n):]}


@pytest.mark.parametrize("n", [300, 30, 7])
def test_paper_split_is_the_papers_rule_for_any_csv_order_and_seed(n):
    rng = np.random.default_rng(n)
    csv_ids = [f"{rng.integers(16**8):08x}-uuid-{i}" for i in range(n)]
    for seed in (PAPER_SEED, 0, 12345):
        for ids in (csv_ids, csv_ids[::-1], [csv_ids[i] for i in rng.permutation(n)]):
            assert paper_split_cases(ids, seed) == paper_rule(ids, seed)
    assert [len(paper_split_cases(csv_ids)[p]) for p in ("train", "val", "test")] == \
        {300: [210, 30, 60], 30: [21, 3, 6], 7: [4, 1, 2]}[n]
    assert paper_split_cases(csv_ids) != paper_split_cases(csv_ids[::-1])  # file order matters, as in its code


def test_paper_recipe_splits_the_csv_in_file_order_and_writes_the_lists(tmp_path):
    csv_ids = [f"case-{i:02d}" for i in np.random.default_rng(1).permutation(30)]  # not sorted
    circumferences = {case: [None, 12.5, None, None, None, None] for case in csv_ids}
    split = make_split(sorted(csv_ids) + ["not-in-csv"], circumferences, PAPER_SEED, recipe="paper")
    assert {p: split.part(p) for p in ("train", "val", "test")} == paper_rule(csv_ids, PAPER_SEED)
    assert "not-in-csv" not in split.sweeps
    save_split(split, str(tmp_path))
    written = json.loads((tmp_path / SPLIT_FILE).read_text())
    assert written["seed"] == PAPER_SEED and written["recipe"] == "paper"  # a Python int of any size in JSON
    assert {p: written[p] for p in ("train", "val", "test")} == paper_rule(csv_ids, PAPER_SEED)
    assert load_split(str(tmp_path)) == split
    with pytest.raises(FetaliqaError, match="no image"):
        make_split(csv_ids[1:], circumferences, PAPER_SEED, recipe="paper")


def test_circumferences_keep_the_csv_row_order(tmp_path):
    ids = ["c", "a", "d", "b"]
    header = "uuid,subject_id," + ",".join(f"sweep_{i}_ac_mm" for i in range(1, 7))
    (tmp_path / "ac.csv").write_text("\n".join([header] + [f"{u},1,,,,,,{i + 100}" for i, u in enumerate(ids)]) + "\n")
    assert list(read_circumferences(str(tmp_path / "ac.csv"))) == ids
