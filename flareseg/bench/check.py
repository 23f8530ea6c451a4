"""``flare-bench --check``: does every backend on this machine give PyTorch fp32's labels?

Every available backend of :data:`~flareseg.bench.backends.ALL_BACKENDS` (or those asked
for) runs the same model, exported here from the checkpoint (or random weights), on the
same slices of one volume (a real CT given with ``--input``, else a phantom) and on that
whole volume through flare-infer's pipeline. Each is compared with the PyTorch fp32 CPU
reference: label agreement over voxels, the largest logit difference where the backend
returns logits, and pass/fail against the tolerance of its precision (:func:`tolerance_for`).
With an ONNX model alone, the reference is ONNX Runtime on the CPU running it, and the
precision (hence the tolerance) is the model's own, from its metadata; backends that need
a model it cannot give are left out, and the report says which and why. Non-finite logits
(NaN or infinity, in the reference or a backend) always fail.

Exit status of the command: 0 when every checked backend passes, 1 when one fails its
tolerance or raises while running (the table is printed and written all the same), 2 for
an error before any backend runs (bad arguments or input, unknown or unavailable backend).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flareseg.atomic import atomic_outputs
from flareseg.bench.backends import (
    ALL_BACKENDS,
    Backend,
    make_runner,
    onnx_reference,
    prepare_models_but_int8_below_agreement,
    run_precision,
    select_backends,
)
from flareseg.bench.inputs import clear_earlier_run
from flareseg.errors import FlareSegError
from flareseg.export import onnx_export
from flareseg.export.options import DEFAULT_MIN_AGREEMENT

if TYPE_CHECKING:
    from flareseg.preprocess import NormalizationStats
    from flareseg.runtime.runners import Runner

log = logging.getLogger(__name__)

#: Slices of the volume compared logit by logit (evenly spaced); the whole volume is compared by labels.
MAX_CHECK_SLICES = 8
#: Field of view of the phantom (mm): its body fills the slice at any slice size.
PHANTOM_FOV_MM = 400.0
PHANTOM_SLICE_MM = 5.0
#: The INT8 export's own label-agreement threshold.
INT8_MIN_AGREEMENT = DEFAULT_MIN_AGREEMENT
#: The reference: PyTorch fp32 on the CPU; with an ONNX model alone, ONNX Runtime on the CPU running it
#: (:func:`~flareseg.bench.backends.onnx_reference`).
REFERENCE = "torch-cpu-fp32"


@dataclass(frozen=True)
class Tolerance:
    """What a backend must reach against the reference: label agreement, and for fp32 logits their difference."""

    min_agreement: float
    max_relative_logit_diff: float | None = None

    def describe(self) -> str:
        text = f"agreement >= {100 * self.min_agreement:g}%"
        if self.max_relative_logit_diff is not None:
            text = f"relative logit diff <= {self.max_relative_logit_diff:.0e}, " + text
        return text


def tolerance_for(math: str, output_kind: str) -> Tolerance:
    """The stated tolerance per arithmetic, with the export module's constants.

    fp32 with logits: the fp32 export's relative logit tolerance on the slices and its label
    agreement on the volume (labels may flip where two classes tie to float rounding).
    TF32 (CUDA fp32 convolutions on Ampere and later) keeps fp16's 10-bit mantissa, so it is
    held to fp16's agreement; bf16 too; int8 to the INT8 export's.
    """
    if math == "fp32":
        rel = onnx_export.FP32_RELATIVE_TOLERANCE if output_kind == "logits" else None
        return Tolerance(onnx_export.FP32_MIN_AGREEMENT, rel)
    if math == "int8":
        return Tolerance(INT8_MIN_AGREEMENT)
    return Tolerance(onnx_export.FP16_MIN_AGREEMENT)  # tf32, fp16, bf16, and any other reduced precision


@dataclass(frozen=True)
class CheckConfig:
    """What the user asked for; None means this machine's default (see :meth:`resolved`)."""

    out: Path
    model: Path | None = None
    backends: tuple[str, ...] | None = None
    input: Path | None = None
    slices: int | None = None  # of the phantom volume (default 8 on the CPU, 32 with a GPU)
    size: tuple[int, int] = (512, 512)
    batch: int = 2
    base_width: int = 64

    def resolved(self) -> CheckPlan:
        """Defaults filled in and every argument checked: nothing is written until this has passed."""
        from flareseg.bench.inputs import check_input_volume, check_model, check_report_folder
        from flareseg.bench.measure import nvml_readable
        from flareseg.bench.run import check_counts
        from flareseg.shapes import check_slice_size

        if self.batch < 1:
            raise FlareSegError(f"batch must be positive, got {self.batch}")
        check_counts(slices=self.slices, base_width=self.base_width)
        size = check_slice_size(self.size)
        check_report_folder(self.out)
        onnx_precision, model_size = check_model(self.model)
        backends, left_out = select_backends(self.backends, onnx_precision)
        check_input_volume(self.input)
        return CheckPlan(
            out=self.out,
            model=self.model,
            backends=backends,
            input=self.input,
            slices=self.slices if self.slices is not None else (32 if torch.cuda.is_available() else 8),
            size=size,
            network_size=model_size or size,  # a given model runs at its own slice size
            batch=self.batch,
            base_width=self.base_width,
            onnx_precision=onnx_precision,
            left_out=left_out,
            nvml=nvml_readable([ALL_BACKENDS[b].device for b in backends]),
        )


