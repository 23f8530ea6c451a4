"""A CT volume in, a label map out: read, normalise, infer, post-process, write.

The normalisation uses the statistics carried by the model (checkpoint, ONNX metadata
or engine sidecar), never statistics recomputed from the input. Inputs are NIfTI files
or DICOM series folders; outputs are uint8 NIfTI (default) or DICOM SEG.

Cases run as a three-stage pipeline: a reader thread loads case *i + 1* and a writer
thread post-processes and writes case *i - 1* while case *i* is on the device (gzip,
numpy and the DICOM codecs release the GIL). At most three volumes are in memory at
once. The first read also overlaps the runner's activation (model loading, CUDA
context). Finished cases are skipped, a failing case is reported and the others go on,
and every output is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch

from flareseg.atomic import NoMoreWritesError, OutputExistsError, write_text_atomic
from flareseg.errors import FlareSegError, first_few, gpu_memory_errors, wrapped_interrupt
from flareseg.postprocess import StreamingPostprocessor, keep_largest_components
from flareseg.preprocess import volume_normalizer
from flareseg.provenance import PLAIN_DESCRIPTION, ModelStamp
from flareseg.runtime.defaults import device_batch
from flareseg.runtime.inferer import InferenceTimes, infer_volume
from flareseg.runtime.jobs import (
    OUTPUT_SUFFIXES,
    CaseJob,
    OutputType,
    PlannedCase,
    file_job,
    list_cases,
    list_inputs,
    output_name,
    plan_folder,
    result_model,
)
from flareseg.runtime.reading import Read, Reader, read_case
from flareseg.runtime.runners import Runner
from flareseg.runtime.startup import Timeline
from flareseg.volume import (
    Volume,
    VolumeGeometry,
    check_ct_intensities,
    from_canonical,
    volume_from_array,
    write_labels,
)
from flareseg.workers import stop_signals_blocked

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

log = logging.getLogger(__name__)


@dataclass
class CaseTiming:
    """One case's outcome and stage times in seconds.

    ``total_s`` is the sum of the stage times. In a folder run the stages of
    neighbouring cases overlap, so the folder's wall time is less than the sum of
    the cases' totals (see :class:`FolderSummary`).
    """

    case: str
    input: str
    output: str
    status: str = "ok"  # ok | skipped | failed
    error: str | None = None
    slices: int = 0
    shape: tuple[int, int, int] | None = None
    read_s: float = 0.0
    preprocess_s: float = 0.0
    infer_s: float = 0.0
    postprocess_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    #: The case's in-process time, as a warm process takes it alone: its read stage, then from
    #: the moment the run took the volume (the device free, the runner ready) to the end of
    #: its write. A read done ahead (before torch's import, or during the previous case)
    #: counts its own duration, not its wait. It can be less than ``total_s`` (components
    #: labelled during inference) or more (a write queued behind the previous case's).
    wall_s: float = 0.0
    #: From the start of inference to the first labels back on the host (first-batch set-up shows here).
    first_labels_s: float | None = None
    #: The slice loop's wall time, from its first normalisation to its last labels on the host, with whatever ran in
    #: it (components labelled slab by slab too): ``slices / slice_loop_s`` is the rate the loop delivers. On CUDA
    #: the host normalises batch i+1 (and labels the components of batch i-1) while the device runs batch i; the
    #: stages split the loop (normalisation under ``preprocess_s``, the components under ``postprocess_s``, the rest
    #: under ``infer_s``), so ``infer_s`` leaves out device time that host work hid, and is no measure of speed.
    slice_loop_s: float = 0.0
    #: The process's peak host RSS when the case was written: its peak so far (since it started, or since the
    #: command reset the kernel's counter: flare-infer for a file, flare-bench), not the case's alone. In a folder
    #: cases overlap (one read, one on the device, one written). The library never resets it: a process-wide
    #: counter that a service may watch itself.
    peak_rss_mb: float | None = None
    peak_gpu_allocated_mb: float | None = None
    #: Slices whose scores from the model held NaN or infinity (warned of): their labels are no result.
    nonfinite_slices: int = 0

    @classmethod
    def of(cls, job: CaseJob) -> CaseTiming:
        """A fresh timing for a job."""
        return cls(case=job.case, input=str(job.input), output=str(job.output))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        if self.status != "ok":
            return f"{self.case}: {self.status}" + (f" ({self.error})" if self.error else "")
        gpu = f", peak GPU {self.peak_gpu_allocated_mb:.0f} MB" if self.peak_gpu_allocated_mb is not None else ""
        rss = f", peak RSS {self.peak_rss_mb:.0f} MB" if self.peak_rss_mb is not None else ""
        return (
            f"{self.case}: {self.slices} slices, read {self.read_s:.2f}s, preprocess {self.preprocess_s:.2f}s, "
            f"infer {self.infer_s:.2f}s ({1000 * self.infer_s / max(self.slices, 1):.1f} ms/slice), "
            f"postprocess {self.postprocess_s:.2f}s, write {self.write_s:.2f}s, total {self.total_s:.2f}s "
            f"(wall {self.wall_s:.2f}s){rss}{gpu}"
        )

    def _failed(self, exc: Exception) -> CaseTiming:
        self.status = "failed"
        self.error = str(exc) if isinstance(exc, FlareSegError) else f"{type(exc).__name__}: {exc}"
        return self

    def _log_failure(self, exc: Exception) -> CaseTiming:
        """Log the case's failure and mark it failed; an error nobody foresaw keeps its traceback in the log."""
        if isinstance(exc, FlareSegError):
            log.error("%s", exc)
        else:
            log.error("%s: %s: %s", self.input, type(exc).__name__, exc, exc_info=exc)
        return self._failed(exc)


