"""Scoring a folder that mixes DICOM studies, bare .mha stacks and bad files, in one run on a real local Ray."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydicom
import pytest
from conftest import assert_decisions_follow_the_frames, own_stderr_lines
from pydicom.uid import MPEG4HP41

from fetaliqa import cli
from fetaliqa.evaluation.run_report import write_run_report
from fetaliqa.inputs import layout
from fetaliqa.pseudonym import key_id, pseudonym
from fetaliqa.score.ledger import read_table
from fetaliqa.inputs.listing import list_archive, listing_notes
from fetaliqa.score.read import read_case_row
from fetaliqa.score.schema import CASES, CASES_SCHEMA, ERRORS, FRAMES, FRAMES_SCHEMA
from fetaliqa.synthetic.archive import write_synthetic_archive
from fetaliqa.synthetic.dicom import DICOM_DIR, study_uid_of, write_synthetic_dicom_archive

from jobs import score as score_job

K, H, W, SEED = 3, 40, 48, 5


def _instances(folder: Path) -> dict[str, list[tuple[int, Path]]]:
    """study UID -> [(InstanceNumber, file)] of the DICOM files in `folder`."""
    studies: dict[str, list[tuple[int, Path]]] = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        studies.setdefault(ds.StudyInstanceUID, []).append((int(ds.InstanceNumber), path))
    return {study: sorted(files) for study, files in studies.items()}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    """A folder of: studies A and B (6 instances each, 3 encodings; one file without extension), the same two
    cases as .mha stacks, study C with one instance truncated, a single-frame instance of A, a study D whose only
    instance has an unsupported transfer syntax, a text file named .dcm, and a README that is not an input."""
    root = tmp_path_factory.mktemp("mixed-src")
    write_synthetic_dicom_archive(str(root / "dcm"), cases=3, frames_per_sweep=K, height=H, width=W, seed=SEED)
    ids = write_synthetic_archive(str(root / "mha"), cases=2, frames_per_sweep=K, height=H, width=W, seed=SEED)
    folder = tmp_path_factory.mktemp("mixed")
    studies = _instances(root / "dcm" / DICOM_DIR)
    a, b = study_uid_of(ids[0]), study_uid_of(ids[1])
    c = next(s for s in studies if s not in (a, b))
    for study, files in studies.items():
        for number, path in files:
            name = path.stem if (study, number) == (a, 2) else path.name  # one file without extension
            shutil.copy(path, folder / name)
    truncated = folder / studies[c][3][1].name
    truncated.write_bytes(truncated.read_bytes()[:-200])
    for case_id in ids:
        shutil.copy(root / "mha" / layout.IMAGES_DIR / f"{case_id}.mha", folder / f"{case_id}.mha")
    single = pydicom.dcmread(studies[a][0][1])
    first_frame = single.pixel_array[0]
    single.NumberOfFrames, single.SOPInstanceUID = 1, "2.25.1"
    single.file_meta.MediaStorageSOPInstanceUID = "2.25.1"
    single.PixelData = first_frame.tobytes()
    single.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    single.save_as(folder / "single.dcm", enforce_file_format=True)
    video = pydicom.dcmread(studies[a][1][1])
    video.StudyInstanceUID, video.SOPInstanceUID = "2.25.42", "2.25.43"
    video.file_meta.TransferSyntaxUID = MPEG4HP41
    video.save_as(folder / "video.dcm", enforce_file_format=True)
    (folder / "notes.dcm").write_text("not DICOM\n" * 30)
    (folder / "README.txt").write_text("this folder mixes everything\n")
    return {"folder": folder, "ids": ids, "a": a, "b": b, "c": c, "truncated": truncated, "studies": studies}


def test_listing_groups_studies_and_lists_bad_files_as_failed(mixed):
    one = list_archive(str(mixed["folder"] / "single.dcm"))  # one DICOM file as the input
    assert one["case_id"].to_pylist() == [mixed["a"]] and one["error"].to_pylist() == ["study_failed"]
    table = list_archive(str(mixed["folder"]))
    rows = {r["case_id"]: r for r in table.to_pylist()}
    a, b, c = mixed["a"], mixed["b"], mixed["c"]
    notes_dcm = str(mixed["folder"] / "notes.dcm")  # a bad file's row is keyed by its URI, never its name
    assert set(rows) == {a, b, c, *mixed["ids"], notes_dcm, "2.25.42"}
    numbers = {path.stem: number for number, path in mixed["studies"][a]}
    assert [numbers[Path(u).name.removesuffix(".dcm")] for u in rows[a]["instances"]] == [1, 2, 3, 4, 5, 6]
    assert rows[mixed["ids"][0]]["instances"] is None and rows[b]["error"] == ""
    assert rows[notes_dcm]["error"] == "not_dicom" and rows[notes_dcm]["source"] == notes_dcm
    assert rows["2.25.42"]["instances"] == [str(mixed["folder"] / "video.dcm")]
    notes = listing_notes(table)
    assert len(notes) == 1 and "single.dcm" in notes[0] and a in notes[0]


def test_a_study_reads_as_the_same_frames_as_its_mha(mixed):
    rows = {r["case_id"]: r for r in list_archive(str(mixed["folder"])).to_pylist()}
    for case_id in mixed["ids"]:
        study = rows[study_uid_of(case_id)]
        from_dicom = read_case_row(study["case_id"], study["source"], instances=study["instances"])
        from_mha = read_case_row(case_id, rows[case_id]["source"])
        np.testing.assert_array_equal(from_dicom["images"], from_mha["images"])
        sweeps = json.loads(from_dicom["sweeps"])
        assert [(s["frames"], s["height"], s["width"], s["spacing"]) for s in sweeps] == [(K, H, W, [0.28, 0.28])] * 6


def test_one_run_scores_the_mixed_folder(ray_local, mixed, cls_checkpoint, tmp_path):
    out = str(tmp_path / "out")
    assert score_job.main(["--input", str(mixed["folder"]), "--checkpoint", cls_checkpoint, "--output", out]) == 0
    frames, cases, errors = (read_table(out, t) for t in (FRAMES, CASES, ERRORS))
    assert frames.schema.equals(FRAMES_SCHEMA) and cases.schema.equals(CASES_SCHEMA)
    a, b, c = mixed["a"], mixed["b"], mixed["c"]
    by_case = {r["case_id"]: r for r in cases.to_pylist()}
    assert set(by_case) == {a, b, c, *mixed["ids"]}
    assert {k: (by_case[k]["sweeps"], by_case[k]["frames"]) for k in by_case} == {
        a: (6, 6 * K), b: (6, 6 * K), c: (5, 5 * K), mixed["ids"][0]: (6, 6 * K), mixed["ids"][1]: (6, 6 * K)}
    kinds = sorted(zip(errors["case_id"].to_pylist(), errors["error"].to_pylist()))
    folder = mixed["folder"]
    assert kinds == sorted([(str(folder / "notes.dcm"), "not_dicom"), (str(mixed["truncated"]), "truncated"),
                            ("2.25.42", "study_failed"), (str(folder / "video.dcm"), "unsupported_transfer_syntax")])
    assert all(m.startswith(s + ": ") for s, m in zip(errors["source"].to_pylist(), errors["message"].to_pylist()))

    # Every DICOM frame names its instance and its place in it; sweeps follow InstanceNumber.
    sop_of = {}
    for study, files in mixed["studies"].items():
        for number, path in files:
            sop_of[(study, number)] = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    rows = frames.filter(pc.equal(frames["case_id"], a)).sort_by("frame").to_pylist()
    assert [(r["sweep"], r["instance_frame"], r["sop_instance_uid"]) for r in rows] == [
        (s, f, sop_of[(a, s)]) for s in range(1, 7) for f in range(K)]
    mha_rows = frames.filter(pc.equal(frames["case_id"], mixed["ids"][0]))
    assert mha_rows["sop_instance_uid"].null_count == mha_rows["instance_frame"].null_count == mha_rows.num_rows
    # The same frames score the same, whether read from DICOM or from .mha.
    score_of = {(r["case_id"], r["frame"]): r["score"] for r in frames.select(["case_id", "frame", "score"]).to_pylist()}
    for case_id in mixed["ids"]:
        got = [score_of[(study_uid_of(case_id), f)] for f in range(6 * K)]
        np.testing.assert_allclose(got, [score_of[(case_id, f)] for f in range(6 * K)], rtol=0, atol=1e-5)
    run = json.loads((Path(out) / "run.json").read_text())
    assert len(run["notes"]) == 1 and "single-frame" in run["notes"][0]
    assert_decisions_follow_the_frames(cases, frames)
    # A study's context is its first instance's header; stacked images have none.
    for study in (a, b, c):
        assert {k: by_case[study][k] for k in CONTEXT} == header_context(mixed["studies"][study][0][1])
    assert {by_case[s]["institution"] for s in (a, b, c)} == {"Synthetic North Clinic", "Synthetic South Hospital"}
    for case_id in mixed["ids"]:
        assert [by_case[case_id][k] for k in CONTEXT] == [None] * len(CONTEXT)

    # The morning report of this run: its decisions by site and month are the cases table's own.
    summary = write_run_report(out, str(tmp_path / "morning"))
    assert json.loads((tmp_path / "morning" / "summary.json").read_text())["decisions"] == summary["decisions"]
    decisions = summary["decisions"]
    assert (decisions["overall"]["cases"], decisions["overall"]["usable"]) == (
        cases.num_rows, sum(d == "usable" for d in cases["decision"].to_pylist()))
    for key, column in (("site", "institution"), ("month", "study_date")):
        expected = {}
        for row in by_case.values():
            if row[column] is not None:
                value = row[column][:7] if key == "month" else row[column]
                expected.setdefault(value, [0, 0])
                expected[value][0] += 1
                expected[value][1] += row["decision"] == "usable"
        assert {g["value"]: [g["cases"], g["usable"]] for g in decisions[key]["groups"]} == expected
        assert decisions[key]["unknown_cases"] == len(mixed["ids"])
    page = (tmp_path / "morning" / "report.html").read_text()
    assert "Synthetic North Clinic" in page and "Synthetic South Hospital" in page


CONTEXT = ("study_date", "institution", "station", "manufacturer", "device_model")


def header_context(path: Path) -> dict:
    """`cases/`' context columns as read here from an instance's header with pydicom."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    date = ds.StudyDate
    return {"study_date": f"{date[:4]}-{date[4:6]}-{date[6:]}", "institution": ds.InstitutionName,
            "station": ds.StationName, "manufacturer": ds.Manufacturer, "device_model": ds.ManufacturerModelName}


