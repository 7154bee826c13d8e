"""Print a model's parameter counts and config as JSON: `python -m jobs.info --model fetalclip --task cls`."""

from __future__ import annotations

import argparse
import json
import sys

from fetaliqa.models import MODEL_NAMES, model_info
from fetaliqa.runner import run_recipe


def build_parser(prog: str = "python -m jobs.info") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--task", choices=("cls", "seg"), default="cls")
    return parser


def info(args: argparse.Namespace) -> int:
    print(json.dumps(model_info(args.model, args.task), indent=2))
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m jobs.info") -> int:
    return run_recipe(info, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
