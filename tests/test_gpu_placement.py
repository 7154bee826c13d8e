"""GPUs only where Ray gave them: the device and dtype rules of `fetaliqa.models.frame_model`, the CLS head's float32
logits, no tensor built from host data per micro-batch, and the GPU actor pool of `jobs.score` run on a local
Ray that declares a logical GPU while torch has no CUDA (this machine): two concurrent calls per actor on two
threads, rows identical to the CPU pool's.

CUDA itself cannot run here: its few lines (the capability query, the streams and their event) are kept small;
every decision around them is a function tested with given inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from torch.utils._python_dispatch import TorchDispatchMode

from fetaliqa.inputs.stacks import read_image_stack
from fetaliqa.models.frame_model import FrameModel, device_for_ray_gpus, inference_dtype, scoring_device
from fetaliqa.preprocess import resize_frames
from fetaliqa.score.ledger import read_table
from fetaliqa.score.predict import CALL_LOG_ENV
from fetaliqa.score.schema import CASES, FRAMES
from jobs.score import GPU_CASES_PER_CALL, predictor_cases_per_call


@pytest.fixture(scope="module")
def frames(small_archive) -> np.ndarray:
    """(48, 224, 224) uint8: the frames of one synthetic case, resized."""
    first = sorted((small_archive / "images" / "stacked_fetal_ultrasound").glob("*.mha"))[0]
    return resize_frames(read_image_stack(str(first)).frames)


@pytest.mark.parametrize(("gpu_ids", "visible", "cuda", "expected"), [
    ([], None, True, "cpu"),            # a CPU actor on a GPU node: CUDA is available, nothing was assigned
    ([], "", True, "cpu"),
    (["0"], "0", False, "cpu"),         # assigned, but torch has no CUDA (this machine, a CPU-only torch)
    (["2"], "2", True, "cuda:0"),       # Ray's usual case: CUDA_VISIBLE_DEVICES is the worker's GPUs
    ([3, 1], "1,3", True, "cuda:1"),    # ids as ints, several GPUs: the first assigned, at its place in the list
    (["1"], None, True, "cuda:1"),      # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: all GPUs visible
])
def test_cuda_only_on_a_gpu_ray_assigned(gpu_ids, visible, cuda, expected):
    assert device_for_ray_gpus(gpu_ids, visible, cuda) == torch.device(expected)


def test_an_assigned_gpu_hidden_from_torch_is_an_error():
    with pytest.raises(RuntimeError, match="Ray assigned GPU 2 but CUDA_VISIBLE_DEVICES='0,1'"):
        device_for_ray_gpus(["2"], "0,1", True)


def test_outside_a_gpu_worker_the_cpu_even_where_cuda_is_available(monkeypatch):
    """The old rule took CUDA whenever torch saw it. This process is no Ray worker (the driver, if Ray runs in
    it, is assigned nothing): CPU, unless a device is named."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert scoring_device() == torch.device("cpu")
    assert scoring_device("cuda:1") == torch.device("cuda:1")
    assert scoring_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(("device_type", "capability", "expected"), [
    ("cuda", (9, 0), torch.bfloat16),   # H100, H200
    ("cuda", (8, 0), torch.bfloat16),   # A100
    ("cuda", (8, 6), torch.bfloat16),   # A10, RTX 30xx
    ("cuda", (7, 5), torch.float16),    # T4
    ("cuda", (7, 0), torch.float16),    # V100
    ("cuda", (6, 1), torch.float32),    # P4, P40: float16 at 1/64 rate
    ("cpu", None, torch.float32),
])
def test_inference_dtype_by_device_and_capability(device_type, capability, expected):
    assert inference_dtype(device_type, capability) == expected


