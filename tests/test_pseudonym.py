"""Keyed pseudonyms: the contract's formula, key files, free text, and the key holder's command. The end-to-end run
(pseudonymised outputs, resume under a key) is in test_score_dicom.py."""

from __future__ import annotations

import hashlib
import hmac
import io
import json

import numpy as np
import pytest
from conftest import own_stderr_lines

from fetaliqa import cli
from fetaliqa.errors import FetaliqaError, MissingObjectError
from fetaliqa.inputs import storage
from fetaliqa.pseudonym import KeyFile, Pseudonyms, key_id, load_key, pseudonym
from fetaliqa.score.write import summarise_cases
from jobs import score as score_job

KEY = b"0123456789abcdef-test-key"


def test_a_pseudonym_is_the_contracts_hmac_and_depends_on_the_key():
    study = "2.25.329800735698586629295641978511506172918"
    assert pseudonym(KEY, study) == "p" + hmac.new(KEY, study.encode(), hashlib.sha256).hexdigest()[:32]
    assert pseudonym(KEY, study) == pseudonym(bytes(KEY), study)  # stable
    assert pseudonym(KEY + b"x", study) != pseudonym(KEY, study)
    assert pseudonym(KEY, study + "1") != pseudonym(KEY, study)
    assert key_id(KEY) == hmac.new(KEY, b"fetaliqa-key-id", hashlib.sha256).hexdigest()[:12]
    assert KEY.decode() not in repr(Pseudonyms(KEY)) and key_id(KEY) in repr(Pseudonyms(KEY))


def test_a_key_file_is_stripped_and_a_short_or_missing_one_refused_in_one_line(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"  " + KEY + b"\n")
    assert load_key(str(path)) == KEY
    path.write_bytes(b"short-key\n")
    with pytest.raises(FetaliqaError) as err:
        load_key(str(path))
    assert str(path) in str(err.value) and "9 bytes" in str(err.value) and "short-key" not in str(err.value)
    with pytest.raises(MissingObjectError) as err:
        load_key(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value) and "nowhere" in str(err.value)


def test_free_text_loses_every_identifier_in_one_pass():
    pseudonyms = Pseudonyms(KEY)
    source, study = "s3://archive/site-a/IM000001", "1.2.840.113619.2.55.3"
    text = (f"{source}: truncated (study {study}; copy at /data/x/IM000001, bucket path archive/site-a/IM000001; "
            "frames 3 x 0.28 mm)")
    written = pseudonyms.text(text, [source, "archive/site-a/IM000001"])
    p = pseudonyms.id
    assert written == (f"{p(source)}: truncated (study {p(study)}; copy at {p('/data/x/IM000001')}, bucket path "
                       f"{p('archive/site-a/IM000001')}; frames 3 x 0.28 mm)")
    off = Pseudonyms()
    assert off.text(text, [source]) == text and off.id(source) == source and off.date("2025-02-16") == "2025-02-16"
    assert pseudonyms.date("2025-02-16") == "2025-02" and pseudonyms.date(None) is None and p(None) is None


def test_write_tasks_load_the_key_from_its_file_and_refuse_a_changed_one(tmp_path):
    """What travels to Ray's write tasks is the key file and its id; a study's row written under two keys differs in
    every identifier and keeps its scores, device and month."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(KEY)
    second.write_bytes(KEY[::-1])
    sweeps = [{"frames": 2, "height": 30, "width": 40, "spacing": [0.3, 0.3], "sop_instance_uid": f"2.25.{k}"}
              for k in (11, 12)]
    study = {"study_date": "2025-03-30", "institution": "Example Unit", "station": "US-3", "manufacturer": "Acme",
             "device_model": "Sono 9"}
    batch = {"case_id": np.array(["2.25.7"]), "source": np.array(["/data/2.25.11.dcm"]), "error": np.array([""]),
             "message": np.array([""]), "note": np.array([""]), "instance_errors": np.array(["[]"]),
             "sweeps": np.array([json.dumps(sweeps)]), "study": np.array([json.dumps(study)]),
             "scores": [np.array([0.1, 0.9, 0.2, 0.4], np.float32)], "best_image": [np.zeros((32, 32), np.uint8)]}
    rows = [summarise_cases(batch, 0.5, 32, KeyFile(str(path), key_id(path.read_bytes()))).to_pylist()[0]
            for path in (first, second)]
    for row, key in zip(rows, (KEY, KEY[::-1])):
        assert (row["case_id"], row["source"], row["institution"], row["station"]) == tuple(
            pseudonym(key, x) for x in ("2.25.7", "/data/2.25.11.dcm", "Example Unit", "US-3"))
        assert row["sop_instance_uid"] == [pseudonym(key, "2.25.11")] * 2 + [pseudonym(key, "2.25.12")] * 2
        assert (row["study_date"], row["manufacturer"], row["device_model"]) == ("2025-03", "Acme", "Sono 9")
    assert rows[0]["case_id"] != rows[1]["case_id"] and rows[0]["score"] == rows[1]["score"]
    assert (rows[0]["decision"], rows[0]["usable_sweeps"]) == ("usable", [1])
    with pytest.raises(FetaliqaError, match="changed during the run"):
        KeyFile(str(second), key_id(KEY)).pseudonyms()


def test_score_refuses_a_short_key_before_any_work(cls_checkpoint, small_archive, tmp_path, capsys):
    key = tmp_path / "key"
    key.write_text("too short\n")
    out = tmp_path / "out"
    assert score_job.main(["--input", str(small_archive), "--checkpoint", cls_checkpoint, "--output", str(out),
                           "--pseudonymize-key-file", str(key)]) == 2
    err = own_stderr_lines(capsys)
    assert len(err) == 1 and str(key) in err[0] and "at least 16" in err[0] and "too short" not in err[0]
    assert not out.exists()


def test_the_key_holder_pseudonymises_arguments_or_stdin(tmp_path, capsys, monkeypatch):
    key = tmp_path / "key"
    key.write_bytes(KEY + b"\n")
    assert cli.main(["pseudonym", "--key-file", str(key), "2.25.7", "case, with a comma"]) == 0
    assert capsys.readouterr().out == f"2.25.7,{pseudonym(KEY, '2.25.7')}\n" \
                                      f'"case, with a comma",{pseudonym(KEY, "case, with a comma")}\n'
    monkeypatch.setattr("sys.stdin", io.StringIO("a\r\n\nb\n"))
    assert cli.main(["pseudonym", "--key-file", str(key)]) == 0
    assert capsys.readouterr().out == f"a,{pseudonym(KEY, 'a')}\nb,{pseudonym(KEY, 'b')}\n"


def test_a_key_file_in_object_storage_is_read_and_a_missing_one_named(s3_bucket):
    bucket, options = s3_bucket
    fs, root = storage.filesystem(bucket, options)
    fs.pipe_file(f"{root}/keys/fetaliqa.key", KEY + b"\n")
    assert load_key(f"{bucket}/keys/fetaliqa.key", options) == KEY
    with pytest.raises(MissingObjectError) as err:
        load_key(f"{bucket}/keys/nowhere.key", options)
    assert "\n" not in str(err.value) and f"{bucket}/keys/nowhere.key" in str(err.value)
