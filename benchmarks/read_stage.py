"""The read stage of one case: counting the percentiles' histogram while the file inflates, against after it.

``flare-infer``'s reader thread reads each case and counts its stored values (the exact
percentiles' one pass). Three ways, on the issue-10 volume (512 x 512 x 300 int16 stored
LPS, ``.nii.gz``, built by ``host_stages.py``):

- ``read, then count``: ``read_ct`` and then ``value_histogram`` of the whole volume, as
  the read stage did before it counted during the inflate;
- ``read stage``: ``flareseg.runtime.reading.read_stage``, which hands each inflated
  stretch to a ``ValueCounter`` thread;
- ``read alone``: ``read_ct`` without any count (the floor).

Each way runs in fresh child processes, which rotate their order round by round: the
allocator's state after earlier reads in the same process moves these times by up to
30 %, so in-process alternation is not a fair comparison. A child reads the case three
times in a row: the first read is a fresh process's (``flare-infer`` on a file), the
others are what a folder's later cases meet. Wall and CPU (process) seconds are medians.
The children check that the histogram counted while inflating equals the whole count.

Run: python benchmarks/read_stage.py [--rounds 7] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from host_stages import _case, _cpu_name

from flareseg.percentiles import value_histogram
from flareseg.runtime.reading import read_stage
from flareseg.volume import read_ct

WAYS = ("read, then count", "read stage (counted while inflating)", "read alone")
READS_PER_CHILD = 3


def _way(name: str, ct: Path) -> Callable[[], Any]:
    return {
        WAYS[0]: lambda: value_histogram(read_ct(ct).array),
        WAYS[1]: lambda: read_stage(ct),
        WAYS[2]: lambda: read_ct(ct),
    }[name]


def _child(name: str, ct: Path) -> None:
    fn, out = _way(name, ct), []
    for _ in range(READS_PER_CHILD):
        w, c = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - w, time.process_time() - c))
    streamed = read_stage(ct)
    whole = value_histogram(streamed.volume.array)
    same = (
        streamed.histogram is not None
        and whole is not None
        and bool(np.array_equal(streamed.histogram.counts, whole.counts))
        and streamed.histogram.low == whole.low
    )
    print(json.dumps({"times": out, "same": same}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flareseg-host-stages")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    ct, _ = _case(args.work)
    if args.child:
        _child(args.child, ct)
        return 0
    first: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
    later: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
    same = True
    for i in range(args.rounds):
        for name in WAYS[i % 3 :] + WAYS[: i % 3]:  # rotate who goes first
            cmd = [sys.executable, __file__, "--work", str(args.work), "--child", name]
            report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            first[name].append(tuple(report["times"][0]))
            later[name].extend(tuple(t) for t in report["times"][1:])
            same = same and report["same"]

    def med(runs: list[tuple[float, float]], k: int) -> float:
        return statistics.median(t[k] for t in runs)

    print(f"machine: {platform.machine()} {_cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}")
    print(f"input: {ct.name}, {ct.stat().st_size / 2**20:.1f} MiB; {args.rounds} rounds of fresh children per way")
    print()
    head = "| way | first read: wall s | vs read, then count | CPU s "
    print(head + "| later reads: wall s | vs read, then count | CPU s |")
    print("|---|---|---|---|---|---|---|")
    base_first, base_later = med(first[WAYS[0]], 0), med(later[WAYS[0]], 0)
    for name in WAYS:
        fw, lw = med(first[name], 0), med(later[name], 0)
        print(
            f"| {name} | {fw:.3f} | {base_first / fw:.2f}x | {med(first[name], 1):.3f} "
            f"| {lw:.3f} | {base_later / lw:.2f}x | {med(later[name], 1):.3f} |"
        )
    print()
    print(f"histogram counted while inflating equals the whole count in every child: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
