"""Batched slice inference over a volume: normalised slices in, uint8 label slices out.

:func:`infer_volume` accepts any runner (or anything with the runner's attributes and an
``infer`` method). On the CPU it runs batch by batch with no copies beyond what the
backend needs. On CUDA it uses a double-buffered pipeline:

- pinned host staging buffers, allocated once and reused;
- host-to-device and device-to-host copies on a copy stream, compute on the runner's stream;
- while the GPU works on batch *i*, the host normalises batch *i + 1*;
- the argmax runs on the device, so only uint8 labels come back (4 x 5 fewer bytes than scores).

Class scores are resized back to the slice's own size before the argmax; label outputs
(an export with the argmax in its graph) can only be resized by nearest neighbour.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from flareseg.errors import FlareSegError
from flareseg.preprocess import SliceNormalizer, network_batch, resize_scores_to_labels
from flareseg.runtime.runners import Runner


@dataclass
class InferenceTimes:
    """Seconds spent normalising slices on the host and in the runner (including copies)."""

    normalize_s: float = 0.0
    infer_s: float = 0.0
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)


def scores_to_labels(out: torch.Tensor, size: tuple[int, int], output_kind: str) -> torch.Tensor:
    """Runner output -> (B, H, W) uint8 labels at the slice's own size, on the output's device."""
    if output_kind == "labels":
        labels = out
        if tuple(labels.shape[-2:]) != tuple(size):
            labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
        return labels.to(torch.uint8)
    scores = out if out.dtype in (torch.float32, torch.float16) else out.float()
    return resize_scores_to_labels(scores, size)


def infer_volume(
    stored: np.ndarray,
    normalizer: SliceNormalizer,
    runner: Runner,
    batch_size: int,
    *,
    progress: Callable[[int], None] | None = None,
    times: InferenceTimes | None = None,
) -> np.ndarray:
    """Labels (Z, Y, X) uint8 for a canonical volume of stored values (Z, Y, X)."""
    if batch_size < 1:
        raise FlareSegError(f"batch size must be positive, got {batch_size}")
    if runner.max_batch is not None and batch_size > runner.max_batch:
        raise FlareSegError(f"batch size {batch_size} exceeds the model's maximum batch {runner.max_batch}")
    if stored.ndim != 3:
        raise FlareSegError(f"expected a (Z, Y, X) volume, got shape {stored.shape}")
    times = times if times is not None else InferenceTimes()
    labels = np.empty(stored.shape, dtype=np.uint8)
    if runner.device.type == "cuda":
        _infer_cuda(stored, normalizer, runner, batch_size, labels, progress, times)
    else:
        _infer_cpu(stored, normalizer, runner, batch_size, labels, progress, times)
    return labels


def _infer_cpu(
    stored: np.ndarray,
    normalizer: SliceNormalizer,
    runner: Runner,
    batch_size: int,
    labels: np.ndarray,
    progress: Callable[[int], None] | None,
    times: InferenceTimes,
) -> None:
    size = stored.shape[1:]
    net_size, channels = runner.info.slice_size, runner.input_channels
    for start in range(0, stored.shape[0], batch_size):
        stop = min(start + batch_size, stored.shape[0])
        t0 = time.perf_counter()
        x = normalizer(stored[start:stop])
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = runner.infer(network_batch(x, net_size, channels))
            labels[start:stop] = scores_to_labels(out, size, runner.output_kind).numpy()
        t2 = time.perf_counter()
        times.normalize_s += t1 - t0
        times.infer_s += t2 - t1
        times.batches += 1
        times.batch_sizes.append(stop - start)
        if progress:
            progress(stop - start)


class _Slot:
    """One set of staging buffers of the double-buffered CUDA pipeline."""

    def __init__(self, batch: int, size: tuple[int, int], device: torch.device) -> None:
        self.host_in = torch.empty((batch, *size), dtype=torch.float32, pin_memory=True)
        self.host_out = torch.empty((batch, *size), dtype=torch.uint8, pin_memory=True)
        self.dev_in = torch.empty((batch, *size), dtype=torch.float32, device=device)
        self.uploaded = torch.cuda.Event()
        self.computed = torch.cuda.Event()
        self.downloaded = torch.cuda.Event()
        self.pending: tuple[int, int] | None = None  # the slice range whose labels are in flight


def _infer_cuda(
    stored: np.ndarray,
    normalizer: SliceNormalizer,
    runner: Runner,
    batch_size: int,
    labels: np.ndarray,
    progress: Callable[[int], None] | None,
    times: InferenceTimes,
) -> None:
    device = runner.device
    size = (int(stored.shape[1]), int(stored.shape[2]))
    net_size, channels = runner.info.slice_size, runner.input_channels
    compute = torch.cuda.current_stream(device)
    copy = torch.cuda.Stream(device)
    slots = [_Slot(batch_size, size, device) for _ in range(2)]

    def harvest(slot: _Slot) -> None:
        if slot.pending is None:
            return
        slot.downloaded.synchronize()
        a, b = slot.pending
        labels[a:b] = slot.host_out[: b - a].numpy()
        slot.pending = None
        if progress:
            progress(b - a)

    t_start = time.perf_counter()
    for i, start in enumerate(range(0, stored.shape[0], batch_size)):
        stop = min(start + batch_size, stored.shape[0])
        n = stop - start
        slot = slots[i % 2]
        harvest(slot)  # its previous batch's labels (and its input buffer) are free again
        t0 = time.perf_counter()
        slot.host_in[:n].numpy()[...] = normalizer(stored[start:stop])  # host work overlaps the other slot's GPU work
        times.normalize_s += time.perf_counter() - t0
        with torch.cuda.stream(copy):
            copy.wait_event(slot.computed)  # never overwrite an input still being read
            slot.dev_in[:n].copy_(slot.host_in[:n], non_blocking=True)
            slot.uploaded.record(copy)
        compute.wait_event(slot.uploaded)
        with torch.inference_mode():
            out = runner.infer(network_batch(slot.dev_in[:n], net_size, channels))
            lab = scores_to_labels(out, size, runner.output_kind)
        slot.computed.record(compute)
        with torch.cuda.stream(copy):
            copy.wait_event(slot.computed)
            slot.host_out[:n].copy_(lab, non_blocking=True)
            lab.record_stream(copy)  # keep the allocator from reusing it before the copy ends
            slot.downloaded.record(copy)
        slot.pending = (start, stop)
        times.batches += 1
        times.batch_sizes.append(n)
    for slot in slots:
        harvest(slot)
    times.infer_s += time.perf_counter() - t_start - times.normalize_s
