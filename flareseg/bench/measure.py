"""Measurements: FLOPs (fvcore), latency and throughput, peak memory, arithmetic-rate peaks.

Pure measuring functions; :mod:`flareseg.bench.run` decides what to measure and
:mod:`flareseg.bench.report` writes it down.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flareseg.errors import FlareSegError

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
    """fvcore's count for one slice (fvcore counts one multiply-add as one flop, as the paper did)."""
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError:
        raise FlareSegError("FLOP counting needs fvcore: pip install fvcore") from None
    x = torch.zeros(1, channels, *size)
    with torch.no_grad():
        analysis = FlopCountAnalysis(_Outputs(model), (x,))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return int(analysis.total())


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


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, *, n: int | None = None, repeats: int = 5) -> float:
    """Dense matrix-product rate (FLOP/s, multiply and add counted apart) measured on ``device`` now."""
    if n is None:
        n = 8192 if device.type == "cuda" else 4096
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


class NvmlSampler:
    """Whole-device used memory (total - free) every ``interval`` seconds, as FLARE21 measured it."""

    def __init__(self, device_index: int = 0, interval: float = 0.1) -> None:
        try:
            import pynvml
        except ImportError:
            raise FlareSegError("NVML memory sampling needs nvidia-ml-py: pip install 'flareseg[gpu]'") from None
        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.samples.append(int(info.total - info.free))
            self._stop.wait(self.interval)

    def __enter__(self) -> NvmlSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._nvml.nvmlShutdown()

    def flare21_max_mb(self) -> float | None:
        return flare21_max_memory(self.samples)


def flare21_max_memory(samples: Sequence[int], share: float = 0.02) -> float | None:
    """FLARE21's "maximum GPU memory": the largest value held for at least ``share`` of the samples (MiB)."""
    if not samples:
        return None
    need = max(1, int(share * len(samples) + 0.999999))
    ordered = sorted(samples, reverse=True)
    return ordered[need - 1] / 2**20
