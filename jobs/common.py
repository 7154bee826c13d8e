"""What every recipe shares: argument parsing helpers and turning expected errors into one-line exits."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from fetaliqa.errors import FetaliqaError

log = logging.getLogger("fetaliqa")


def storage_options_arg(text: str) -> dict:
    """`--storage-options` value: a JSON object passed to fsspec (e.g. {"endpoint_url": ...})."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def run_recipe(recipe: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
               argv: list[str] | None) -> int:
    """Parse `argv`, run `recipe`, and report a FetaliqaError as one line on stderr with exit code 2."""
    args = parser.parse_args(argv)
    # Libraries (open_clip, Ray) log their own INFO chatter to the root logger; show only their warnings.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    try:
        return recipe(args)
    except FetaliqaError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
