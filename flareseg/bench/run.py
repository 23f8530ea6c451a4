"""What flare-bench measures, on which backends, and in what order.

With no model given, the paper's full-width network is benchmarked with random weights
(speed and memory do not depend on the weight values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import flareseg
from flareseg.bench.backends import (
    ALL_BACKENDS,
    Backend,
    fresh_process_args,
    make_runner,
    named_twice,
    prepare_models_but_int8_below_agreement,
    run_precision,
    select_backends,
)
from flareseg.bench.inputs import clear_earlier_run
from flareseg.errors import FlareSegError, gpu_memory_errors
from flareseg.network import PAPER_PARAMETERS_REPORTED, build_deploy_network, count_parameters

if TYPE_CHECKING:
    from flareseg.runtime.runners import OnnxRuntimeRunner

log = logging.getLogger(__name__)

PAPER_FLOPS = 208_095_739_904
NNUNET_FLOPS = 590_861_472_000
#: One 3x3, 64 -> 64 convolution at 512 x 512 in fvcore's units: the suspected extra layer.
ONE_FULL_RES_CONV_FLOPS = 64 * 64 * 9 * 512 * 512
#: fvcore's count (4 per output value) for resizing the 16 full-resolution supervision maps to their
#: own size: a no-op flareseg skips, which the reference implementation evidently ran.
IDENTITY_UPSAMPLE_FLOPS = 16 * 512 * 512 * 4
FLARE21_WINNER = {"seconds_per_case": 9.32, "max_gpu_memory_mb": 1177}
NNUNET_BASELINE = {"seconds_per_case": 145.0, "max_gpu_memory_mb": 2298}
#: fp32 references for the voxel agreement of reduced-precision backends, in order of preference.
REFERENCE_BACKENDS = ("torch-cpu-fp32", "onnxruntime-cpu-fp32")
#: The stages of a whole-volume run, in order (CaseTiming's fields).
STAGES = ("read", "preprocess", "infer", "postprocess", "write")


@dataclass(frozen=True)
class BenchConfig:
    """What the user asked for; None means this machine's default (see :meth:`resolved`)."""

    out: Path
    model: Path | None = None
    backends: tuple[str, ...] | None = None
    batches: tuple[int, ...] | None = None
    slices: int | None = None
    input: Path | None = None
    size: tuple[int, int] = (512, 512)
    warmup: int | None = None
    repeats: int | None = None
    fresh_process: bool = True
    base_width: int = 64
    #: CPU threads of the CPU backends (ONNX Runtime, OpenVINO, flare-infer's fresh process); None: their own.
    threads: int | None = None

    def resolved(self) -> BenchPlan:
        """Defaults that fit the machine (a few minutes on a 2-core CPU, thorough on a GPU), every argument checked.

        None means the default; a count out of range is refused, never taken for the default.
        Nothing is written until this has passed.
        """
        from flareseg.bench.inputs import check_input_volume, check_model, check_report_folder
        from flareseg.bench.measure import nvml_readable
        from flareseg.shapes import check_slice_size

        check_counts(
            slices=self.slices,
            warmup=self.warmup,
            repeats=self.repeats,
            base_width=self.base_width,
            batches=self.batches,
            threads=self.threads,
        )
        size = check_slice_size(self.size)
        check_report_folder(self.out)
        onnx_precision, model_size = check_model(self.model)
        backends, left_out = select_backends(self.backends, onnx_precision)
        check_input_volume(self.input)
        gpu = torch.cuda.is_available()
        return BenchPlan(
            out=self.out,
            model=self.model,
            backends=backends,
            batches=self.batches or ((1, 2, 4, 8, 16, 32) if gpu else (1, 2, 4)),
            slices=self.slices if self.slices is not None else (64 if gpu else 8),
            input=self.input,
            size=size,
            network_size=model_size or size,  # a given model runs at its own slice size
            warmup=self.warmup if self.warmup is not None else (5 if gpu else 1),
            repeats=self.repeats if self.repeats is not None else (20 if gpu else 3),
            fresh_process=self.fresh_process,
            base_width=self.base_width,
            threads=self.threads,
            onnx_precision=onnx_precision,
            left_out=left_out,
            nvml=nvml_readable([ALL_BACKENDS[b].device for b in backends]),
            defaulted=frozenset(n for n, v in (("repeats", self.repeats), ("slices", self.slices)) if v is None),
        )


