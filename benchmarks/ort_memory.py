"""ONNX Runtime CPU memory settings: peak RSS and time per slice, full width, 512 x 512, batch 2.

Each run is a fresh process (a deployment's process): it opens the full-width fp32 export
(NetworkConfig() defaults, random weights) with one memory setting, runs one warm-up batch
and then timed batches of 2 slices, and reports the kernel's peak RSS (VmHWM) and the
median time per slice. Settings alternate run by run so that the machine's load (other
processes share its cores) affects them alike.

    lean:             enable_cpu_mem_arena=True,  enable_mem_pattern=False  (the runner's CPU default)
    no-arena:         enable_cpu_mem_arena=False, enable_mem_pattern=False
    no-arena-pattern: enable_cpu_mem_arena=False, enable_mem_pattern=True   (not offered by the runner)
    ort-defaults:     enable_cpu_mem_arena=True,  enable_mem_pattern=True   (ONNX Runtime's defaults)

Besides wall time it reports the process's CPU time (user + system, all threads) per
slice: on a machine shared with other work, wall time swings with their load, while the
CPU time counts this run's own work (the system part is mostly page faults, which a
session without an arena pays on every run).

With ``--paired N`` it measures speed only, in one process: lean and ort-defaults sessions run
alternately, batch by batch, and the median of the N per-pair time ratios is reported.

Run: python benchmarks/ort_memory.py [WORK_DIR] [--repeats N] [--batches N]
     python benchmarks/ort_memory.py [WORK_DIR] --paired N
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

SETTINGS = {  # named as OnnxRuntimeRunner's memory= values
    "lean": {"enable_cpu_mem_arena": True, "enable_mem_pattern": False},
    "no-arena": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
    "no-arena-pattern": {"enable_cpu_mem_arena": False, "enable_mem_pattern": True},
    "ort-defaults": {"enable_cpu_mem_arena": True, "enable_mem_pattern": True},
}
BATCH = 2
SIZE = 512


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(model: Path, setting: str, batches: int) -> None:
    """One measured run: prints a JSON line."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    for name, value in SETTINGS[setting].items():
        setattr(opts, name, value)
    before = _status_mib("VmRSS")
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    loaded = _status_mib("VmRSS")
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((BATCH, 1, SIZE, SIZE)).astype(np.float32)
    session.run(None, {name: x})  # warm-up
    times, user, system = [], [], []
    for _ in range(batches):
        t0, c0 = time.perf_counter(), os.times()
        session.run(None, {name: x})
        c1 = os.times()
        times.append(time.perf_counter() - t0)
        user.append(c1.user - c0.user)
        system.append(c1.system - c0.system)
    print(
        json.dumps(
            {
                "setting": setting,
                "rss_before_session_mib": before,
                "rss_after_load_mib": loaded,
                "peak_rss_mib": _status_mib("VmHWM"),
                "s_per_slice": statistics.median(times) / BATCH,
                # CPU seconds of the process (all threads): the work done, less sensitive than wall time
                # to other processes sharing the cores.
                "user_cpu_s_per_slice": statistics.median(user) / BATCH,
                "sys_cpu_s_per_slice": statistics.median(system) / BATCH,
            }
        )
    )


def paired(model: Path, pairs: int) -> None:
    """Speed only: lean and ort-defaults sessions in one process, run alternately, batch by batch.

    Meant to put both under the same machine load; in practice each session's idle thread
    pool and the other's memory traffic disturb it, so the CPU times of separate processes
    are the figures to quote (benchmarks/ort_memory.md).
    """
    import numpy as np
    import onnxruntime as ort

    sessions = {}
    for setting in ("lean", "ort-defaults"):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        for name, value in SETTINGS[setting].items():
            setattr(opts, name, value)
        sessions[setting] = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = sessions["lean"].get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((BATCH, 1, SIZE, SIZE)).astype(np.float32)
    for s in sessions.values():
        s.run(None, {name: x})  # warm-up
    ratios, times = [], {"lean": [], "ort-defaults": []}
    for i in range(pairs):
        pair = {}
        for setting in ("lean", "ort-defaults") if i % 2 == 0 else ("ort-defaults", "lean"):
            t0 = time.perf_counter()
            sessions[setting].run(None, {name: x})
            pair[setting] = time.perf_counter() - t0
            times[setting].append(pair[setting] / BATCH)
        ratios.append(pair["lean"] / pair["ort-defaults"])
        lean, default = pair["lean"] / BATCH, pair["ort-defaults"] / BATCH
        print(f"pair {i}: lean {lean:.2f} s/slice, ort-defaults {default:.2f} s/slice", flush=True)
    print(
        f"paired, {pairs} pairs: lean/ort-defaults time ratio median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}); median s/slice lean "
        f"{statistics.median(times['lean']):.2f}, ort-defaults {statistics.median(times['ort-defaults']):.2f}"
    )


def export_full_width(work: Path) -> Path:
    import torch

    from flareseg.checkpoint import ModelInfo, save_checkpoint
    from flareseg.export import ExportOptions, export_onnx
    from flareseg.network import NetworkConfig, build_training_network
    from flareseg.preprocess import NormalizationStats

    model = work / "full_fp32.onnx"
    if model.is_file():
        return model
    torch.manual_seed(0)
    net = build_training_network(NetworkConfig()).eval()
    ckpt = save_checkpoint(work / "full.pt", net, ModelInfo(net.config, NormalizationStats(mean=-300.0, std=450.0)))
    options = ExportOptions(batch_profile=(1, 2, 2), verify_slices=1, name="full")
    return export_onnx(ckpt, work, options)[0].path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work", nargs="?", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--paired", type=int, metavar="PAIRS", help="speed only, PAIRS lean/ort-defaults pairs")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "SETTING"))
    args = p.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.batches)
        return
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    model = export_full_width(work)
    if args.paired:
        paired(model, args.paired)
        return
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
    order = list(SETTINGS)
    for r in range(args.repeats):
        for setting in order if r % 2 == 0 else order[::-1]:
            cmd = [sys.executable, __file__, "--child", str(model), setting, "--batches", str(args.batches)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
            print(runs[setting][-1], flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"\nmachine: {cpu}, {platform.machine()}, python {platform.python_version()}")
    base = statistics.median(r["s_per_slice"] for r in runs["ort-defaults"])
    cpu_base = statistics.median(r["user_cpu_s_per_slice"] + r["sys_cpu_s_per_slice"] for r in runs["ort-defaults"])
    print(
        "| setting | peak RSS MiB | RSS after load MiB | wall s/slice | user+sys CPU s/slice (sys) "
        "| CPU time vs ort-defaults | wall vs ort-defaults |"
    )
    print("|---|---|---|---|---|---|---|")
    for setting, rows in runs.items():
        peak = statistics.median(r["peak_rss_mib"] for r in rows)
        loaded = statistics.median(r["rss_after_load_mib"] for r in rows)
        t = statistics.median(r["s_per_slice"] for r in rows)
        cpu = statistics.median(r["user_cpu_s_per_slice"] + r["sys_cpu_s_per_slice"] for r in rows)
        sys_ = statistics.median(r["sys_cpu_s_per_slice"] for r in rows)
        print(
            f"| {setting} | {peak:.0f} | {loaded:.0f} | {t:.2f} | {cpu:.2f} ({sys_:.2f}) "
            f"| {cpu / cpu_base:.3f} | {t / base:.3f} |"
        )


if __name__ == "__main__":
    main()