@dataclass(frozen=True)
class FolderSummary:
    """A run's wall time and throughput, next to the per-case timings."""

    cases: int
    segmented: int
    skipped: int
    failed: int
    wall_s: float

    @property
    def cases_per_minute(self) -> float | None:
        return 60.0 * self.segmented / self.wall_s if self.segmented and self.wall_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "cases_per_minute": self.cases_per_minute}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter for this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_mb(usage: Any) -> float:
    """``ru_maxrss`` of a ``resource.struct_rusage`` in MiB: macOS counts it in bytes, Linux and the BSDs in KiB."""
    return float(usage.ru_maxrss) / (2**20 if sys.platform == "darwin" else 1024)


def current_rss_mb() -> float | None:
    """Resident set size of this process now, in MiB (Linux); None where unreadable."""
    return _status_mb("VmRSS:")


def _status_mb(field: str) -> float | None:
    """A memory figure of this process from ``/proc/self/status`` (kB there), in MiB; None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (since start, or since :func:`reset_peak_rss`)."""
    peak = _status_mb("VmHWM:")
    if peak is not None:
        return peak
    try:
        import resource

        return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF))
    except (ImportError, OSError):
        return None


# --- outputs -----------------------------------------------------------------------------


def write_case(
    labels: np.ndarray,
    geometry: VolumeGeometry,
    source: Any,
    path: Path,
    output_type: OutputType = "nifti",
    *,
    replace: bool = True,
    stamp: ModelStamp | None = None,
) -> Path:
    """Write canonical labels as NIfTI on the input's grid, or as DICOM SEG referencing the input series.

    ``replace=False``: a file that appeared at ``path`` meanwhile is kept (:class:`~flareseg.atomic.OutputExistsError`).
    ``stamp``: the model that made the labels, named in the output (NIfTI ``descrip``, SEG algorithm parameters).
    """
    if output_type == "dicom-seg":
        from flareseg.dicom import write_seg

        # The writer needs the grid and the series, not the voxels (already released); it refuses a source that is
        # no DICOM series (the plan refuses such a case before any work).
        volume = Volume(np.empty((0, 0, 0), np.int16), geometry, source=source)
        return write_seg(labels, volume, path, replace=replace, model=stamp.dicom_parameters() if stamp else None)
    description = stamp.nifti_description() if stamp is not None else PLAIN_DESCRIPTION
    return write_labels(labels, geometry, path, replace=replace, description=description)


# --- the stages --------------------------------------------------------------------------


def _infer_stage(
    runner: Runner,
    read: Read,
    timing: CaseTiming,
    batch_size: int,
    progress: Callable[[int], None] | None,
    infer_options: dict[str, Any],
    streaming: StreamingPostprocessor | None = None,
) -> np.ndarray:
    cuda = runner.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(runner.device)
    volume = read.volume
    t0 = time.perf_counter()
    stats = runner.info.normalization
    normalizer = volume_normalizer(volume.array, stats, volume.slope, volume.inter, read.histogram)
    check_ct_intensities(
        volume, timing.input, "segmentation", (normalizer.lo, normalizer.hi)
    )  # bounds at hand: no pass
    t1 = time.perf_counter()
    times = InferenceTimes()
    on_labels = streaming.add if streaming is not None else None
    with gpu_memory_errors(timing.input, batch_size, "lower --batch-size, or let --gpu-memory MB choose it"):
        labels = infer_volume(
            volume.array,
            normalizer,
            runner,
            batch_size,
            progress=progress,
            times=times,
            on_labels=on_labels,
            **infer_options,
        )
    if cuda:
        torch.cuda.synchronize(runner.device)
        timing.peak_gpu_allocated_mb = torch.cuda.max_memory_allocated(runner.device) / 2**20
    t2 = time.perf_counter()
    timing.slices, timing.shape = int(labels.shape[0]), volume.geometry.shape
    timing.preprocess_s = read.histogram_s + (t1 - t0) + times.normalize_s
    # Components labelled during inference (on_labels) count as post-processing, not inference.
    timing.infer_s = (t2 - t1) - times.normalize_s - times.on_labels_s
    timing.slice_loop_s = t2 - t1
    timing.first_labels_s = times.first_labels_s
    timing.nonfinite_slices = times.nonfinite_slices
    if times.nonfinite_slices:
        log.warning(
            "%s: the model gave NaN or infinite scores on %d of %d slices; their labels are not to be trusted "
            "(a model that overflows in fp16, or a damaged one)",
            timing.input,
            times.nonfinite_slices,
            timing.slices,
        )
    return labels


