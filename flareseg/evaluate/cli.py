"""``flare-eval``: score a folder of predictions against ground truth (the CLI over flareseg.evaluate)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from flareseg.atomic import check_writable, write_text_atomic
from flareseg.cli import add_common_arguments, non_negative_float, path_arg, positive_int, run_command, say
from flareseg.errors import FlareSegError
from flareseg.evaluate.scoring import evaluate_folders
from flareseg.evaluate.tables import csv_text, summary_table

log = logging.getLogger("flareseg.evaluate.cli")  # not __main__ under python -m


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flare-eval", description="Score predictions against ground truth with FLARE21's DSC and NSD."
    )
    parser.add_argument("--pred", required=True, type=path_arg, help="folder of predicted label maps")
    parser.add_argument("--gt", required=True, type=path_arg, help="folder of ground truth label maps")
    parser.add_argument("-o", "--output", type=path_arg, help="per-case CSV to write (.csv)")
    parser.add_argument("--tolerance", type=non_negative_float, default=1.0, help="NSD tolerance in mm (default 1)")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=min(4, os.cpu_count() or 1),
        help="parallel processes (default: up to 4, one per core)",
    )
    add_common_arguments(parser)
    return parser


def check_csv_output(path: Path) -> None:
    """Refuse, before any scoring, a CSV path that would replace a label map or could not be written."""
    if path.suffix.lower() != ".csv":  # so that it can never replace a NIfTI input, nor be taken for a case
        raise FlareSegError(f"{path}: the per-case results file must end in .csv")
    if path.is_dir():
        raise FlareSegError(f"{path}: is a folder, not a file")
    check_writable(path)


def _main(args: argparse.Namespace) -> int:
    if args.output:
        check_csv_output(args.output)
    ev = evaluate_folders(
        args.pred, args.gt, tolerance_mm=args.tolerance, workers=args.workers, progress=not args.quiet
    )
    table = summary_table(ev)
    if args.output:  # first: a stdout that cannot be written (a full disk, a reader gone) loses no file
        text = csv_text(ev)
        try:
            write_text_atomic(text, args.output)
        except FlareSegError:  # a CSV that cannot be written loses none of the scores: they go to stdout
            say(table)
            say(text.rstrip("\n"))  # the per-case rows, which the table does not hold
            raise
        log.info("wrote %s", args.output)
    say(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