@dataclass(frozen=True)
class BenchPlan:
    """A :class:`BenchConfig` resolved for this machine: every figure fixed and checked."""

    out: Path
    model: Path | None
    backends: tuple[str, ...]
    batches: tuple[int, ...]
    slices: int
    input: Path | None
    #: The phantom volume's slice size (--size); the random-weight network's too.
    size: tuple[int, int]
    #: The slice size the network runs at: a given model's own, else ``size``.
    network_size: tuple[int, int]
    warmup: int
    repeats: int
    fresh_process: bool
    base_width: int
    threads: int | None
    #: The precision of an ONNX model given alone (its metadata's), else None.
    onnx_precision: str | None
    #: Backends of this machine not run, with the reason for each.
    left_out: Mapping[str, str]
    #: Whether NVML samples the GPU's memory during CUDA runs (:func:`~flareseg.bench.measure.nvml_readable`).
    nvml: bool
    #: The settings that took this machine's default (not given): "repeats", "slices".
    defaulted: frozenset[str] = frozenset()


def check_counts(
    *,
    slices: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    base_width: int | None = None,
    batches: Sequence[int] | None = None,
    threads: int | None = None,
) -> None:
    """Refuse counts out of range (None: the default, not checked here)."""
    for name, value, least in (
        ("--slices", slices, 2),  # the phantom volume's: one slice has no extent along the slice axis
        ("--warmup", warmup, 0),
        ("--repeats", repeats, 1),
        ("--width", base_width, 1),
        ("--threads", threads, 1),
    ):
        if value is not None and value < least:
            raise FlareSegError(f"{name} must be at least {least}, got {value}")
    if batches is not None and (not batches or min(batches) < 1):
        raise FlareSegError(f"--batch takes positive batch sizes, got {','.join(map(str, batches)) or 'none'}")
    if batches is not None:
        named_twice("--batch", batches)


def _bare_session_run(runner: OnnxRuntimeRunner, inputs: Sequence[torch.Tensor], cfg: BenchPlan) -> dict[str, Any]:
    """The runner against a bare ``session.run`` on its own session, timed alternately run by run.

    Same model, batch and thread pool: the difference is the runner's own overhead. Alternating
    keeps the machine's drift (other load, clock changes) out of the comparison.
    """
    from flareseg.bench.measure import LatencyStats

    arrays = [x.numpy() for x in inputs]
    batch = int(inputs[0].shape[0])
    bare, wrapped = LatencyStats(batch), LatencyStats(batch)
    for i in range(cfg.repeats):
        t = time.perf_counter()
        runner.session.run(None, {"image": arrays[i % len(arrays)]})
        bare.runs.append(time.perf_counter() - t)
        t = time.perf_counter()
        runner.infer(inputs[i % len(inputs)])
        wrapped.runs.append(time.perf_counter() - t)
    result = bare.to_dict()
    result["runner_slice_median_s"] = wrapped.to_dict()["slice_median_s"]
    return result


