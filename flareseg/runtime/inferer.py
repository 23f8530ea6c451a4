"""Batched slice inference over a volume: normalised slices in, uint8 label slices out.

:func:`infer_volume` accepts any runner (or anything with the runner's attributes and an
``infer`` method). On the CPU it runs batch by batch with no copies beyond what the
backend needs. On CUDA it uses a double-buffered pipeline:

- pinned host staging buffers, allocated once and reused;
- host-to-device and device-to-host copies on a copy stream, compute on the runner's stream;
- while the GPU works on batch *i*, the host normalises batch *i + 1*;
- the argmax runs on the device, so only uint8 labels come back (4 x 5 fewer bytes than scores).

With ``device_preprocess=True`` the host only copies the stored integer slices (int16 for
CT: half the bytes of float32) into the pinned buffers; clipping, z-scoring and resizing
run on the runner's device with :class:`~flareseg.preprocess.TensorNormalizer`, bit for
bit the host's arithmetic. It is opt-in: the default CUDA path is the measured one. On a
CPU runner the same staged path runs synchronously (its streams and events are no-ops),
which is how the tests drive it.

A runner with a ``min_batch`` (a TensorRT profile's minimum) gets its short last batch
padded with zero slices; the padded outputs are dropped.

Class scores are resized back to the slice's own size before the argmax; label outputs
(an export with the argmax in its graph) can only be resized by nearest neighbour.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flareseg.errors import FlareSegError
from flareseg.preprocess import SliceNormalizer, TensorNormalizer, network_batch, resize_labels, resize_scores_to_labels
from flareseg.runtime.runners import Runner

log = logging.getLogger(__name__)


@dataclass
class InferenceTimes:
    """Seconds spent normalising slices on the host and in the runner (including copies).

    ``first_labels_s``: from the start of inference until the host collected the first
    labels (on CUDA, when their slot is reused or the run ends: with double buffering that
    is after the second batch is queued); on a fresh runner the backend's first-batch
    set-up (cuDNN, TensorRT) shows here.
    ``on_labels_s``: time in the caller's ``on_labels`` callback, not counted in ``infer_s``.
    ``nonfinite_slices``: slices whose scores held NaN or infinity (their argmax is no label to trust); counted
    on the CPU and in the staged loop (``device_preprocess``), not yet in the default CUDA loop.
    """

    normalize_s: float = 0.0
    infer_s: float = 0.0
    first_labels_s: float | None = None
    on_labels_s: float = 0.0
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    nonfinite_slices: int = 0


def scores_to_labels(out: torch.Tensor, size: tuple[int, int], output_kind: str) -> torch.Tensor:
    """Runner output -> (B, H, W) uint8 labels at the slice's own size, on the output's device."""
    if output_kind == "labels":
        if out.dtype != torch.uint8:  # out of uint8's range (a callable's int32 259) would wrap into a class: 255
            out = torch.where((out < 0) | (out > 255), 255, out)  # is then refused with the rest, no sync here
        return resize_labels(out, size)
    scores = out if out.dtype in (torch.float32, torch.float16) else out.float()
    return resize_scores_to_labels(scores, size)


def min_batch_of(runner: Runner) -> int | None:
    """The smallest batch the runner accepts (a TensorRT profile's minimum), or None when any batch goes."""
    value = getattr(runner, "min_batch", None)
    return int(value) if value is not None and int(value) > 1 else None


def run_padded(runner: Runner, batch: torch.Tensor, min_batch: int | None) -> torch.Tensor:
    """``runner.infer(batch)``, padding a batch below ``min_batch`` with zero slices and dropping their outputs."""
    n = int(batch.shape[0])
    if min_batch is None or n >= min_batch:
        return checked_output(runner, runner.infer(batch), batch)
    padding = batch.new_zeros((min_batch - n, *batch.shape[1:]))
    padded = torch.cat([batch, padding])
    return checked_output(runner, runner.infer(padded), padded)[:n]


def checked_output(runner: Runner, out: object, batch: torch.Tensor) -> torch.Tensor:
    """A runner's output, refused in one line unless it is what its ``output_kind`` promises for ``batch``: scores
    (B, classes, h, w) or labels (B, h, w), at the batch's slice size. Shapes only, so no device sync: a callable
    (FunctionRunner) returning a tuple, a numpy array or another class count would otherwise fail deep inside,
    or be resized into a wrong label map without a word."""
    name = type(runner).__name__
    if not isinstance(out, torch.Tensor):
        hint = " (a network in training mode returns one per output level: call .eval())"
        hint = hint if isinstance(out, tuple) else ""
        raise FlareSegError(f"{name} returned a {type(out).__name__}, expected a torch.Tensor{hint}")
    n, size, classes = int(batch.shape[0]), tuple(batch.shape[-2:]), runner.info.network.num_classes
    if runner.output_kind == "labels":
        expected, ok = f"labels ({n}, {size[0]}, {size[1]})", out.ndim == 3
    else:
        expected, ok = f"scores ({n}, {classes}, {size[0]}, {size[1]})", out.ndim == 4 and out.shape[1] == classes
    if not ok or out.shape[0] != n or tuple(out.shape[-2:]) != size:
        raise FlareSegError(f"{name} returned shape {tuple(out.shape)} for a batch of {n}; expected {expected}")
    if runner.output_kind == "labels" and (out.is_floating_point() or out.is_complex() or out.dtype == torch.bool):
        raise FlareSegError(f"{name} returned labels of type {out.dtype}, expected an integer type")  # 1.5: class 1
    return out


def infer_volume(
    stored: np.ndarray,
    normalizer: SliceNormalizer,
    runner: Runner,
    batch_size: int,
    *,
    progress: Callable[[int], None] | None = None,
    times: InferenceTimes | None = None,
    device_preprocess: bool = False,
    on_labels: Callable[[np.ndarray, int], None] | None = None,
) -> np.ndarray:
    """Labels (Z, Y, X) uint8 for a canonical volume of stored values (Z, Y, X).

    ``device_preprocess``: upload the stored values and normalise/resize them on the
    runner's device (see the module docstring); the labels are the same.
    ``on_labels(labels, stop)``: called whenever slices ``[0, stop)`` of the (C-ordered)
    label map are final, in increasing ``stop``; on CUDA it runs while the device works
    on later batches (the pipeline post-processes there).
    """
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise FlareSegError(f"batch size must be a positive integer, got {batch_size!r}")
    if runner.max_batch is not None and batch_size > runner.max_batch:
        raise FlareSegError(f"batch size {batch_size} exceeds the model's maximum batch {runner.max_batch}")
    min_batch = min_batch_of(runner)
    if min_batch is not None and batch_size < min_batch:
        raise FlareSegError(f"batch size {batch_size} is below the model's minimum batch {min_batch}")
    if stored.ndim != 3:
        raise FlareSegError(f"expected a (Z, Y, X) volume, got shape {stored.shape}")
    if stored.dtype.kind not in "iuf":
        raise FlareSegError(f"expected a volume of integers or floats, got {stored.dtype}")
    times = times if times is not None else InferenceTimes()
    callbacks_before = times.on_labels_s  # the times may be reused: take off this call's share only
    labels = np.empty(stored.shape, dtype=np.uint8)
    done = _Done(labels, progress, on_labels, times)
    if device_preprocess:
        _infer_staged(stored, normalizer, runner, batch_size, done, times)
    elif runner.device.type == "cuda":
        _infer_cuda(stored, normalizer, runner, batch_size, done, times)
    else:
        _infer_cpu(stored, normalizer, runner, batch_size, done, times)
    done.count_nonfinite()
    times.infer_s -= times.on_labels_s - callbacks_before
    classes = runner.info.network.num_classes
    if runner.output_kind == "labels" and labels.size and int(labels.max()) >= classes:  # argmax of scores cannot
        found = np.unique(labels)
        wide = " (255: or a value outside 0..255, which the check sees as 255)" if found[-1] == 255 else ""
        raise FlareSegError(f"{type(runner).__name__} returned labels {found[found >= classes].tolist()}, outside 0.."
                            f"{classes - 1}{wide}")  # fmt: skip
    return labels


class _Done:
    """What happens when a batch's labels are on the host, for every loop below.

    The first labels' time is noted, then progress, then the caller's callback (timed).
    On CUDA, :meth:`harvest` first collects a slot's labels from its pinned buffer.
    """

    def __init__(
        self,
        labels: np.ndarray,
        progress: Callable[[int], None] | None,
        on_labels: Callable[[np.ndarray, int], None] | None,
        times: InferenceTimes,
    ) -> None:
        self.labels, self.progress, self.on_labels, self.times = labels, progress, on_labels, times
        self.started = time.perf_counter()
        self.nonfinite: torch.Tensor | None = None  # a count kept on the scores' device: no sync per batch

    def scores(self, out: torch.Tensor) -> torch.Tensor:
        """Count the batch's slices whose scores hold NaN or infinity (a model overflowing in fp16, say: argmax
        would turn them into labels without a word); ``out`` passes through."""
        if out.is_floating_point():
            bad = (~torch.isfinite(out)).flatten(1).any(dim=1).sum()
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        return out

    def count_nonfinite(self) -> None:
        """The slices counted by :meth:`scores`, into the times (one read of the device's count, at the end)."""
        if self.nonfinite is not None:
            self.times.nonfinite_slices += int(self.nonfinite)

    def start(self) -> float:
        """The loop starts now (its buffers are allocated): the first labels' time counts from here."""
        self.started = time.perf_counter()
        return self.started

    def harvest(self, slot: _Slot | _StagedSlot) -> None:
        """Wait for a slot's download, if it has one in flight, and hand its labels on."""
        if slot.pending is None:
            return
        slot.downloaded.synchronize()
        a, b = slot.pending
        self.labels[a:b] = slot.host_out[: b - a].numpy()
        slot.pending = None
        self(a, b)

    def harvest_all(self, slots: Sequence[_Slot | _StagedSlot]) -> None:
        """The slots still holding labels, by slice range: callers see the slices in order."""
        for slot in sorted((s for s in slots if s.pending is not None), key=lambda s: s.pending or (0, 0)):
            self.harvest(slot)

    def __call__(self, start: int, stop: int) -> None:
        if self.times.first_labels_s is None:
            self.times.first_labels_s = time.perf_counter() - self.started
        if self.progress:
            self.progress(stop - start)
        if self.on_labels:
            t = time.perf_counter()
            self.on_labels(self.labels, stop)
            self.times.on_labels_s += time.perf_counter() - t


def _infer_cpu(
    stored: np.ndarray,
    normalizer: SliceNormalizer,
    runner: Runner,
    batch_size: int,
    done: _Done,
    times: InferenceTimes,
) -> None:
    size = stored.shape[1:]
    net_size, channels = runner.info.slice_size, runner.input_channels
    min_batch = min_batch_of(runner)
    done.start()
    for start in range(0, stored.shape[0], batch_size):
        stop = min(start + batch_size, stored.shape[0])
        t0 = time.perf_counter()
        x = normalizer(stored[start:stop])
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = run_padded(runner, network_batch(x, net_size, channels), min_batch)
            done.labels[start:stop] = scores_to_labels(done.scores(out), size, runner.output_kind).numpy()
        t2 = time.perf_counter()
        times.normalize_s += t1 - t0
        times.infer_s += t2 - t1
        times.batches += 1
        times.batch_sizes.append(stop - start)
        t3 = time.perf_counter()
        done(start, stop)
        times.infer_s += time.perf_counter() - t3  # on_labels_s is taken off once, at the end


@contextlib.contextmanager
def _drained_on_error(copy: Any) -> Iterator[None]:
    """On an error, wait for the copies in flight before the slots' buffers go with the frame: an upload may still
    write a device input buffer that the allocator would hand to the next case (it was allocated on the compute
    stream, and the copy stream's use of it is not recorded)."""
    try:
        yield
    except BaseException:
        try:
            copy.synchronize()
        except Exception:  # a sticky CUDA error says it again here: the first error is the one to report
            log.debug("waiting for the copy stream after an error failed too", exc_info=True)
        raise


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
    done: _Done,
    times: InferenceTimes,
) -> None:
    device = runner.device
    size = (int(stored.shape[1]), int(stored.shape[2]))
    net_size, channels = runner.info.slice_size, runner.input_channels
    min_batch = min_batch_of(runner)
    compute = torch.cuda.current_stream(device)
    copy = torch.cuda.Stream(device)
    slots = [_Slot(batch_size, size, device) for _ in range(2)]
    normalized_before = times.normalize_s  # the times may already hold another volume's
    t_start = done.start()
    with _drained_on_error(copy):
        for i, start in enumerate(range(0, stored.shape[0], batch_size)):
            stop = min(start + batch_size, stored.shape[0])
            n = stop - start
            slot = slots[i % 2]
            done.harvest(slot)  # its previous batch's labels (and its input buffer) are free again
            t0 = time.perf_counter()
            # Host work, overlapping the other slot's GPU work.
            slot.host_in[:n].numpy()[...] = normalizer(stored[start:stop])
            times.normalize_s += time.perf_counter() - t0
            with torch.cuda.stream(copy):
                copy.wait_event(slot.computed)  # never overwrite an input still being read
                slot.dev_in[:n].copy_(slot.host_in[:n], non_blocking=True)
                slot.uploaded.record(copy)
            compute.wait_event(slot.uploaded)
            with torch.inference_mode():
                out = run_padded(runner, network_batch(slot.dev_in[:n], net_size, channels), min_batch)
                # Not counted here (done.scores): the default CUDA path keeps to what has run on a GPU, and the
                # count's bool copy of the scores would add to the memory its batch plan measured.
                lab = scores_to_labels(out, size, runner.output_kind)
                del out  # else the scores stay alive through the next batch's forward (the planner counts one batch)
            slot.computed.record(compute)
            with torch.cuda.stream(copy):
                copy.wait_event(slot.computed)
                slot.host_out[:n].copy_(lab, non_blocking=True)
                lab.record_stream(copy)  # keep the allocator from reusing it before the copy ends
                slot.downloaded.record(copy)
            slot.pending = (start, stop)
            times.batches += 1
            times.batch_sizes.append(n)
        done.harvest_all(slots)
    times.infer_s += time.perf_counter() - t_start - (times.normalize_s - normalized_before)


