"""Print a model's parameter counts and config as JSON: `python -m jobs.info --model fetalclip --task cls`
(`--recipe paper`: with the paper's LoRA placement, 2,360,065 trainable for that one; for SEG with the paper's
decoder, which trains alone: its LoRA is counted in `counted_trainable_never_trained`)."""

from __future__ import annotations

import argparse
import json
import sys

from fetaliqa.models import MODEL_NAMES, PAPER_BASELINES, TRAINABLE, is_known_model, model_info
from fetaliqa.training.recipes import RECIPES
from jobs.common import run_recipe


def model_name(value: str) -> str:
    if not is_known_model(value):
        raise argparse.ArgumentTypeError(f"unknown model {value!r}; choose from {', '.join(MODEL_NAMES)}, "
                                         f"or timm:<arch> such as {', '.join(PAPER_BASELINES)}")
    return value


def build_parser(prog: str = "python -m jobs.info") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--model", required=True, type=model_name, metavar="NAME",
                        help=f"{', '.join(MODEL_NAMES)}, or timm:<arch> (a baseline encoder)")
    parser.add_argument("--task", choices=("cls", "seg"), default="cls")
    parser.add_argument("--trainable", choices=TRAINABLE, default=None,
                        help="what trains: LoRA + head, head only, or everything (default: the paper's recipe)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="fetaliqa",
                        help="whose LoRA placement and SEG decoder: fetaliqa's (default) or the paper's code's")
    return parser


def info(args: argparse.Namespace) -> int:
    try:
        recipe = RECIPES[args.recipe]
        info_ = model_info(args.model, args.task, recipe.lora(args.model), trainable=args.trainable,
                           decoder=recipe.decoder if args.task == "seg" else None)
    except ValueError as err:  # e.g. SEG on a CNN baseline, LoRA on a CNN
        print(f"fetaliqa info: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info_, indent=2))
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m jobs.info") -> int:
    return run_recipe(info, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
