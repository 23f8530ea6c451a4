"""What flare-bench measures, on which backends, and in what order.

With no model given, the paper's full-width network is benchmarked with random weights
(speed and memory do not depend on the weight values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flareseg.errors import FlareSegError
from flareseg.network import PAPER_PARAMETERS_REPORTED, NetworkConfig, build_deploy_network, count_parameters

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


@dataclass(frozen=True)
class Backend:
    """One way of running the model: a runner configuration."""

    name: str
    kind: str  # torch | onnxruntime | tensorrt
    device: str
    precision: str
    channels_last: bool = False
    cuda_graph: bool = False


ALL_BACKENDS = {
    b.name: b
    for b in (
        Backend("torch-cpu-fp32", "torch", "cpu", "fp32"),
        Backend("onnxruntime-cpu-fp32", "onnxruntime", "cpu", "fp32"),
        Backend("torch-cuda-fp32", "torch", "cuda", "fp32"),
        Backend("torch-cuda-bf16", "torch", "cuda", "bf16", channels_last=True),
        Backend("torch-cuda-fp16", "torch", "cuda", "fp16", channels_last=True),
        Backend("torch-cuda-fp16-graph", "torch", "cuda", "fp16", channels_last=True, cuda_graph=True),
        Backend("onnxruntime-cuda-fp32", "onnxruntime", "cuda", "fp32"),
        Backend("onnxruntime-cuda-fp16", "onnxruntime", "cuda", "fp16"),
        Backend("tensorrt-fp16", "tensorrt", "cuda", "fp16"),
    )
}


def available_backends() -> list[str]:
    """The backends this machine can run."""
    names = ["torch-cpu-fp32", "onnxruntime-cpu-fp32"]
    if torch.cuda.is_available():
        names += ["torch-cuda-fp32", "torch-cuda-bf16", "torch-cuda-fp16", "torch-cuda-fp16-graph"]
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            names += ["onnxruntime-cuda-fp32", "onnxruntime-cuda-fp16"]
        try:
            import tensorrt  # noqa: F401

            names.append("tensorrt-fp16")
        except ImportError:
            pass
    return names


@dataclass(frozen=True)
class BenchConfig:
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

    def resolved(self) -> BenchConfig:
        """Defaults that fit the machine: a few minutes on a 2-core CPU, thorough on a GPU."""
        gpu = torch.cuda.is_available()
        return dataclasses.replace(
            self,
            backends=self.backends or tuple(available_backends()),
            batches=self.batches or ((1, 2, 4, 8, 16, 32) if gpu else (1, 2, 4)),
            slices=self.slices or (64 if gpu else 8),
            warmup=self.warmup if self.warmup is not None else (5 if gpu else 1),
            repeats=self.repeats or (20 if gpu else 3),
        )


def _prepare_models(cfg: BenchConfig, work: Path) -> dict[str, Path]:
    """Checkpoint, ONNX (fp32, fp16) and engine as the requested backends need them."""
    from flareseg.checkpoint import DEFAULT_SLICE_SIZE, ModelInfo, save_checkpoint
    from flareseg.export import ExportOptions, export_onnx
    from flareseg.network import build_training_network
    from flareseg.preprocess import NormalizationStats

    assert cfg.backends is not None and cfg.batches is not None
    kinds = {ALL_BACKENDS[b].kind for b in cfg.backends}
    models: dict[str, Path] = {}
    if cfg.model is None:
        torch.manual_seed(0)
        net = build_training_network(NetworkConfig(base_width=cfg.base_width)).eval()
        stats = NormalizationStats(mean=-300.0, std=450.0)  # typical CT figures; speed does not depend on them
        info = ModelInfo(network=net.config, normalization=stats, slice_size=cfg.size or DEFAULT_SLICE_SIZE)
        models["checkpoint"] = save_checkpoint(work / "random-weights.pt", net, info)
    elif cfg.model.suffix in (".pt", ".pth"):
        models["checkpoint"] = cfg.model
    elif cfg.model.suffix == ".onnx":
        models["onnx-fp32"] = cfg.model
    else:
        raise FlareSegError(f"{cfg.model}: flare-bench takes a checkpoint (.pt) or an ONNX model")
    needs_onnx = kinds & {"onnxruntime", "tensorrt"}
    if needs_onnx and "checkpoint" in models:
        fp16 = any(ALL_BACKENDS[b].precision == "fp16" and ALL_BACKENDS[b].kind != "torch" for b in cfg.backends)
        profile = (1, max(cfg.batches) // 2 or 1, max(cfg.batches))
        exported = export_onnx(
            models["checkpoint"], work, ExportOptions(fp16=fp16, batch_profile=profile, verify_slices=2)
        )
        for item in exported:
            models[f"onnx-{item.metadata.precision}"] = item.path
    if "torch" in kinds and "checkpoint" not in models:
        raise FlareSegError(
            "PyTorch backends need a checkpoint (.pt); pass --backends onnxruntime-... for an ONNX model"
        )
    if "tensorrt" in kinds:
        from flareseg.export.tensorrt import build_engine

        models["engine"] = build_engine(models["onnx-fp16"])
    return models


def _runner(backend: Backend, models: dict[str, Path], batch: int) -> Any:
    from flareseg.runtime.runners import OnnxRuntimeRunner, TensorRTRunner, TorchRunner

    if backend.kind == "torch":
        return TorchRunner(
            models["checkpoint"],
            device=backend.device,
            precision=backend.precision,  # type: ignore[arg-type]
            channels_last=backend.channels_last,
            cuda_graph_batch=batch if backend.cuda_graph else None,
        )
    if backend.kind == "onnxruntime":
        return OnnxRuntimeRunner(
            models[f"onnx-{backend.precision}"], provider="cpu" if backend.device == "cpu" else "cuda"
        )
    return TensorRTRunner(models["engine"])


def _bare_session_run(runner: Any, inputs: Sequence[torch.Tensor], cfg: BenchConfig) -> dict[str, Any]:
    """The runner against a bare ``session.run`` on its own session, timed alternately run by run.

    Same model, batch and thread pool: the difference is the runner's own overhead. Alternating
    keeps the machine's drift (other load, clock changes) out of the comparison.
    """
    from flareseg.bench.measure import LatencyStats

    arrays = [x.numpy() for x in inputs]
    batch = int(inputs[0].shape[0])
    bare, wrapped = LatencyStats(batch), LatencyStats(batch)
    assert cfg.repeats is not None
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


def _volume(cfg: BenchConfig, work: Path) -> Path:
    if cfg.input is not None:
        return cfg.input
    from flareseg.phantom import make_phantom

    assert cfg.slices is not None
    img, _ = make_phantom((*cfg.size, cfg.slices), (0.8, 0.8, 2.5), seed=0).to_nifti()
    path = work / f"phantom_{cfg.slices}_0000.nii.gz"
    import nibabel as nib

    nib.save(img, path)
    return path


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Every figure of the report, as a JSON-serialisable dictionary."""
    from flareseg.bench.measure import NvmlSampler, count_flops, matmul_peak_flops, time_batches
    from flareseg.checkpoint import load_model, software_versions
    from flareseg.runtime.pipeline import peak_rss_mb, reset_peak_rss, segment_file

    cfg = config.resolved()
    assert cfg.backends is not None and cfg.batches is not None and cfg.warmup is not None and cfg.repeats is not None
    unknown = [b for b in cfg.backends if b not in ALL_BACKENDS]
    if unknown:
        raise FlareSegError(f"unknown backends {unknown}; known: {', '.join(ALL_BACKENDS)}")
    missing = [b for b in cfg.backends if b not in available_backends()]
    if missing:
        raise FlareSegError(f"backends not available on this machine: {', '.join(missing)}")
    work = cfg.out / "models"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    # Arithmetic-rate peaks first, before any ONNX Runtime session exists: idle ORT worker
    # threads spin for a while and would steal the cores from the measurement.
    peaks: dict[str, float] = {}
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for name in cfg.backends:
        b = ALL_BACKENDS[name]
        key = f"{b.device}-{b.precision}"
        if key not in peaks and not (b.device == "cpu" and b.precision != "fp32"):
            peaks[key] = matmul_peak_flops(torch.device(b.device), dtypes[b.precision])

    models = _prepare_models(cfg, work)
    report: dict[str, Any] = {
        "matmul_peak_flops": peaks,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": software_versions(),
        },
        "settings": {
            "backends": list(cfg.backends),
            "batches": list(cfg.batches),
            "volume_slices": cfg.slices,
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "slice_size": list(cfg.size),
            "random_weights": cfg.model is None,
            "note": None
            if torch.cuda.is_available()
            else f"CPU machine: {cfg.repeats} timed repeats per batch size and a {cfg.slices}-slice volume "
            "keep the run to a few minutes",
        },
    }

    # Parameters and FLOPs, on the training graph and the deploy graph.
    if "checkpoint" in models:
        net, info, _ = load_model(models["checkpoint"])
        deploy = build_deploy_network(net, fold_input=True)
        train_flops = count_flops(net.train(), net.config.in_channels, info.slice_size)
        deploy_flops = count_flops(deploy, 1, info.slice_size)
        net.eval()
        report["model"] = {
            "network": net.config.to_dict(),
            "parameters_training": count_parameters(net),
            "parameters_deploy": count_parameters(deploy),
            "parameters_paper_reported": PAPER_PARAMETERS_REPORTED,
            "parameters_encoder": sum(p.numel() for p in net.encoder.parameters()),
            "flops_training_fvcore": train_flops,
            "flops_deploy_fvcore": deploy_flops,
            "flops_paper": PAPER_FLOPS,
            "flops_nnunet_paper": NNUNET_FLOPS,
            "flops_paper_minus_training": PAPER_FLOPS - train_flops,
            "one_full_resolution_conv_flops": ONE_FULL_RES_CONV_FLOPS,
            "identity_upsample_flops": IDENTITY_UPSAMPLE_FLOPS,
        }
    else:
        report["model"] = {"note": "ONNX model given: parameters and FLOPs need the checkpoint"}

    # Latency and throughput against batch size, per backend.
    flops_slice = report["model"].get("flops_deploy_fvcore")
    results: dict[str, Any] = {}
    for name in cfg.backends:
        b = ALL_BACKENDS[name]
        entry: dict[str, Any] = {"batches": []}
        cuda = b.device == "cuda"
        sampler = NvmlSampler() if cuda else None
        with sampler if sampler else contextlib.nullcontext():
            for batch in cfg.batches:
                reset_peak_rss()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                runner = _runner(b, models, batch)
                try:
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
                row["peak_rss_mb"] = peak_rss_mb()
                if cuda:
                    row["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
                if flops_slice:
                    achieved = 2.0 * flops_slice / row["slice_median_s"]
                    row["achieved_flops"] = achieved
                    peak = peaks.get(f"{b.device}-{b.precision}")
                    row["fraction_of_matmul_peak"] = achieved / peak if peak else None
                if bare is not None:
                    row["bare_session_run"] = bare
                    row["runtime_overhead"] = bare["runner_slice_median_s"] / bare["slice_median_s"] - 1.0
                entry["batches"].append(row)
                log.info("%s batch %d: %.3f s/slice", name, batch, row["slice_median_s"])
        if sampler:
            entry["nvml_flare21_max_mb"] = sampler.flare21_max_mb()
            entry["nvml_samples"] = len(sampler.samples)
        ok = [r for r in entry["batches"] if "error" not in r]
        if ok:
            entry["best"] = min(ok, key=lambda r: r["slice_median_s"])
        results[name] = entry
    report["backends"] = results

    # Whole volumes: read, pre-process, infer, post-process, write, in this process.
    volume = _volume(cfg, work)
    volumes: dict[str, Any] = {}
    for name in cfg.backends:
        entry = results[name]
        if "best" not in entry:
            continue
        batch = entry["best"]["batch"]
        runner = _runner(ALL_BACKENDS[name], models, batch)
        with runner:
            timing = segment_file(runner, volume, cfg.out / "pred" / f"{name}.nii.gz", batch_size=batch)
        row = timing.to_dict()
        row["batch"] = batch
        bare = entry["best"].get("bare_session_run")
        per_slice = bare["slice_median_s"] if bare else entry["best"]["slice_median_s"]
        row["slices_times_per_slice_s"] = timing.slices * per_slice
        row["volume_overhead"] = timing.total_s / row["slices_times_per_slice_s"] - 1.0
        volumes[name] = row
    report["volumes"] = {"input": str(volume), "results": volumes}

    # The FLARE21 way: one case in a fresh process (start, load, read, infer, write).
    if cfg.fresh_process:
        name = _end_to_end_backend(cfg.backends)
        b = ALL_BACKENDS[name]
        model = models["checkpoint"] if b.kind == "torch" else models.get(f"onnx-{b.precision}", models.get("engine"))
        batch = results[name].get("best", {}).get("batch", 1)
        cmd = [sys.executable, "-m", "flareseg.runtime.cli", "--model", str(model), "-i", str(volume)]
        cmd += ["-o", str(cfg.out / "pred" / "fresh-process.nii.gz"), "--batch-size", str(batch), "-q", "--overwrite"]
        if b.device == "cuda":
            cmd += ["--device", "cuda"]
            if b.kind == "torch":
                cmd += ["--precision", b.precision] + (["--channels-last"] if b.channels_last else [])
        sampler = NvmlSampler() if b.device == "cuda" else None
        t = time.perf_counter()
        with sampler if sampler else contextlib.nullcontext():
            proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise FlareSegError(f"fresh-process run failed: {proc.stderr.strip().splitlines()[-1:]}")
        report["fresh_process"] = {
            "backend": name,
            "command": " ".join(cmd),
            "wall_s": wall,
            "slices": results[name].get("best") and volumes.get(name, {}).get("slices"),
            "nvml_flare21_max_mb": sampler.flare21_max_mb() if sampler else None,
        }
    report["references"] = {"flare21_winner": FLARE21_WINNER, "nnunet_baseline": NNUNET_BASELINE}
    report["bench_wall_s"] = time.perf_counter() - t_start
    return report


def _end_to_end_backend(backends: Sequence[str]) -> str:
    for preferred in ("tensorrt-fp16", "torch-cuda-fp16", "onnxruntime-cpu-fp32", "torch-cpu-fp32"):
        if preferred in backends:
            return preferred
    return backends[0]
