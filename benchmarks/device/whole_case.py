"""Issue 10's whole-case measurements, in one call on a GPU machine (dry-runs on the CPU too).

Builds a random-weight full-width checkpoint and the issue's 512 x 512 x 300 LPS phantom
(100 slices repeated 3 times along S), then, in fresh ``flare-infer`` processes sampled
with NVML every 0.1 s: wall time, memory above the idle reading (FLARE21 max and the
FLARE22/23 area), per-stage timings and label agreement with the fp32 run, for each
setting below; a bare torch + CUDA start-up in the same run; and a folder of 8 copies
for cases per minute. Writes ``whole_case.json`` and ``whole_case.md`` to ``--out``.

    python benchmarks/device/whole_case.py --out device-out/whole-case            # GPU
    python benchmarks/device/whole_case.py --out /tmp/wc --device cpu --slices 6 --size 64 --width 4 --cases 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flareseg.bench.measure import NvmlSampler  # noqa: E402

SETTINGS: dict[str, list[str]] = {
    # The path the issue measured (fp16 + channels_last, batch 8), then today's defaults and the opt-in paths.
    "fp16-cl-batch8": ["--precision", "fp16", "--channels-last", "--batch-size", "8"],
    "defaults": [],
    "device-preprocess": ["--device-preprocess"],
    "gpu-memory-1000": ["--gpu-memory", "1000"],
    "device-preprocess+gpu-memory-1000": ["--device-preprocess", "--gpu-memory", "1000"],
    "fp32": ["--precision", "fp32", "--batch-size", "8"],
    # One batch of zeros while the first volume is read (cuDNN's set-up off the critical path).
    "warm-up": ["--warm-up"],
    "device-preprocess+warm-up": ["--device-preprocess", "--warm-up"],
    # Components labelled slab by slab while later slices are inferred.
    "overlap-postprocess": ["--overlap-postprocess"],
    # rapidgzip on every core of the host, instead of ISA-L on one.
    "read-threads-all": ["--read-threads", "0"],
    "all-opt-in": ["--device-preprocess", "--warm-up", "--overlap-postprocess", "--read-threads", "0"],
    # Small batches, with and without a CUDA graph: can a batch that fits 1,000 MB keep the throughput?
    "batch-2": ["--batch-size", "2"],
    "batch-1-graph": ["--batch-size", "1", "--cuda-graph"],
    "batch-2-graph": ["--batch-size", "2", "--cuda-graph"],
    # The raw labels, for host_cpu.py's post-processing measurements.
    "no-postprocess": ["--no-postprocess"],
}
#: Folder runs (cases per minute): today's defaults, and every opt-in path together.
FOLDER_SETTINGS: dict[str, list[str]] = {"defaults": [], "all-opt-in": SETTINGS["all-opt-in"]}

#: The start-up timeline's points, in the order a run reaches them (see flareseg/runtime/startup.py).
MARKS = [
    "main",
    "imports",
    "runner_opened",
    "activated",
    "warmed_up",
    "first_read",
    "first_inferred",
    "all_written",
    "released",
    "end",
]


def build_inputs(work: Path, slices: int, size: int, width: int) -> tuple[Path, Path]:
    import torch

    from flareseg.checkpoint import ModelInfo, save_checkpoint
    from flareseg.network import NetworkConfig, build_training_network
    from flareseg.phantom import make_phantom
    from flareseg.preprocess import NormalizationStats

    torch.manual_seed(0)
    net = build_training_network(NetworkConfig(base_width=width)).eval()
    info = ModelInfo(network=net.config, normalization=NormalizationStats(-300.0, 450.0), slice_size=(size, size))
    ckpt = save_checkpoint(work / "random.pt", net, info)
    third = max(1, slices // 3)
    ph = make_phantom((size, size, third), (0.8 * 512 / size, 0.8 * 512 / size, 2.5), seed=0, axcodes="LPS")
    img, _ = ph.to_nifti()
    data = np.concatenate([np.asanyarray(img.dataobj)] * 3, axis=2)[..., :slices]
    ct = work / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), ct)
    return ckpt, ct


def fresh(cmd: list[str], cuda: bool) -> dict[str, Any]:
    sampler = NvmlSampler() if cuda else None
    t = time.perf_counter()
    with sampler if sampler else contextlib.nullcontext():
        proc = subprocess.run(cmd, capture_output=True, text=True)
    row: dict[str, Any] = {"command": " ".join(cmd), "wall_s": time.perf_counter() - t, "rc": proc.returncode}
    row["end_epoch_s"] = time.time()  # against the timeline's end stamp: how long the process took to exit
    if proc.returncode != 0:
        row["stderr"] = proc.stderr.strip().splitlines()[-3:]
    if sampler is not None:
        row["nvml"] = sampler.summary() if hasattr(sampler, "summary") else {"max_mb": sampler.flare21_max_mb()}
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--work", type=Path, help="inputs and outputs of the runs (default: OUT/work)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    out = args.out
    work = args.work or out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt, ct = build_inputs(work, args.slices, args.size, args.width)
    infer = [sys.executable, "-m", "flareseg.runtime.cli", "--model", str(ckpt), "--device", args.device, "-q"]
    report: dict[str, Any] = {"device": args.device, "slices": args.slices, "size": args.size, "width": args.width}
    bare = "import torch; torch.zeros(1, device='cuda')" if cuda else "import torch"
    report["bare_startup"] = fresh([sys.executable, "-c", bare], cuda)
    # The parts of the bare start-up: the interpreter alone, and torch's import without CUDA.
    report["bare_python"] = fresh([sys.executable, "-c", "pass"], False)
    report["bare_torch_import"] = fresh([sys.executable, "-c", "import torch"], False)
    runs: dict[str, Any] = {}
    for name, flags in SETTINGS.items():
        if not cuda and name not in ("defaults", "fp32", "no-postprocess"):
            continue  # the other settings are CUDA paths
        pred = work / f"pred-{name}.nii.gz"
        row = fresh([*infer, "-i", str(ct), "-o", str(pred), *flags], cuda)
        timings = pred.with_name(pred.name.split(".nii")[0] + ".timings.json")
        if row["rc"] == 0 and timings.exists():
            data = json.loads(timings.read_text())
            row["case"], row["startup"] = data["cases"][0], data.get("startup", {})
            if row["startup"].get("end_epoch_s"):
                row["exit_s"] = row["end_epoch_s"] - row["startup"]["end_epoch_s"]
        runs[name] = row
    ref = work / "pred-fp32.nii.gz"
    if ref.exists():
        ref_labels = np.asarray(nib.load(ref).dataobj)
        for name in runs:
            if name == "no-postprocess":
                continue  # raw labels: not comparable with post-processed ones
            pred = work / f"pred-{name}.nii.gz"
            if pred.exists():
                runs[name]["agreement_with_fp32"] = float(np.mean(np.asarray(nib.load(pred).dataobj) == ref_labels))
    report["runs"] = runs
    folder = work / "folder"
    folder.mkdir()
    for i in range(args.cases):
        (folder / f"case{i:02d}_0000.nii.gz").symlink_to(ct)
    report["folders"] = {}
    for name, flags in FOLDER_SETTINGS.items():
        if not cuda and flags:
            continue
        row = fresh([*infer, "-i", str(folder), "-o", str(work / f"folder-{name}"), *flags], cuda)
        tj = work / f"folder-{name}" / "timings.json"
        if tj.exists():
            row["summary"] = json.loads(tj.read_text()).get("summary")
        report["folders"][name] = row
    (out / "whole_case.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Whole case, {args.slices} x {args.size} x {args.size}, device {args.device}", ""]
    lines.append(
        f"bare start-up (import torch + CUDA context): {report['bare_startup']['wall_s']:.2f} s; "
        f"python -c pass: {report['bare_python']['wall_s']:.2f} s; "
        f"import torch: {report['bare_torch_import']['wall_s']:.2f} s"
    )
    lines += [
        "",
        "| setting | process wall s | case in-process s | read | pre | infer | post | write | NVML above idle "
        "| agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        c = r.get("case", {})
        nv = r.get("nvml", {})
        lines.append(
            f"| {name} | {r['wall_s']:.2f} | {c.get('wall_s', 0):.2f} | {c.get('read_s', 0):.2f} | "
            f"{c.get('preprocess_s', 0):.2f} | "
            f"{c.get('infer_s', 0):.2f} | {c.get('postprocess_s', 0):.2f} | {c.get('write_s', 0):.2f} | "
            f"{json.dumps(nv)} | {r.get('agreement_with_fp32', float('nan')):.5f} |"
        )
    lines += [
        "",
        "Start-up timeline, seconds since the process started (flareseg/runtime/startup.py); exit = wall clock "
        "after the timeline's end until the process was gone:",
        "",
        "| setting | " + " | ".join(MARKS) + " | exit | activate | activation steps | first labels |",
        "|---|" + "---|" * (len(MARKS) + 4),
    ]
    for name, r in runs.items():
        st = r.get("startup", {})
        marks = st.get("since_process_start_s", {})
        cells = [f"{marks[m]:.2f}" if m in marks else "" for m in MARKS]
        steps = ", ".join(f"{k} {v:.2f}" for k, v in (st.get("activation_steps_s") or {}).items())
        first = r.get("case", {}).get("first_labels_s")
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {r.get('exit_s', float('nan')):.2f} | "
            f"{st.get('activate_s') or float('nan'):.2f} | {steps} | {first if first is None else round(first, 3)} |"
        )
    lines.append("")
    for name, row in report["folders"].items():
        summ = row.get("summary") or {}
        lines.append(
            f"folder of {args.cases}, {name}: {summ.get('cases_per_minute')} cases/min, wall {row['wall_s']:.1f} s"
        )
    (out / "whole_case.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
