"""benchmarks/ray_job_gpu.py's pure parts: the steady-state rate read off committed parts, and the replicated
archive it scores (the measurement itself is a benchmark, run on a GPU machine, not here)."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import pytest

from fetaliqa.inputs import layout
from fetaliqa.inputs.listing import list_archive
from fetaliqa.synthetic.archive import write_synthetic_archive

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ray_job_gpu", REPO / "benchmarks" / "ray_job_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steady_rate_counts_the_parts_after_the_first_over_first_to_last_commit(bench):
    # commits at 10 s, 12 s, 16 s (given out of order): (300 + 500) frames over 6 s; the first part's 840 are
    # frames scored before the window opened
    assert bench.steady_rate([(16.0, 500), (10.0, 840), (12.0, 300)]) == pytest.approx(800 / 6)


@pytest.mark.parametrize("commits", [[], [(5.0, 840)], [(5.0, 840), (5.0, 840)]])
def test_steady_rate_is_none_without_two_commits_apart_in_time(bench, commits):
    assert bench.steady_rate(commits) is None


def test_replicated_cases_form_an_archive_the_lister_reads_whole(bench, tmp_path):
    root = tmp_path / "archive"
    sources = write_synthetic_archive(str(root), 2, frames_per_sweep=1, height=32, width=32)
    copies = bench.replicate_cases(root, sources, 5)

    listed = list_archive(str(root))
    assert sorted(listed["case_id"].to_pylist()) == sorted(sources + copies)
    assert len(set(copies)) == 5 and not set(copies) & set(sources)
    with (root / layout.CIRCUMFERENCES_CSV).open(newline="") as f:
        rows = {row["uuid"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(sources + copies)
    for k, case_id in enumerate(copies):  # sources taken in turn: the same files, linked, and the same AC row
        source = sources[k % 2]
        for folder in (layout.IMAGES_DIR, layout.MASKS_DIR):
            assert os.path.samefile(root / folder / f"{case_id}.mha", root / folder / f"{source}.mha")
        assert {**rows[case_id], "uuid": source} == rows[source]