def _volume(cfg: BenchPlan, work: Path) -> Path:
    from flareseg.bench.inputs import phantom_volume

    if cfg.input is not None:
        return cfg.input
    return phantom_volume(work, cfg.size, cfg.slices, (0.8, 0.8, 2.5))


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Every figure of the report, as a JSON-serialisable dictionary: one section function each."""
    cfg = config.resolved()
    clear_earlier_run(cfg.out, model=cfg.model, input=cfg.input)  # after every check passed
    work = cfg.out / "models"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    # Arithmetic-rate peaks first, before any ONNX Runtime session exists: idle ORT worker
    # threads spin for a while and would steal the cores from the measurement.
    # An ONNX model alone has no FLOP count (that needs its checkpoint), so no fraction of a peak to measure for.
    peaks = matmul_peaks(cfg) if cfg.onnx_precision is None else {}
    rest, models, failed = prepare_models_but_int8_below_agreement(cfg, work)
    if failed is not None:  # reported as left out, and the other backends measured
        gone = {b: f"its INT8 export was refused: {failed}" for b in cfg.backends if b not in rest.backends}
        cfg = dataclasses.replace(rest, left_out={**cfg.left_out, **gone})
    report: dict[str, Any] = {
        "matmul_peak_flops": peaks,
        "machine": machine_section(),
        "settings": settings_section(cfg),
    }
    report["model"] = model_section(models)
    report["backends"] = latency_section(cfg, models, peaks, report["model"].get("flops_deploy_fvcore"))
    volume = _volume(cfg, work)
    report["volumes"] = volume_section(cfg, models, report["backends"], volume)
    if cfg.fresh_process:
        report["fresh_process"] = fresh_process_section(cfg, models, report["backends"], report["volumes"], volume)
    report["references"] = {"flare21_winner": FLARE21_WINNER, "nnunet_baseline": NNUNET_BASELINE}
    report["bench_wall_s"] = time.perf_counter() - t_start
    return report


def _peak_math(backend: Backend, onnx_precision: str | None = None) -> str:
    """The arithmetic of the peak a backend is compared with (fp32, tf32, fp16, ...)."""
    from flareseg.bench.measure import convolution_math

    return convolution_math(torch.device(backend.device), run_precision(backend, onnx_precision), backend.kind)


def peak_key(backend: Backend, onnx_precision: str | None = None) -> str:
    """Which measured matrix-product peak a backend's rate is compared with: device and arithmetic."""
    return f"{backend.device}-{_peak_math(backend, onnx_precision)}"


def matmul_peaks(cfg: BenchPlan) -> dict[str, float]:
    """The measured matrix-product rate per device and arithmetic the backends use.

    CUDA fp32 backends whose convolutions run in TF32 are compared with a TF32 peak
    (``cuda-tf32``), measured with TF32 switched on for the measurement only. No peak is
    measured for the CPU's reduced precisions (bf16, int8): their fraction reads n/a.
    """
    from flareseg.bench.measure import matmul_peak_flops

    peaks: dict[str, float] = {}
    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for name in cfg.backends:
        b = ALL_BACKENDS[name]
        key, math = peak_key(b, cfg.onnx_precision), _peak_math(b, cfg.onnx_precision)
        if key in peaks or math not in dtypes or (b.device == "cpu" and math != "fp32"):
            continue
        peaks[key] = matmul_peak_flops(torch.device(b.device), dtypes[math], tf32=math == "tf32")
        log.info("matrix-product peak %s: %.1f GFLOP/s", key, peaks[key] / 1e9)
    return peaks


def machine_section() -> dict[str, Any]:
    from flareseg.bench.measure import cpu_description
    from flareseg.checkpoint import software_versions

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        **cpu_description(),
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": software_versions(),
    }


def settings_section(cfg: BenchPlan) -> dict[str, Any]:
    return {
        "backends": list(cfg.backends),
        "batches": list(cfg.batches),
        "volume_slices": None if cfg.input is not None else cfg.slices,  # the phantom's; --input has its own
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "slice_size": list(cfg.network_size),
        "phantom_slice_size": None if cfg.input is not None else list(cfg.size),
        "threads": cfg.threads,
        "random_weights": cfg.model is None,
        "onnx_model_precision": cfg.onnx_precision,
        "left_out": dict(cfg.left_out),
        "note": _cpu_defaults_note(cfg),
    }


