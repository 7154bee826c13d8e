"""MetaImage decode throughput: SimpleITK against fetaliqa's fast path, side by side, one core.

    PYTHONPATH=. taskset -c 0 .venv/bin/python benchmarks/decode_mha.py [--frames-per-sweep 140] [--repeats 12]
        [--output benchmarks/RESULTS-decode.md]

One synthetic ACOUSLIC-size case (6 sweeps of K frames of 562 x 744, speckle of `fetaliqa.synthetic.archive`)
is written as a zlib-compressed .mha by SimpleITK, as the challenge ships it. With the process pinned to one
core, each repeat times, in turn: SimpleITK's ``ReadImage`` (the pixel read `read_image_stack` did before
the fast path), `read_metaimage`, `read_image_stack` as it is now (SimpleITK's header check, then the fast
path), and the bare inflaters on the file's stream (zlib; ISA-L's when `isal` is installed; libdeflate).
Best CPU and wall time of `--repeats` each; the fast path's frames are checked bit-identical to SimpleITK's
first. The Markdown goes to `--output`. Not a test: timings belong here.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
import zlib
from pathlib import Path

import deflate
import numpy as np
import SimpleITK as sitk
from threadpoolctl import threadpool_limits

from fetaliqa.inputs import layout
from fetaliqa.inputs.metaimage import HEADER_LIMIT, parse_header, read_metaimage
from fetaliqa.inputs.stacks import read_image_stack
from fetaliqa.synthetic.archive import put_volume, synthetic_cases

HEIGHT, WIDTH = 562, 744


def readers(path: Path, n_bytes: int) -> dict:
    """Name -> a function that decodes the case once."""
    fields, header_end = parse_header(path.read_bytes()[:HEADER_LIMIT])
    stream = path.read_bytes()[header_end: header_end + int(fields["CompressedDataSize"])]
    found = {
        "SimpleITK ReadImage (the reader before)": lambda: sitk.GetArrayViewFromImage(sitk.ReadImage(str(path))),
        "fetaliqa read_metaimage (libdeflate)": lambda: read_metaimage(str(path)),
        "fetaliqa read_image_stack (header check + fast path)": lambda: read_image_stack(str(path)),
        "inflate only: zlib": lambda: zlib.decompress(stream, bufsize=n_bytes),
        "inflate only: libdeflate": lambda: deflate.zlib_decompress(stream, n_bytes),
    }
    try:  # measured when installed; not a dependency of fetaliqa
        from isal import isal_zlib
        found["inflate only: ISA-L (isal)"] = lambda: isal_zlib.decompress(stream, bufsize=n_bytes)
    except ImportError:
        pass
    return found


def best_seconds_interleaved(reads: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Best (CPU, wall) seconds of each read over `repeats` rounds, every read once a round, so that load
    drifting on a shared machine touches them all alike. CPU time (the process's) is the figure to compare
    on a busy machine: it leaves out the time the pinned core spent on other processes."""
    for read in reads.values():
        read()  # untimed: fills the page cache, loads the libraries
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in reads}
    for _ in range(repeats):
        for name, read in reads.items():
            cpu, wall = time.process_time(), time.perf_counter()
            read()
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    return {name: (min(c for c, _ in t), min(w for _, w in t)) for name, t in times.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames-per-sweep", type=int, default=140)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--output", default="benchmarks/RESULTS-decode.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n = layout.SWEEPS_PER_CASE * args.frames_per_sweep
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    threadpool_limits(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    case = next(synthetic_cases(1, args.frames_per_sweep, HEIGHT, WIDTH, seed=0))
    with tempfile.TemporaryDirectory(prefix="fetaliqa-bench-") as tmp:
        path = Path(tmp) / "case.mha"
        put_volume(None, str(path), case.image, tmp, local=True)
        fast = read_metaimage(str(path))
        assert fast is not None and fast.pixels.tobytes() == case.image.tobytes()
        assert np.array_equal(fast.pixels, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
        del fast
        file_size = path.stat().st_size
        seconds = best_seconds_interleaved(readers(path, case.image.nbytes), args.repeats)
    reference = seconds["SimpleITK ReadImage (the reader before)"]
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# MetaImage decode throughput", "", f"    {command}", "",
        f"One synthetic case of {n} frames of {HEIGHT} x {WIDTH} uint8 ({case.image.nbytes:,} bytes), "
        f"written by SimpleITK as a zlib .mha of {file_size:,} bytes ({case.image.nbytes / file_size:.2f}:1; "
        f"the real ACOUSLIC files are ~1.8:1), page cache warm. One core of "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), every library one thread, "
        f"best of {args.repeats} interleaved rounds (process CPU time, and wall time), "
        f"{time.strftime('%Y-%m-%d')}. The fast path's frames are "
        "bit-identical to SimpleITK's (checked by the script before timing).", "",
        "| reader | CPU seconds | frames/s (CPU) | ms/frame (CPU) | x SimpleITK (CPU) | wall seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, (cpu, wall) in seconds.items():
        lines.append(f"| {name} | {cpu:.3f} | {n / cpu:,.0f} | {1000 * cpu / n:.2f} | {reference[0] / cpu:.2f} | "
                     f"{wall:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