def _finish_stage(
    labels: np.ndarray,
    geometry: VolumeGeometry,
    source: Any,
    job: CaseJob,
    postprocess: bool | StreamingPostprocessor,
    started: float,
    stamp: Callable[[], ModelStamp | None],
) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    during_inference = 0.0
    if isinstance(postprocess, StreamingPostprocessor):
        during_inference = postprocess.seconds  # the slabs labelled while the device worked
        labels = postprocess.finish(labels, in_place=True)  # the map is this stage's alone
    elif postprocess:
        labels = keep_largest_components(labels, in_place=True)
    t1 = time.perf_counter()
    write_case(labels, geometry, source, job.output, job.output_type, replace=job.replace, stamp=stamp())
    t2 = time.perf_counter()
    return during_inference + (t1 - t0), t2 - t1, t2 - started


def run_cases(
    runner: Runner,
    jobs: Sequence[CaseJob],
    *,
    batch_size: int | None = None,
    postprocess: bool = True,
    raise_errors: bool = False,
    on_case: Callable[[CaseTiming], None] | None = None,
    progress: Callable[[int], None] | None = None,
    infer_options: dict[str, Any] | None = None,
    warm_up: bool = False,
    timeline: Timeline | None = None,
    overlap_postprocess: bool = False,
    read_threads: int = 1,
    reader: Reader | None = None,
) -> list[CaseTiming]:
    """Run ``jobs`` through the read / infer / write pipeline; timings in job order.

    ``batch_size``: slices per batch; None: the runner's preferred batch (a TensorRT
    engine's profile opt), else :func:`default_batch`'s for its device (2 on the CPU, 8 on CUDA).
    The runner is activated here if it is not yet, after the first read has started,
    so that model loading overlaps it (and with ``warm_up``, one batch of zeros, so that
    the backend's first-batch set-up overlaps it too); the caller deactivates it. An
    error marks its case failed and the others go on (one foreseen, a
    :class:`FlareSegError`, is logged in one line; any other with its traceback), or is
    raised with ``raise_errors``. A write that finds its file system taking no more writes
    (:class:`~flareseg.atomic.NoMoreWritesError`: full, over quota, read-only) fails the cases left for that file
    system untried, without reading them. ``on_case`` sees each case when its output is written (or fails).
    ``timeline`` gets the points the run reaches (activated, first read, ...).
    ``overlap_postprocess``: label components slab by slab while later slices are
    inferred (:class:`~flareseg.postprocess.StreamingPostprocessor`, same result), so only
    the last slab and the filtering are left after inference.
    ``read_threads``: cores that inflate each ``.nii.gz`` (0: all; above 1 needs rapidgzip).
    ``reader``: a reader thread started earlier, which may already be reading the first
    case (see :class:`~flareseg.runtime.reading.Reader`; its own ``threads`` apply); the
    caller closes it. Without one, the run has its own.
    """
    if not jobs:
        return []  # nothing to run (every case done or refused): the model is not loaded for nothing
    own_reader = reader is None
    reads = reader if reader is not None else Reader(read_threads)
    run = _CaseRun(
        runner,
        jobs,
        postprocess=postprocess,
        raise_errors=raise_errors,
        on_case=on_case,
        progress=progress,
        infer_options=infer_options or {},
        timeline=timeline,
        overlap_postprocess=overlap_postprocess,
    )
    try:
        return run.run(reads, batch_size, warm_up)
    finally:
        if own_reader:
            reads.close()


_Write = Future[tuple[float, float, float]]  # a case's post-processing and write: (postprocess_s, write_s, wall_s)


