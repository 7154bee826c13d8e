"""FrameModel and ScoreFrames without Ray: bf16 weights against float32, channels_last against NCHW,
CLS normalisation folded into the patch convolution against the checkpoint's model on normalised frames,
micro-batches, bit-packed masks, the device's default batch; and the GPU benchmark's smoke run on CPU.

bf16 runs on this CPU too (slowly: no bf16 matrix units), so the tolerance of the path CUDA takes is
checked here on `fetalclip-tiny`, on a few frames.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fetaliqa.inputs.stacks import read_image_stack
from fetaliqa.models import load_checkpoint
from fetaliqa.models.frame_model import FrameModel, default_batch_size, pack_masks
from fetaliqa.models.normalize import fold_normalization, normalize_frames
from fetaliqa.preprocess import resize_frames
from fetaliqa.score.predict import ScoreFrames
from jobs.score import build_parser, predictor_pool

REPO = Path(__file__).resolve().parents[1]
# bf16 weights against float32 on fetalclip-tiny (README, "Precision"): CLS probability within 0.01;
# SEG mask-area score within 0.005 and at least 99% of mask pixels the same.
CLS_SCORE_TOLERANCE = 0.01
SEG_SCORE_TOLERANCE = 0.005
SEG_PIXEL_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def frames(small_archive) -> np.ndarray:
    """(48, 224, 224) uint8: the frames of one synthetic case (fan, speckle, an abdomen in some), resized."""
    first = sorted((small_archive / "images" / "stacked_fetal_ultrasound").glob("*.mha"))[0]
    return resize_frames(read_image_stack(str(first)).frames)


def test_bf16_cls_scores_stay_within_tolerance_of_float32(cls_checkpoint, frames):
    picked = frames[[0, 30]]  # without and with the abdomen
    reference = FrameModel(cls_checkpoint)
    bf16 = FrameModel(cls_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in reference.model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.model.encoder.parameters()} == {torch.bfloat16}  # cast once, every weight
    assert {p.dtype for p in bf16.model.head.parameters()} == {torch.float32}  # but the CLS head's
    expected, _ = reference(picked)
    scores, _ = bf16(picked)
    assert scores.dtype == np.float32 and scores.shape == (2,)
    assert not np.array_equal(scores, expected)  # bf16 really ran
    np.testing.assert_allclose(scores, expected, rtol=0, atol=CLS_SCORE_TOLERANCE)


def test_folded_cls_scores_as_the_checkpoint_model_on_normalised_frames(cls_checkpoint, frames):
    """The fold changes the input, not the scores: float32 scores of raw (B, 1, S, S) pixels through the folded
    patch convolution against the unfolded model's on `normalize_frames` output."""
    picked = frames[[0, 10, 29, 30, 47]]  # 30 has the abdomen
    folded = FrameModel(cls_checkpoint)
    conv = folded.model.encoder.conv1
    assert folded.folded and conv.in_channels == 1 and conv.bias is not None
    assert not fold_normalization(folded.model.encoder, folded.mean, folded.std)  # never folded twice
    assert folded.model_input(torch.from_numpy(picked)).shape == (5, 1, 224, 224)
    model, meta = load_checkpoint(cls_checkpoint)
    model.merge_adapters()
    with torch.inference_mode():
        x = normalize_frames(picked, meta["preprocess"]["mean"], meta["preprocess"]["std"])
        expected = model.frame_scores(model(x)).numpy()
    scores, _ = folded(picked)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)


def test_bf16_channels_last_seg_stays_within_tolerance_of_float32_nchw(seg_checkpoint, frames):
    """The configuration CUDA runs (bf16 weights, channels_last) against the float32 NCHW reference."""
    picked = frames[30:31]  # one frame with the abdomen: bf16 convolutions are slow on this CPU
    reference = FrameModel(seg_checkpoint)
    fast = FrameModel(seg_checkpoint, dtype=torch.bfloat16, channels_last=True)
    assert fast.model.head.skip1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert {p.dtype for p in fast.model.parameters()} == {torch.bfloat16}
    expected_scores, expected_masks = reference(picked)
    scores, masks = fast(picked)
    assert masks.shape == (1, 224, 224) and masks.dtype == bool
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=SEG_SCORE_TOLERANCE)
    assert (masks == expected_masks).mean() >= SEG_PIXEL_AGREEMENT


def test_channels_last_gives_the_nchw_output(seg_checkpoint, frames):
    nchw = FrameModel(seg_checkpoint)
    channels_last = FrameModel(seg_checkpoint, channels_last=True)
    assert not nchw.channels_last  # the CPU default
    assert not nchw.folded and nchw.model.encoder.conv1.in_channels == 3  # its decoder reads the image too
    pixels = torch.from_numpy(frames[:2])
    x = channels_last.model_input(pixels)
    assert x.shape == (2, 3, 224, 224)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    with torch.inference_mode():
        expected = nchw.model(nchw.model_input(pixels))
        output = channels_last.model(x)
    torch.testing.assert_close(output.contiguous(), expected, rtol=0, atol=1e-4)


