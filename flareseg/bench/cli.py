"""``flare-bench``: what the model costs on this machine, beside the paper and FLARE21."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flareseg.cli import (
    add_common_arguments,
    int_list,
    non_negative_int,
    path_arg,
    positive_int,
    run_command,
    say,
    slice_size,
    torch_threads,
    warn_threads_beyond_cores,
)
from flareseg.errors import FlareSegError


def build_parser() -> argparse.ArgumentParser:
    from flareseg.bench.backends import ALL_BACKENDS

    p = argparse.ArgumentParser(
        prog="flare-bench",
        description="Benchmark latency, throughput, FLOPs and memory of the FLARE21 network on every backend "
        "available here (default: the paper's full-width network with random weights).",
    )
    p.add_argument("--model", type=path_arg, help="a checkpoint (.pt) or ONNX model (default: random weights)")
    p.add_argument(
        "--backends", type=lambda s: tuple(s.split(",")), help="comma-separated, from: " + ", ".join(ALL_BACKENDS)
    )
    p.add_argument("--batch", type=int_list, help="batch sizes (default 1,2,4 on CPU; 1..32 on GPU)")
    p.add_argument("--slices", type=positive_int, help="slices of the phantom volume (default 8 on CPU, 64 on GPU)")
    p.add_argument(
        "--input", type=path_arg, help="a CT volume (NIfTI file or DICOM series folder) to time instead of the phantom"
    )
    p.add_argument(
        "--size",
        type=slice_size,
        help="slice size of the phantom volume, and of the random-weight network (default 512; a --model runs at "
        "its own)",
    )
    p.add_argument("--repeats", type=positive_int, help="timed runs per batch size (default 3 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=non_negative_int, help="untimed runs first (default 1 on CPU, 5 on GPU)")
    p.add_argument(
        "--width", type=positive_int, help="base width of the random-weight network (default 64; not with --model)"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads of the CPU backends, fresh process included (default: each runtime's own, every core); "
        "on a shared machine, fewer threads than cores can time far steadier",
    )
    p.add_argument("--no-fresh-process", action="store_true", help="skip the FLARE21-style fresh-process timing")
    p.add_argument(
        "--check",
        action="store_true",
        help="instead of timing: check every available backend's outputs against PyTorch fp32 on the same slices "
        "and volume (writes check.json and check.md; exit status 1 if any backend fails its tolerance)",
    )
    p.add_argument(
        "-o", "--out", type=path_arg, default=Path("bench-report"), help="report folder (default bench-report)"
    )
    add_common_arguments(p)
    return p


def _command(args: argparse.Namespace) -> str:
    return "flare-bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if args.argv is None else args.argv))


def _refuse_ignored(args: argparse.Namespace) -> None:
    """Options that would change nothing in this run are refused, not silently dropped."""
    ignored = []
    if args.model is not None and args.width is not None:
        ignored.append("--width (the random-weight network's; --model's network has its own)")
    if args.input is not None and args.slices is not None:
        ignored.append("--slices (the phantom volume's; --input has its own slices)")
    if args.input is not None and args.model is not None and args.size is not None:
        ignored.append("--size (the phantom's and the random-weight network's; --input and --model have their own)")
    if args.check:
        timing = {"--repeats": args.repeats is not None, "--warmup": args.warmup is not None}
        timing["--threads"] = args.threads is not None
        timing["--no-fresh-process"] = args.no_fresh_process
        ignored += [f"{option} (--check does not time)" for option, given in timing.items() if given]
    if ignored:
        raise FlareSegError(f"{'; '.join(ignored)}: does not apply here; leave it out")


def _main(args: argparse.Namespace) -> int:
    _refuse_ignored(args)
    from flareseg.bench.inputs import removed_on_failure

    # What both kinds of run take; None (and no width) means the machine's default.
    common: dict[str, Any] = {
        "out": args.out,
        "model": args.model,
        "backends": args.backends,
        "input": args.input,
        "slices": args.slices,
    }
    if args.width is not None:
        common["base_width"] = args.width
    if args.size is not None:
        common["size"] = args.size
    if args.check:
        from flareseg.bench.check import CheckConfig, markdown, run_check, write_check

        if args.batch is not None and len(args.batch) != 1:
            raise FlareSegError(f"--check runs one batch size, got --batch {','.join(map(str, args.batch))}")
        check = CheckConfig(batch=args.batch[0] if args.batch else 2, **common)
        measure, write, text = functools.partial(run_check, check), write_check, markdown
    else:
        from flareseg.bench.report import markdown as report_markdown
        from flareseg.bench.report import write_report
        from flareseg.bench.run import BenchConfig, run_benchmark

        bench = BenchConfig(
            batches=args.batch,
            warmup=args.warmup,
            repeats=args.repeats,
            fresh_process=not args.no_fresh_process,
            threads=args.threads,
            **common,
        )
        measure, write = functools.partial(run_benchmark, bench), write_report
        text = functools.partial(report_markdown, figures=())
    warn_threads_beyond_cores(args.threads)
    with removed_on_failure(args.out), torch_threads(args.threads), _each_file_warned_once():
        report = measure()
        try:
            paths = write(report, args.out, _command(args))
        except FlareSegError:  # a full disk, say: the figures measured are not lost with the folder
            say(text(report, _command(args)))
            raise
    say(paths["markdown"].read_text())
    say("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if report.get("passed", True) else 1


class _OncePerFile(logging.Filter):
    """Passes the first record of each message and file, whatever its numbers: flare-bench reads its ``--input``
    once per backend, and would say the same about it each time."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        key = (str(record.msg), "\0".join(str(a) for a in args if not isinstance(a, int | float)))
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


@contextlib.contextmanager
def _each_file_warned_once() -> Iterator[None]:
    """Within the block, the volume reader's notes on a file are said once (the filter is removed after it)."""
    reader = logging.getLogger("flareseg.volume")
    once = _OncePerFile()
    reader.addFilter(once)
    try:
        yield
    finally:
        reader.removeFilter(once)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.set_defaults(argv=list(argv) if argv is not None else None)
    return run_command(parser, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
