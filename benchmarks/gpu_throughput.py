"""Model throughput on one device, without Ray: the model alone, `FrameModel`, the predictor (`ScoreFrames`)
per case, CLS and SEG, bf16 weights against float32 weights under bf16 autocast, and a LoRA training step.

    python benchmarks/gpu_throughput.py [--model fetalclip] [--output benchmarks/RESULTS-gpu.md]
    python benchmarks/gpu_throughput.py --model fetalclip-tiny --case-frames 2 --batches 1 --train-batches 1 \\
        --decoder-batch 1 --repeats 1          # smoke run, seconds on CPU (tests/test_inference.py)

It imports torch, open_clip, peft, numpy and fetaliqa only (never Ray), so it runs on a bare GPU machine
with those installed: `PYTHONPATH=. python benchmarks/gpu_throughput.py` from a copy of the repository.
The device is the first GPU if there is one, else the CPU; the Markdown table names it.

Towers are random-init from `build_model` (speed does not depend on the weights). Each task's model is
saved as a checkpoint once, so that `FrameModel` and `ScoreFrames` load it as `fetaliqa score` does. Rows:
  - model only: (N, 3, S, S) normalised frames already on the device -> model output; float32 weights under
    bf16 autocast on CUDA (the scoring path before bf16 weights; plain float32 on CPU, as it was there), and
    the model cast to bf16 weights (channels_last for SEG), as `FrameModel` casts it on CUDA;
  - `FrameModel` and `ScoreFrames` (bf16 on CUDA, float32 on CPU): one `--case-frames` uint8 case in,
    scores (and SEG masks, bit-packed) out on the host, at 32 frames a pass (the old CLI default) and at the
    device's default; then two concurrent calls, as a GPU Ray actor runs them;
  - a LoRA training step: `fetaliqa.training.step.run_epoch` (AdamW, float32 weights, bf16 autocast on CUDA);
  - the SEG decoder alone on encoder-shaped tokens, ms a frame: the old path (float32 weights, NCHW,
    autocast on CUDA) against bf16 weights in channels_last.
Timings are the mean over `--repeats` after one warm-up, with the device synchronised around them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fetaliqa.models import DEFAULT_THRESHOLD, IQAModel, PreprocessSpec, build_model, load_checkpoint, save_checkpoint
from fetaliqa.models.frame_model import default_batch_size
from fetaliqa.models.normalize import normalize_frames
from fetaliqa.score.predict import ScoreFrames
from fetaliqa.training.step import LOSSES, run_epoch

OLD_DEFAULT_BATCH = 32  # `score --batch-size` before it defaulted by device
TASKS = ("cls", "seg")


def timed_rate(step: Callable[[], object], frames: int, repeats: int, device: torch.device) -> float:
    """Frames per second of `step` (which handles `frames` frames) over `repeats` calls after one warm-up."""
    step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    return frames * repeats / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size) uint8 frames of uniform noise."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def model_rate(model: IQAModel, batch: int, preprocess: PreprocessSpec, device: torch.device, repeats: int, *,
               dtype: torch.dtype, autocast: bool, channels_last: bool = False) -> float:
    """Frames/s of `model` alone on `batch` normalised frames already on the device."""
    pixels = torch.from_numpy(random_frames(batch, preprocess.image_size)).to(device)
    x = normalize_frames(pixels, preprocess.mean, preprocess.std).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(x)

    return timed_rate(step, batch, repeats, device)


def bf16_copy(reference: IQAModel, task: str) -> IQAModel:
    """`reference` (merged, float32) cast as `FrameModel` casts it on CUDA: bf16, SEG in channels_last."""
    fast = copy.deepcopy(reference).to(torch.bfloat16)
    return fast.to(memory_format=torch.channels_last) if task == "seg" else fast


def predictor_rates(predictor: ScoreFrames, case: np.ndarray, batches: list[int], repeats: int,
                    device: torch.device) -> dict[str, dict[int, float]]:
    """Frames/s of `FrameModel` and of `ScoreFrames` on one case at each of `batches` frames a pass, and of
    `ScoreFrames` with two calls at once (`jobs.score.predictor_pool` gives a GPU actor two)."""
    frame_model, rates = predictor.model, {"frame_model": {}, "predictor": {}, "concurrent": {}}
    batch = {"case_id": np.array(["case"]), "images": [case]}
    for size in batches:
        frame_model.batch_size = size
        rates["frame_model"][size] = timed_rate(lambda: frame_model(case), len(case), repeats, device)
        rates["predictor"][size] = timed_rate(lambda: predictor(batch), len(case), repeats, device)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            def two_calls() -> None:
                list(pool.map(predictor, [batch, batch]))

            rates["concurrent"][size] = timed_rate(two_calls, 2 * len(case), repeats, device)
    return rates


def training_rate(model: IQAModel, preprocess: PreprocessSpec, batch: int, device: torch.device,
                  repeats: int) -> float:
    """Frames/s of LoRA training steps on `batch` frames (the training loop's own step, one process)."""
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-4)
    frames = torch.from_numpy(random_frames(batch, preprocess.image_size)).to(device)
    data = {"image": frames, "label": (torch.arange(batch, device=device) % 2).to(torch.uint8),
            "mask": (frames > 127).to(torch.uint8)}
    return timed_rate(lambda: run_epoch(model, LOSSES[model.task], [data], preprocess, device, optimizer),
                      batch, repeats, device)


