"""How long each command's ``--help`` takes in a fresh process, for this tree and a baseline tree.

    git worktree add /tmp/base <rev>
    python benchmarks/help_startup.py /tmp/base --rounds 5

Rounds alternate between the trees (the machine is shared and noisy); medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: The package holding each command's parser.
COMMANDS = {
    "flare-infer": "runtime",
    "flare-export": "export",
    "flare-bench": "bench",
    "flare-train": "train",
    "flare-eval": "evaluate",
}


def seconds(tree: Path, command: str) -> float:
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from flareseg.{command}.cli import main; main(['--help'])"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)  # --help exits 0 via SystemExit
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("baseline", type=Path, help="a checkout of the baseline revision")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this tree": Path(__file__).resolve().parents[1]}
    times: dict[str, dict[str, list[float]]] = {name: {c: [] for c in COMMANDS} for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            for command, package in COMMANDS.items():
                times[name][command].append(seconds(tree, package))
    print("| command | " + " | ".join(trees) + " | ratio |")
    print("|---|" + "---|" * (len(trees) + 1))
    for command in COMMANDS:
        base, this = (statistics.median(times[name][command]) for name in trees)
        print(f"| {command} --help | {base:.3f} s | {this:.3f} s | {base / this:.1f}x |")


if __name__ == "__main__":
    main()