def output_text(out: Path) -> tuple[str, bytes]:
    """Everything under a scoring output: the text of every file (Parquet decoded row by row), and the raw bytes."""
    texts, raw = [], b""
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        raw += data
        texts.append(str(pq.read_table(path).to_pylist()) if path.suffix == ".parquet" else data.decode())
    return "\n".join(texts), raw


def test_a_pseudonymised_run_writes_no_identifier_and_resumes_under_its_key(ray_local, mixed, cls_checkpoint,
                                                                           tmp_path, capsys):
    """The mixed folder (studies, stacks, bad files, a single-frame note) scored with a key: every identifier is its
    keyed pseudonym, the key and the identifiers are nowhere in the output, dates keep their month, a rerun with the
    same key skips the scored cases and retries the failed ones, and another key (or none) is refused."""
    folder = mixed["folder"]
    key = b"fetaliqa-test-pseudonym-key-0001"
    key_file = tmp_path / "key"
    key_file.write_bytes(key + b"\n")
    out = tmp_path / "out"
    argv = ["--input", str(folder), "--checkpoint", cls_checkpoint, "--output", str(out)]
    assert score_job.main([*argv, "--pseudonymize-key-file", str(key_file)]) == 0
    tables = {t: read_table(str(out), t) for t in (FRAMES, CASES, ERRORS)}
    a, b, c = mixed["a"], mixed["b"], mixed["c"]

    def p(text: str) -> str:
        return pseudonym(key, text)

    cases = {r["case_id"]: r for r in tables[CASES].to_pylist()}
    assert set(cases) == {p(x) for x in (a, b, c, *mixed["ids"])}
    assert cases[p(a)]["source"] == p(str(folder / mixed["studies"][a][0][1].name))
    assert {r["case_id"] for r in tables[ERRORS].to_pylist()} == {
        p(str(folder / "notes.dcm")), p(str(mixed["truncated"])), p("2.25.42"), p(str(folder / "video.dcm"))}
    first = header_context(mixed["studies"][a][0][1])
    assert {k: cases[p(a)][k] for k in CONTEXT} == {
        "study_date": first["study_date"][:7], "institution": p(first["institution"]), "station": p(first["station"]),
        "manufacturer": first["manufacturer"], "device_model": first["device_model"]}
    sops = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for _, path in mixed["studies"][a]}
    frames_a = tables[FRAMES].filter(pc.equal(tables[FRAMES]["case_id"], p(a)))
    assert set(frames_a["sop_instance_uid"].to_pylist()) == {p(uid) for uid in sops}
    run = json.loads((out / "run.json").read_text())
    assert run["pseudonymized"] is True and run["pseudonym_key_id"] == key_id(key) and run["input"] == p(str(folder))

    names = {header_context(files[0][1])[k] for files in mixed["studies"].values() for k in ("institution", "station")}
    files = [str(path) for path in folder.iterdir()]
    originals = {a, b, c, "2.25.42", *mixed["ids"], *sops, str(folder), *files, *names}
    text, raw = output_text(out)
    assert key.decode() not in text and key not in raw
    leaked = sorted(x for x in originals if re.search(rf"(?<![\w.]){re.escape(x)}(?![\w.])", text))
    assert not leaked, f"identifiers in clear in a pseudonymised output: {leaked}"
    assert p(a) in run["notes"][0] and p(str(folder / "single.dcm")) in run["notes"][0]

    # The key holder turns pseudonyms back into studies.
    capsys.readouterr()
    assert cli.main(["pseudonym", "--key-file", str(key_file), a, b]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{a},{p(a)}", f"{b},{p(b)}"]

    # Rerun with the same key: the scored cases are skipped, the failed ones read again under the same pseudonyms.
    assert score_job.main([*argv, "--pseudonymize-key-file", str(key_file)]) == 0
    again = json.loads((out / "run.json").read_text())
    assert again["cases"]["skipped"] == len(cases) and again["cases"]["scored"] == 0
    assert again["cases"]["failed"] == run["cases"]["failed"] == 2
    assert read_table(str(out), CASES).equals(tables[CASES])
    errors = read_table(str(out), ERRORS)
    assert sorted(errors["case_id"].to_pylist()) == sorted(tables[ERRORS]["case_id"].to_pylist())
    retried = errors.filter(pc.equal(errors["run_id"], again["run_id"]))["case_id"].to_pylist()
    assert sorted(retried) == sorted([p(str(folder / "notes.dcm")), p("2.25.42"), p(str(folder / "video.dcm"))])

    # Another key, or none, into this output is refused in one line, and changes nothing.
    other = tmp_path / "other-key"
    other.write_bytes(b"another-test-key-of-enough-bytes")
    for flags in (["--pseudonymize-key-file", str(other)], []):
        capsys.readouterr()
        assert score_job.main([*argv, *flags]) == 2
        err = own_stderr_lines(capsys)
        assert len(err) == 1 and key_id(key) in err[0], err
    assert json.loads((out / "run.json").read_text()) == again


def test_an_s3_prefix_of_dicom_is_listed_from_headers_alone(mixed, s3_server, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs=options, skip_instance_cache=True)
    files = [p for p in mixed["folder"].iterdir() if not p.name.endswith((".mha", ".txt"))]
    fs.pipe({f"{bucket}/dicom/{p.name}": p.read_bytes() for p in files})
    before = len(s3_server.requests)

    table = list_archive(f"{bucket}/dicom", {"client_kwargs": options})

    assert set(table["case_id"].to_pylist()) == {mixed["a"], mixed["b"], mixed["c"], f"{bucket}/dicom/notes.dcm",
                                                 "2.25.42"}
    reads = [r for r in s3_server.requests[before:] if "list-type" not in r.query]
    per_file: dict[str, list[str]] = {}
    for r in reads:
        per_file.setdefault(r.path.rsplit("/", 1)[-1], []).append(r.method)
    # Per file a HEAD (s3fs learns the size) and one GET of a 256 KiB block, which holds the header (these
    # small files whole); nothing else but the LISTs.
    assert per_file == {p.name: ["HEAD", "GET"] for p in files}


def test_instances_of_different_sizes_keep_their_own_native_size(tmp_path):
    """Sweep 1 at 40 x 48 and sweep 2 at 56 x 64 in one study: each is resized on its own, and a SEG mask goes
    back to its own sweep's size (an all-ones model mask covers exactly that sweep's region)."""
    from fetaliqa.score.write import summarise_cases
    from fetaliqa.synthetic.archive import synthetic_cases
    from fetaliqa.synthetic.dicom import encode_sweep

    small, large = (next(synthetic_cases(1, 2, h, w, seed=9)) for h, w in ((40, 48), (56, 64)))
    assert small.case_id == large.case_id  # the id is drawn before the frames: one study
    for sweep, case in ((1, small), (2, large)):
        (tmp_path / f"{sweep}.dcm").write_bytes(encode_sweep(case, 1, sweep, 2)[1])
    row = list_archive(str(tmp_path)).to_pylist()[0]
    read = read_case_row(row["case_id"], row["source"], image_size=32, instances=row["instances"])
    assert read["error"] == "" and read["images"].shape == (4, 32, 32)
    assert [(s["height"], s["width"]) for s in json.loads(read["sweeps"])] == [(40, 48), (56, 64)]

    side = 32
    batch = {key: np.array([value]) for key, value in read.items() if key != "images"}
    batch["scores"] = np.array([np.full(4, 0.9, np.float32)])
    batch["masks"] = np.array([np.packbits(np.ones((4, side * side), np.uint8), axis=1)])
    batch["best_image"] = read["images"][:1]
    summary = summarise_cases(batch, threshold=0.5, image_size=side).to_pylist()[0]
    assert summary["mask_area"] == [40 * 48] * 2 + [56 * 64] * 2
    assert summary["sweep"] == [1, 1, 2, 2] and summary["instance_frame"] == [0, 1, 0, 1]
    assert summary["sweeps"] == 2 and summary["ac_mm"] is not None and summary["note"] is None


def test_without_spacing_ac_stays_null_and_the_case_says_why(tmp_path):
    from fetaliqa.score.write import summarise_cases
    from fetaliqa.synthetic.archive import synthetic_cases
    from fetaliqa.synthetic.dicom import encode_sweep

    case = next(synthetic_cases(1, 2, 40, 48, seed=9))
    path = tmp_path / "1.dcm"
    path.write_bytes(encode_sweep(case, 1, 1, 2)[1])
    ds = pydicom.dcmread(path)
    del ds.SequenceOfUltrasoundRegions
    ds.save_as(path, enforce_file_format=True)
    row = list_archive(str(tmp_path)).to_pylist()[0]
    read = read_case_row(row["case_id"], row["source"], image_size=32, instances=row["instances"])
    assert json.loads(read["sweeps"])[0]["spacing"] is None
    batch = {key: np.array([value]) for key, value in read.items() if key != "images"}
    batch["scores"] = np.array([np.full(2, 0.9, np.float32)])
    batch["masks"] = np.array([np.packbits(np.ones((2, 32 * 32), np.uint8), axis=1)])
    batch["best_image"] = read["images"][:1]
    summary = summarise_cases(batch, threshold=0.5, image_size=32).to_pylist()[0]
    assert summary["ac_mm"] is None
    assert "sweep 1: no pixel spacing" in summary["note"] and "not cropped" in summary["note"]