@dataclass(frozen=True)
class CheckPlan:
    """A :class:`CheckConfig` resolved for this machine: every figure fixed and checked."""

    out: Path
    model: Path | None
    backends: tuple[str, ...]
    input: Path | None
    slices: int
    #: The phantom volume's slice size (--size); the random-weight network's too.
    size: tuple[int, int]
    #: The slice size the network runs at: a given model's own, else ``size``.
    network_size: tuple[int, int]
    batch: int
    base_width: int
    #: The precision of an ONNX model given alone (its metadata's), else None.
    onnx_precision: str | None
    #: Backends of this machine not checked, with the reason for each.
    left_out: Mapping[str, str]
    #: Whether NVML samples the GPU's memory during CUDA runs (:func:`~flareseg.bench.measure.nvml_readable`).
    nvml: bool

    @property
    def batches(self) -> tuple[int, ...]:
        """What :func:`~flareseg.bench.backends.prepare_models` sizes its exports for."""
        return (self.batch,)

    @property
    def reference(self) -> str:
        return REFERENCE if self.onnx_precision is None else onnx_reference(self.onnx_precision)


def _phantom(cfg: CheckPlan, work: Path) -> Path:
    from flareseg.bench.inputs import phantom_volume

    h, w = cfg.size
    return phantom_volume(work, cfg.size, cfg.slices, (PHANTOM_FOV_MM / w, PHANTOM_FOV_MM / h, PHANTOM_SLICE_MM))


def slice_indices(count: int) -> list[int]:
    """Up to :data:`MAX_CHECK_SLICES` evenly spaced indices of ``count`` slices, first and last included."""
    return sorted({int(i) for i in np.linspace(0, count - 1, min(MAX_CHECK_SLICES, count)).round()})


def check_slices(volume: Path, stats: NormalizationStats) -> np.ndarray:
    """Up to :data:`MAX_CHECK_SLICES` evenly spaced slices of the volume, normalised as flare-infer does."""
    from flareseg.export.inputs import read_ct_normalized

    return read_ct_normalized(volume, stats, "--input", slice_indices)


