"""No secret in a task spec, a log or an output: `--storage-options` refuses credentials, and presigned URLs are
read whole but recorded without their query strings (`fetaliqa.redact`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import S3_ENV, run_cli

from fetaliqa import errors
from fetaliqa.inputs import layout
from fetaliqa.redact import public_url, redact_text
from fetaliqa.score.ledger import read_table
from fetaliqa.score.schema import CASES, ERRORS
from fetaliqa.score.write import summarise_cases
from fetaliqa.synthetic.archive import write_synthetic_archive

SIGNED_S3 = ("https://bucket.s3.amazonaws.com/archive/images/stacked_fetal_ultrasound/c1.nii.gz?X-Amz-Algorithm="
             "AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
             "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=600&X-Amz-SignedHeaders=host&X-Amz-Signature=5ec12e7")


@pytest.mark.parametrize("url, public", [
    (SIGNED_S3, "https://bucket.s3.amazonaws.com/archive/images/stacked_fetal_ultrasound/c1.nii.gz"),
    ("http://127.0.0.1:9000/b/x.mha?AWSAccessKeyId=AKIDEXAMPLE&Signature=5ec%2B12e7%3D&Expires=1",
     "http://127.0.0.1:9000/b/x.mha"),
    ("https://storage.googleapis.com/b/x.mha?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=5ec12e7",
     "https://storage.googleapis.com/b/x.mha"),
    ("https://acct.blob.core.windows.net/c/x.mha?sv=2022-11-02&se=2026-01-01&sp=r&sig=5ec12e7%3D#frag",
     "https://acct.blob.core.windows.net/c/x.mha"),
    ("s3://AKIDEXAMPLE:5ec12e7@bucket/archive", "s3://bucket/archive"),
    ("/data/archive", "/data/archive"),
    ("/data/odd?name.mha", "/data/odd?name.mha"),  # a local file name may hold '?': only a signed query goes
    ("/data/x.mha?X-Amz-Signature=5ec12e7", "/data/x.mha"),
])
def test_public_url_drops_user_info_and_query_strings(url, public):
    assert public_url(url) == public
    assert redact_text(url) == public


def test_redact_text_redacts_every_url_in_a_message_and_keeps_the_rest():
    message = (f"{SIGNED_S3}: cannot read (ClientResponseError: 403, message='Forbidden', url='{SIGNED_S3}'); "
               "see also (http://h/b/y.mha?sig=5ec12e7). IM000001?X-Amz-Signature=5ec12e7: not DICOM")
    public = public_url(SIGNED_S3)
    assert redact_text(message) == (f"{public}: cannot read (ClientResponseError: 403, message='Forbidden', "
                                    f"url='{public}'); see also (http://h/b/y.mha). IM000001: not DICOM")


def test_suffix_and_case_id_come_from_a_presigned_urls_path():
    assert layout.image_suffix(SIGNED_S3) == ".nii.gz"
    assert layout.case_id_of(SIGNED_S3) == "c1"
    assert layout.image_suffix("https://h/b/case.mha?X-Amz-Signature=1&x=.nrrd") == ".mha"
    assert layout.image_suffix("https://h/b/notes.txt?x=case.mha") is None


def test_input_error_redacts_its_source_and_problem():
    err = errors.MissingObjectError(SIGNED_S3, f"no such object (FileNotFoundError: {SIGNED_S3})")
    public = public_url(SIGNED_S3)
    assert str(err) == f"{public}: no such object (FileNotFoundError: {public})"
    assert err.source == public and err.kind == "missing"


def test_summarise_cases_redacts_every_text_column():
    signed_dicom = SIGNED_S3.replace("c1.nii.gz", "IM000001")
    batch = {"case_id": np.array(["IM000001?X-Amz-Signature=5ec12e7"]), "source": np.array([signed_dicom]),
             "error": np.array(["not_dicom"]), "message": np.array([f"{signed_dicom}: not DICOM"]),
             "instance_errors": np.array([json.dumps([[signed_dicom, "truncated", f"{signed_dicom}: truncated"]])]),
             "note": np.array([f"{signed_dicom}: single-frame instance skipped"]),
             "scores": [np.zeros(0, np.float32)], "sweeps": np.array(["[]"])}
    row = summarise_cases(batch, threshold=0.5, image_size=224).to_pylist()[0]
    public = public_url(signed_dicom)
    assert row["case_id"] == "IM000001" and row["source"] == public and row["message"] == f"{public}: not DICOM"
    assert json.loads(row["instance_errors"]) == [[public, "truncated", f"{public}: truncated"]]
    assert row["note"] == f"{public}: single-frame instance skipped"


@pytest.mark.parametrize("options, named", [
    ({"key": "AKIDEXAMPLE", "secret": "5ec12e7"}, "key, secret"),
    ({"endpoint_url": "http://h", "client_kwargs": {"aws_secret_access_key": "5ec12e7"}},
     "client_kwargs.aws_secret_access_key"),
    ({"config_kwargs": {"s3": {"Session_Token": "5ec12e7"}}}, "config_kwargs.s3.Session_Token"),
])
def test_storage_options_refuse_credentials_in_one_line(options, named, capsys):
    from jobs import score as score_job

    code = score_job.main(["--input", "in", "--checkpoint", "ckpt", "--output", "out",
                           "--storage-options", json.dumps(options)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and captured.out == ""
    assert lines[0].startswith("python -m jobs.score: error: --storage-options holds credentials")
    assert f"({named})" in lines[0] and "standard AWS/fsspec chain on every node" in lines[0]
    assert "5ec12e7" not in lines[0] and "AKIDEXAMPLE" not in lines[0]


def test_storage_options_keep_what_is_no_secret():
    from jobs.common import _storage_options

    options = {"anon": False, "profile": "screening", "endpoint_url": "http://h",
               "client_kwargs": {"region_name": "eu-west-2"}, "config_kwargs": {"retries": {"mode": "adaptive"}}}
    assert _storage_options(json.dumps(options)) == options


def _presign(s3_endpoint: str, bucket: str, key: str) -> str:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=s3_endpoint, config=Config(signature_version="s3v4"))
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600)


def _texts(path: Path) -> list[str]:
    """The file's bytes as text, and for Parquet also every string value it holds (its pages are compressed)."""
    texts = [path.read_bytes().decode("latin-1")]
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        texts += [str(value) for column in table.columns if pa.types.is_string(column.type)
                  for value in column.to_pylist()]
    return texts


