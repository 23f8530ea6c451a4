"""Measurements: FLOPs (fvcore), latency and throughput, peak memory, arithmetic-rate peaks.

Pure measuring functions; :mod:`flareseg.bench.run` decides what to measure and
:mod:`flareseg.bench.report` writes it down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flareseg.errors import FlareSegError, interrupts_kept
from flareseg.runtime.memory import nvml_index
from flareseg.shapes import SIZE_MULTIPLE

log = logging.getLogger(__name__)


class _Outputs(nn.Module):
    """fvcore traces tensors or tuples of tensors: flatten (logits, [aux...]) for it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        if isinstance(out, tuple):
            logits, aux = out
            return (logits, *aux)
        return (out,)


def count_flops(model: nn.Module, channels: int, size: tuple[int, int]) -> int:
    """fvcore's count for one slice (fvcore counts one multiply-add as one flop, as the paper did).

    A 16 x 16 slice is counted twice over and halved (every count is linear in the batch): a training-mode
    BatchNorm refuses a batch whose bottleneck holds one value a channel. Others are counted alone, at half the time.
    """
    try:
        with interrupts_kept():
            from fvcore.nn import FlopCountAnalysis
    except ImportError:
        raise FlareSegError("FLOP counting needs fvcore: pip install fvcore") from None
    slices = 2 if model.training and (size[0] // SIZE_MULTIPLE) * (size[1] // SIZE_MULTIPLE) < 2 else 1
    x = torch.zeros(slices, channels, *size)
    with torch.no_grad():
        analysis = FlopCountAnalysis(_Outputs(model), (x,))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return int(analysis.total()) // slices


@dataclass
class LatencyStats:
    """Seconds per batch over timed runs; per-slice figures divide by the batch size."""

    batch: int
    runs: list[float] = field(default_factory=list)

    def _q(self, q: float) -> float:
        data = sorted(self.runs)
        if len(data) == 1:
            return data[0]
        pos = q * (len(data) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    def to_dict(self) -> dict[str, Any]:
        med = statistics.median(self.runs)
        return {
            "batch": self.batch,
            "repeats": len(self.runs),
            "batch_median_s": med,
            "slice_median_s": med / self.batch,
            "slice_p10_s": self._q(0.1) / self.batch,
            "slice_p90_s": self._q(0.9) / self.batch,
            "slices_per_s": self.batch / med,
        }


def time_batches(
    run: Callable[[Any], Any],
    inputs: Sequence[Any],
    batch: int,
    *,
    warmup: int,
    repeats: int,
    synchronize: Callable[[], None] | None = None,
) -> LatencyStats:
    """Time ``run`` on a cycle of different inputs after ``warmup`` untimed calls."""
    stats = LatencyStats(batch)
    for i in range(warmup):
        run(inputs[i % len(inputs)])
    if synchronize:
        synchronize()
    for i in range(repeats):
        t = time.perf_counter()
        run(inputs[(warmup + i) % len(inputs)])
        if synchronize:
            synchronize()
        stats.runs.append(time.perf_counter() - t)
    return stats


@contextlib.contextmanager
def cuda_matmul_tf32(enabled: bool) -> Iterator[None]:
    """CUDA float32 matrix products in TF32 (or not) for a block, then the previous setting again."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def convolution_math(device: torch.device, precision: str, kind: str = "torch") -> str:
    """The arithmetic a backend's float32 convolutions use: ``tf32`` on CUDA GPUs that have it, by default.

    On compute capability 8.0 and later, cuDNN runs float32 convolutions in TF32 unless
    ``torch.backends.cudnn.allow_tf32`` is off (it is on by default), and so do ONNX Runtime's
    CUDA provider (its ``use_tf32`` option defaults to on) and TensorRT (its TF32 builder flag
    is set by default), while torch's float32 matrix products default to full precision: a peak
    measured with the latter understates what the former can reach.
    """
    if device.type != "cuda" or precision != "fp32":
        return precision
    major, _ = torch.cuda.get_device_capability(device)
    allowed = torch.backends.cudnn.allow_tf32 if kind == "torch" else True
    return "tf32" if allowed and major >= 8 else "fp32"


def matmul_peak_flops(
    device: torch.device,
    dtype: torch.dtype,
    *,
    tf32: bool = False,
    n: int | None = None,
    repeats: int | None = None,
) -> float:
    """Dense matrix-product rate (FLOP/s, multiply and add counted apart) measured on ``device`` now: the best of
    ``repeats`` products of two ``n`` x ``n`` matrices.

    ``tf32``: on CUDA, float32 products in TF32 for this measurement only (the global setting is restored).
    On a CPU the best of many small products: on the shared 2-core Intel Xeon, five of 4096 x 4096 read 221-300
    GFLOP/s from run to run, thirty of 2048 x 2048 302.6-302.9 when the machine was quiet (233-243 under load), in
    2 s; a recorded report's backends reached 113 % of a five-product peak.
    """
    cuda = device.type == "cuda"
    n = n if n is not None else (8192 if cuda else 2048)
    repeats = repeats if repeats is not None else (5 if cuda else 30)
    # Drawn on the device from a generator of its own: the caller's global generators are left as they were.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with cuda_matmul_tf32(tf32) if device.type == "cuda" else contextlib.nullcontext():
        torch.matmul(a, b)
        sync()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(a, b)
            sync()
            best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


MIB = 2**20


def nvml_readable(devices: Sequence[str]) -> bool:
    """Whether NVML can sample GPU memory for runs on ``devices`` ("cpu", "cuda"), checked once per benchmark.

    False without a CUDA run, and False with one warning where NVML cannot read the GPU: the
    memory figures are then n/a, and the rest of the benchmark still runs.
    """
    if "cuda" not in devices:
        return False
    try:
        NvmlSampler().close()
    except FlareSegError as exc:
        log.warning("no GPU memory figures: %s", exc)
        return False
    return True


def nvml_sampler(on: bool) -> NvmlSampler | None:
    """A sampler where ``on`` (a CUDA run, NVML readable at the start), or None; a later NVML failure gives
    n/a figures for that run, with a warning, rather than failing it."""
    if not on:
        return None
    try:
        return NvmlSampler()
    except FlareSegError as exc:
        log.warning("no GPU memory figures for this run: %s", exc)
        return None


class NvmlSampler:
    """Whole-device used memory (total - free) every ``interval`` seconds, as FLARE21 measured it.

    One reading is taken on entry, before the sampled work starts: the idle level that the
    figures of :meth:`summary` are measured above. A last sample is taken on exit, so even a
    short run has a start and an end for the memory-time area.
    """

    def __init__(self, device_index: int = 0, interval: float = 0.1) -> None:
        """``device_index``: the CUDA device's (NVML's own numbering may differ, see :func:`nvml_index`)."""
        try:
            with interrupts_kept():
                import pynvml
        except ImportError:
            raise FlareSegError("NVML memory sampling needs nvidia-ml-py: pip install 'flareseg[gpu]'") from None
        self._nvml = pynvml
        index = nvml_index(device_index)
        try:
            pynvml.nvmlInit()
            try:
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError:
                pynvml.nvmlShutdown()
                raise
        except pynvml.NVMLError as exc:
            raise FlareSegError(f"NVML cannot read GPU {index}'s memory: {exc}") from None
        self.interval = interval
        self.idle: int | None = None
        self.samples: list[int] = []
        self.times: list[float] = []
        #: Readings NVML failed to give (a transient error): skipped, and counted in the summary.
        self.failed_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _used(self) -> int:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return int(info.total - info.free)

    def _sample(self) -> None:
        """One reading; a failed one is skipped and counted (in the sampling thread it would end the sampling)."""
        t = time.perf_counter()
        try:
            used = self._used()
        except self._nvml.NVMLError:
            self.failed_samples += 1
            return
        self.times.append(t)
        self.samples.append(used)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> NvmlSampler:
        try:
            self.idle = self._used()
        except self._nvml.NVMLError:  # no idle level: the figures are then absolute, and the summary says so
            self.failed_samples += 1
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.close()

    def close(self) -> None:
        """Release NVML (the context manager does on exit)."""
        self._nvml.nvmlShutdown()

    def flare21_max_mb(self) -> float | None:
        """FLARE21's maximum, above the idle reading (MiB)."""
        return flare21_max_memory(self.samples, idle=self.idle or 0)

    def summary(self) -> dict[str, float | int | None]:
        """Idle level, FLARE21 maximum and absolute peak above it (MiB), area above it (MiB x s)."""
        idle = self.idle or 0
        return {
            "nvml_idle_mb": idle / MIB,
            "nvml_flare21_max_mb": flare21_max_memory(self.samples, idle=idle),
            "nvml_peak_mb": max(0, max(self.samples) - idle) / MIB if self.samples else None,
            "nvml_area_mb_s": memory_time_area(self.times, self.samples, idle=idle),
            "nvml_samples": len(self.samples),
            "nvml_failed_samples": self.failed_samples,
        }


def flare21_max_memory(samples: Sequence[int], share: float = 0.02, *, idle: int = 0) -> float | None:
    """FLARE21's "maximum GPU memory": the largest value held for at least ``share`` of the samples (MiB).

    ``idle`` (bytes) is subtracted first; readings below it count as zero.
    """
    if not samples:
        return None
    need = max(1, int(share * len(samples) + 0.999999))
    ordered = sorted(samples, reverse=True)
    return max(0, ordered[need - 1] - idle) / MIB


def memory_time_area(times: Sequence[float], samples: Sequence[int], *, idle: int = 0) -> float | None:
    """FLARE22/23's GPU-memory figure: area under the used-memory curve (MiB x s), by the trapezoid rule.

    ``times`` in seconds, ``samples`` in bytes, paired; ``idle`` (bytes) is subtracted first and
    readings below it count as zero. One sample spans no time: its area is 0.
    """
    if len(times) != len(samples):
        raise FlareSegError(f"memory-time area: {len(times)} times for {len(samples)} samples")
    if not samples:
        return None
    above = [max(0, s - idle) / MIB for s in samples]
    return sum((times[i + 1] - times[i]) * (above[i] + above[i + 1]) / 2 for i in range(len(above) - 1))


def label_map(path: str | os.PathLike[str]) -> Any:
    """A written label map's voxels, read and checked as flare-eval reads them."""
    from flareseg.volume import read_labels

    return read_labels(path)[0]


def voxel_agreement(a: Any, b: Any) -> float:
    """Fraction of voxels with the same label in two label arrays of the same shape."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise FlareSegError(f"label maps differ in shape: {a.shape} and {b.shape}")
    return float(np.mean(a == b)) if a.size else 1.0


#: CPU features that decide which reduced-precision paths are fast (or available at all).
CPU_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model and the relevant instruction sets from the text of Linux's ``/proc/cpuinfo`` (first CPU)."""
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"cpu_model": model, "cpu_features": [f for f in CPU_FEATURES if f in flags]}


def cpu_description() -> dict[str, Any]:
    """This machine's CPU model and instruction sets; the platform's processor name where /proc is absent."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            found = parse_cpuinfo(f.read())
    except OSError:
        found = {"cpu_model": None, "cpu_features": None}
    found["cpu_model"] = found["cpu_model"] or platform.processor() or platform.machine()
    return found
