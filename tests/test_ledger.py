"""Per-case Parquet files: atomic writes, completion markers, whole-dataset reads."""

import pyarrow as pa
import pytest

from fetaliqa import outputs


def errors_row(source: str) -> pa.Table:
    return pa.table({"source": [source], "error": ["missing"], "message": [f"{source}: gone"]},
                    schema=outputs.ERRORS_SCHEMA)


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_write_then_read_back_whole_dataset(tmp_path, scheme):
    out = str(tmp_path / "out") if scheme == "local" else "memory://fetaliqa-outputs-test"
    for case in ("a", "b"):
        outputs.write_table(errors_row(case), outputs.case_file(out, outputs.ERRORS, case))
    table = outputs.read_dataset(out, outputs.ERRORS)
    assert sorted(table["source"].to_pylist()) == ["a", "b"]
    assert outputs.read_dataset(out, outputs.FRAMES).num_rows == 0  # absent -> empty, with the schema
    assert outputs.read_dataset(out, outputs.FRAMES).schema.equals(outputs.FRAMES_SCHEMA)


def test_local_writes_leave_no_temporary_files_and_rewrites_replace(tmp_path):
    out = str(tmp_path)
    target = outputs.case_file(out, outputs.ERRORS, "a")
    outputs.write_table(errors_row("first"), target)
    outputs.write_table(errors_row("second"), target)
    assert [p.name for p in (tmp_path / "errors").iterdir()] == ["a.parquet"]
    assert outputs.read_dataset(out, outputs.ERRORS)["source"].to_pylist() == ["second"]


def test_completed_cases_are_those_with_a_cases_file(tmp_path):
    out = str(tmp_path)
    assert outputs.completed_case_ids(out) == set()
    case = pa.table({"case_id": ["x"], "frames": [6], "positives": [0], "best_frame": [0], "best_sweep": [1],
                     "best_score": [0.1], "ac_mm": [None], "source": ["x.mha"]}, schema=outputs.CASES_SCHEMA)
    outputs.write_table(case, outputs.case_file(out, outputs.CASES, "x"))
    outputs.write_table(errors_row("y.mha"), outputs.case_file(out, outputs.ERRORS, "y"))
    assert outputs.completed_case_ids(out) == {"x"}
    outputs.remove_file(outputs.case_file(out, outputs.ERRORS, "y"))
    outputs.remove_file(outputs.case_file(out, outputs.ERRORS, "y"))  # absent: no error
    assert outputs.read_dataset(out, outputs.ERRORS).num_rows == 0
