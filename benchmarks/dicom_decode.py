"""DICOM decode throughput: a study of compressed instances against the same frames from a zlib .mha, one core.

    .venv/bin/python benchmarks/dicom_decode.py [--frames-per-sweep 140] [--repeats 3]
        [--output benchmarks/RESULTS-dicom.md]

One synthetic ACOUSLIC-size case (6 sweeps of K frames of 562 x 744) is written once as a zlib-compressed
.mha (as the challenge ships it) and as a DICOM study of six multi-frame instances per encoding: JPEG
Baseline (gray, quality 90, PIL), JPEG-LS Lossless, JPEG 2000 Lossless, RLE Lossless, deflated explicit VR,
each with the burned-in text and the US region of `fetaliqa.synthetic.dicom`. Timed, best of `--repeats`, with
the process pinned to one core and every library to one thread: `read_image_stack` of the .mha against
`read_dicom_instance` of the six instances (parse, decode, crop to the region, gray). Neither includes the
resize to 224 that scoring adds to both. The Markdown goes to `--output`. Not a test: timings belong here.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from threadpoolctl import threadpool_limits

from fetaliqa.inputs import layout
from fetaliqa.inputs.dicom import read_dicom_instance
from fetaliqa.inputs.stacks import read_image_stack
from fetaliqa.synthetic.archive import put_volume, synthetic_cases
from fetaliqa.synthetic.dicom import instance_dataset, burn_in

HEIGHT, WIDTH = 562, 744
ENCODINGS = (JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless, RLELossless, DeflatedExplicitVRLittleEndian)


def write_study(case, k: int, syntax, folder: Path) -> list[Path]:
    """The case's six sweeps as MONOCHROME2 instances in `syntax` under `folder`."""
    paths = []
    for sweep in range(1, layout.SWEEPS_PER_CASE + 1):
        canvas = burn_in(case.image[(sweep - 1) * k: sweep * k], f"BENCH SWEEP {sweep}", colour=False)
        ds = instance_dataset(case, 1, sweep, canvas, "MONOCHROME2")
        if syntax == JPEGBaseline8Bit:  # no pydicom encoder: PIL's, one JPEG per frame
            frames = []
            for frame in canvas:
                buffer = io.BytesIO()
                Image.fromarray(frame).save(buffer, "JPEG", quality=90)
                frames.append(buffer.getvalue())
            ds.PixelData = encapsulate(frames)
            ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
            ds.file_meta.TransferSyntaxUID = syntax
        elif syntax.is_encapsulated:
            ds.compress(syntax, canvas, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.PixelData = canvas.tobytes()
        path = folder / f"{syntax.keyword}-{sweep}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def best_seconds(read, repeats: int) -> float:
    read()  # untimed: imports the decoder plugin, fills the page cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        times.append(time.perf_counter() - start)
    return min(times)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames-per-sweep", type=int, default=140)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/RESULTS-dicom.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    k = args.frames_per_sweep
    n = layout.SWEEPS_PER_CASE * k
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    threadpool_limits(1)
    case = next(synthetic_cases(1, k, HEIGHT, WIDTH, seed=0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fetaliqa-bench-") as tmp:
        folder = Path(tmp)
        mha = folder / "case.mha"
        put_volume(None, str(mha), case.image, tmp, local=True)
        mha_s = best_seconds(lambda: read_image_stack(str(mha)), args.repeats)
        rows.append(("zlib .mha (SimpleITK), the reference", mha.stat().st_size, mha_s))
        for syntax in ENCODINGS:
            paths = write_study(case, k, syntax, folder)
            first = read_dicom_instance(str(paths[0]))
            frames, stored = first.frames, (first.header.rows, first.header.columns)
            assert frames.shape == (k, HEIGHT, WIDTH)
            if syntax != JPEGBaseline8Bit:  # lossless: the region is the case's frames exactly
                assert np.array_equal(frames, case.image[:k])
            seconds = best_seconds(lambda: [read_dicom_instance(str(p)) for p in paths], args.repeats)
            rows.append((f"DICOM {syntax.name}", sum(p.stat().st_size for p in paths), seconds))
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# DICOM decode throughput", "", f"    {command}", "",
        f"One case of {n} frames ({layout.SWEEPS_PER_CASE} x {k}) of {HEIGHT} x {WIDTH} (stored DICOM frames "
        f"{stored[0]} x {stored[1]} with burned-in text, cropped back), one core "
        f"of {platform.processor() or platform.machine()} ({os.cpu_count()} cores), best of {args.repeats}, "
        f"{time.strftime('%Y-%m-%d')}. Target: a compressed study within 1.5x of the .mha.", "",
        "| input | bytes | seconds | frames/s | ms/frame | x .mha |", "|---|---|---|---|---|---|",
    ]
    for name, size, seconds in rows:
        lines.append(f"| {name} | {size:,} | {seconds:.2f} | {n / seconds:,.0f} | {1000 * seconds / n:.2f} | "
                     f"{seconds / mha_s:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
