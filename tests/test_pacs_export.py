"""A PACS export as it comes off the archive: scored in one run, every bad file recorded once, keyed by its URI.

The export is hand-built with pydicom's `FileSet` (the DICOMDIR writer): two file sets, each a DICOMDIR beside
patient / study / series folders whose files are named IM000000, IM000001, ... in every series folder. Among
three good studies (the synthetic cases of `fetaliqa.synthetic.dicom`) sit a header declaring a 1 TB image, a file
with a bad StudyInstanceUID and a truncated file, the three bad files holding names that repeat elsewhere.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from fetaliqa.errors import InputError
from fetaliqa.evaluation.challenge_format import read_prediction, write_prediction
from fetaliqa.score import ledger
from fetaliqa.score.ledger import read_table
from fetaliqa.inputs.listing import list_archive, listing_notes
from fetaliqa.score.read import read_case_row
from fetaliqa.score.schema import CASES, ERRORS
from fetaliqa.synthetic.archive import synthetic_cases
from fetaliqa.synthetic.dicom import encode_sweep, study_uid_of

from jobs import score as score_job

K, H, W, SEED = 2, 40, 48, 21
SERIES = "PT000000/ST000000/SE000000"  # FileSet's folders: patient / study / series
pytestmark = pytest.mark.filterwarnings("ignore:.*VR UI")  # pydicom warns of the bad UID it writes and reads
TB_MESSAGE = "decoded size 973.5 GiB (2500000 frames x 562 x 744 x 1 byte) over --max-case-gib 1.5"


def _sweeps(case, number: int) -> list[pydicom.Dataset]:
    datasets = []
    for sweep in range(1, 7):
        ds = pydicom.dcmread(io.BytesIO(encode_sweep(case, number, sweep, K)[1]))
        ds.StudyTime, ds.StudyID = "090000", str(number)  # what a DICOMDIR's STUDY record needs
        datasets.append(ds)
    return datasets


def _extra(ds: pydicom.Dataset, path: Path, **changes) -> Path:
    """A copy of instance `ds` as a 7th instance (its own SOP Instance UID) with `changes`, saved at `path`."""
    copy = pydicom.dcmread(io.BytesIO(_bytes(ds)))
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    copy.InstanceNumber = 7
    for key, value in changes.items():
        setattr(copy, key, value)
    path.write_bytes(_bytes(copy))
    return path


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict:
    """DISC1: DICOMDIR, studies A and B; DISC2: dicomdir (lower case), study C. Extras: A's series holds IM000006,
    a header declaring 2,500,000 frames of 562 x 744 (~1 TB); B's series holds IM000006 too, an instance cut 200
    bytes short; DISC2 has a patient whose IM000000 has the StudyInstanceUID '1.2.840/../../evil'. A hidden folder
    (.trash) holds junk, and a series folder a stacked image (not listed without --recursive)."""
    root = tmp_path_factory.mktemp("pacs") / "export"
    cases = list(synthetic_cases(3, K, H, W, SEED))
    studies = [study_uid_of(c.case_id) for c in cases]
    sweeps = [_sweeps(case, number) for number, case in enumerate(cases, start=1)]
    for disc, numbers in (("DISC1", (0, 1)), ("DISC2", (2,))):
        file_set = FileSet()
        for n in numbers:
            for ds in sweeps[n]:
                file_set.add(ds)
        file_set.write(root / disc)
    (root / "DISC2" / "DICOMDIR").rename(root / "DISC2" / "dicomdir")
    # FileSet numbers patients in the order added: DISC1's PT000000 is study A, PT000001 study B.
    too_large = _extra(sweeps[0][0], root / "DISC1" / SERIES / "IM000006",
                       NumberOfFrames=2_500_000, Rows=562, Columns=744)
    truncated = _extra(sweeps[1][0], root / "DISC1" / SERIES.replace("PT000000", "PT000001") / "IM000006")
    truncated.write_bytes(truncated.read_bytes()[:-200])
    bad_uid_dir = root / "DISC2" / SERIES.replace("PT000000", "PT000001")
    bad_uid_dir.mkdir(parents=True)
    bad_uid = _extra(sweeps[2][0], bad_uid_dir / "IM000000", StudyInstanceUID="1.2.840/../../evil")
    (root / ".trash").mkdir()
    (root / ".trash" / "IM000000").write_bytes(b"not DICOM" * 20)
    (root / "DISC2" / SERIES / "preview.mha").write_bytes(b"not an image")
    return {"root": root, "studies": studies, "too_large": str(too_large), "truncated": str(truncated),
            "bad_uid": str(bad_uid), "dicomdirs": [str(root / "DISC1" / "DICOMDIR"), str(root / "DISC2" / "dicomdir")]}


def test_one_run_scores_a_pacs_export_and_records_each_bad_file_once(ray_local, export, cls_checkpoint, tmp_path):
    out = str(tmp_path / "out")
    assert score_job.main(["--input", str(export["root"]), "--checkpoint", cls_checkpoint, "--output", out,
                           "--cases-per-file", "50"]) == 0

    cases, errors = read_table(out, CASES), read_table(out, ERRORS)
    assert {r["case_id"]: (r["sweeps"], r["frames"]) for r in cases.to_pylist()} == {
        s: (6, 6 * K) for s in export["studies"]}
    rows = errors.to_pylist()
    assert sorted((r["case_id"], r["error"]) for r in rows) == sorted([
        (export["too_large"], "too_large"), (export["truncated"], "truncated"), (export["bad_uid"], "bad_uid")])
    for r in rows:  # keyed by the URI, the message one line naming it
        assert r["source"] == r["case_id"] and r["message"].startswith(r["source"] + ": ") and "\n" not in r["message"]
    by_kind = {r["error"]: r["message"] for r in rows}
    assert by_kind["too_large"].endswith(TB_MESSAGE)
    assert "StudyInstanceUID '1.2.840/../../evil' is not a DICOM UID" in by_kind["bad_uid"]
    run = json.loads((Path(out) / "run.json").read_text())
    assert sorted(run["notes"]) == sorted(f"{d}: DICOMDIR skipped (a file-set index, not an image)"
                                          for d in export["dicomdirs"])

    # The next run's start retries the files that failed as cases, and keeps the row of study B's bad instance,
    # whose name (IM000006) is that of one retried: B is scored, and never read again.
    assert len(ledger.load_records(out)) == 1  # one part: both rows in one errors/ file
    resumed = ledger.resume(out)
    assert resumed.retried == 2 and resumed.scored == set(export["studies"])
    assert read_table(out, ERRORS)["case_id"].to_pylist() == [export["truncated"]]


def test_an_s3_prefix_of_the_export_is_listed_by_the_same_rule_in_one_listing(export, s3_server, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs=options, skip_instance_cache=True)
    root = export["root"]
    files = {f"{bucket}/pacs/{p.relative_to(root).as_posix()}": p.read_bytes() for p in root.rglob("*") if p.is_file()}
    files[f"{bucket}/pacs/top.mha"] = b"x"  # a stacked image directly in the prefix: listed
    files[f"{bucket}/pacs/DISC1/INDEX"] = (root / "DISC1" / "DICOMDIR").read_bytes()  # a DICOMDIR by its SOP class
    fs.pipe(files)
    uri = {name: f"{bucket}/pacs/{Path(export[name]).relative_to(root).as_posix()}"
           for name in ("too_large", "truncated", "bad_uid")}
    so = {"client_kwargs": options}
    before = len(s3_server.requests)

    table = list_archive(f"{bucket}/pacs", so)

    lists = [r for r in s3_server.requests[before:] if "list-type=2" in r.query]
    assert len(lists) == 2  # the ACOUSLIC images/ folder looked for, then one page for the whole tree
    rows = {r["case_id"]: r for r in table.to_pylist()}
    assert set(rows) == {*export["studies"], "top", uri["too_large"], uri["bad_uid"]}
    assert (rows[uri["too_large"]]["error"], rows[uri["bad_uid"]]["error"]) == ("too_large", "bad_uid")
    assert rows[uri["too_large"]]["message"] == f"{uri['too_large']}: {TB_MESSAGE}"
    study_b = rows[export["studies"][1]]["instances"]
    assert len(study_b) == 7 and study_b[-1] == uri["truncated"]  # a good header: found bad when read
    notes = listing_notes(table)
    assert sorted(n.split(": ")[0] for n in notes) == sorted(
        f"{bucket}/pacs/{name}" for name in ("DISC1/DICOMDIR", "DISC2/dicomdir", "DISC1/INDEX"))

    recursive = list_archive(f"{bucket}/pacs", so, recursive=True)
    assert set(recursive["case_id"].to_pylist()) == set(rows) | {"preview"}


@pytest.mark.filterwarnings("ignore:End of file reached")  # pydicom's own warning; the check does not use it
def test_the_truncated_instance_costs_its_study_one_sweep_when_read(export):
    rows = {r["case_id"]: r for r in list_archive(str(export["root"])).to_pylist()}
    study = rows[export["studies"][1]]
    read = read_case_row(study["case_id"], study["source"], image_size=32, instances=study["instances"])
    assert read["error"] == "" and len(json.loads(read["sweeps"])) == 6
    [(source, kind, message)] = json.loads(read["instance_errors"])
    assert (source, kind) == (export["truncated"], "truncated") and message.startswith(source + ": ")


@pytest.mark.parametrize("case_id", ["..", ".", "", "../evil", "1.2/../../evil", "a\\b", "x\ny"])
def test_export_never_builds_a_path_outside_its_folder(tmp_path, case_id):
    out = tmp_path / "predictions"
    out.mkdir()
    with pytest.raises(InputError) as err:
        write_prediction(str(out), case_id, -1, np.zeros((2, 2), bool), (1, 2, 2))
    text = str(err.value)
    assert text.startswith(f"{out}: case id ") and "not a single safe path component" in text and "\n" not in text
    with pytest.raises(InputError, match="not a single safe path component"):
        read_prediction(str(out), case_id, (1, 2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["predictions"] and not any(out.iterdir())