def _cpu_defaults_note(cfg: BenchPlan) -> str | None:
    """What this CPU machine's defaults cut short (only those not given: the user's own need no excuse)."""
    if torch.cuda.is_available():
        return None
    cut = []
    if "repeats" in cfg.defaulted:
        cut.append(f"{cfg.repeats} timed repeats per batch size")
    if "slices" in cfg.defaulted and cfg.input is None:
        cut.append(f"a volume of {cfg.slices} slices")
    return f"CPU machine defaults ({'; '.join(cut)}) keep the run to a few minutes" if cut else None


def model_section(models: dict[str, Path]) -> dict[str, Any]:
    """Parameters and FLOPs, on the training graph and the deploy graph."""
    from flareseg.bench.measure import count_flops
    from flareseg.checkpoint import load_model

    if "checkpoint" not in models:
        return {"note": "ONNX model given: parameters and FLOPs need the checkpoint"}
    net, info, _ = load_model(models["checkpoint"])
    deploy = build_deploy_network(net, fold_input=True)
    from flareseg.bench.report import differs_from_paper

    train_flops = count_flops(net.train(), net.config.in_channels, info.slice_size)
    deploy_flops = count_flops(deploy, 1, info.slice_size)
    net.eval()
    model = {
        "network": net.config.to_dict(),
        "slice_size": list(info.slice_size),  # the FLOPs' (the paper's: 512 x 512)
        "parameters_training": count_parameters(net),
        "parameters_deploy": count_parameters(deploy),
        "parameters_paper_reported": PAPER_PARAMETERS_REPORTED,
        "parameters_encoder": sum(p.numel() for p in net.encoder.parameters()),
        "flops_training_fvcore": train_flops,
        "flops_deploy_fvcore": deploy_flops,
        "flops_paper": PAPER_FLOPS,
        "flops_nnunet_paper": NNUNET_FLOPS,
        "flops_paper_minus_training": PAPER_FLOPS - train_flops,
        "flops_convention": "flops_*: fvcore's count, one multiply-add as one flop; the FLOP/s rates "
        "(achieved_flops, matmul_peak_flops) count two",
        "one_full_resolution_conv_flops": ONE_FULL_RES_CONV_FLOPS,
        "identity_upsample_flops": IDENTITY_UPSAMPLE_FLOPS,
    }
    if differs_from_paper(model):  # the gap to the paper's count means something for its network and slices only
        model["flops_paper_minus_training"] = None
    return model


def _rss_figures(peak: float | None, before: float | None) -> dict[str, float | None]:
    """This process's peak RSS, and its growth above the RSS before the runner was made: a lower bound on what the
    backend, its model and its batches (or volume) need, since memory an earlier runner freed is used again."""
    added = peak - before if peak is not None and before is not None else None
    return {"peak_rss_mb": peak, "rss_before_mb": before, "rss_added_mb": added}


def _release_cuda_memory() -> None:
    """Return the previous runner's cached blocks to the device, so the idle reading excludes them."""
    gc.collect()
    torch.cuda.empty_cache()


def _allocator_figure(backend: Backend, peak_mb: float | None) -> dict[str, Any]:
    """torch's allocator peak, only where torch allocates the backend's memory (NVML holds the rest)."""
    if backend.device != "cuda":
        return {}
    if backend.kind == "torch":
        return {"peak_allocated_mb": peak_mb}
    return {
        "peak_allocated_mb": None,
        "peak_allocated_note": f"not applicable: {backend.kind} allocates outside torch's allocator (see NVML)",
    }