def test_micro_batches_are_sliced_from_all_stacks_end_to_end(cls_checkpoint, frames):
    model = FrameModel(cls_checkpoint, batch_size=4)
    sizes: list[int] = []
    model.model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    scores, masks = model([frames[:5], frames[5:11]])
    assert sizes == [4, 4, 3] and masks is None
    model.batch_size = 32
    np.testing.assert_allclose(scores, model(frames[:11])[0], rtol=0, atol=1e-6)  # one pass
    assert sizes[3:] == [11]
    with pytest.raises(ValueError, match="uint8"):
        model([frames[:2].astype(np.float32)])


def test_masks_are_bit_packed_as_numpy_does_it(seg_checkpoint, frames):
    rng = np.random.default_rng(0)
    for shape in ((3, 224, 224), (2, 5, 5)):  # 25 pixels: the last byte is zero-padded
        masks = rng.random(shape) < 0.3
        packed = pack_masks(torch.from_numpy(masks))
        assert packed.dtype == torch.uint8
        np.testing.assert_array_equal(packed.numpy(), np.packbits(masks.reshape(len(masks), -1), axis=1))
    model = FrameModel(seg_checkpoint)
    scores, masks = model(frames[29:31])
    packed_scores, packed = model(frames[29:31], packed_masks=True)
    assert masks.any()  # something to pack
    np.testing.assert_array_equal(packed_scores, scores)
    np.testing.assert_array_equal(packed, np.packbits(masks.reshape(2, -1), axis=1))


def test_concurrent_calls_score_as_sequential_ones(cls_checkpoint, frames):
    """A GPU Ray actor runs two calls at once (`jobs.score.predictor_pool`); on CPU they share no stream,
    which makes this the thread-safety half of that check."""
    model = FrameModel(cls_checkpoint)
    halves = [frames[:6], frames[6:12]]
    expected = [model(half)[0] for half in halves]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda half: model(half)[0], halves))
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_batch_size_defaults_by_device(cls_checkpoint):
    assert default_batch_size(torch.device("cuda")) == 256
    assert default_batch_size(torch.device("cpu")) == 32
    predictor = ScoreFrames(cls_checkpoint)  # batch_size None: resolved where the model is
    assert predictor.model.batch_size == default_batch_size(predictor.model.device)
    assert ScoreFrames(cls_checkpoint, batch_size=7).model.batch_size == 7
    parser = build_parser()
    assert parser.parse_args(["--input", "i", "--checkpoint", "c", "--output", "o"]).batch_size is None
    help_text = " ".join(parser.format_help().split())
    assert "256 on a GPU, 32 on CPU" in help_text


def test_gpu_actors_run_two_calls_at_once_cpu_actors_one():
    gpu, cpu = predictor_pool(3, 1.0), predictor_pool(3, 0.0)
    assert (gpu.min_size, gpu.max_size) == (3, 3) == (cpu.min_size, cpu.max_size)
    assert gpu.max_concurrent_calls_per_actor == 2 and gpu.enable_true_multi_threading
    assert cpu.max_concurrent_calls_per_actor is None and not cpu.enable_true_multi_threading


def test_gpu_benchmark_smoke_run_on_cpu_without_ray(tmp_path):
    """benchmarks/gpu_throughput.py on fetalclip-tiny with tiny sizes on CPU, in a process where `import ray`
    fails (it must run on a bare GPU machine). One torch thread: two would spin against other work here."""
    output = tmp_path / "gpu.md"
    argv = ["gpu_throughput.py", "--model", "fetalclip-tiny", "--case-frames", "2", "--batches", "1",
            "--train-batches", "1", "--decoder-batch", "1", "--repeats", "1", "--output", str(output)]
    code = ("import runpy, sys; sys.modules['ray'] = None; "
            f"sys.argv = {argv!r}; runpy.run_path('benchmarks/gpu_throughput.py', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = output.read_text()
    assert "Device: CPU (" in table and "model `fetalclip-tiny`" in table
    for row in ("| model only | float32 | 1 |", "| model only | bf16 | 1 |",
                "| `FrameModel`, uint8 in, scores out, per 2-frame case | float32 | 32 |",
                "| `ScoreFrames` (the predictor), per 2-frame case | float32 | 32 |",
                "| `ScoreFrames`, two concurrent calls, per 2-frame case each | float32 | 32 |",
                "| LoRA training step (AdamW) | float32 | 1 |"):
        line = next((line for line in table.splitlines() if line.startswith(row)), None)
        assert line is not None, f"no row {row!r} in\n{table}"
        cls, seg = (float(cell.replace(",", "")) for cell in line.strip("|").split("|")[-2:])
        assert cls > 0 and seg > 0
    assert "| SEG decoder alone, batch 1 | ms a frame |" in table
    assert table.count("max |score difference|") == 2 and "SEG mask pixels that differ" in table
    # The attention check runs without --compile (which is left to a manual run: inductor takes ~30 s a task
    # here); on CPU it tries the CPU flash kernel and MATH, and names the ops the tower's forward dispatches.
    for backend in ("| as built (every backend allowed) | - | aten::", "| FLASH_ATTENTION only | ", "| MATH only | "):
        assert backend in table, f"no attention row {backend!r} in\n{table}"
    assert "- Fused SDPA kernel in the tower as built, on cpu: " in table and "torch.compile" not in table