def test_presigned_manifest_scores_and_leaks_no_signature(s3_server, s3_endpoint, s3_bucket, cls_checkpoint, tmp_path):
    bucket, options = s3_bucket
    ids = write_synthetic_archive(f"{bucket}/archive", cases=3, frames_per_sweep=4, height=40, width=50, seed=1,
                                  storage_options=options)
    name = bucket.removeprefix("s3://")
    keys = [f"archive/{layout.IMAGES_DIR}/{case_id}.mha" for case_id in ids] + [f"archive/{layout.IMAGES_DIR}/gone.mha"]
    urls = [_presign(s3_endpoint, name, key) for key in keys]
    signatures = [url.rsplit("X-Amz-Signature=", 1)[1] for url in urls]
    manifest = tmp_path / "presigned.txt"
    manifest.write_text("# presigned GET URLs, one a line\n" + "\n".join(urls) + "\n")
    out = tmp_path / "scores"
    s3_server.take()

    job = run_cli("jobs.score", "--input", str(manifest), "--checkpoint", cls_checkpoint, "--output", str(out))
    log = job.stdout + job.stderr
    assert job.returncode == 0, log

    # Read with the whole signed URL: every GET of a case object carried its signature.
    gets = [r for r in s3_server.take() if r.method == "GET" and r.path.startswith(f"/{name}/archive/")]
    assert {r.path for r in gets} == {f"/{name}/{key}" for key in keys}
    assert all("X-Amz-Signature=" in r.query for r in gets)
    # The good cases scored; the missing one is an errors/ row named by its public URL.
    assert sorted(read_table(str(out), CASES)["case_id"].to_pylist()) == sorted(ids)
    failed, gone = read_table(str(out), ERRORS).to_pylist(), public_url(urls[3])
    assert [(row["case_id"], row["error"], row["source"]) for row in failed] == [("gone", "missing", gone)]
    assert failed[0]["message"].startswith(f"{gone}: ")
    run = json.loads((out / "run.json").read_text())
    assert run["cases"]["scored"] == 3 and run["cases"]["failed"] == 1

    files = [path for path in out.rglob("*") if path.is_file()]
    assert {path.suffix for path in files} >= {".parquet", ".json"}
    secrets = [*signatures, "X-Amz-Signature", "X-Amz-Credential", S3_ENV["AWS_ACCESS_KEY_ID"]]
    leaks = [(str(path), secret) for path in files for text in _texts(path) for secret in secrets if secret in text]
    leaks += [("job log", secret) for secret in secrets if secret in log]
    assert leaks == []


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_a_presigned_manifest_url_is_read_as_a_manifest(s3_endpoint, s3_bucket, suffix):
    """`--input` may itself be a presigned URL of a manifest: its kind comes from its path, not the query string,
    and its folder (where a relative entry or the annotations would be) is the unsigned one."""
    import fsspec

    from fetaliqa.inputs.listing import archive_root, list_archive

    bucket, options = s3_bucket
    ids = write_synthetic_archive(f"{bucket}/archive", cases=2, frames_per_sweep=1, height=32, width=32, seed=2,
                                  storage_options=options)
    name = bucket.removeprefix("s3://")
    images = [_presign(s3_endpoint, name, f"archive/{layout.IMAGES_DIR}/{case_id}.mha") for case_id in ids]
    text = ("uri\n" if suffix == ".csv" else "") + "\n".join(images) + "\n"
    fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint}).pipe_file(f"{name}/archive/list{suffix}",
                                                                                   text.encode())
    manifest = _presign(s3_endpoint, name, f"archive/list{suffix}")

    listed = list_archive(manifest).to_pylist()
    assert sorted((row["case_id"], row["source"], row["error"]) for row in listed) == sorted(
        (case_id, url, "") for case_id, url in zip(ids, images))
    assert archive_root(manifest) == f"{s3_endpoint}/{name}/archive"