def latency_section(
    cfg: BenchPlan, models: dict[str, Path], peaks: dict[str, float], flops_slice: int | None
) -> dict[str, Any]:
    """Latency and throughput against batch size, per backend; on CUDA, NVML memory per batch size."""
    from flareseg.bench.measure import nvml_sampler, time_batches
    from flareseg.runtime.pipeline import current_rss_mb, peak_rss_mb, reset_peak_rss

    results: dict[str, Any] = {}
    for name in cfg.backends:
        b = ALL_BACKENDS[name]
        precision = run_precision(b, cfg.onnx_precision)
        entry: dict[str, Any] = {"precision": precision, "device": b.device, "batches": []}
        cuda = b.device == "cuda"
        runner: Any = None
        inputs: list[torch.Tensor] = []
        for batch in cfg.batches:
            runner, inputs = None, []  # the previous batch's device tensors go before the idle reading
            reset_peak_rss()
            before = current_rss_mb()  # this process's own memory (networks, exports): not the backend's
            if cuda:
                _release_cuda_memory()
                torch.cuda.reset_peak_memory_stats()
            try:
                sampler = nvml_sampler(cuda and cfg.nvml)
                oom = gpu_memory_errors(name, batch, "this batch does not fit this GPU")  # a row, as any failure
                with oom, sampler if sampler else contextlib.nullcontext():
                    runner = make_runner(b, models, batch, threads=cfg.threads)
                    with runner:
                        dev = runner.device
                        shape = (batch, runner.input_channels, *runner.info.slice_size)
                        gen = torch.Generator().manual_seed(batch)
                        inputs = [torch.randn(shape, generator=gen).to(dev) for _ in range(3)]
                        sync = torch.cuda.synchronize if cuda else None
                        with torch.inference_mode():
                            stats = time_batches(
                                runner.infer, inputs, batch, warmup=cfg.warmup, repeats=cfg.repeats, synchronize=sync
                            )
                            bare = _bare_session_run(runner, inputs, cfg) if name == "onnxruntime-cpu-fp32" else None
            except FlareSegError as exc:
                entry["batches"].append({"batch": batch, "error": str(exc)})
                continue
            row = stats.to_dict()
            row.update(_rss_figures(peak_rss_mb(), before))
            row.update(_allocator_figure(b, torch.cuda.max_memory_allocated() / 2**20 if cuda else None))
            if sampler:
                row.update(sampler.summary())
            if flops_slice:
                achieved = 2.0 * flops_slice / row["slice_median_s"]
                row["achieved_flops"] = achieved
                key = peak_key(b, cfg.onnx_precision)
                peak = peaks.get(key)
                row["matmul_peak_key"] = key
                row["fraction_of_matmul_peak"] = achieved / peak if peak else None
            if bare is not None:
                row["bare_session_run"] = bare
                row["runtime_overhead"] = bare["runner_slice_median_s"] / bare["slice_median_s"] - 1.0
            entry["batches"].append(row)
            log.info("%s batch %d: %.3f s/slice", name, batch, row["slice_median_s"])
        ok = [r for r in entry["batches"] if "error" not in r]
        if ok:
            entry["best"] = min(ok, key=lambda r: r["slice_median_s"])
        results[name] = entry
    return results


