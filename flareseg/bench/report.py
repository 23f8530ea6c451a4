"""flare-bench's report: ``report.json``, ``report.md``, ``latency.png`` and ``stages.png``."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from flareseg.atomic import atomic_outputs
from flareseg.bench.inputs import FIGURE_SOFTWARE
from flareseg.errors import interrupts_kept


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _rss(row: dict[str, Any]) -> str:
    """A peak RSS with the part the backend added in brackets (absent from reports written before it was kept)."""
    added = row.get("rss_added_mb")
    return _mb(row.get("peak_rss_mb")) + ("" if added is None else f" (+{added:,.0f})")


#: What the peak RSS columns hold.
RSS_NOTE = (
    "peak RSS MB: this process's peak, flare-bench's own memory (networks, exports, counts) included; in brackets, "
    "its growth above the RSS just before the runner was made: a lower bound on what the backend needs, which "
    "depends on what ran before it (memory an earlier runner freed is used again). The fresh-process run below "
    "gives one backend's whole figure alone."
)


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


def percent(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage with ``digits`` decimals; n/a for None."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def machine_line(m: dict[str, Any]) -> str:
    cpu = m.get("cpu_model") or m["processor"]
    features = m.get("cpu_features")
    isa = (
        f" ({', '.join(features) if features else 'none of AVX2/AVX-512/VNNI/BF16/AMX'})"
        if features is not None
        else ""
    )
    return f"Machine: {cpu}{isa}, {m['cpu_cores']} CPU cores, GPU: {m['gpu'] or 'none'}; {m['platform']}"


def differs_from_paper(model: dict[str, Any]) -> list[str]:
    """How a report's model section differs from the paper's network on its 512 x 512 slices (empty: it does not),
    where a gap to the paper's FLOPs would measure nothing."""
    h, w = model.get("slice_size", (512, 512))
    paper_network = model["parameters_training"] + model["parameters_encoder"] == model["parameters_paper_reported"]
    differs = [] if paper_network else [f"width {model['network']['base_width']}"]
    return differs + ([] if (h, w) == (512, 512) else [f"{h} x {w} slices"])


def _model_lines(model: dict[str, Any]) -> list[str]:
    if "parameters_training" not in model:
        return [model.get("note", "")]
    h, w = model.get("slice_size", (512, 512))
    differs = differs_from_paper(model)
    if not differs:
        flops = (
            f"The paper's FLOPs exceed fvcore's count of the training graph (train mode, auxiliary heads "
            f"included) by {model['flops_paper_minus_training']:,}" + _flops_gap(model)
        )
    else:
        ours = " and ".join(differs)
        flops = f"The paper's FLOPs are the full-width network's on 512 x 512 slices; these are for {ours}."
    return [
        "| | ours (measured) | paper |",
        "|---|---|---|",
        f"| parameters (training graph) | {model['parameters_training']:,} | {model['parameters_paper_reported']:,} |",
        f"| parameters (deploy graph, folded 1-channel input) | {model['parameters_deploy']:,} | |",
        f"| FLOPs, fvcore, training graph, {h} x {w} | {model['flops_training_fvcore']:,} | {model['flops_paper']:,} |",
        f"| FLOPs, fvcore, deploy graph (1-channel input), {h} x {w} | {model['flops_deploy_fvcore']:,} | |",
        f"| FLOPs, nnU-Net (paper) | | {model['flops_nnunet_paper']:,} |",
        "",
        _params_note(model),
        flops,
        f"The deploy graph counts {model['flops_training_fvcore'] - model['flops_deploy_fvcore']:,} fewer than the "
        "training graph: export removes the auxiliary heads and folds the three input channels into one.",
        "fvcore counts one multiply-add as one flop; the arithmetic rates below count two.",
    ]


def _allocated(row: dict[str, Any], key: str) -> str:
    note = row.get("peak_allocated_note") or row.get("peak_gpu_allocated_note")
    return "n/a (not torch)" if note else _mb(row.get(key))


