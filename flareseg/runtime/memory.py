"""The CUDA batch size that fits a whole-device GPU memory budget (``flare-infer --gpu-memory MB``).

FLARE21 measured GPU memory as the whole device's used memory (NVML), so the budget is
whole-device, above the idle reading: the CUDA context and libraries (cuDNN, cuBLAS),
the model weights, the staging buffers and each batch's activations all count. The
context is measured, not assumed (621 MB on the H200 of issue 10), and each candidate
batch is measured by running one warm-up batch and reading the device and the
allocator's peak.

:func:`plan_batch` is the decision, a pure function over measured numbers (tested on the
CPU); :func:`measure_cuda_plan` is the thin CUDA part that measures. Neither is a default
yet: the measuring part has not run on a GPU in this project.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flareseg.errors import FlareSegError, interrupts_kept, no_room
from flareseg.preprocess import network_batch
from flareseg.runtime.inferer import min_batch_of, run_padded, scores_to_labels, staged_buffer_bytes, upload_dtype
from flareseg.runtime.runners import Runner

log = logging.getLogger(__name__)

MB = 2**20
#: Candidate batch sizes, tried in increasing order until one no longer fits.
DEFAULT_CANDIDATES = (1, 2, 4, 8, 16, 32)
#: Default budget, whole device above idle (issue 10's target on the 300-slice case).
DEFAULT_GPU_MEMORY_MB = 1000.0


@dataclass(frozen=True)
class BatchMemory:
    """One measured candidate: the predicted whole-device MB above idle while it runs."""

    batch: int
    device_mb: float


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen batch and the figures it was chosen from."""

    batch: int
    budget_mb: float
    #: CUDA context and libraries: device memory above idle that torch's allocator does not hold.
    context_mb: float
    #: Model weights (and anything else allocated before the first batch).
    weights_mb: float
    #: Every candidate measured, in order; the last may be the first one that did not fit.
    measured: tuple[BatchMemory, ...]
    #: False when no idle reading was available: figures then include other processes' memory.
    idle_known: bool = True

    @property
    def predicted_mb(self) -> float:
        """The chosen batch's last measurement (a batch measured twice was measured again last)."""
        return [m.device_mb for m in self.measured if m.batch == self.batch][-1]

    def to_dict(self) -> dict[str, object]:
        """The plan for ``timings.json``: what was measured, and what was chosen from it."""
        data = {**dataclasses.asdict(self), "predicted_mb": self.predicted_mb}
        for m in data["measured"]:  # JSON has no infinity: a batch the device had no room for is null
            m["device_mb"] = None if math.isinf(m["device_mb"]) else m["device_mb"]
        return data

    def line(self) -> str:
        above = "above idle" if self.idle_known else "whole device (no idle reading: nvidia-ml-py not installed)"
        tried = ", ".join(
            f"{m.batch}: " + ("out of device memory" if math.isinf(m.device_mb) else f"{m.device_mb:.0f} MB")
            for m in self.measured
        )
        return (
            f"batch {self.batch} fits the {self.budget_mb:.0f} MB GPU budget ({above}): predicted "
            f"{self.predicted_mb:.0f} MB, of which CUDA context {self.context_mb:.0f} MB and model "
            f"{self.weights_mb:.0f} MB; measured batches {tried}"
        )


def plan_batch(
    budget_mb: float,
    context_mb: float,
    weights_mb: float,
    measure: Callable[[int], float],
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    *,
    min_batch: int | None = None,
    max_batch: int | None = None,
    idle_known: bool = True,
) -> MemoryPlan:
    """The largest candidate batch whose measured whole-device figure fits ``budget_mb``.

    ``measure(batch)`` returns the whole-device MB above idle while a batch of that size
    runs (context, weights, buffers and activations together), or infinity when the device
    ran out of memory. Candidates are tried in
    increasing order and the search stops at the first that does not fit: memory grows
    with the batch, and every extra measurement costs a warm-up batch. Candidates outside
    the runner's ``[min_batch, max_batch]`` are skipped.
    """
    if not budget_mb > 0:
        raise FlareSegError(f"GPU memory budget must be a positive number of MB, got {budget_mb}")
    usable = sorted(
        {int(b) for b in candidates if b >= max(1, min_batch or 1) and (max_batch is None or b <= max_batch)}
    )
    if not usable:
        raise FlareSegError(
            f"no candidate batch size in {tuple(candidates)} lies within the model's batch range "
            f"[{min_batch or 1}, {max_batch if max_batch is not None else 'unbounded'}]"
        )
    fixed = context_mb + weights_mb
    if fixed > budget_mb:
        raise FlareSegError(
            f"GPU memory budget {budget_mb:.0f} MB is below what this device needs before any batch runs: "
            f"CUDA context {context_mb:.0f} MB + model {weights_mb:.0f} MB = {fixed:.0f} MB; raise --gpu-memory"
        )
    measured: list[BatchMemory] = []
    chosen: int | None = None
    for batch in usable:
        figure = float(measure(batch))
        measured.append(BatchMemory(batch, figure))
        if figure > budget_mb:
            break
        chosen = batch
    # The larger batch measured after the chosen one may have loaded kernels of its own (CUDA loads them
    # lazily, and keeps them): the chosen batch is measured again with them resident, stepping down if need be.
    while chosen is not None and measured[-1].batch != chosen:
        figure = float(measure(chosen))
        measured.append(BatchMemory(chosen, figure))
        if figure <= budget_mb:
            break
        chosen = max((b for b in usable if b < chosen), default=None)
    if chosen is None:
        smallest = [m for m in measured if m.batch == measured[0].batch]
        last = smallest[-1]  # measured again after a larger batch: the figure that refused it
        if math.isinf(last.device_mb):
            raise FlareSegError(
                f"batch {last.batch} does not fit in the GPU's free memory (CUDA context {context_mb:.0f} MB, "
                f"model {weights_mb:.0f} MB already there): free the GPU, or use a smaller model"
            )
        grew = (
            f" once batch {max(m.batch for m in measured)}'s kernels were loaded, {smallest[0].device_mb:.0f} MB before"
            if len(smallest) > 1
            else ""
        )
        raise FlareSegError(
            f"GPU memory budget {budget_mb:.0f} MB is too small for even batch {last.batch}, which needs "
            f"{last.device_mb:.0f} MB{grew} (CUDA context {context_mb:.0f} MB, model {weights_mb:.0f} MB); "
            "raise --gpu-memory"
        )
    return MemoryPlan(chosen, float(budget_mb), float(context_mb), float(weights_mb), tuple(measured), idle_known)