def run_slices(runner: Runner, slices: np.ndarray, batch: int) -> tuple[np.ndarray, float]:
    """The runner's outputs on the slices (logits or labels, on the host) and its seconds per slice.

    The first batch, and a shorter last one, run once untimed (lazy initialisation, per input shape: graph
    compilation, oneDNN's primitives, cuDNN's choice of algorithms).
    """
    from flareseg.preprocess import network_batch
    from flareseg.runtime.inferer import min_batch_of, run_padded

    cuda = runner.device.type == "cuda"
    min_batch = min_batch_of(runner)  # an engine's profile may refuse the short last batch: pad it
    batches = [
        network_batch(slices[i : i + batch], runner.info.slice_size, runner.input_channels).to(runner.device)
        for i in range(0, len(slices), batch)
    ]
    outputs = []
    with torch.inference_mode():
        for x in {tuple(b.shape): b for b in (batches[0], batches[-1])}.values():
            run_padded(runner, x, min_batch)
        if cuda:
            torch.cuda.synchronize(runner.device)
        t = time.perf_counter()
        for x in batches:
            out = run_padded(runner, x, min_batch)
            # Copy at once: a CUDA-graph runner overwrites its output on the next call.
            outputs.append(out.float().cpu().numpy() if out.is_floating_point() else out.cpu().numpy())
        seconds = time.perf_counter() - t
    return np.concatenate(outputs), seconds / len(slices)


def compare(reference: np.ndarray, got: np.ndarray) -> dict[str, float | bool | None]:
    """Label agreement over voxels; whether every logit of both is finite; and where both are finite logits,
    max |difference| (absolute, relative).

    NaN compares as no difference at all, so non-finite logits get no difference figure (``finite`` False),
    which :func:`verdict` fails.
    """
    ref_labels = reference.argmax(axis=1) if reference.ndim == 4 else reference
    got_labels = got.argmax(axis=1) if got.ndim == 4 else got
    if ref_labels.shape != got_labels.shape:
        raise FlareSegError(f"output shapes differ: {got_labels.shape} against the reference's {ref_labels.shape}")
    finite = all(bool(np.isfinite(a).all()) for a in (reference, got) if a.dtype.kind == "f")
    figures: dict[str, float | bool | None] = {
        "slice_agreement": float(np.mean(ref_labels == got_labels.astype(ref_labels.dtype))),
        "max_abs_logit_diff": None,
        "max_rel_logit_diff": None,
        "finite": finite,
    }
    if reference.ndim == 4 and got.ndim == 4 and finite:
        diff = float(np.max(np.abs(got.astype(np.float32) - reference)))
        figures["max_abs_logit_diff"] = diff
        figures["max_rel_logit_diff"] = diff / (float(np.max(np.abs(reference))) or 1.0)
    return figures


def verdict(row: dict[str, Any], tol: Tolerance) -> str:
    """PASS or FAIL of one compared backend against its tolerance; non-finite logits always FAIL."""
    if row.get("finite") is False:
        return "FAIL"
    agreements = [row[k] for k in ("slice_agreement", "volume_agreement") if row.get(k) is not None]
    ok = bool(agreements) and min(agreements) >= tol.min_agreement
    rel = row.get("max_rel_logit_diff")
    if tol.max_relative_logit_diff is not None and rel is not None and rel > tol.max_relative_logit_diff:
        ok = False
    return "PASS" if ok else "FAIL"


def _prepare_models(cfg: CheckPlan, work: Path) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """The backends' models, and a FAIL row for each INT8 backend whose export missed its agreement."""
    rest, models, failed = prepare_models_but_int8_below_agreement(cfg, work)
    if failed is None:
        return models, {}
    row = {
        "math": "int8",
        "status": "FAIL",
        "error": f"INT8 export: {failed}",
        "held_out_agreement": failed.best_agreement,  # on the export's held-out slices, not the check's
        "tolerance": tolerance_for("int8", "logits").describe(),
    }
    return models, {b: dict(row) for b in cfg.backends if b not in rest.backends}