def _latency_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        "| backend | batch | ms/slice (median) | p10 | p90 | slices/s | % of matmul peak | peak RSS MB "
        "| peak alloc MB | GPU MB (NVML) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["backends"].items():
        for r in entry["batches"]:
            if "error" in r:
                lines.append(f"| {name} | {r['batch']} | error: {r['error']} | | | | | | | |")
                continue
            cells = [
                name,
                str(r["batch"]),
                f"{1000 * r['slice_median_s']:.1f}",
                f"{1000 * r['slice_p10_s']:.1f}",
                f"{1000 * r['slice_p90_s']:.1f}",
                f"{r['slices_per_s']:.2f}",
                percent(r.get("fraction_of_matmul_peak"), 1),
                _rss(r),
                _allocated(r, "peak_allocated_mb"),
                _mb(r.get("nvml_flare21_max_mb")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "GPU MB: whole-device memory sampled by NVML every 0.1 s, above the reading taken just before the "
        "runner was created, by FLARE21's rule (the largest value held for 2 % of the samples). peak alloc: "
        "torch's allocator, which sees only what torch allocates (n/a for ONNX Runtime and TensorRT).",
        "",
        RSS_NOTE,
    ]
    peaks = report.get("matmul_peak_flops", {})
    if peaks:
        lines += [
            "",
            "Matrix-product peaks measured in this run: "
            + ", ".join(f"{k} {_g(v, 1e9)} GFLOP/s" for k, v in peaks.items())
            + ".",
        ]
        rows = [r for entry in report["backends"].values() for r in entry["batches"]]
        if any((r.get("fraction_of_matmul_peak") or 0) > 1 for r in rows):
            lines.append(
                "Above 100 %: the backend ran faster than the matrix products measured in this run, which then ran "
                "slow (a busy machine?); those fractions overstate how near it is to the device's limit."
            )
        if any(k.endswith("-tf32") for k in peaks):
            lines.append(
                "CUDA fp32 backends run their convolutions in TF32 (the default of cuDNN, ONNX Runtime's CUDA "
                "provider and TensorRT on this GPU): they are compared with the TF32 peak (`cuda-tf32`), measured "
                "with TF32 switched on for that measurement only."
            )
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
    return lines


def _side_by_side_lines(report: dict[str, Any]) -> list[str]:
    """Each backend at its best batch: speed, memory and labels against fp32, in one table."""
    backends = {n: e for n, e in report["backends"].items() if "best" in e}
    if not backends:
        return []
    base = "onnxruntime-cpu-fp32" if "onnxruntime-cpu-fp32" in backends else next(iter(backends))
    base_rate = backends[base]["best"]["slices_per_s"]
    volumes = report["volumes"]["results"]
    ref = report["volumes"].get("reference")
    lines = [
        "",
        "## Backends side by side",
        "",
        f"Each at its best batch; speed against {base}; agreement: voxels of the whole volume's labels equal to "
        f"those of the fp32 reference ({ref or 'none run'}) on the same volume. Peak RSS as in the latency table: "
        "in brackets, its growth above flare-bench's own memory when the runner was made.",
        "",
        f"| backend | precision | best batch | slices/s | x {base} | peak RSS MB (latency) | peak RSS MB (volume) "
        "| GPU MB (NVML, volume) | agreement with fp32 (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in backends.items():
        best, vol = entry["best"], volumes.get(name, {})
        agreement = "reference" if name == ref else percent(vol.get("agreement_with_fp32"), 3)
        cells = [
            name,
            entry.get("precision", vol.get("precision", "")),
            str(best["batch"]),
            f"{best['slices_per_s']:.2f}",
            f"{best['slices_per_s'] / base_rate:.2f}",
            _rss(best),
            _rss(vol),
            _mb(vol.get("nvml_flare21_max_mb")),
            agreement,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _volume_lines(report: dict[str, Any], figures: Collection[str] = ("stages.png",)) -> list[str]:
    volumes = report["volumes"]
    lines = ["", "## Whole volumes", "", f"Input: `{volumes['input']}`", ""]
    lines += [
        "| backend | slices | batch | read s | preprocess s | infer s | postprocess s | write s | total s | wall s "
        "| slices x per-slice s | overhead | GPU MB (NVML) | GPU MB·s (NVML) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in volumes["results"].items():
        area = v.get("nvml_area_mb_s")
        lines.append(
            f"| {name} | {v['slices']} | {v['batch']} | {v['read_s']:.2f} | {v['preprocess_s']:.2f} "
            f"| {v['infer_s']:.2f} | {v['postprocess_s']:.2f} | {v['write_s']:.2f} | {v['total_s']:.2f} "
            f"| {v.get('wall_s', float('nan')):.2f} | {v['slices_times_per_slice_s']:.2f} "
            f"| {100 * v['volume_overhead']:+.1f} % "
            f"| {_mb(v.get('nvml_flare21_max_mb'))} | {'n/a' if area is None else f'{area:,.1f}'} |"
        )
    for name, error in volumes.get("errors", {}).items():
        lines.append(f"| {name} | failed: {error} |" + " |" * 12)
    lines += [
        "",
        "Stages as `flare-infer` runs them: read (decompress and decode), preprocess (percentiles and "
        "normalisation), infer (the network and its copies), postprocess (largest components), write; total is "
        "their sum, wall the case's time from read to written (less where stages overlap). GPU MB·s: "
        "FLARE22/23's memory figure, the area under the NVML used-memory curve above idle, by the trapezoid rule.",
    ]
    if "stages.png" in figures:
        lines += ["", "![time per stage](stages.png)"]
    return lines


def _fresh_lines(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    fresh = report.get("fresh_process")
    win, base = report["references"]["flare21_winner"], report["references"]["nnunet_baseline"]
    lines = [
        "",
        "## Against the paper and FLARE21",
        "",
        "| | seconds per case | max GPU memory (MB) | GPU memory-time (MB·s) | device |",
        "|---|---|---|---|---|",
        f"| FLARE21 winner (test set) | {win['seconds_per_case']} | {win['max_gpu_memory_mb']:,} | | challenge GPU |",
        f"| nnU-Net baseline (validation) | ~{base['seconds_per_case']:.0f} | {base['max_gpu_memory_mb']:,} "
        "| | challenge GPU |",
    ]
    if not fresh:
        return lines
    mem, area = fresh.get("nvml_flare21_max_mb"), fresh.get("nvml_area_mb_s")
    device = m["gpu"] or (m.get("cpu_model") or m["processor"]) + " CPU"
    lines.append(
        f"| flareseg, {fresh['backend']} ({fresh.get('slices')} slices, fresh process) | {fresh['wall_s']:.1f} "
        f"| {'n/a (no GPU)' if mem is None else f'{mem:,.0f}'} | {'n/a' if area is None else f'{area:,.1f}'} "
        f"| {device} |"
    )
    lines += ["", f"Fresh-process command: `{fresh['command']}`"]
    bare = fresh.get("bare_start")
    if bare:
        lines.append(
            f"Bare start-up in the same run, `{bare['command']}`: {bare['median_s']:.2f} s (median of "
            f"{len(bare['wall_s'])} runs, before and after the case); the case took "
            f"{fresh['minus_bare_start_s']:.2f} s more."
        )
        if bare.get("nvml_flare21_max_mb") is not None:
            lines.append(
                f"The CUDA context alone holds {bare['nvml_flare21_max_mb']:,.0f} MB on this GPU (NVML, above idle)."
            )
    if fresh.get("peak_rss_mb") is not None:
        lines.append(f"Peak RSS of the fresh process: {fresh['peak_rss_mb']:,.0f} MB (all of it: the process's own).")
    if mem is not None:
        lines.append("GPU memory figures are above the idle reading taken before the process started.")
    lines.append("MB = 2^20 bytes.")
    return lines


def markdown(report: dict[str, Any], command: str, figures: Collection[str] = ("latency.png", "stages.png")) -> str:
    """report.md; ``figures``: the figure files drawn beside it (only those are linked)."""
    m = report["machine"]
    lines = [
        "# flare-bench report",
        "",
        f"Command: `{command}`",
        machine_line(m),
        "Software: " + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items())),
    ]
    settings = report["settings"]
    if settings.get("note"):
        lines.append(f"Note: {settings['note']}.")
    if settings.get("onnx_model_precision"):
        lines.append(
            f"Model: an {settings['onnx_model_precision']} ONNX model (by its own metadata); every backend runs it "
            "as it is, so a backend's precision is the coarser of its own and the model's."
        )
    if settings.get("threads"):
        lines.append(f"CPU threads: {settings['threads']} (--threads), for every CPU backend and the fresh process.")
    if settings.get("left_out"):
        lines.append("Left out: " + "; ".join(f"{name} ({why})" for name, why in settings["left_out"].items()) + ".")
    lines += ["", "## Model", "", *_model_lines(report["model"])]
    lines += ["", "## Latency and throughput", "", *_latency_lines(report)]
    lines += _side_by_side_lines(report)
    lines += _volume_lines(report, figures)
    lines += _fresh_lines(report)
    if "latency.png" in figures:
        lines += ["", "![latency and throughput](latency.png)"]
    lines += ["", f"Benchmark wall time: {report['bench_wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def _figure(figsize: tuple[float, float]) -> Any:
    """A figure of matplotlib's object interface, or None without matplotlib. Not pyplot: that would choose a
    backend for the whole process and keep every figure in its global list."""
    try:
        with interrupts_kept():
            from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=figsize)


def _title(report: dict[str, Any], what: str) -> str:
    m = report["machine"]
    size = "x".join(str(s) for s in report["settings"].get("slice_size", (512, 512)))
    device = m["gpu"] or m.get("cpu_model") or m["processor"]
    settings, network = report["settings"], report.get("model", {}).get("network", {})
    width = f"width {network['base_width']}, " if "base_width" in network else ""
    n = settings.get("threads")
    threads = f", {n} thread{'' if n == 1 else 's'}" if n else ""
    return f"flareseg {what}, {width}{size} slices: {device} ({m['cpu_cores']} CPU cores{threads})"


def plot(report: dict[str, Any]) -> Any:
    """Latency and throughput against the batch size, per backend; None without matplotlib."""
    fig = _figure((11, 4))
    if fig is None:
        return None
    ax1, ax2 = fig.subplots(1, 2)
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
    fig.suptitle(_title(report, "latency"), fontsize=10)
    fig.tight_layout()
    return fig


def plot_stages(report: dict[str, Any]) -> Any:
    """A stacked bar per backend: seconds of each stage of the whole-volume run; None without results or
    matplotlib."""
    results = report["volumes"]["results"]
    names = list(results)
    fig = _figure((9, 1.2 + 0.5 * len(names))) if results else None
    if fig is None:
        return None
    stages = report["volumes"].get("stages", ["read", "preprocess", "infer", "postprocess", "write"])
    ax = fig.subplots()
    left = [0.0] * len(names)
    for stage in stages:
        widths = [results[n][f"{stage}_s"] for n in names]
        ax.barh(names, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    slices = {results[n]["slices"] for n in names}
    ax.set_xlabel(f"seconds per volume ({', '.join(map(str, sorted(slices)))} slices)")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(stages), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(_title(report, "whole volume by stage"), fontsize=10)
    fig.tight_layout()
    return fig


def write_report(report: dict[str, Any], out: Path, command: str) -> dict[str, Path]:
    """report.json, report.md and the figures, as one set: all renamed into place once all are written, and a
    figure this run did not draw (no whole-volume results, no matplotlib) removed rather than left from an
    earlier run beside a report that does not match it."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {"plot": (out / "latency.png", plot(report)), "stages": (out / "stages.png", plot_stages(report))}
    drawn = [path.name for path, fig in figures.values() if fig is not None]
    texts = {
        "json": (out / "report.json", json.dumps({**report, "command": command}, indent=2) + "\n"),
        "markdown": (out / "report.md", markdown(report, command, drawn)),
    }
    paths: dict[str, Path] = {}
    with atomic_outputs() as outputs:
        for key, (path, text) in texts.items():
            with outputs.writing(path) as tmp:
                tmp.write_text(text)
            paths[key] = path
        for key, (path, fig) in figures.items():
            if fig is not None:
                with outputs.writing(path, keep_suffix=".png") as tmp:
                    # Marked, so that a rerun into the folder can tell it from a figure of the user's.
                    fig.savefig(tmp, dpi=90, format="png", metadata={"Software": FIGURE_SOFTWARE})
                paths[key] = path
    for path, fig in figures.values():
        if fig is None:
            path.unlink(missing_ok=True)
    return paths