# --- Device preprocessing: stored values go up, the device normalises and resizes -------------------------

#: Stored dtypes uploaded as they are; others (uint16, float64, ...) become float32 on the host first,
#: which is the first step of SliceNormalizer anyway (uint16 -> float32 is exact).
_UPLOAD_AS_IS = {
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
}


def upload_dtype(stored: np.dtype) -> tuple[np.dtype, torch.dtype]:
    """The (host, device) dtype in which stored slices travel: the stored one where torch computes on it."""
    native = stored.newbyteorder("=")  # a big-endian file's values are swapped during the host copy
    if native in _UPLOAD_AS_IS:
        return native, _UPLOAD_AS_IS[native]
    return np.dtype(np.float32), torch.float32


class _Immediate:
    """A stream or event of a synchronous device (the CPU): work is done when it is issued."""

    def record(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None


class _Streams:
    """The copy/compute streams and events of the staged pipeline: CUDA's, or no-ops on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.compute: Any = torch.cuda.current_stream(device) if self.cuda else _Immediate()
        self.copy: Any = torch.cuda.Stream(device) if self.cuda else _Immediate()

    def event(self) -> Any:
        return torch.cuda.Event() if self.cuda else _Immediate()

    @contextlib.contextmanager
    def on_copy(self) -> Iterator[None]:
        if self.cuda:
            with torch.cuda.stream(self.copy):
                yield
        else:
            yield

    def keep_for_copy(self, tensor: torch.Tensor) -> None:
        """Keep the allocator from reusing ``tensor`` before the copy stream is done with it."""
        if self.cuda:
            tensor.record_stream(self.copy)


class _StagedSlot:
    """One set of buffers of the staged pipeline: pinned host slices in their stored dtype, device twins."""

    def __init__(
        self,
        batch: int,
        size: tuple[int, int],
        dtypes: tuple[np.dtype, torch.dtype],
        device: torch.device,
        streams: _Streams,
    ) -> None:
        pin = streams.cuda
        self.host_in = torch.empty((batch, *size), dtype=dtypes[1], pin_memory=pin)
        self.host_out = torch.empty((batch, *size), dtype=torch.uint8, pin_memory=pin)
        self.dev_in = torch.empty((batch, *size), dtype=dtypes[1], device=device)
        self.uploaded, self.computed, self.downloaded = streams.event(), streams.event(), streams.event()
        self.pending: tuple[int, int] | None = None  # the slice range whose labels are in flight


def staged_buffer_bytes(batch: int, size: tuple[int, int], stored: np.dtype, device_preprocess: bool) -> int:
    """Device bytes of the two input slots' staging buffers (for memory planning)."""
    itemsize = upload_dtype(stored)[0].itemsize if device_preprocess else 4
    return 2 * batch * size[0] * size[1] * itemsize


def _infer_staged(
    stored: np.ndarray,
    normalizer: SliceNormalizer,
    runner: Runner,
    batch_size: int,
    done: _Done,
    times: InferenceTimes,
) -> None:
    """The double-buffered pipeline with preprocessing on the runner's device.

    Per batch the host only copies stored slices into a pinned slot (the memcpy overlaps
    the other slot's device work); the upload, TensorNormalizer, resize, inference, argmax
    and the uint8 download are queued on the device.
    """
    device = runner.device
    size = (int(stored.shape[1]), int(stored.shape[2]))
    net_size, channels = runner.info.slice_size, runner.input_channels
    min_batch = min_batch_of(runner)
    dtypes = upload_dtype(stored.dtype)
    prepare = TensorNormalizer(normalizer, device)
    streams = _Streams(device)
    slots = [_StagedSlot(batch_size, size, dtypes, device, streams) for _ in range(2)]
    normalized_before = times.normalize_s  # the times may already hold another volume's
    t_start = done.start()
    with _drained_on_error(streams.copy):
        for i, start in enumerate(range(0, stored.shape[0], batch_size)):
            stop = min(start + batch_size, stored.shape[0])
            n = stop - start
            slot = slots[i % 2]
            done.harvest(slot)  # its previous batch's labels (and its input buffers) are free again
            t0 = time.perf_counter()
            # A copy (any strides, any flips) in the stored dtype; float32 conversion only for dtypes torch lacks.
            np.copyto(slot.host_in[:n].numpy(), stored[start:stop], casting="unsafe")
            times.normalize_s += time.perf_counter() - t0
            with streams.on_copy():
                streams.copy.wait_event(slot.computed)  # never overwrite an input still being read
                slot.dev_in[:n].copy_(slot.host_in[:n], non_blocking=streams.cuda)
                slot.uploaded.record(streams.copy)
            streams.compute.wait_event(slot.uploaded)
            with torch.inference_mode():
                x = prepare.network_batch(slot.dev_in[:n], net_size, channels)
                out = run_padded(runner, x, min_batch)
                lab = scores_to_labels(done.scores(out), size, runner.output_kind)
                del x, out  # else they stay alive through the next batch's forward (the planner counts one batch)
            slot.computed.record(streams.compute)
            with streams.on_copy():
                streams.copy.wait_event(slot.computed)
                slot.host_out[:n].copy_(lab, non_blocking=streams.cuda)
                streams.keep_for_copy(lab)
                slot.downloaded.record(streams.copy)
            slot.pending = (start, stop)
            times.batches += 1
            times.batch_sizes.append(n)
        done.harvest_all(slots)
    times.infer_s += time.perf_counter() - t_start - (times.normalize_s - normalized_before)