# --- Measuring on CUDA (thin; not verified on a GPU in this project yet) -----------------------------------


def nvml_index(cuda_index: int | None) -> int:
    """NVML's index of CUDA device ``cuda_index``.

    NVML numbers every GPU of the machine, CUDA only those ``CUDA_VISIBLE_DEVICES`` shows
    (by index or UUID), so ``cuda:0`` may be NVML's 3. torch's own mapping reads the variable
    without creating a CUDA context; it is private, hence the fallback to the plain index.
    """
    index = cuda_index or 0
    mapping = getattr(torch.cuda, "_get_nvml_device_index", None)
    if mapping is None:
        return index
    try:
        return int(mapping(index))
    except (RuntimeError, ValueError, IndexError) as exc:  # IndexError: a variable that shows no GPU at all
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = "it shows no GPU" if isinstance(exc, IndexError) else str(exc)
        raise FlareSegError(
            f"cannot tell which GPU NVML should read for cuda:{index} (CUDA_VISIBLE_DEVICES={visible!r}): {why}"
        ) from None


def nvml_used_mb(device: torch.device) -> float | None:
    """The whole device's used memory (total - free) from NVML, or None without nvidia-ml-py.

    NVML needs no CUDA context, so it can read the idle figure before torch creates one.
    """
    try:
        with interrupts_kept():
            import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(device.index))
            return float(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / MB
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        log.warning("NVML memory reading failed: %s", exc)
        return None


def device_used_mb(device: torch.device) -> float:
    """The whole device's used memory: NVML where installed, else the CUDA runtime's free/total."""
    used = nvml_used_mb(device)
    if used is not None:
        return used
    free, total = torch.cuda.mem_get_info(device)
    return float(total - free) / MB


def measure_cuda_plan(
    runner: Runner,
    budget_mb: float,
    slice_shape: tuple[int, int],
    stored_dtype: np.dtype,
    *,
    idle_mb: float | None = None,
    device_preprocess: bool = False,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
) -> MemoryPlan:
    """Measure an activated CUDA runner and choose its batch with :func:`plan_batch`.

    ``idle_mb`` is the device's used memory read (with :func:`nvml_used_mb`) before this
    process created its CUDA context; without it the figures are whole-device and include
    whatever else runs there (conservative). Each candidate runs one zero batch of
    ``slice_shape`` slices the way :func:`~flareseg.runtime.inferer.infer_volume` does
    (resize, network, resize back, argmax); its figure is the device's used memory after
    it, plus the part of the allocator's peak already released, plus the second staging
    slot. Runners with a captured CUDA graph already hold their graph's memory: plan
    before capturing.
    """
    device = runner.device
    if device.type != "cuda":
        raise FlareSegError(f"GPU memory planning needs a CUDA runner, got device {device}")
    idle = idle_mb if idle_mb is not None else 0.0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved(device) / MB
    weights_mb = torch.cuda.memory_allocated(device) / MB
    context_mb = device_used_mb(device) - idle - reserved
    net_size, channels = runner.info.slice_size, runner.input_channels
    min_batch = min_batch_of(runner)
    up_dtype = upload_dtype(np.dtype(stored_dtype))[1] if device_preprocess else torch.float32

    def measure(batch: int) -> float:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.inference_mode():
                dev_in = torch.zeros((batch, *slice_shape), dtype=up_dtype, device=device)  # one slot's input buffer
                # Device preprocessing makes a float32 copy of the stored slices; the default path resizes in place.
                normalised = dev_in.to(torch.float32, copy=True) if device_preprocess else dev_in
                x = network_batch(normalised, net_size, channels)
                labels = scores_to_labels(run_padded(runner, x, min_batch), slice_shape, runner.output_kind)
                del dev_in, normalised, x, labels
        except RuntimeError as exc:  # the device itself has no room (a shared or small GPU): it does not fit
            if not no_room(exc):
                raise
            torch.cuda.empty_cache()
            return math.inf
        torch.cuda.synchronize(device)
        released = max(0.0, (torch.cuda.max_memory_reserved(device) - torch.cuda.memory_reserved(device)) / MB)
        other_slot = staged_buffer_bytes(batch, slice_shape, np.dtype(stored_dtype), device_preprocess) / 2 / MB
        return device_used_mb(device) - idle + released + other_slot

    plan = plan_batch(
        budget_mb,
        context_mb,
        weights_mb,
        measure,
        candidates,
        min_batch=min_batch,
        max_batch=runner.max_batch,
        idle_known=idle_mb is not None,
    )
    torch.cuda.empty_cache()
    return plan
