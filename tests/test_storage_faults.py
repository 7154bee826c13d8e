"""Transient S3 faults are retried, permanent ones are not: real S3 (moto over HTTP) behind tests/fault_proxy.py,
which answers with 503 SlowDown, 500 InternalError, connection resets mid-body and 2 s stalls."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from fault_proxy import FAULTS, FaultProxy

from fetaliqa.errors import InputError
from fetaliqa.inputs import storage
from fetaliqa.score import ledger
from fetaliqa.score.ledger import read_table
from fetaliqa.score.read import read_case_row
from fetaliqa.score.schema import CASES, ERRORS, FRAMES
from fetaliqa.synthetic.archive import write_synthetic_archive

from jobs import score as score_job

# Faulted requests of the scoring run: a seeded 10% of all, plus the first listing, read and write.
SEED, RATE = 19, 0.10
OBJECT_KINDS = ("LIST", "GET object", "PUT object")


@pytest.fixture
def proxy_factory(s3_server):
    proxies = []

    def start(**kwargs) -> FaultProxy:
        proxies.append(FaultProxy(s3_server.url, **kwargs))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.stop()


def test_a_run_through_a_flaky_store_scores_every_case_once(ray_local, cls_checkpoint, s3_bucket, proxy_factory):
    bucket, direct = s3_bucket
    case_ids = write_synthetic_archive(f"{bucket}/archive", cases=6, frames_per_sweep=4, height=40, width=50, seed=1,
                                       storage_options=direct)
    proxy = proxy_factory(rate=RATE, seed=SEED, max_stalls=2, force_first=OBJECT_KINDS)
    output = f"{bucket}/scores"

    assert score_job.main(["--input", f"{bucket}/archive", "--checkpoint", cls_checkpoint, "--output", output,
                           "--storage-options", json.dumps({"endpoint_url": proxy.url})]) == 0

    requests, faults = sum(proxy.requests.values()), proxy.faults_by_kind()
    print(f"\nfault proxy: {requests} requests {dict(proxy.requests)}; {sum(faults.values())} faults {faults} "
          f"on {sorted(proxy.faulted_kinds())}; {proxy.retries} retries")
    # The faults were real and everywhere: every kind, on listings, reads and writes, at least 5% of all requests.
    assert set(faults) == set(FAULTS) and set(OBJECT_KINDS) <= proxy.faulted_kinds()
    assert sum(faults.values()) >= 0.05 * requests
    assert not proxy.unanswered, "a faulted request was never retried"

    # Checked through the endpoint directly: nothing lost, nothing twice, no error row, every record whole.
    cases, frames = read_table(output, CASES, direct), read_table(output, FRAMES, direct)
    keys = Counter(zip(frames["case_id"].to_pylist(), frames["frame"].to_pylist()))
    print(f"cases scored {cases.num_rows}/{len(case_ids)}; frames {frames.num_rows}; "
          f"rows lost {len(case_ids) * 24 - len(keys)}; duplicates {sum(n - 1 for n in keys.values())}")
    assert sorted(cases["case_id"].to_pylist()) == sorted(case_ids)
    assert read_table(output, ERRORS, direct).num_rows == 0
    assert max(keys.values()) == 1 and len(keys) == len(case_ids) * 24  # T = 6 sweeps x 4 frames
    fs, root = storage.filesystem(output, direct)
    records = ledger.load_records(output, direct)
    assert sorted(case for r in records for case in r["scored"]) == sorted(case_ids)
    for record in records:
        assert all(fs.exists(f"{root}/{path}") for path in record["files"].values()), record


def test_permanent_faults_cost_one_request(s3_bucket, proxy_factory, small_archive):
    bucket, direct = s3_bucket
    fs, root = storage.filesystem(bucket, direct)
    good = next((small_archive / "images" / "stacked_fetal_ultrasound").iterdir()).read_bytes()
    fs.pipe_file(f"{root}/denied.mha", good)
    fs.pipe_file(f"{root}/truncated.mha", good[: len(good) // 2])
    proxy = proxy_factory(rate=0.0)
    proxy.deny(f"/{root}/denied.mha")
    through_proxy = {"endpoint_url": proxy.url}

    for name, kind in [("denied", "credentials"), ("missing", "missing"), ("truncated", "truncated")]:
        row = read_case_row(name, f"{bucket}/{name}.mha", through_proxy)
        assert row["error"] == kind, row["message"]
        assert dict(proxy.requests) == {"GET object": 1}, name
        proxy.reset_counts()


def test_storage_options_override_the_retry_defaults(s3_bucket, proxy_factory):
    bucket, direct = s3_bucket
    fs, root = storage.filesystem(bucket, direct)
    fs.pipe_file(f"{root}/object.bin", b"bytes")

    merged = storage.filesystem(bucket, {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"read_timeout": 30}})[0]
    assert merged.config_kwargs == {"read_timeout": 30, "retries": {"mode": "standard", "max_attempts": 5}}
    assert storage.filesystem("memory://x")[0].storage_options == {}  # other protocols: fsspec's own

    url = f"{bucket}/object.bin"
    proxy = proxy_factory(rate=0.0, faults=("internal",), force_first=("GET object",))
    with storage.local_copy(url, {"endpoint_url": proxy.url}) as local:  # the default policy retries the 500
        assert Path(local).read_bytes() == b"bytes"
    assert proxy.requests["GET object"] == 2
    client = storage.filesystem(url, {"endpoint_url": proxy.url})[0].s3  # the cached filesystem that read it
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 6}

    proxy = proxy_factory(rate=0.0, faults=("internal",), force_first=("GET object",))
    no_retries = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 0}}}
    with pytest.raises(InputError, match="internal error"), storage.local_copy(url, no_retries):
        pass
    assert proxy.requests["GET object"] == 1