class _CaseRun:
    """One :func:`run_cases` call: its cases' timings, the writes in flight behind the device, and the file systems
    that took no more writes. The caller owns the reader and the runner's deactivation."""

    def __init__(
        self,
        runner: Runner,
        jobs: Sequence[CaseJob],
        *,
        postprocess: bool,
        raise_errors: bool,
        on_case: Callable[[CaseTiming], None] | None,
        progress: Callable[[int], None] | None,
        infer_options: dict[str, Any],
        timeline: Timeline | None,
        overlap_postprocess: bool,
    ) -> None:
        self.runner, self.jobs = runner, jobs
        self.postprocess, self.overlap_postprocess = postprocess, overlap_postprocess
        self.raise_errors, self.on_case, self.progress = raise_errors, on_case, progress
        self.infer_options = infer_options
        self.mark: Callable[[str], None] = timeline.mark if timeline is not None else (lambda name: None)
        self.results: list[CaseTiming] = []
        self.writes: deque[tuple[CaseTiming, _Write]] = deque()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="flareseg-write")
        # File systems that took no more writes (full, over quota, read-only), with the case whose write said so: the
        # cases left there are not read nor inferred, which would take minutes each to end in the same error.
        self.full: dict[tuple[int, bool], str] = {}
        self.said: set[tuple[int, bool]] = set()
        self.hashing = threading.Event()  # set: the model's hash, the writer's first job, is given up (the run stops)
        self.batch = 0  # known once the runner is active

    def run(self, reads: Reader, batch_size: int | None, warm_up: bool) -> list[CaseTiming]:
        try:
            # The writer's thread starts now, outside the hand-over's held-back window (see _on_device): a thread
            # inherits the signals blocked where it starts, and so would every thread or process it started. Its
            # first job hashes the model for the outputs' stamp, while the first case is read and inferred (an
            # error there is the first write's to say).
            self.writer.submit(self.runner.stamp, self.hashing)
            upcoming = self._read_ahead(reads, 0)
            self.runner.activate()  # no-op when already active; otherwise overlaps the first read
            self.mark("activated")
            # Known once active (an engine's profile is read on loading); the stages below use it.
            self.batch = batch_size if batch_size is not None else default_batch(self.runner)
            if warm_up:
                self.runner.warm_up(self.batch)
                self.mark("warmed_up")
            for i, job in enumerate(self.jobs):
                timing = CaseTiming.of(job)
                self.results.append(timing)
                if self.full:  # the write still in flight may yet go through, or fail there too: known before judging
                    while self.writes:
                        self._settle_first()
                if self._untried(job):
                    _not_tried(timing, job, self.jobs[i:], self.full, self.said)
                    if self.on_case:
                        self.on_case(timing)
                    upcoming = None  # a read begun before the write failed is not waited for
                    continue
                current = upcoming if upcoming is not None else self._read_ahead(reads, i)
                upcoming = self._read_ahead(reads, i + 1)
                assert current is not None
                self._on_device(i, job, timing, current)
                del current  # its result is the case's voxels: let them go with the case
                # Keep at most one write in flight behind the device, so memory stays bounded.
                while len(self.writes) > 1 or (self.writes and self.writes[0][1].done()):
                    self._settle_first()
            while self.writes:
                self._settle_first()
            self.mark("all_written")
        except BaseException:
            self._stop()
            raise
        finally:
            self.writer.shutdown(wait=True, cancel_futures=True)
        return self.results

    def _stop(self) -> None:
        """Interrupted (Ctrl-C, SIGTERM) or stopped by a case's error: the cases already inferred are written (at
        most two: bounded), then settled and said like the others before the run unwinds. A second stop meanwhile
        waits for them too: it would break the wait, and the interpreter would then end with the writer mid-file
        (a .part file left, the case lost); it is raised once they are."""
        self.hashing.set()  # a stop waits for the writes in flight, not for a hash on a slow disk
        with stop_signals_blocked():
            self.writer.shutdown(wait=True)
            while self.writes:
                timing, fut = self.writes.popleft()
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._settle(timing, fut)

    def _untried(self, job: CaseJob) -> bool:
        return bool(self.full) and _file_system(job.output) in self.full

    def _read_ahead(self, reads: Reader, i: int) -> Future[Read] | None:
        if i >= len(self.jobs) or self._untried(self.jobs[i]):
            return None
        return reads.submit(self.jobs[i].input, self.jobs[i].output_type)

    def _settle(self, timing: CaseTiming, fut: _Write) -> None:
        try:
            timing.postprocess_s, timing.write_s, timing.wall_s = fut.result()
        except OutputExistsError as exc:  # another run wrote the case meanwhile: its file is kept, as planned ones are
            log.warning("%s", exc)
            timing.status, timing.error = "skipped", str(exc)
        except Exception as exc:  # in a folder, any case's failure is that case's alone
            if self.raise_errors:
                raise
            timing._log_failure(exc)
            if isinstance(exc, NoMoreWritesError):  # the cases left for that file system would fail alike
                self.full.setdefault(_file_system(Path(timing.output)), timing.case)
        else:
            if self.full:  # a write there went through after all (room was made): its cases are tried again
                where = _file_system(Path(timing.output))
                self.full.pop(where, None)
                self.said.discard(where)
            timing.total_s = timing.read_s + timing.preprocess_s + timing.infer_s + timing.postprocess_s
            timing.total_s += timing.write_s
            timing.peak_rss_mb = peak_rss_mb()
        if self.on_case:
            self.on_case(timing)

    def _settle_first(self) -> None:
        """Settle the oldest write once it has ended; a stop while waiting leaves it queued, so :meth:`_stop` still
        says a case written meanwhile (it used to be taken off the queue first, and lost)."""
        wait((self.writes[0][1],))
        self._settle(*self.writes.popleft())

    def _tick(self, slices: int) -> None:
        """Progress of the case on the device; and the case before it, once written, is settled and said now,
        not when this one's inference ends (its line and the case count once lagged a whole case behind)."""
        if self.progress is not None:
            self.progress(slices)
        while self.writes and self.writes[0][1].done():
            self._settle_first()

    def _on_device(self, i: int, job: CaseJob, timing: CaseTiming, current: Future[Read]) -> None:
        """Case i's turn on the device; its post-processing and write go to the writer (queued in ``writes``).

        A function of its own, so that the case's voxels and labels are released when it returns.
        """
        try:
            read = current.result()
            taken = time.perf_counter()
            timing.read_s = read.read_s
            if i == 0:
                self.mark("first_read")
            shape = read.volume.array.shape
            streaming = StreamingPostprocessor(shape) if self.postprocess and self.overlap_postprocess else None
            labels = _infer_stage(self.runner, read, timing, self.batch, self._tick, self.infer_options, streaming)
            if i == 0:
                self.mark("first_inferred")
        except Exception as exc:  # in a folder, any case's failure is that case's alone
            if self.raise_errors:
                raise
            if isinstance(exc, ImportError) and (stop := wrapped_interrupt(exc)) is not None:
                raise stop from None  # a stop in a lazy import's set-up (a backend's, on its first batch) is a stop
            timing._log_failure(exc)
            self.writes.append((timing, _done((0.0, 0.0, 0.0))))
            return
        # As if the read had ended as the run took it: its wait for the run is start-up, not the case's.
        started = taken - (read.read_s + read.histogram_s)
        geometry, source = read.volume.geometry, read.volume.source
        del read  # the stored voxels are not needed for writing: free them before the next case
        finish = streaming if streaming is not None else self.postprocess
        # A stop between handing the case over and queueing its future (the writer may end the job before the
        # submit returns) would leave a write running unseen: the stop would not wait for it, nor say the case.
        # The hand-over is held together.
        with stop_signals_blocked():
            fut = self.writer.submit(_finish_stage, labels, geometry, source, job, finish, started, self.runner.stamp)
            self.writes.append((timing, fut))