def _run_backend(
    backend: Backend, models: dict[str, Path], cfg: CheckPlan, volume: Path, slices: np.ndarray | None
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One backend on the slices (drawn from the volume when None) and on the whole volume.

    Returns its row's figures, its outputs on the slices, and the slices.
    """
    from flareseg.bench.measure import convolution_math
    from flareseg.bench.run import segment_volume

    runner = make_runner(backend, models, cfg.batch)
    with runner:
        if slices is None:
            slices = check_slices(volume, runner.info.normalization)
        outputs, per_slice = run_slices(runner, slices, cfg.batch)
        output_kind = runner.output_kind
    precision = run_precision(backend, cfg.onnx_precision)
    out = cfg.out / "pred" / f"{backend.name}.nii.gz"
    timing = segment_volume(backend, models, cfg.batch, volume, out, precision, nvml=cfg.nvml)
    row = {
        "backend": backend.name,
        "precision": precision,
        "math": convolution_math(torch.device(backend.device), precision, backend.kind),
        "output_kind": output_kind,
        "slice_s": per_slice,
        "volume_slices": timing["slices"],
        "volume_total_s": timing["total_s"],
        "volume_infer_s_per_slice": timing["infer_s"] / max(timing["slices"], 1),
        "output": timing["output"],
    }
    return row, outputs, slices


def run_check(config: CheckConfig) -> dict[str, Any]:
    """Every backend against the reference: the rows of the table and whether all passed."""
    from flareseg.bench.measure import label_map, voxel_agreement
    from flareseg.bench.run import machine_section

    cfg = config.resolved()
    clear_earlier_run(cfg.out, model=cfg.model, input=cfg.input)  # after every check passed
    work = cfg.out / "models"
    work.mkdir(parents=True, exist_ok=True)
    ref_name = cfg.reference
    # The reference runs even when not asked for: prepare its model with the others'.
    models, export_failures = _prepare_models(
        dataclasses.replace(cfg, backends=tuple(dict.fromkeys((*cfg.backends, ref_name)))), work
    )
    note = (
        f"PyTorch reference missing: an ONNX model was given ({cfg.onnx_precision}, by its own metadata), so "
        f"backends are compared with {ref_name} running it, within the tolerance of its precision; pass the "
        "checkpoint (.pt) to check against PyTorch"
        if cfg.onnx_precision is not None
        else None
    )
    volume = cfg.input or _phantom(cfg, work)
    t0 = time.perf_counter()
    ref_row, ref_out, slices = _run_backend(ALL_BACKENDS[ref_name], models, cfg, volume, None)
    ref_labels = label_map(ref_row["output"])
    ref_entry = {**ref_row, "status": "reference", "slice_agreement": 1.0, "volume_agreement": 1.0}
    if ref_out.dtype.kind == "f" and not np.isfinite(ref_out).all():  # nothing can be checked against NaN
        log.error("%s: the reference's logits are not finite (NaN or infinity)", ref_name)
        ref_entry.update(status="FAIL", finite=False, error="its logits are not finite (NaN or infinity)")
    rows: list[dict[str, Any]] = []
    for name in cfg.backends:
        backend = ALL_BACKENDS[name]
        if name == ref_name:
            rows.append(ref_entry)
            continue
        if name in export_failures:  # its model could not be made within its tolerance: that is its verdict
            rows.append({"backend": name, "precision": backend.precision, **export_failures[name]})
            continue
        try:
            row, out, _ = _run_backend(backend, models, cfg, volume, slices)
        except FlareSegError as exc:
            log.error("%s: %s", name, exc)
            rows.append({"backend": name, "precision": backend.precision, "status": "ERROR", "error": str(exc)})
            continue
        row.update(compare(ref_out, out))
        row["volume_agreement"] = voxel_agreement(label_map(row["output"]), ref_labels)
        tol = tolerance_for(row["math"], row["output_kind"])
        row["tolerance"] = tol.describe()
        row["status"] = verdict(row, tol)
        rows.append(row)
        log.info("%s: %s", name, row["status"])
    if ref_name not in cfg.backends:
        rows.insert(0, ref_entry)
    failed = [r["backend"] for r in rows if r["status"] in ("FAIL", "ERROR")]
    return {
        "machine": machine_section(),
        "model": str(cfg.model) if cfg.model else f"random weights, width {cfg.base_width}",
        "input": str(volume),
        "slice_indices": slice_indices(ref_row["volume_slices"]),
        "slice_size": list(slices.shape[1:]),
        "batch": cfg.batch,
        "reference": ref_name,
        "reference_precision": ref_row["precision"],
        "note": note,
        "left_out": dict(cfg.left_out),
        "tolerances": {m: tolerance_for(m, "logits").describe() for m in ("fp32", "tf32", "fp16", "bf16", "int8")},
        "rows": rows,
        "failed": failed,
        "passed": not failed,
        "check_wall_s": time.perf_counter() - t0,
    }


def _logit_diff(row: dict[str, Any]) -> str:
    if row.get("finite") is False:
        return "not finite (NaN or infinity)"
    if row.get("max_abs_logit_diff") is None:
        return "n/a (labels)" if row.get("output_kind") == "labels" else "n/a"
    return f"{row['max_abs_logit_diff']:.2e} ({row['max_rel_logit_diff']:.1e} rel.)"


def markdown(report: dict[str, Any], command: str) -> str:
    from flareseg.bench.report import machine_line, percent

    lines = [
        "# flare-bench --check",
        "",
        f"Command: `{command}`",
        machine_line(report["machine"]),
        f"Model: {report['model']}. Input: `{report['input']}`, slices {report['slice_indices']} compared logit by "
        f"logit, the whole volume by labels (after post-processing), batch {report['batch']}.",
        f"Reference: {report['reference']} ({report.get('reference_precision', 'fp32')}).",
    ]
    if report["note"]:
        lines.append(f"Note: {report['note']}.")
    if report.get("left_out"):
        lines.append("Left out: " + "; ".join(f"{name} ({why})" for name, why in report["left_out"].items()) + ".")
    lines += [
        "",
        "| backend | precision | math | agreement, slices (%) | agreement, volume (%) | max logit diff "
        "| tolerance | result | ms/slice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] in ("ERROR", "SKIPPED") or r.get("error"):
            held = r.get("held_out_agreement")  # an export that failed its own check: its figure
            if held is not None:
                agreement = f"{percent(held, 3)} (export's held-out slices)"
            else:
                agreement = percent(r.get("slice_agreement"), 3)
            lines.append(
                f"| {r['backend']} | {r['precision']} | {r.get('math', '')} | {agreement} "
                f"| | | {r.get('tolerance', '')} | {r['status']}: {r['error']} | |"
            )
            continue
        cells = [
            r["backend"],
            r["precision"],
            r["math"],
            percent(r.get("slice_agreement"), 3),
            percent(r.get("volume_agreement"), 3),
            "reference" if r["status"] == "reference" else _logit_diff(r),
            r.get("tolerance", ""),
            r["status"],
            f"{1000 * r['slice_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Tolerances: " + "; ".join(f"{k}: {v}" for k, v in report["tolerances"].items()) + ". TF32 is how CUDA "
        "runs fp32 convolutions on Ampere and later GPUs by default. A backend passes when both agreements and "
        "(fp32 logits) the relative logit difference are within its tolerance.",
        "",
        "Result: " + ("every backend passed." if report["passed"] else f"FAILED: {', '.join(report['failed'])}."),
    ]
    return "\n".join(lines) + "\n"


def write_check(report: dict[str, Any], out: Path, command: str) -> dict[str, Path]:
    """check.json and check.md, as one set (renamed into place together), as the timing report is written."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        "json": (out / "check.json", json.dumps({**report, "command": command}, indent=2) + "\n"),
        "markdown": (out / "check.md", markdown(report, command)),
    }
    with atomic_outputs() as outputs:
        for path, text in texts.values():
            with outputs.writing(path) as tmp:
                tmp.write_text(text)
    return {key: path for key, (path, _) in texts.items()}
