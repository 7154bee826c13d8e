"""Recompute the pseudonyms a `score --pseudonymize-key-file` run wrote, for the key holder: `python -m jobs.pseudonym
--key-file PATH [ID ...]` prints one `original,pseudonym` CSV line per identifier (case id, source URI, SOP Instance
UID, institution or station, as a run without the flag writes it), the arguments' or else stdin's, one a line.

To turn a rescan list back into studies, pseudonymise the archive's case ids and join:
`python -m jobs.pseudonym --key-file key < case_ids.txt > pseudonyms.csv`.
"""

from __future__ import annotations

import argparse
import csv
import sys

from fetaliqa.pseudonym import load_key, pseudonym
from jobs.common import add_storage_options, run_recipe


def build_parser(prog: str = "python -m jobs.pseudonym") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key-file", required=True, metavar="PATH",
                        help="the key file the scoring run was given (local path or fsspec URL)")
    parser.add_argument("ids", nargs="*", metavar="ID", help="identifiers to pseudonymise (default: stdin, one a line)")
    add_storage_options(parser)
    return parser


def pseudonyms(args: argparse.Namespace) -> int:
    key = load_key(args.key_file, args.storage_options)
    ids = args.ids or (line.rstrip("\r\n") for line in sys.stdin)
    out = csv.writer(sys.stdout, lineterminator="\n")
    for text in ids:
        if text:
            out.writerow([text, pseudonym(key, text)])
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m jobs.pseudonym") -> int:
    return run_recipe(pseudonyms, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
