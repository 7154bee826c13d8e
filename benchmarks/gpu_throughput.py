"""Model throughput on one device, without Ray: the model alone, `FrameModel`, the predictor (`ScoreFrames`)
per case, CLS and SEG, bf16 weights against float32 weights under bf16 autocast, and a LoRA training step.

    python benchmarks/gpu_throughput.py [--model fetalclip] [--output benchmarks/RESULTS-gpu.md]
    python benchmarks/gpu_throughput.py --model fetalclip-tiny --case-frames 2 --batches 1 --train-batches 1 \\
        --decoder-batch 1 --repeats 1          # smoke run, seconds on CPU (tests/test_inference.py)
    python benchmarks/gpu_throughput.py --compile --repeats 5 --train-batches   # + torch.compile, no training rows

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
    autocast on CUDA) against bf16 weights in channels_last;
  - the attention kernel (always): which attention ops one forward of `FrameModel`'s module runs (torch's
    profiler), and, with one SDPA backend allowed at a time (`sdpa_kernel`), whether that backend serves
    `scaled_dot_product_attention` on q, k, v of the tower's shape and which ops the forward then runs;
  - with `--compile [MODE ...]`: `FrameModel`'s own module (bf16 weights, float32 CLS head, folded
    normalisation, channels_last SEG) under `torch.compile(mode=MODE, dynamic=False)`, model only and through
    `FrameModel` and `ScoreFrames` at the device's default batch, its compile time, and its scores against
    the same module uncompiled. The compile time counts against a short GPU session: each MODE compiles once
    a task, so keep the modes few. Where torch.compile fails (no C++ compiler on CPU, say) the Markdown says
    so in a line and the other figures stand.
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
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fetaliqa.models import DEFAULT_THRESHOLD, IQAModel, PreprocessSpec, build_model, load_checkpoint, save_checkpoint
from fetaliqa.models.frame_model import default_batch_size
from fetaliqa.models.normalize import normalize_frames
from fetaliqa.score.predict import ScoreFrames
from fetaliqa.training.step import LOSSES, run_epoch

OLD_DEFAULT_BATCH = 32  # `score --batch-size` before it defaulted by device
TASKS = ("cls", "seg")
# `--compile` with no mode: inductor's kernels under CUDA graphs, and with autotuned GEMMs and convolutions.
COMPILE_MODES = ("reduce-overhead", "max-autotune-no-cudagraphs")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# SDPA backends tried one at a time; on CPU, FLASH_ATTENTION is torch's CPU flash kernel.
SDPA_BACKENDS = {"cuda": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"),
                 "cpu": ("FLASH_ATTENTION", "MATH")}
# Issue 22 item 4: frames/s through `ScoreFrames` at default settings on an H100/H200.
PREDICTOR_TARGET = {"cls": "3,000 (stretch 3,500)", "seg": "2,400"}


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
    return forward_rate(model, x, repeats, device, autocast=autocast)


def forward_rate(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int,
                 device: torch.device, *, autocast: bool = False) -> float:
    """Frames/s of `model` on the batch `x` (already on the device, in the model's dtype and memory format)."""

    @torch.inference_mode()
    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(x)

    return timed_rate(step, len(x), repeats, device)


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


def attention_ops(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> list[str]:
    """Names of the attention and softmax ops that one forward of `model` on `x` dispatches (torch's profiler,
    host-side op events: what ran, whichever kernel it launched)."""
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        model(x)
    return sorted({e.name for e in trace.events() if "attention" in e.name or "softmax" in e.name})


def sdpa_check(model: IQAModel, x: torch.Tensor) -> dict:
    """Which attention kernel the ViT tower of `model` (as `FrameModel` built it) runs on the batch `x`.

    open_clip's blocks call nn.MultiheadAttention with need_weights=False; in inference its fast path
    (`_native_multi_head_attention`) hands the call to a fused SDPA kernel when one can serve it and otherwise
    falls back, silently, to its own matmul + softmax, so a forward under `sdpa_kernel` does not raise when
    the allowed backend cannot serve it. Hence both: for each backend of `SDPA_BACKENDS` alone,
    `scaled_dot_product_attention` on random q, k, v of the tower's shape (N, heads, tokens, head dim) in
    `x`'s dtype (it raises when that backend cannot serve the call; torch's warning says why) and the ops
    the forward then dispatches."""
    attention = model.encoder.transformer.resblocks[0].attn
    heads, tokens = attention.num_heads, model.encoder.positional_embedding.shape[0]  # patches + class token
    shape = (len(x), heads, tokens, attention.embed_dim // heads)
    q, k, v = (torch.randn(shape, device=x.device, dtype=x.dtype) for _ in range(3))
    out = {"shape": shape, "dtype": str(x.dtype).removeprefix("torch."), "device": x.device.type,
           "as built": attention_ops(model, x),
           "backends": {}}
    for name in SDPA_BACKENDS[x.device.type]:
        with sdpa_kernel([getattr(SDPBackend, name)]), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.inference_mode():
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                served = "serves it"
            except RuntimeError as error:
                reasons = "; ".join(str(w.message).splitlines()[0] for w in caught) or str(error).splitlines()[0]
                served = f"cannot serve it ({reasons[:300]})"
            out["backends"][name] = (served, attention_ops(model, x))
    return out


def dynamo_counts() -> tuple[int, int]:
    """Graphs Dynamo has compiled and graph breaks it has met in this process so far."""
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


class FullBatchesCompiled:
    """Stands in for `FrameModel.model`: micro-batches of exactly `batch` frames run `model` under
    `torch.compile(mode=mode, dynamic=False)`, one static graph; shorter ones (a case's last micro-batch,
    whose size varies from case to case and would compile a graph of its own each time) run `model` as it
    is. Its other attributes (`frame_scores`) are `model`'s. The compiled graph shares `model`'s weights."""

    def __init__(self, model: IQAModel, batch: int, mode: str):
        self.eager, self.batch = model, batch
        self.compiled = torch.compile(model, mode=mode, dynamic=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.compiled if len(x) == self.batch else self.eager)(x)

    def __getattr__(self, name: str) -> object:
        return getattr(self.eager, name)


def compiled_figures(predictor: ScoreFrames, case: np.ndarray, mode: str, repeats: int,
                     device: torch.device) -> dict:
    """`FrameModel`'s module under torch.compile (`FullBatchesCompiled`) at the device's default batch:
    compile time (the first call), frames/s model only and through `predictor` (`predictor_rates`), max
    |score difference| against the module uncompiled (model only on one static batch; on `case` through
    `FrameModel`, one call and two concurrent calls: CUDA graphs' outputs live in a pool that the next
    replay may overwrite), the share of SEG mask pixels that differ, and the compiled forward's attention
    ops; and how many graphs Dynamo compiled and graph breaks it met (one graph, no break: the whole static
    forward is one compiled graph). {"error": line} when torch.compile fails."""
    frame_model, batch = predictor.model, default_batch_size(device)
    eager, side = frame_model.model, case.shape[-1]
    frame_model.batch_size = batch
    with torch.inference_mode():  # an inference tensor, as FrameModel's: Dynamo would otherwise compile a graph each
        x = frame_model.model_input(torch.from_numpy(random_frames(batch, side, seed=2)).to(device))
    expected = frame_model(case)
    fast = FullBatchesCompiled(eager, batch, mode)
    out = {"full_batches": len(case) // batch, "tail": len(case) % batch}
    graphs, breaks = dynamo_counts()
    try:
        with torch.inference_mode():
            started = time.perf_counter()
            fast(x)
            synchronize(device)
            out["compile_s"] = time.perf_counter() - started
            for _ in range(2):  # CUDA graph trees warm up on one call and record on the next
                fast(x)
            model_scores = eager.frame_scores(fast(x))
            out["model_difference"] = (model_scores - eager.frame_scores(eager(x))).abs().max().item()
        out["module"] = forward_rate(fast, x, repeats, device)
        out["ops"] = attention_ops(fast, x)
        frame_model.model = fast
        rates = predictor_rates(predictor, case, [batch], repeats, device)
        out |= {key: by_batch[batch] for key, by_batch in rates.items()}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = [frame_model(case), *pool.map(lambda _: frame_model(case), range(2))]
        out["graphs"], out["breaks"] = (after - before for after, before in zip(dynamo_counts(), (graphs, breaks)))
        out["case_difference"] = max(np.abs(scores - expected[0]).max(initial=0.0) for scores, _ in results)
        if frame_model.task == "seg":
            out["mask_share"] = max(float(np.mean(masks != expected[1])) if masks.size else 0.0
                                    for _, masks in results)
    except Exception as error:  # noqa: BLE001 - any failure to compile is a finding, reported as a line
        out["error"] = f"{type(error).__name__}: {(str(error).strip() or '-').splitlines()[0][:300]}"
    finally:
        frame_model.model = eager
        torch._dynamo.reset()  # drops this mode's graphs (and CUDA graph pools) before the next
    return out


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
    frame_model = predictor.model
    frame_model.batch_size = default_batch_size(device)
    pixels = torch.from_numpy(random_frames(frame_model.batch_size, preprocess.image_size, seed=2)).to(device)
    with torch.inference_mode():
        x = frame_model.model_input(pixels)
    out["sdpa"] = sdpa_check(frame_model.model, x)
    if args.compile:
        out["module"] = forward_rate(frame_model.model, x, args.repeats, device)
    out["compiled"] = {mode: compiled_figures(predictor, case, mode, args.repeats, device) for mode in args.compile}
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
    task, result = next((t, r) for t, r in zip(TASKS, (cls, seg)) if r)
    lines += ["", *sdpa_markdown(result["sdpa"], task)]
    if args.compile:
        lines += ["", *compile_markdown(cls, seg, args, default)]
    return "\n".join(lines) + "\n"


def sdpa_markdown(check: dict, task: str) -> list[str]:
    """`sdpa_check`'s result as a table and a verdict line."""
    shape = " x ".join(map(str, check["shape"]))
    module = f"`FrameModel`'s {task.upper()} module on {check['device']} ({check['dtype']}, q/k/v {shape})"
    lines = [f"| attention, {module} | `scaled_dot_product_attention` alone | ops one forward dispatches |",
             "|---|---|---|",
             f"| as built (every backend allowed) | - | {', '.join(check['as built']) or 'none'} |"]
    lines += [f"| {name} only | {served} | {', '.join(ops) or 'none'} |"
              for name, (served, ops) in check["backends"].items()]
    fused = [op for op in check["as built"] if op.startswith("aten::_scaled_dot_product_") and "math" not in op]
    verdict = f"yes ({', '.join(fused)})" if fused else "no (the forward runs no fused SDPA op)"
    return [*lines, "", f"- Fused SDPA kernel in the tower as built, on {check['device']}: {verdict}."]


def compile_markdown(cls: dict | None, seg: dict | None, args: argparse.Namespace, batch: int) -> list[str]:
    """The `--compile` figures: a table (uncompiled against each mode) and, per task and mode, the compile
    time, the score differences and the compiled forward's attention ops, or why it failed."""
    def cell(result: dict | None, mode: str | None, key: str) -> str:
        if not result:
            return "-"
        if mode is None:
            return f"{result[key] if key == 'module' else result[key][batch]:,.0f}"
        figures = result["compiled"][mode]
        return f"{figures[key]:,.0f}" if key in figures else "failed"

    per_case = f"per {args.case_frames}-frame case"
    lines = [f"| torch.compile(dynamic=False), batch {batch} | mode | CLS frames/s | SEG frames/s |",
             "|---|---|---|---|"]
    for key, label in (("module", "model only, `FrameModel`'s module"), ("frame_model", f"`FrameModel`, {per_case}"),
                       ("predictor", f"`ScoreFrames`, {per_case}"),
                       ("concurrent", f"`ScoreFrames`, two concurrent calls, {per_case} each")):
        lines += [f"| {label} | {mode or 'uncompiled'} | {cell(cls, mode, key)} | {cell(seg, mode, key)} |"
                  for mode in [None, *args.compile]]
    lines.append("")
    for task, result in (("cls", cls), ("seg", seg)):
        for mode, figures in (result["compiled"] if result else {}).items():
            lines.append(f"- {task.upper()}, {mode}: " + compile_line(figures, batch))
    for task, result in (("cls", cls), ("seg", seg)):
        if result:
            best = max([(result["predictor"][batch], "uncompiled")]
                       + [(f["predictor"], mode) for mode, f in result["compiled"].items() if "predictor" in f])
            lines.append(f"- {task.upper()} through `ScoreFrames`: best {best[0]:,.0f} frames/s ({best[1]}); "
                         f"target {PREDICTOR_TARGET[task]} on an H100/H200 (issue 22 item 4).")
    return lines


def compile_line(figures: dict, batch: int) -> str:
    """One mode's compile time, score differences and attention ops (`compiled_figures`), or its failure."""
    if "error" in figures:
        compiled = f"first call (compile) {figures['compile_s']:.1f} s, then " if "compile_s" in figures else ""
        return f"torch.compile: {compiled}failed ({figures['error']}); the other figures stand"
    masks = f", SEG mask pixels that differ {100 * figures['mask_share']:.3f}%" if "mask_share" in figures else ""
    tail = f" and a tail of {figures['tail']} frames run uncompiled" if figures["tail"] else ""
    return (f"first call (compile) {figures['compile_s']:.1f} s; max |score difference| against uncompiled: "
            f"{figures['model_difference']:.2g} on one batch, {figures['case_difference']:.2g} on the case "
            f"({figures['full_batches']} micro-batches of {batch} compiled{tail}; one call and two concurrent "
            f"calls){masks}; {figures['graphs']} graph(s) compiled, {figures['breaks']} graph break(s); attention ops "
            f"in the compiled forward: {', '.join(figures['ops']) or 'none recorded'}.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fetalclip", help="model name (fetalclip-tiny for a CPU smoke run)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 256], help="model-only batch sizes")
    parser.add_argument("--train-batches", type=int, nargs="*", default=[32, 128],
                        help="training batch sizes (none: no training rows)")
    parser.add_argument("--case-frames", type=int, default=840, help="frames of the case the predictor scores")
    parser.add_argument("--decoder-batch", type=int, default=128, help="batch of the SEG decoder alone")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per figure, after one warm-up")
    parser.add_argument("--compile", nargs="*", choices=TORCH_COMPILE_MODES, metavar="MODE",
                        help="also time FrameModel's module under torch.compile in each MODE (one of "
                             f"{', '.join(TORCH_COMPILE_MODES)}; none given: {' '.join(COMPILE_MODES)})")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS-gpu.md"),
                        help="Markdown written here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.compile = list(COMPILE_MODES) if args.compile == [] else args.compile or []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="fetaliqa-gpu-bench-"))
    try:
        results = {}
        for task in args.tasks:
            results[task] = measure_task(task, args, device, work)
            # Written after each task, so that a run cut short (a GPU session's time limit) keeps what it measured.
            args.output.write_text(markdown(results, args, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(args.output.read_text())


if __name__ == "__main__":
    main()