def segment_volume(
    backend: Backend,
    models: dict[str, Path],
    batch: int,
    volume: Path,
    out: Path,
    precision: str | None = None,
    *,
    nvml: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """One whole volume through flare-infer's pipeline in this process: stage times, memory (NVML on CUDA).

    ``precision``: what the run computes in, where not the backend's own (an ONNX model given alone).
    ``nvml``: sample the GPU's memory with NVML (on CUDA, where :func:`~flareseg.bench.measure.nvml_readable`).
    ``threads``: the CPU threads of an ONNX Runtime or OpenVINO session (None: its own default).
    """
    from flareseg.bench.measure import nvml_sampler
    from flareseg.runtime.pipeline import current_rss_mb, reset_peak_rss, segment_file

    cuda = backend.device == "cuda"
    if cuda:
        _release_cuda_memory()
    before = current_rss_mb()  # this process's own memory, before the backend's model is loaded
    sampler = nvml_sampler(cuda and nvml)
    with sampler if sampler else contextlib.nullcontext():
        runner = make_runner(backend, models, batch, threads=threads)
        with runner:
            reset_peak_rss()  # the volume's peak, not an earlier measurement's
            timing = segment_file(runner, volume, out, overwrite=True, batch_size=batch)
    row = timing.to_dict()
    row.update(_rss_figures(timing.peak_rss_mb, before))
    row["batch"] = batch
    row["precision"] = precision or backend.precision
    allocator = _allocator_figure(backend, timing.peak_gpu_allocated_mb)
    if "peak_allocated_note" in allocator:
        row["peak_gpu_allocated_mb"] = None
        row["peak_gpu_allocated_note"] = allocator["peak_allocated_note"]
    if sampler:
        row.update(sampler.summary())
    return row


def _reference_volume(
    cfg: BenchPlan, models: dict[str, Path], results: dict[str, Any], volume: Path
) -> tuple[str, Path, dict[str, Any] | None] | None:
    """The fp32 reference labels of the volume: from a run already made, or from one made now.

    None when no fp32 run is possible (an fp16 or INT8 ONNX model given alone) or needed.
    """
    for name in REFERENCE_BACKENDS:
        if name in results and results[name]["precision"] == "fp32":
            return name, Path(results[name]["output"]), None
    if all(r["precision"] == "fp32" for r in results.values()):
        return None  # nothing needs it
    for name in REFERENCE_BACKENDS:
        if run_precision(ALL_BACKENDS[name], cfg.onnx_precision) != "fp32":
            continue  # it would run the given fp16 or INT8 model: no fp32 reference
        out = cfg.out / "pred" / f"reference-{name}.nii.gz"
        try:
            row = segment_volume(ALL_BACKENDS[name], models, 1, volume, out, nvml=cfg.nvml, threads=cfg.threads)
        except FlareSegError as exc:  # no model this reference can run (e.g. an ONNX model only)
            log.info("fp32 reference %s unavailable: %s", name, exc)
            continue
        return name, out, row
    return None


def volume_section(cfg: BenchPlan, models: dict[str, Path], latency: dict[str, Any], volume: Path) -> dict[str, Any]:
    """Whole volumes in this process, per backend at its best batch: the time of each stage, memory, and the
    voxel agreement of each backend's labels with an fp32 reference's on the same volume."""
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in cfg.backends:
        entry = latency[name]
        if "best" not in entry:
            continue
        batch = entry["best"]["batch"]
        b = ALL_BACKENDS[name]
        out = cfg.out / "pred" / f"{name}.nii.gz"
        try:
            precision = run_precision(b, cfg.onnx_precision)
            row = segment_volume(b, models, batch, volume, out, precision, nvml=cfg.nvml, threads=cfg.threads)
        except FlareSegError as exc:  # one backend's failure (the GPU's memory, say) is a line of the report
            log.warning("%s: whole volume failed: %s", name, exc)
            errors[name] = str(exc)
            continue
        bare = entry["best"].get("bare_session_run")
        per_slice = bare["slice_median_s"] if bare else entry["best"]["slice_median_s"]
        row["slices_times_per_slice_s"] = row["slices"] * per_slice
        row["volume_overhead"] = row["total_s"] / row["slices_times_per_slice_s"] - 1.0
        results[name] = row
        # Each figure as it is measured: a run cut short (a timeout) keeps them in its log, not only in the report.
        gpu = row.get("nvml_flare21_max_mb")
        log.info(
            "%s whole volume, %d slices at batch %d: %.2f s (%s)%s", name, row["slices"], batch, row["total_s"],
            ", ".join(f"{stage} {row[f'{stage}_s']:.2f}" for stage in STAGES),
            "" if gpu is None else f"; GPU {gpu:,.0f} MB above idle (NVML)",
        )  # fmt: skip
    section: dict[str, Any] = {
        "input": str(volume),
        "stages": list(STAGES),
        "reference": None,
        "results": results,
        "errors": errors,
    }
    reference = _reference_volume(cfg, models, results, volume)
    if reference is not None:
        from flareseg.bench.measure import label_map, voxel_agreement

        ref_name, ref_path, ref_run = reference
        section["reference"] = ref_name
        if ref_run is not None:
            section["reference_run"] = ref_run
        ref_labels = label_map(ref_path)
        for name, row in results.items():
            if name != ref_name:
                row["agreement_with_fp32"] = voxel_agreement(label_map(row["output"]), ref_labels)
    return section


# Appended to a bare start-up's code: the child's own peak RSS in KiB, where /proc says it. On Linux the
# ru_maxrss that wait4 returns carries the spawning process's high-water mark across the fork and exec, so
# a small child of a large flare-bench would report flare-bench's peak.
_PRINT_OWN_PEAK = """
try:
    with open('/proc/self/status') as status:
        print(next(int(line.split()[1]) for line in status if line.startswith('VmHWM:')))
except (OSError, StopIteration, ValueError, IndexError):
    pass
"""


def _run_child(
    cmd: Sequence[str], *, nvml: bool, own_peak: Callable[[str], float | None] | None = None
) -> dict[str, Any]:
    """Wall time, peak RSS and (on CUDA) NVML memory of one child process; a failure raises.

    ``own_peak``: the child's peak RSS in MiB from what it printed (or wrote), None where it said none. Without
    one, or where it says none, the peak is the kernel's ru_maxrss, but not on Linux, where that figure is at least
    this process's own peak (see ``_PRINT_OWN_PEAK``). The child runs in an empty folder: ``python -m`` and ``-c``
    put the working folder first on the import path, and a checkout named ``flareseg`` (or ``torch``) there
    would be imported instead of the installed package.
    """
    from flareseg.bench.measure import nvml_sampler
    from flareseg.runtime.pipeline import maxrss_mb

    sampler = nvml_sampler(nvml)
    rss: float | None = None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as empty:
        with sampler if sampler else contextlib.nullcontext():
            t = time.perf_counter()
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, cwd=empty, env=_child_environment())
            try:
                if hasattr(os, "wait4"):  # the child's own resource usage (Unix)
                    _, status, usage = os.wait4(proc.pid, 0)
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    rss = None if sys.platform.startswith("linux") else maxrss_mb(usage)
                else:
                    proc.wait()
            except BaseException:  # Ctrl-C or SIGTERM: the child must not write on into a folder being removed
                proc.kill()
                proc.wait()
                raise
            wall = time.perf_counter() - t
        if proc.returncode != 0:
            err.seek(0)
            last = err.read().decode(errors="replace").strip().splitlines()[-1:]
            raise FlareSegError(f"{shlex.join(cmd)} failed with exit code {proc.returncode}: {' '.join(last)}")
        out.seek(0)
        said = own_peak(out.read().decode(errors="replace")) if own_peak else None
    row: dict[str, Any] = {"command": shlex.join(cmd), "wall_s": wall, "peak_rss_mb": rss if said is None else said}
    if sampler:
        row.update(sampler.summary())
    return row


