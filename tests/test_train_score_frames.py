"""The frames a checkpoint is scored on are the frames it was trained on: for each recipe, the training
reader's copy-0 images equal the scoring reader's images, bit for bit, under the resize the recipe records in
its checkpoint (`PreprocessSpec.interpolation`)."""

from __future__ import annotations

import numpy as np
import pytest

from fetaliqa.inputs.listing import list_cases
from fetaliqa.inputs.metaimage import DecodeBuffer
from fetaliqa.score.read import read_case_row
from fetaliqa.synthetic.archive import write_synthetic_archive
from fetaliqa.training.data import read_frames, read_paper_frames
from fetaliqa.training.recipes import RECIPES


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    write_synthetic_archive(str(root), 1, frames_per_sweep=4, height=97, width=131, seed=3)  # odd sizes
    return list_cases(str(root))[0]


@pytest.mark.parametrize("recipe", ["fetaliqa", "paper"])
def test_training_and_scoring_resize_a_case_alike(case, recipe):
    batch = {"case": np.array([case], dtype=object), "sweeps": np.array([[0, 2, 5]], dtype=object)}  # 0-based
    if recipe == "paper":
        trained = read_paper_frames(batch, with_masks=False, copies=2, seed=0)
        keep = trained["copy"] == 0  # copy 1 is augmented: training only
        trained = {key: value[keep] for key, value in trained.items()}
    else:
        trained = read_frames(batch, with_masks=False)
    scored = read_case_row(case.case_id, case.source, resize=RECIPES[recipe].resize, buffer=DecodeBuffer())
    assert scored["error"] == ""
    assert len(trained["frame"]) == 12  # sweeps 1, 3 and 6, four frames each
    assert np.array_equal(trained["image"], scored["images"][trained["frame"]])
