"""Host memory against volume size: peak RSS of flare-infer for 100- and 400-slice 512 x 512 volumes.

Each volume runs in a fresh process (as a deployment would), with a small network (width 8):
the volume-proportional memory this measures does not depend on the network's width.
The target (issue 6): the 400-slice peak exceeds the 100-slice peak by no more than 4x the
difference of the volumes' int16 sizes.

Run: python benchmarks/runtime_memory.py [OUT_DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from flareseg.checkpoint import ModelInfo, save_checkpoint
from flareseg.network import NetworkConfig, build_training_network
from flareseg.preprocess import NormalizationStats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="work folder (default: a new temporary folder)")
    args = parser.parse_args()
    work = args.out_dir or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = build_training_network(NetworkConfig(base_width=8)).eval()
    ckpt = save_checkpoint(work / "w8.pt", net, ModelInfo(net.config, NormalizationStats(mean=-300.0, std=450.0)))
    rng = np.random.default_rng(0)
    rows = []
    for slices in (100, 400):
        data = rng.integers(-1024, 1500, (512, 512, slices), dtype=np.int16)
        ct = work / f"ct{slices}_0000.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), ct)
        del data
        out = work / f"ct{slices}.nii.gz"
        cmd = [sys.executable, "-m", "flareseg.runtime.cli", "--model", str(ckpt), "-i", str(ct), "-o", str(out)]
        cmd += ["--batch-size", "8", "-q", "--overwrite", "--timings", str(work / f"t{slices}.json")]
        subprocess.run(cmd, check=True)
        case = json.loads((work / f"t{slices}.json").read_text())["cases"][0]
        rows.append((slices, 512 * 512 * slices * 2 / 2**20, case["peak_rss_mb"], case["total_s"]))
    print(f"machine: {platform.machine()} {platform.processor()}, python {platform.python_version()}")
    print("| slices | int16 volume MiB | peak RSS MiB | case time s |")
    print("|---|---|---|---|")
    for s, vol, rss, t in rows:
        print(f"| {s} | {vol:.0f} | {rss:.0f} | {t:.1f} |")
    d_rss, d_vol = rows[1][2] - rows[0][2], rows[1][1] - rows[0][1]
    print(f"\nRSS growth {d_rss:.0f} MiB for {d_vol:.0f} MiB more int16 voxels: {d_rss / d_vol:.2f}x (target <= 4x)")


if __name__ == "__main__":
    main()