def _file_system(path: Path) -> tuple[int, bool]:
    """Which file system a write to ``path`` lands on: the device of the folder it is written in (links followed,
    as the write follows them; the nearest folder there, where it is yet to be made), and whether that mount is
    read-only (a read-only bind mount shares its device with the writable one)."""
    for folder in Path(os.path.realpath(path)).parents:
        try:
            device = os.stat(folder).st_dev
        except OSError:  # not made yet, or unreadable: its parent's
            continue
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):  # Windows has no statvfs
            read_only = False
        return device, read_only
    return -1, False


def _not_tried(
    timing: CaseTiming,
    job: CaseJob,
    left: Sequence[CaseJob],
    full: Mapping[tuple[int, bool], str],
    said: set[tuple[int, bool]],
) -> None:
    """Mark ``job`` failed untried, its output's file system having taken no more writes. The first such case says
    it once for all those ``left`` there; each case's own line then says only that it was not tried."""
    where = _file_system(job.output)
    if where not in said:
        said.add(where)
        n = sum(_file_system(j.output) == where for j in left)
        log.error(
            "%s: no more writes there since case %s's failed; %s left for it not tried (free room and run again: "
            "finished cases are kept)",
            job.output.parent,
            full[where],
            f"{n} case{'' if n == 1 else 's'}",
        )
    timing._failed(FlareSegError(f"not tried: {job.output.parent} takes no more writes"))


def _done(value: tuple[float, float, float]) -> _Write:
    fut: _Write = Future()
    fut.set_result(value)
    return fut


