"""The `fetaliqa` command: one sub-command per recipe in `jobs/`, with the same flags as `python -m jobs.<name>`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "synth": "write a synthetic ACOUSLIC-layout archive",
    "info": "print a model's parameter counts and config as JSON",
    "train": "fine-tune a model on an annotated archive with Ray Train (the paper's protocol)",
    "score": "score every frame of an archive on Ray and write Parquet",
    "evaluate": "compare a scoring run or challenge-format predictions with the annotations: metrics.json, report.html",
    "report": "the morning report of a scoring run: decisions, rescan.csv, quality by site and sweep, AC, gallery",
    "export": "write a scoring run as ACOUSLIC-AI challenge-format predictions (segmentation stack + frame number)",
    "pseudonym": "print the pseudonyms a `score --pseudonymize-key-file` run wrote for identifiers (the key holder's)",
    "demo": "the whole chain on a synthetic archive: synth, train, score, evaluate, report",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help_}" for name, help_ in COMMANDS.items()]
        print("usage: fetaliqa COMMAND [flags]   (fetaliqa COMMAND --help)\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    job = importlib.import_module(f"jobs.{argv[0]}")
    return job.main(argv[1:], prog=f"fetaliqa {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
