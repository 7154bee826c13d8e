"""Write a synthetic archive in the ACOUSLIC-AI layout: `python -m jobs.synth OUT --cases N [--format dicom]`.

`--format dicom` writes the same cases as DICOM studies (one multi-frame instance per sweep, under
OUT/dicom/) with their masks and circumferences beside them, keyed by StudyInstanceUID.
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import add_storage_options, run_recipe
from fetaliqa.synthetic.archive import write_synthetic_archive
from fetaliqa.synthetic.dicom import DICOM_DIR, write_synthetic_dicom_archive


def build_parser(prog: str = "python -m jobs.synth") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("output", help="archive root: a local path or fsspec URL (s3://bucket/prefix)")
    parser.add_argument("--cases", type=int, required=True)
    parser.add_argument("--frames-per-sweep", type=int, default=140, help="frames per sweep (6 sweeps a case)")
    parser.add_argument("--height", type=int, default=562)
    parser.add_argument("--width", type=int, default=744)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("mha", "dicom"), default="mha",
                        help="mha: stacked .mha images (ACOUSLIC); dicom: a DICOM study per case under OUT/dicom/")
    add_storage_options(parser)
    return parser


def synth(args: argparse.Namespace) -> int:
    write = write_synthetic_dicom_archive if args.format == "dicom" else write_synthetic_archive
    case_ids = write(
        args.output, cases=args.cases, frames_per_sweep=args.frames_per_sweep, height=args.height,
        width=args.width, seed=args.seed, storage_options=args.storage_options)
    print(f"wrote {len(case_ids)} cases ({6 * args.frames_per_sweep} frames of {args.height}x{args.width}) "
          f"to {args.output}" + (f" (DICOM studies in {args.output.rstrip('/')}/{DICOM_DIR}/)" if args.format == "dicom" else ""))
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m jobs.synth") -> int:
    try:
        return run_recipe(synth, build_parser(prog), argv)
    except ValueError as err:  # argument values the generator rejects
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