def default_batch(runner: Runner) -> int:
    """The batch where the caller gives none: the runner's preferred one (an engine's profile opt, a CUDA graph's
    batch), else flare-infer's default for the runner's device (:func:`~flareseg.runtime.defaults.device_batch`: 2
    on the CPU, 8 on CUDA); always within the batches the runner takes."""
    batch = runner.preferred_batch or device_batch(runner.device.type)
    if runner.max_batch is not None:
        batch = min(batch, runner.max_batch)
    return max(batch, runner.min_batch or 1)


class RunOptions(TypedDict, total=False):
    """How cases run: the keyword options of :func:`run_cases`, which also documents them.

    :func:`segment_file` and :func:`segment_folder` pass them on unchanged.
    """

    batch_size: int | None
    postprocess: bool
    progress: Callable[[int], None] | None
    infer_options: dict[str, Any] | None
    warm_up: bool
    timeline: Timeline | None
    overlap_postprocess: bool
    read_threads: int
    reader: Reader | None


def segment_file(
    runner: Runner,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    output_type: OutputType = "nifti",
    overwrite: bool = False,
    on_case: Callable[[CaseTiming], None] | None = None,
    **options: Unpack[RunOptions],
) -> CaseTiming:
    """Segment one CT volume (NIfTI file or DICOM series folder) and write its result atomically.

    A file already at ``output_path`` is refused unless ``overwrite`` (as :func:`segment_folder`
    keeps finished cases); one that appears there while the case runs (another run's) is kept too, and the
    timing returned says ``skipped``. The input itself is never replaced.
    Foreseen errors (the input, the output, the model, a setting) are raised as :class:`FlareSegError`, in one
    line naming the file; a backend's own failure is raised as it is, with its traceback. Nothing is written for a
    failed case.
    ``on_case`` sees the case once its output is written, even if the run is then interrupted.
    ``options``: see :func:`run_cases`.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    job = dataclasses.replace(file_job(input_path, output_path, output_type), replace=overwrite)
    if not overwrite and os.path.lexists(output_path):
        raise OutputExistsError(f"{output_path}: exists, kept (overwrite=True replaces it; flare-infer: --overwrite)")
    (timing,) = run_cases(runner, [job], raise_errors=True, on_case=on_case, **options)
    return timing


def warn_kept_of_other_models(runner: Runner, kept: Sequence[tuple[str, Path, OutputType]]) -> None:
    """Say which results kept from an earlier run (case, output, type) name another model than the runner's, or
    none: a model retrained and run over its folder again would otherwise leave the old one's results standing
    beside the new, unsaid. They are kept all the same (a resume never replaces unasked)."""
    if not kept or runner.model_file is None:
        return
    try:
        stamp = runner.stamp()
    except FlareSegError:  # the run says it where it matters, for the outputs it writes
        return
    if stamp is None:
        return
    exported: list[str] | None = None  # what the runner's export was made from: read once, if ever needed
    other: list[str] = []
    unstamped: list[str] = []
    unnamed: list[str] = []
    for case, output, output_type in kept:
        made = result_model(output, output_type)
        if made is None:
            unnamed.append(case)
        elif made.sha256 is None:
            unstamped.append(case)
        else:
            if exported is None:  # an export's checkpoint made the same network's results
                exported = _exported_from(runner.model_file)
            if not any(digest.startswith(made.sha256) for digest in (stamp.sha256, *exported)):
                other.append(f"{case} ({made.name}, sha256:{made.sha256[:16]})")

    if other:
        # A result names its model file only: an export of the same checkpoint, the other way round than
        # _exported_from sees, is another file, and said as one.
        this = f"{stamp.name} (sha256:{stamp.sha256[:16]})"
        log.warning("%s, made by another model file than %s: %s", _kept_results(other), this, _redo(other))
    if unstamped:
        log.warning(
            "%s, made by flareseg without naming its model (an earlier version, or a callable runner): %s",
            _kept_results(unstamped), _redo(unstamped),
        )  # fmt: skip
    if unnamed:
        what = "not made by flareseg (another tool's, or copied in?)"
        log.warning("%s, %s: %s", _kept_results(unnamed), what, _redo(unnamed))


def _kept_results(cases: Sequence[str]) -> str:
    return f"{len(cases)} result{'' if len(cases) == 1 else 's'} kept from an earlier run"


def _redo(cases: Sequence[str]) -> str:
    return f"{first_few(cases)}; --overwrite redoes {'it' if len(cases) == 1 else 'them'}"


def warn_kept_of_other_postprocessing(
    kept: Sequence[CaseTiming], earlier: Iterable[Mapping[str, Any]], postprocess: bool
) -> None:
    """Say which results kept from an earlier run were made with the other post-processing setting than this
    run's, as the timings of the run that made them record it: a folder resumed with or without
    ``--no-postprocess`` would otherwise hold both kinds of label map, unsaid. ``earlier``: :func:`earlier_cases`'
    entries, of one timings file or several, the newest first (a result's first entry is taken). An earlier case
    is that result where it took the same input to the same output, paths resolved against the folder each run
    started in; a result whose run's timings are gone is not judged."""

    def place(paths: tuple[object, object], cwd: object) -> tuple[str, str] | None:
        where = cwd if isinstance(cwd, str) else os.getcwd()  # timings written before runs recorded their folder
        if not all(isinstance(p, str) and p for p in paths):
            return None
        try:
            found, made = (os.path.realpath(os.path.join(where, str(path))) for path in paths)
        except ValueError:  # a damaged file's path (a NUL byte): no result of this run's
            return None
        return found, made

    made_by: dict[tuple[str, str], bool] = {}
    for entry in earlier:
        context = entry.get("context")
        context = context if isinstance(context, Mapping) else {}
        setting = context.get("postprocess")
        at = place((entry.get("input"), entry.get("output")), context.get("cwd"))
        if isinstance(setting, bool) and at is not None:
            made_by.setdefault(at, setting)
    otherwise = []
    for r in kept:
        at = place((r.input, r.output), None)
        setting = made_by.get(at) if at is not None else None
        if setting is not None and setting != postprocess:
            otherwise.append(r.case)
    if otherwise:
        then, now = ("without", "post-processes") if postprocess else ("with", "does not (--no-postprocess)")
        log.warning(
            "%s, made %s post-processing (its run's timings say), where this run %s: %s",
            _kept_results(otherwise), then, now, _redo(otherwise),
        )  # fmt: skip


def _exported_from(model: Path) -> list[str]:
    """The SHA-256s of what an exported model was made from (its checkpoint; an engine's ONNX too), from its
    metadata; none for a checkpoint or an export whose metadata does not read."""
    from flareseg.export.metadata import read_onnx_metadata, read_sidecar
    from flareseg.runtime.runners import backend_for

    try:
        backend = backend_for(model)  # by its suffix, as the run chose its runner
        if backend == "onnxruntime":
            return [read_onnx_metadata(model).source_checkpoint_sha256]
        if backend == "tensorrt":
            data = read_sidecar(model)
            sources = [data.get("source_checkpoint_sha256"), (data.get("engine") or {}).get("source_onnx_sha256")]
            return [str(digest) for digest in sources if digest]
    except (FlareSegError, AttributeError):
        pass
    return []


def segment_folder(
    runner: Runner,
    inputs: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    output_type: OutputType = "nifti",
    overwrite: bool = False,
    on_case: Callable[[CaseTiming], None] | None = None,
    planned: Iterable[PlannedCase] | None = None,
    **options: Unpack[RunOptions],
) -> list[CaseTiming]:
    """Segment each input into ``out_dir`` (FLARE21 names); skip finished cases; go on after a failure.

    ``inputs``: NIfTI files and DICOM series folders, or what :func:`list_inputs` gives for a folder (its
    inputs by case name; the names are the inputs' own, so only the inputs are used).
    ``planned``: :func:`~flareseg.runtime.jobs.plan_folder` of these very inputs, output folder and options,
    made moments ago (a resumed run's done cases are then not checked again); None: planned here.
    ``options``: see :func:`run_cases`.
    """
    if isinstance(inputs, str | os.PathLike):  # a str is a Sequence too: its characters would each be a "case"
        raise FlareSegError(
            f"segment_folder takes a list of inputs, got the path {os.fspath(inputs)!r}; "
            "list_inputs(folder) lists a folder's cases"
        )
    out = Path(out_dir)  # made by the first write: a run that fails to start leaves no empty folder
    results: dict[int, CaseTiming] = {}
    jobs: list[tuple[int, CaseJob]] = []
    paths = [Path(p) for p in (inputs.values() if isinstance(inputs, Mapping) else inputs)]
    plan = plan_folder(paths, out, output_type, overwrite=overwrite) if planned is None else planned
    plan_cases: list[PlannedCase] = []
    for i, (path, case) in enumerate(zip(paths, plan, strict=True)):
        plan_cases.append(case)
        if case.input != path:
            raise FlareSegError(f"segment_folder: the plan given is not of these inputs ({case.input}, {path})")
        if case.status == "run":
            jobs.append((i, case.job))
            continue
        output = str(case.output) if case.output is not None else ""
        results[i] = CaseTiming(case=case.case, input=str(case.input), output=output, status=case.status)
        if case.error is not None:
            log.error("%s", case.error)
            results[i]._failed(case.error)
    for i in sorted(results):
        if on_case:
            on_case(results[i])
    ran = run_cases(runner, [job for _, job in jobs], on_case=on_case, **options)
    results.update({i: timing for (i, _), timing in zip(jobs, ran, strict=True)})
    # Said after the run, beside its tally: the model is hashed by then, and the first case did not wait for it.
    kept = [(c.case, c.output, c.output_type) for c in plan_cases if c.status == "skipped" and c.output is not None]
    warn_kept_of_other_models(runner, kept)
    return [results[i] for i in sorted(results)]


def segment_array(
    runner: Runner,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    batch_size: int | None = None,
    postprocess: bool = True,
    name: str = "array",
    infer_options: dict[str, Any] | None = None,
) -> np.ndarray:
    """Segment a CT held in memory; its uint8 label map on the same grid (same shape, same axes).

    ``array``: Hounsfield units on the voxel axes that ``affine`` maps to RAS+ mm, as
    nibabel gives a file's voxels and ``img.affine`` (see
    :func:`~flareseg.volume.volume_from_array`); it is checked as a file would be (3D or a
    trailing singleton fourth axis, finite, not a label map). The labels are those
    :func:`segment_file` writes for a file holding the same voxels and affine. The runner
    is activated here if it is not yet; the caller deactivates it. ``name`` stands for the volume in error messages.
    """
    volume = volume_from_array(array, affine, name=name)
    runner.activate()
    batch = batch_size if batch_size is not None else default_batch(runner)
    timing = CaseTiming(case=name, input=name, output="")
    labels = _infer_stage(runner, Read(volume, None, 0.0, 0.0), timing, batch, None, infer_options or {})
    if postprocess:
        labels = keep_largest_components(labels, in_place=True)
    out = np.empty_like(np.asarray(array), dtype=np.uint8)  # the input's memory layout, whatever it is
    np.copyto(out[..., 0] if out.ndim == 4 else out, from_canonical(labels, volume.geometry))
    return out


def summarize(results: Sequence[CaseTiming], wall_s: float) -> FolderSummary:
    return FolderSummary(
        cases=len(results),
        segmented=sum(r.status == "ok" for r in results),
        skipped=sum(r.status == "skipped" for r in results),
        failed=sum(r.status == "failed" for r in results),
        wall_s=wall_s,
    )


def earlier_cases(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The measured cases of the timings file at ``path``, by case name (those it kept from runs before it too),
    each with the context of the run that measured it; empty where there is no such file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    cases, context = data.get("cases"), data.get("context")
    found: dict[str, dict[str, Any]] = {}
    for case in cases if isinstance(cases, list) else []:
        if not isinstance(case, dict) or not isinstance(case.get("case"), str):
            continue
        if case.get("status") == "ok":
            found[case["case"]] = {**case, "context": context}  # the model, batch and machine it ran with
        elif isinstance(case.get("earlier_run"), dict):
            found[case["case"]] = case["earlier_run"]
    return found


def write_timings(
    results: Sequence[CaseTiming],
    path: str | os.PathLike[str],
    context: dict[str, Any],
    summary: FolderSummary | None = None,
    startup: dict[str, Any] | None = None,
    earlier: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Per-case timings, the run's summary, its start-up timeline and context (runner, batch, machine) as JSON.

    ``earlier``: measured cases of an earlier run (:func:`earlier_cases`); a case this run
    skipped as done keeps its measurement under ``earlier_run``, so a resumed run's file
    still holds every case's timings.
    """
    earlier = earlier or {}

    def kept(r: CaseTiming) -> Mapping[str, Any] | None:
        """The earlier measurement of a case skipped now: the same input into the same output only."""
        before = earlier.get(r.case) if r.status == "skipped" else None
        return before if before and (before.get("input"), before.get("output")) == (r.input, r.output) else None

    cases = [{**r.to_dict(), "earlier_run": dict(m)} if (m := kept(r)) else r.to_dict() for r in results]
    data: dict[str, Any] = {"context": context, "cases": cases}
    if summary is not None:
        data["summary"] = summary.to_dict()
    if startup is not None:
        data["startup"] = startup
    return write_text_atomic(json.dumps(data, indent=2) + "\n", path)


__all__ = [
    "OUTPUT_SUFFIXES",
    "CaseJob",
    "CaseTiming",
    "FolderSummary",
    "RunOptions",
    "earlier_cases",
    "list_cases",
    "list_inputs",
    "output_name",
    "read_case",
    "run_cases",
    "segment_array",
    "segment_file",
    "segment_folder",
    "summarize",
    "warn_kept_of_other_models",
    "warn_kept_of_other_postprocessing",
    "write_case",
    "write_timings",
]
