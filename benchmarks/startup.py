"""A fresh ``flare-infer`` process on a tiny case against a bare ``python -c "import torch"``, on the CPU.

What a fresh process costs beyond torch itself: imports, the model, the start-up of the
pipeline, and the exit. With ``--baseline REV`` the same command also runs from a git
worktree of commit REV, alternating round by round with today's code, so that a change
to the start-up or the exit is measured against what it replaced in the same run.

    python benchmarks/startup.py --rounds 5 [--baseline d5c0499] [--ct lps300_0000.nii.gz] [--folder 2] [--width 64]

``--folder N`` runs each process on a folder of N cases (links to the same CT) instead of
one file, with a fresh output folder each time.

It then times the exit alone: children that print ``time.time()`` as their last act, then
end the usual way or through ``flareseg.cli.exit_now``, against the moment their parent
sees them gone.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_case(work: Path, width: int = 4) -> tuple[Path, Path]:
    """A random-weight checkpoint (width 4 unless told) and a 6 x 64 x 64 phantom."""
    code = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import torch
from pathlib import Path
from flareseg.checkpoint import ModelInfo, save_checkpoint
from flareseg.network import NetworkConfig, build_training_network
from flareseg.phantom import make_phantom
from flareseg.preprocess import NormalizationStats
import nibabel as nib
work = Path({str(work)!r})
torch.manual_seed(0)
net = build_training_network(NetworkConfig(base_width={width})).eval()
info = ModelInfo(network=net.config, normalization=NormalizationStats(-300.0, 450.0), slice_size=(64, 64))
save_checkpoint(work / "tiny.pt", net, info)
img, _ = make_phantom((64, 64, 6), (6.4, 6.4, 2.5), seed=0).to_nifti()
nib.save(img, work / "tiny_0000.nii.gz")
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return work / "tiny.pt", work / "tiny_0000.nii.gz"


def wall(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    # cwd matters: `python -m` puts it first on sys.path, ahead of PYTHONPATH.
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def exit_times(ckpt: Path, ct: Path, work: Path, rounds: int) -> dict[str, list[float]]:
    """Seconds from a child's last ``time.time()`` to its parent seeing it end."""
    run = (
        f"from flareseg.runtime.cli import main; "
        f"main(['--model', {str(ckpt)!r}, '-i', {str(ct)!r}, '-o', {str(work / 'exit.nii.gz')!r}, '-q', "
        "'--device', 'cpu', '--overwrite'])"
    )
    children = {
        "import torch, usual exit": "import time, torch; print(time.time())",
        "flare-infer main(), usual exit": f"import time; {run}; print(time.time())",
        "flare-infer main(), exit_now": (
            f"import time; from flareseg.cli import exit_now; {run}; print(time.time()); exit_now(0)"
        ),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out: dict[str, list[float]] = {name: [] for name in children}
    for _ in range(rounds):
        for name, code in children.items():
            done = subprocess.run(
                [sys.executable, "-c", code], check=True, env=env, cwd=work, capture_output=True, text=True
            )
            out[name].append(time.time() - float(done.stdout.split()[-1]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", help="a commit to compare with, run from a temporary git worktree")
    ap.add_argument(
        "--ct",
        type=Path,
        help="a real-size .nii.gz instead of the tiny phantom (the network stays tiny, at 64 x 64 slices), so "
        "that the read, post-processing and write of a whole case are in the figures",
    )
    ap.add_argument("--folder", type=int, help="run on a folder of this many cases (links to the CT), not one file")
    ap.add_argument(
        "--width", type=int, default=4, help="the network's width (64: the paper's, an 83 MB checkpoint to load)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, ct = build_case(work, args.width)
        if args.ct is not None:
            ct = args.ct.resolve()
        inp = ct
        if args.folder:
            inp = work / "cases"
            inp.mkdir()
            for i in range(args.folder):
                (inp / f"case_{i:03d}_0000.nii.gz").symlink_to(ct)
        trees = {"today": ROOT}
        if args.baseline:
            tree = work / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), args.baseline], check=True
            )
            trees[f"at {args.baseline}"] = tree
        times: dict[str, list[float]] = {"bare import torch": [], **{name: [] for name in trees}}
        # When each process had its first volume in hand (its timeline's "first_read", seconds since it began).
        first_read: dict[str, list[float]] = {name: [] for name in trees}
        try:
            for r in range(args.rounds):
                times["bare import torch"].append(wall([sys.executable, "-c", "import torch"], dict(os.environ), work))
                for name, tree in trees.items():
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    stem = work / f"out-{r}-{name.replace(' ', '_')}"
                    out = stem if args.folder else stem.with_suffix(".nii.gz")
                    cmd = [sys.executable, "-m", "flareseg.runtime.cli", "--model", str(ckpt), "-i", str(inp)]
                    times[name].append(wall([*cmd, "-o", str(out), "--device", "cpu", "-q"], env, work))
                    done = out / "timings.json" if args.folder else stem.with_suffix(".timings.json")
                    timings = json.loads(done.read_text())
                    first_read[name].append(timings["startup"]["since_process_start_s"]["first_read"])
            exits = exit_times(ckpt, ct, work, args.rounds)
        finally:
            if args.baseline:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "baseline")], check=False
                )
    bare = statistics.median(times["bare import torch"])
    sys.path.insert(0, str(ROOT))
    from flareseg.bench.measure import cpu_description

    cpu = cpu_description()["cpu_model"]
    print(f"machine: {platform.machine()} {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}")
    what = f"a folder of {args.folder} cases" if args.folder else "one case"
    print(f"{what}: {ct.name}; width {args.width}; {args.rounds} rounds, alternating; wall seconds of whole processes")
    for name, values in times.items():
        median = statistics.median(values)
        extra = "" if name.startswith("bare") else f"  bare + {median - bare:.2f} s"
        print(f"{name:24s} median {median:.2f} s  ({', '.join(f'{v:.2f}' for v in values)}){extra}")
    print("first volume in hand (the timeline's first_read, seconds since the process began):")
    for name, values in first_read.items():
        print(f"  {name:22s} median {statistics.median(values):.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    print("exit alone (last time.time() of the child to its end, seen by the parent):")
    for name, values in exits.items():
        print(f"  {name:32s} median {statistics.median(values):.3f} s  ({', '.join(f'{v:.3f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
