"""How long a fresh process takes to turn a checkpoint into the network it runs (issue 10, start-up).

Times ``TorchRunner.activate()``'s ``load_s`` on the CPU: read the checkpoint, build the
training network with its weights, then the deploy network and its 1-channel fold. On a
GPU this step sits on the fresh process's critical path, after torch's import and before
the first batch. Each round runs one fresh child per tree (this tree, and ``--baseline``
from a temporary git worktree), in an order that flips from round to round, and checks
that both trees built the same weights.

    python benchmarks/model_load.py --rounds 9 --baseline HEAD~1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, sys, time
import torch
import flareseg
from flareseg.runtime.runners.pytorch import TorchRunner
print("tree", __import__("pathlib").Path(flareseg.__file__).parents[1])
runner = TorchRunner(sys.argv[1])
t = time.perf_counter()
runner.activate()
wall = time.perf_counter() - t
digest = hashlib.sha256()
for key, value in sorted(runner.model.state_dict().items()):
    digest.update(key.encode()); digest.update(value.contiguous().numpy().tobytes())
print(json.dumps({"load_s": runner.activation_steps["load_s"], "activate_s": wall, "weights": digest.hexdigest()}))
"""


def make_checkpoint(path: Path, width: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from flareseg.checkpoint import ModelInfo, save_checkpoint
    from flareseg.network import NetworkConfig, build_training_network
    from flareseg.preprocess import NormalizationStats

    torch.manual_seed(0)
    net = build_training_network(NetworkConfig(base_width=width)).eval()
    info = ModelInfo(network=net.config, normalization=NormalizationStats(-300.0, 450.0), slice_size=(512, 512))
    save_checkpoint(path, net, info)


def child(tree: Path, checkpoint: Path) -> dict[str, float | str]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(checkpoint)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,  # `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH
    )
    if result_tree := re.search(r"^tree (.*)$", out.stdout, re.M):
        if Path(result_tree.group(1)).resolve() != tree.resolve():
            raise SystemExit(f"the child imported flareseg from {result_tree.group(1)}, not {tree}")
    result: dict[str, float | str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--baseline", default="HEAD", help="a commit to compare with (default: HEAD, i.e. uncommitted)")
    ap.add_argument("--width", type=int, default=64, help="network base width (64: the paper's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = work / "model.pt"
        make_checkpoint(checkpoint, args.width)
        base = work / "baseline"
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "-q", "--detach", str(base), args.baseline], check=True)
        try:
            trees = {f"at {args.baseline}": base, "this tree": ROOT}
            runs: dict[str, list[dict[str, float | str]]] = {name: [] for name in trees}
            for r in range(args.rounds):
                for name in list(trees)[:: 1 if r % 2 == 0 else -1]:
                    runs[name].append(child(trees[name], checkpoint))
        finally:
            subprocess.run([*git, "remove", "--force", str(base)], check=False)
    digests = {str(row["weights"]) for rows in runs.values() for row in rows}
    medians = {name: statistics.median(float(row["load_s"]) for row in rows) for name, rows in runs.items()}
    first = next(iter(medians.values()))
    print(f"width {args.width}, {args.rounds} rounds, median seconds (fresh processes, order flipped each round):")
    print("| tree | load_s | activate_s | vs baseline |")
    print("|---|---|---|---|")
    for name, rows in runs.items():
        act = statistics.median(float(row["activate_s"]) for row in rows)
        print(f"| {name} | {medians[name]:.3f} | {act:.3f} | {first / medians[name]:.2f}x |")
    print(f"same weights in every run: {len(digests) == 1}")
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