def _child_environment() -> dict[str, str]:
    """This process's environment, for a child run in another folder that must import the flareseg this one runs.

    Relative ``PYTHONPATH`` entries are made absolute, and a flareseg imported from the working folder (``python
    -m`` in a checkout) is put first on the child's path; an installed one the child finds as this process did.
    """
    env = dict(os.environ)
    cwd = Path.cwd()
    entries = [str(cwd / entry) for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    root = Path(flareseg.__file__).resolve().parent.parent
    if root == cwd.resolve():
        entries.insert(0, str(root))
    if entries:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(entries))
    return env


def _printed_peak(stdout: str) -> float | None:
    """The peak RSS that ``_PRINT_OWN_PEAK`` printed, in MiB."""
    lines = stdout.split()
    return int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else None


def _recorded_peak(timings: Path) -> float | None:
    """The peak RSS that a fresh flare-infer recorded for its case in its timings file, in MiB."""
    try:
        value = json.loads(timings.read_text())["cases"][0]["peak_rss_mb"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def fresh_process_section(
    cfg: BenchPlan, models: dict[str, Path], latency: dict[str, Any], volumes: dict[str, Any], volume: Path
) -> dict[str, Any] | None:
    """The FLARE21 way: one case in a fresh process (start, load, read, infer, write), beside a bare start-up.

    The bare start-up (``import torch``, plus a CUDA context on CUDA) is timed before and after the
    case in the same run; its median is the part of the wall time no inference code can save.
    """
    failed = volumes.get("errors", {})  # a backend whose whole volume failed in this process would fail there too
    name = _end_to_end_backend([b for b in cfg.backends if b not in failed])
    if name is None:
        log.info("no fresh-process run: flare-infer has no option for %s", ", ".join(cfg.backends))
        return None
    b = ALL_BACKENDS[name]
    cuda = b.device == "cuda"
    batch = latency[name].get("best", {}).get("batch", 1)
    pred = (cfg.out / "pred").absolute()  # the child runs in another folder
    timings = pred / "fresh-process.timings.json"  # where it records its own peak RSS
    cmd = [sys.executable, "-m", "flareseg.runtime.cli", *fresh_process_args(b, models, cfg.threads)]
    cmd += ["-i", str(Path(volume).absolute()), "-o", str(pred / "fresh-process.nii.gz"), "--timings", str(timings)]
    cmd += ["--batch-size", str(batch), "-q", "--overwrite"]
    bare_code = "import torch; torch.zeros(1, device='cuda')" if cuda else "import torch"
    bare_cmd = [sys.executable, "-c", bare_code + "\n" + _PRINT_OWN_PEAK]
    nvml = cuda and cfg.nvml
    before = _run_child(bare_cmd, nvml=nvml, own_peak=_printed_peak)
    case = _run_child(cmd, nvml=nvml, own_peak=lambda _: _recorded_peak(timings))
    after = _run_child(bare_cmd, nvml=nvml, own_peak=_printed_peak)
    bare_s = statistics.median([before["wall_s"], after["wall_s"]])
    shown = shlex.join([sys.executable, "-c", bare_code])  # what is timed; the lines that print its peak are not
    bare: dict[str, Any] = {"command": shown, "wall_s": [before["wall_s"], after["wall_s"]]}
    bare["median_s"] = bare_s
    bare["peak_rss_mb"] = before["peak_rss_mb"]
    if cuda:  # what a CUDA context (and torch's smallest block) costs on this GPU, above idle
        bare["nvml_flare21_max_mb"] = before.get("nvml_flare21_max_mb")  # None where NVML cannot be read
    log.info("fresh process, %s: %.2f s; bare start-up %.2f s (%+.2f s)", name, case["wall_s"], bare_s,
             case["wall_s"] - bare_s)  # fmt: skip
    return {
        "backend": name,
        **case,
        "slices": volumes["results"].get(name, {}).get("slices"),
        "bare_start": bare,
        "minus_bare_start_s": case["wall_s"] - bare_s,
    }


def _end_to_end_backend(backends: Sequence[str]) -> str | None:
    """The backend of the fresh-process run: the fastest usual one, else the first that flare-infer can run."""
    for preferred in ("tensorrt-fp16", "torch-cuda-fp16", "onnxruntime-cpu-fp32", "torch-cpu-fp32"):
        if preferred in backends:
            return preferred
    runnable = [b for b in backends if not (ALL_BACKENDS[b].kind == "openvino" and ALL_BACKENDS[b].precision == "bf16")]
    return runnable[0] if runnable else None