def decoder_ms(model: IQAModel, batch: int, device: torch.device, repeats: int, *, fast: bool) -> float:
    """ms a frame of the SEG decoder alone on `batch` frames of encoder-shaped tokens: float32 weights in NCHW
    (under bf16 autocast on CUDA), or (`fast`) bf16 weights in channels_last. Tokens are laid out as
    open_clip's `forward_intermediates` returns them: (N, D, g, g) contiguous. (Permuted views of (N, g, g, D),
    as this row once fed, are channels-last and hid the NCHW resampling kernel's cost: 0.14 ms a frame here,
    1.7 in the model on an H100.)"""
    head = bf16_copy(model, "seg").head if fast else model.head
    dtype = torch.bfloat16 if fast else torch.float32
    (size, _), grid = model.encoder.image_size, model.encoder.grid_size  # open_clip keeps both as pairs
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    if fast:
        images = images.contiguous(memory_format=torch.channels_last)
    width = model.encoder.transformer.width
    tokens = [torch.randn(batch, width, *grid, device=device, dtype=dtype) for _ in model.seg_blocks]

    @torch.inference_mode()
    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not fast and device.type == "cuda"):
            return head(images, tokens)

    return 1000 / timed_rate(step, batch, repeats, device)


def score_difference(reference: IQAModel, fast: IQAModel, case: np.ndarray, preprocess: PreprocessSpec,
                     device: torch.device, batch: int) -> tuple[float, float | None]:
    """bf16 weights against float32 weights on the case's frames: max |score difference| and, for SEG, the
    share of mask pixels that differ."""
    worst, differing, pixels = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(case), batch):
            frames = torch.from_numpy(case[start:start + batch]).to(device)
            x = normalize_frames(frames, preprocess.mean, preprocess.std)
            expected = reference(x)
            fast_x = x.to(torch.bfloat16)
            if reference.task == "seg":
                fast_x = fast_x.contiguous(memory_format=torch.channels_last)
            output = fast(fast_x)
            worst = max(worst, (fast.frame_scores(output) - reference.frame_scores(expected)).abs().max().item())
            if reference.task == "seg":
                differing += ((output > 0) != (expected > 0)).sum().item()
                pixels += expected.numel()
    return worst, (differing / pixels if pixels else None)


def measure_task(task: str, args: argparse.Namespace, device: torch.device, work: Path) -> dict:
    """Every figure of one task (see the module docstring)."""
    model, preprocess = build_model(args.model, task, seed=0)
    checkpoint = str(work / task)
    save_checkpoint(model, checkpoint, threshold=DEFAULT_THRESHOLD[task], preprocess=preprocess)
    # Training first: its steps change `model`'s adapters, which the checkpoint already holds unchanged.
    model.to(device)
    out = {"train": {b: training_rate(model, preprocess, b, device, args.repeats) for b in args.train_batches}}
    del model
    reference = load_checkpoint(checkpoint, device=device)[0].merge_adapters()  # float32 weights, eval mode
    fast = bf16_copy(reference, task)
    kinds = {"autocast": (reference, torch.float32, device.type == "cuda"), "bf16": (fast, torch.bfloat16, False)}
    for name, (net, dtype, autocast) in kinds.items():
        out[name] = {b: model_rate(net, b, preprocess, device, args.repeats, dtype=dtype, autocast=autocast,
                                   channels_last=name == "bf16" and task == "seg") for b in args.batches}
    case = random_frames(args.case_frames, preprocess.image_size, seed=1)
    out["difference"] = score_difference(reference, fast, case, preprocess, device, max(args.batches))
    if task == "seg":
        out["decoder"] = {fast_: decoder_ms(reference, args.decoder_batch, device, args.repeats, fast=fast_)
                          for fast_ in (False, True)}
    del fast
    predictor = ScoreFrames(checkpoint, device=device)  # outside Ray a model runs on the CPU unless told
    out["dtype"] = str(predictor.model.dtype).removeprefix("torch.")
    batches = sorted({OLD_DEFAULT_BATCH, default_batch_size(device)})
    out |= predictor_rates(predictor, case, batches, args.repeats, device)
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    named = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return named[0] if named else platform.processor() or platform.machine()


