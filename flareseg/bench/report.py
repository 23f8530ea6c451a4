"""flare-bench's report: ``report.json``, ``report.md`` and ``latency.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flareseg.atomic import write_text_atomic


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _g(x: float | None, unit: float = 1e9, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x / unit:,.{digits}f}"


def _params_note(model: dict[str, Any]) -> str:
    true, encoder, paper = model["parameters_training"], model["parameters_encoder"], model["parameters_paper_reported"]
    if true + encoder == paper:
        return (
            f"The paper's {paper:,} parameters are the true {true:,} plus the VGG encoder's {encoder:,} counted a "
            "second time (the reference code registered the encoder module both whole and inside its stages)."
        )
    return f"This network (width {model['network']['base_width']}) is not the paper's: its figures are not comparable."


def _flops_gap(model: dict[str, Any]) -> str:
    gap, conv, upsample = (
        model["flops_paper_minus_training"],
        model["one_full_resolution_conv_flops"],
        model["identity_upsample_flops"],
    )
    if gap == conv + upsample:
        return (
            f" = {conv:,} (exactly one 3x3, 64->64 convolution at 512x512: the paper seems to have counted a "
            f"variant with one more full-resolution convolution) + {upsample:,} (fvcore's count for resizing "
            "the 16 full-resolution supervision maps to their own size, a no-op flareseg skips)."
        )
    if gap == conv:
        return f", exactly one 3x3, 64->64 convolution at 512x512 ({conv:,})."
    return "."


def markdown(report: dict[str, Any], command: str) -> str:
    m, model = report["machine"], report["model"]
    lines = [
        "# flare-bench report",
        "",
        f"Command: `{command}`",
        f"Machine: {m['processor']}, {m['cpu_cores']} CPU cores, GPU: {m['gpu'] or 'none'}; {m['platform']}",
        "Software: " + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items())),
    ]
    if report["settings"].get("note"):
        lines.append(f"Note: {report['settings']['note']}.")
    lines += ["", "## Model", ""]
    if "parameters_training" in model:
        lines += [
            "| | ours (measured) | paper |",
            "|---|---|---|",
            f"| parameters (training graph) | {model['parameters_training']:,} "
            f"| {model['parameters_paper_reported']:,} |",
            f"| parameters (deploy graph, folded 1-channel input) | {model['parameters_deploy']:,} | |",
            f"| FLOPs, fvcore, training graph | {model['flops_training_fvcore']:,} | {model['flops_paper']:,} |",
            f"| FLOPs, fvcore, deploy graph (1-channel input) | {model['flops_deploy_fvcore']:,} | |",
            f"| FLOPs, nnU-Net (paper) | | {model['flops_nnunet_paper']:,} |",
            "",
            _params_note(model),
            f"The paper's FLOPs exceed fvcore's count of the training graph (train mode, auxiliary heads "
            f"included) by {model['flops_paper_minus_training']:,}" + _flops_gap(model),
            "fvcore counts one multiply-add as one flop; the arithmetic rates below count two.",
        ]
    lines += ["", "## Latency and throughput", ""]
    lines += [
        "| backend | batch | ms/slice (median) | p10 | p90 | slices/s | % of matmul peak | peak RSS MB "
        "| peak alloc MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["backends"].items():
        for r in entry["batches"]:
            if "error" in r:
                lines.append(f"| {name} | {r['batch']} | error: {r['error']} | | | | | | |")
                continue
            frac = r.get("fraction_of_matmul_peak")
            cells = [
                name,
                str(r["batch"]),
                f"{1000 * r['slice_median_s']:.1f}",
                f"{1000 * r['slice_p10_s']:.1f}",
                f"{1000 * r['slice_p90_s']:.1f}",
                f"{r['slices_per_s']:.2f}",
                "n/a" if frac is None else f"{100 * frac:.1f}",
                _mb(r.get("peak_rss_mb")),
                _mb(r.get("peak_allocated_mb")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    peaks = report.get("matmul_peak_flops", {})
    if peaks:
        lines += [
            "",
            "Matrix-product peaks measured in this run: "
            + ", ".join(f"{k} {_g(v, 1e9)} GFLOP/s" for k, v in peaks.items())
            + ".",
        ]
    ort = report["backends"].get("onnxruntime-cpu-fp32")
    torch_cpu = report["backends"].get("torch-cpu-fp32")
    if ort and "best" in ort:
        lines += [
            "",
            "ONNX Runtime runner against a bare `session.run` on the same session and batch, timed alternately:",
            "",
        ]
        for r in ort["batches"]:
            if "bare_session_run" in r:
                lines.append(
                    f"- batch {r['batch']}: runner {1000 * r['bare_session_run']['runner_slice_median_s']:.1f} "
                    "ms/slice, bare "
                    f"{1000 * r['bare_session_run']['slice_median_s']:.1f} ms/slice "
                    f"({100 * r['runtime_overhead']:+.1f} %)"
                )
        if torch_cpu and "best" in torch_cpu:
            ratio = torch_cpu["best"]["slice_median_s"] / ort["best"]["slice_median_s"]
            lines.append(
                f"- ONNX Runtime is {ratio:.2f}x faster per slice than PyTorch eager fp32 (best batch of each)."
            )
    lines += ["", "## Whole volumes", "", f"Input: `{report['volumes']['input']}`", ""]
    lines += [
        "| backend | slices | batch | read s | preprocess s | infer s | postprocess s | write s | total s "
        "| slices x per-slice s | overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in report["volumes"]["results"].items():
        lines.append(
            f"| {name} | {v['slices']} | {v['batch']} | {v['read_s']:.2f} | {v['preprocess_s']:.2f} "
            f"| {v['infer_s']:.2f} | {v['postprocess_s']:.2f} | {v['write_s']:.2f} | {v['total_s']:.2f} "
            f"| {v['slices_times_per_slice_s']:.2f} | "
            f"{100 * v['volume_overhead']:+.1f} % |"
        )
    lines += ["", "## Against the paper and FLARE21", ""]
    fresh = report.get("fresh_process")
    win, base = report["references"]["flare21_winner"], report["references"]["nnunet_baseline"]
    lines += [
        "| | seconds per case | max GPU memory (MB) | device |",
        "|---|---|---|---|",
        f"| FLARE21 winner (test set) | {win['seconds_per_case']} | {win['max_gpu_memory_mb']:,} | challenge GPU |",
        f"| nnU-Net baseline (validation) | ~{base['seconds_per_case']:.0f} | {base['max_gpu_memory_mb']:,} "
        "| challenge GPU |",
    ]
    if fresh:
        mem = fresh.get("nvml_flare21_max_mb")
        lines.append(
            f"| flareseg, {fresh['backend']} ({fresh.get('slices')} slices, fresh process) | {fresh['wall_s']:.1f} | "
            f"{'n/a (no GPU)' if mem is None else f'{mem:,.0f}'} | {m['gpu'] or m['processor'] + ' CPU'} |"
        )
        lines += ["", f"Fresh-process command: `{fresh['command']}`"]
    lines += ["", "![latency and throughput](latency.png)", "", f"Benchmark wall time: {report['bench_wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, entry in report["backends"].items():
        rows = [r for r in entry["batches"] if "error" not in r]
        if not rows:
            continue
        b = [r["batch"] for r in rows]
        ax1.plot(b, [1000 * r["slice_median_s"] for r in rows], marker="o", label=name)
        ax2.plot(b, [r["slices_per_s"] for r in rows], marker="o", label=name)
    for ax, title, unit in ((ax1, "per-slice latency (median)", "ms / slice"), (ax2, "throughput", "slices / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"flareseg, 512x512 slices: {m['gpu'] or m['processor']} ({m['cpu_cores']} CPU cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: Path, command: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_text_atomic(json.dumps({**report, "command": command}, indent=2) + "\n", out / "report.json"),
        "markdown": write_text_atomic(markdown(report, command), out / "report.md"),
    }
    png = plot(report, out / "latency.png")
    if png:
        paths["plot"] = png
    return paths
