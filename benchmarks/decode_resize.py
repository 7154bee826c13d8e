"""A read task's CPU work per frame, today's path against the path before the fast reader, side by side, one core.

    PYTHONPATH=. .venv/bin/python benchmarks/decode_resize.py [--frames-per-sweep 140] [--repeats 12]
        [--output benchmarks/RESULTS-decode-resize.md]

One synthetic ACOUSLIC-size case (6 sweeps of K frames of 562 x 744, speckle of `fetaliqa.synthetic.archive`)
is written as a zlib-compressed .mha by SimpleITK, as the challenge ships it. The process is pinned to one
core with every library on one thread; each round times every row once, in turn (interleaved, so that load
drifting on a shared machine touches them all alike). Figures are process CPU time (the time the pinned core
spent on this process, not on others) over `--repeats` rounds: the best round, and the median, which counts
what a worker pays case after case (memory the kernel maps afresh for each case, for one). Rows:
  - decode + resize, what a read task does per case: the path before (SimpleITK's ``ReadImage``, then the
    resize) and today's (`fetaliqa.score.read.read_case_row` with a read task's `DecodeBuffer`: SimpleITK's
    header check, fetaliqa's MetaImage reader with libdeflate, the resize), for each resize a checkpoint can
    name (`fetaliqa.preprocess.RESIZES`);
  - their parts: decode alone (each reader; fetaliqa's into fresh memory and into a reused buffer), the bare
    inflaters on the file's stream (zlib, libdeflate, and
    ISA-L's when `isal` is installed), the resizes alone on the decoded frames.
Before timing, the script checks that both paths give the same frames: decoded stacks bit-identical, resized
frames bit-identical. Not a test: timings belong here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import platform
import shlex
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import deflate
import numpy as np
import SimpleITK as sitk
from threadpoolctl import threadpool_limits

from fetaliqa.inputs import layout
from fetaliqa.inputs.metaimage import HEADER_LIMIT, DecodeBuffer, parse_header, read_metaimage
from fetaliqa.inputs.stacks import read_image_stack
from fetaliqa.preprocess import RESIZES
from fetaliqa.score.read import read_case_row
from fetaliqa.synthetic.archive import put_volume, synthetic_cases

HEIGHT, WIDTH = 562, 744
BEFORE, NOW = "before: SimpleITK ReadImage + resize", "today: read_case_row"


def sitk_then_resize(path: Path, resize: str) -> np.ndarray:
    """The read path before the fast reader: SimpleITK decodes, the resize reads its buffer in place."""
    image = sitk.ReadImage(str(path))
    return RESIZES[resize](sitk.GetArrayViewFromImage(image))  # the view is valid while `image` lives


def rows(path: Path, frames: np.ndarray) -> dict[str, tuple[str, Callable[[], object]]]:
    """Row name -> (group, a function doing that work once on the case)."""
    fields, header_end = parse_header(path.read_bytes()[:HEADER_LIMIT])
    stream = path.read_bytes()[header_end: header_end + int(fields["CompressedDataSize"])]
    found: dict[str, tuple[str, Callable[[], object]]] = {}
    buffer = DecodeBuffer()  # a read task's, reused case after case
    for resize in RESIZES:
        found[f"{BEFORE} ({resize})"] = ("decode + resize", lambda r=resize: sitk_then_resize(path, r))
        found[f"{NOW} ({resize})"] = ("decode + resize",
                                      lambda r=resize: read_case_row("case", str(path), resize=r, buffer=buffer))
    found |= {
        "SimpleITK ReadImage": ("decode", lambda: sitk.ReadImage(str(path))),
        "read_metaimage, fresh memory": ("decode", lambda: read_metaimage(str(path))),
        "read_metaimage, reused DecodeBuffer": ("decode", lambda: read_metaimage(str(path), buffer)),
        "read_image_stack (header check + read_metaimage), reused DecodeBuffer": (
            "decode", lambda: read_image_stack(str(path), buffer=buffer)),
        "zlib": ("inflate only", lambda: zlib.decompress(stream, bufsize=frames.nbytes)),
        "libdeflate": ("inflate only", lambda: deflate.zlib_decompress(stream, frames.nbytes)),
    }
    try:  # measured when installed; not a dependency of fetaliqa
        from isal import isal_zlib
        found["ISA-L (isal)"] = ("inflate only", lambda: isal_zlib.decompress(stream, bufsize=frames.nbytes))
    except ImportError:
        pass
    for resize, function in RESIZES.items():
        found[f"resize {resize}"] = ("resize only", lambda f=function: f(frames))
    return found


def check_same_frames(path: Path, frames: np.ndarray) -> None:
    """Both paths decode the same pixels and resize them to the same frames (else timing them means nothing)."""
    image = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayViewFromImage(image), frames)
    fast = read_metaimage(str(path))
    assert fast is not None and np.array_equal(fast.pixels, frames)
    for resize in RESIZES:
        assert np.array_equal(read_case_row("case", str(path), resize=resize)["images"], sitk_then_resize(path, resize))


def cpu_seconds_interleaved(work: dict[str, tuple[str, Callable[[], object]]], repeats: int) -> dict[str, list[float]]:
    for _, do in work.values():
        do()  # untimed: fills the page cache, loads the libraries, builds the resize weights
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(repeats):
        for name, (_, do) in work.items():
            start = time.process_time()
            do()
            times[name].append(time.process_time() - start)
    return times


def markdown(times: dict[str, list[float]], groups: dict[str, str], n: int, image_bytes: int, file_size: int,
             repeats: int, command: str) -> str:
    lines = [
        "# Decode + resize per core: today's read path against the path before", "", f"    {command}", "",
        f"One synthetic case of {n} frames of {HEIGHT} x {WIDTH} uint8 ({image_bytes:,} bytes), written by SimpleITK "
        f"as a zlib .mha of {file_size:,} bytes ({image_bytes / file_size:.2f}:1; the real ACOUSLIC files are "
        f"~1.8:1), page cache warm. One core of {platform.processor() or platform.machine()} ({os.cpu_count()} "
        f"cores), every library one thread, process CPU time over {repeats} interleaved rounds, "
        f"{time.strftime('%Y-%m-%d')}. Both paths' frames were checked bit-identical before timing.", "",
        "| work | row | ms/frame, median | ms/frame, best | frames/s per core, median |", "|---|---|---|---|---|",
    ]
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        lines.append(f"| {groups[name]} | {name} | {1000 * median[name] / n:.3f} | {1000 * min(t) / n:.3f} | "
                     f"{n / median[name]:,.0f} |")
    lines += ["", "| resize | today / before, frames/s per core (median) | (best) |", "|---|---|---|"]
    for resize in RESIZES:
        before, now = times[f"{BEFORE} ({resize})"], times[f"{NOW} ({resize})"]
        lines.append(f"| {resize} | {statistics.median(before) / statistics.median(now):.2f} | "
                     f"{min(before) / min(now):.2f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames-per-sweep", type=int, default=140)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--output", default="benchmarks/RESULTS-decode-resize.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n = layout.SWEEPS_PER_CASE * args.frames_per_sweep
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    threadpool_limits(1)
    cv2.setNumThreads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    case = next(synthetic_cases(1, args.frames_per_sweep, HEIGHT, WIDTH, seed=0))
    with tempfile.TemporaryDirectory(prefix="fetaliqa-bench-") as tmp:
        path = Path(tmp) / "case.mha"
        put_volume(None, str(path), case.image, tmp, local=True)
        check_same_frames(path, case.image)
        work = rows(path, case.image)
        times = cpu_seconds_interleaved(work, args.repeats)
        file_size = path.stat().st_size
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = markdown(times, {name: group for name, (group, _) in work.items()}, n, case.image.nbytes, file_size,
                    args.repeats, command)
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