def markdown(results: dict[str, dict], args: argparse.Namespace, device: torch.device) -> str:
    """The results as a Markdown section: one table of frames/s (CLS and SEG side by side), then the ratios."""
    cls, seg = (results.get(t) for t in TASKS)
    default = default_batch_size(device)
    dtype = (cls or seg)["dtype"]

    def cell(result: dict | None, key: str, batch: int) -> str:
        return f"{result[key][batch]:,.0f}" if result else "-"

    def row(label: str, weights: str, key: str, batch: int) -> str:
        return f"| {label} | {weights} | {batch} | {cell(cls, key, batch)} | {cell(seg, key, batch)} |"

    old = "float32 + bf16 autocast" if device.type == "cuda" else "float32"
    per_case = f"per {args.case_frames}-frame case"
    rows = [row("model only", old, "autocast", b) for b in args.batches]
    rows += [row("model only", "bf16", "bf16", b) for b in args.batches]
    for key, label in (("frame_model", f"`FrameModel`, uint8 in, scores out, {per_case}"),
                       ("predictor", f"`ScoreFrames` (the predictor), {per_case}"),
                       ("concurrent", f"`ScoreFrames`, two concurrent calls, {per_case} each")):
        rows += [row(label, dtype, key, b) for b in sorted({OLD_DEFAULT_BATCH, default})]
    rows += [row("LoRA training step (AdamW)", old, "train", b) for b in args.train_batches]
    interpreter = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    command = shlex.join([interpreter, *sys.argv])
    lines = ["# Model throughput on one device", "",
             f"Device: {device_name(device)}; torch {torch.__version__}; model `{args.model}` (random init); "
             f"command `{command}`. Frames/s; the predictor rows score one {args.case_frames}-frame case a call.", "",
             "| path | weights | frames a pass | CLS frames/s | SEG frames/s |", "|---|---|---|---|---|", *rows, ""]
    for task, result in (("CLS", cls), ("SEG", seg)):
        if result:
            worst, pixels = result["difference"]
            share = f"; SEG mask pixels that differ: {100 * pixels:.3f}%" if pixels is not None else ""
            lines.append(f"- {task}, bf16 weights against float32 weights on the case's frames (noise, random "
                         f"init): max |score difference| {worst:.2g}{share}.")
    if seg:
        slow, fast = seg["decoder"][False], seg["decoder"][True]
        lines += ["", f"| SEG decoder alone, batch {args.decoder_batch} | ms a frame |", "|---|---|",
                  f"| {old}, NCHW | {slow:.3f} |",
                  f"| bf16 weights, channels_last | {fast:.3f} ({slow / fast:.1f}x the speed of NCHW; target >= 4x on GPU) |", ""]
    if cls and seg and default in args.batches:
        for task, result in (("CLS", cls), ("SEG", seg)):
            alone = result["bf16"][default]
            lines.append(f"- {task}: predictor / model only (bf16, batch {default}) = "
                         f"{result['predictor'][default] / alone:.2f}, with two concurrent calls "
                         f"{result['concurrent'][default] / alone:.2f} (target >= 0.95 on GPU).")
        ratio = seg["predictor"][default] / cls["predictor"][default]
        lines.append(f"- SEG / CLS through the predictor = {ratio:.2f} (target >= 0.75 on GPU).")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fetalclip", help="model name (fetalclip-tiny for a CPU smoke run)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 256], help="model-only batch sizes")
    parser.add_argument("--train-batches", type=int, nargs="+", default=[32, 128], help="training batch sizes")
    parser.add_argument("--case-frames", type=int, default=840, help="frames of the case the predictor scores")
    parser.add_argument("--decoder-batch", type=int, default=128, help="batch of the SEG decoder alone")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per figure, after one warm-up")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS-gpu.md"),
                        help="Markdown written here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="fetaliqa-gpu-bench-"))
    try:
        results = {}
        for task in args.tasks:
            results[task] = measure_task(task, args, device, work)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = markdown(results, args, device)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