def test_cls_logits_stay_float32_on_a_reduced_precision_encoder(cls_checkpoint, frames):
    """bf16 encoder, float32 head: the logits are float32 (bf16 ones would tie frames on score, and the best
    frame is the argmax); float16, the Volta/Turing choice, stays as close to float32 as bf16 does."""
    picked = frames[[0, 30]]
    expected, _ = FrameModel(cls_checkpoint)(picked)
    for dtype in (torch.bfloat16, torch.float16):
        model = FrameModel(cls_checkpoint, dtype=dtype)
        assert model.device == torch.device("cpu") and model.dtype == dtype
        assert {p.dtype for p in model.model.encoder.parameters()} == {dtype}
        logits = []
        model.model.head.register_forward_hook(lambda module, args, output: logits.append(output))
        scores, _ = model(picked)
        assert [t.dtype for t in logits] == [torch.float32]
        assert not np.array_equal(scores, expected)  # the reduced precision really ran
        np.testing.assert_allclose(scores, expected, rtol=0, atol=0.01)
    in_bf16 = torch.from_numpy(scores).to(torch.bfloat16).float().numpy()
    assert not np.array_equal(in_bf16, scores)  # finer than bf16 could hold


class HostTensors(TorchDispatchMode):
    """Counts tensors made from host data (torch.tensor, as_tensor of a list, from_numpy: `lift_fresh`): on
    CUDA each such constant costs a host-to-device copy that the host waits for."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


def test_a_call_builds_no_constant_per_micro_batch(seg_checkpoint, frames):
    """SEG normalises on the device and packs masks: both use constants FrameModel made once. Per call, the
    one tensor from host data is the frames themselves, however many micro-batches."""
    model = FrameModel(seg_checkpoint, batch_size=1)
    assert model._mean.device == model._std.device == model._bit_values.device == model.device
    with HostTensors() as made:
        scores, packed = model(frames[30:32], packed_masks=True)
    assert made.count == 1 and len(scores) == len(packed) == 2


# The job's driver with a local Ray that declares one logical GPU (torch here has no CUDA). jobs.common.init_ray
# returns at once when Ray is already initialised, so the job runs on this one.
GPU_POOL_DRIVER = """
import sys
import ray
from jobs import score
ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False)
sys.exit(score.main(sys.argv[1:]))
"""


def test_the_gpu_actor_pool_runs_two_calls_at_once_and_scores_as_the_cpu_pool(small_archive, cls_checkpoint,
                                                                                cls_scores, tmp_path):
    """`--num-gpus-per-actor 0.5`: the pool of `predictor_pool` for GPU actors (two concurrent calls, true
    multithreading). The actor is assigned Ray's GPU 0, finds no CUDA and scores on the CPU in float32; its
    first two calls wait for each other (CALL_LOG_ENV), so records of both, met, on two threads of one
    process prove the overlap. The rows equal those of `cls_scores`, the CPU pool's run (4 logical CPUs, hence
    the same read tasks and batches), but for run_id."""
    calls, out = tmp_path / "calls", tmp_path / "scores"
    calls.mkdir()
    env = {**os.environ, CALL_LOG_ENV: str(calls), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-c", GPU_POOL_DRIVER, "--input", str(small_archive), "--checkpoint",
                           cls_checkpoint, "--output", str(out), "--num-gpus-per-actor", "0.5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    records = [json.loads(path.read_text()) for path in calls.glob("*.json")]
    assert len({r["pid"] for r in records}) == 1 and len(records) == 4  # one actor, a call per case
    first_two = [r for r in records if r["call"] <= 2]
    assert [r["met"] for r in first_two] == [True, True]
    assert len({r["thread"] for r in first_two}) == 2
    assert {(tuple(r["gpu_ids"]), r["device"], r["dtype"]) for r in records} == {(("0",), "cpu", "float32")}

    for table in (FRAMES, CASES):
        expected, got = read_table(cls_scores, table), read_table(str(out), table)
        keys = [("case_id", "ascending")] + ([("frame", "ascending")] if table == FRAMES else [])
        expected, got = (t.drop_columns(["run_id"]).sort_by(keys) for t in (expected, got))
        assert got.num_rows == expected.num_rows > 0
        assert got.equals(expected), table


def test_gpu_predictor_calls_take_a_read_tasks_cases_at_most_eight():
    """Ray Data refuses a GPU map without a batch size; CPU actors keep a block per call."""
    assert predictor_cases_per_call(0.0, 1000, 16) is None
    assert predictor_cases_per_call(1.0, 4, 4) == 1
    assert predictor_cases_per_call(0.5, 20, 4) == 5
    assert predictor_cases_per_call(1.0, 10_000, 313) == GPU_CASES_PER_CALL == 8
    assert predictor_cases_per_call(1.0, 0, 1) == 1
