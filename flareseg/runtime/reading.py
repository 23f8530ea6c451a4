"""The pipeline's read stage, and its reader thread, without torch.

This module imports neither torch nor the runners, so that ``flare-infer`` can start
reading its first volume before those imports: a fresh process then reads while torch
loads (zlib/ISA-L release the GIL), instead of after it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flareseg.percentiles import ValueCounter, ValueHistogram, value_histogram
from flareseg.volume import Volume, VoxelsCallback, check_read_threads, read_ct


def read_case(path: str | os.PathLike[str], *, threads: int = 1, on_voxels: VoxelsCallback | None = None) -> Volume:
    """A NIfTI file, or a folder holding one DICOM series, in the canonical slice layout.

    ``threads`` and ``on_voxels``: see :func:`~flareseg.volume.read_ct` (a series calls no ``on_voxels``).
    """
    path = Path(path)
    if path.is_dir():
        from flareseg.dicom import read_series

        return read_series(path)
    return read_ct(path, threads=threads, on_voxels=on_voxels)


@dataclass
class Read:
    """What the reader thread hands over: the volume, its value histogram, and how long each took.

    ``histogram_s``: counting that did not hide behind the read (the wait for the counter
    to finish, or the whole count when the voxels could not be counted while inflating).
    """

    volume: Volume
    histogram: ValueHistogram | None
    read_s: float
    histogram_s: float


def read_stage(path: Path, output_type: str = "nifti", threads: int = 1) -> Read:
    """Read a case and count its values (the percentiles' one pass), in the reader thread.

    A ``.nii.gz`` of 8- or 16-bit integers (CT's int16) is counted while it inflates, in a
    second thread; any other read is counted after it.
    """
    t0 = time.perf_counter()
    with ValueCounter() as counter:
        volume = read_case(path, threads=threads, on_voxels=counter.add)
        if output_type == "dicom-seg":
            from flareseg.dicom import check_seg_writable

            check_seg_writable(volume)  # an anonymised series without UIDs fails now, not after inference
        t1 = time.perf_counter()
        histogram = counter.result(volume.array)
    if histogram is None:
        histogram = value_histogram(volume.array)
    return Read(volume, histogram, t1 - t0, time.perf_counter() - t1)


class Reader:
    """The reader thread of a run; :meth:`prefetch` starts a read before the run knows its jobs.

    :meth:`submit` hands out a prefetched read of the same input once, and reads anything
    else in turn. A context manager: on leaving it, reads not yet begun are cancelled and
    the one under way is awaited (after an error, left to end on its own).
    """

    def __init__(self, threads: int = 1) -> None:
        check_read_threads(threads)
        self.threads = threads
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flareseg-read")
        self._early: dict[tuple[Path, str], Future[Read]] = {}

    def prefetch(self, path: str | os.PathLike[str], output_type: str = "nifti") -> None:
        key = (Path(path), output_type)
        if key not in self._early:
            self._early[key] = self._pool.submit(read_stage, key[0], output_type, self.threads)

    def submit(self, path: str | os.PathLike[str], output_type: str = "nifti") -> Future[Read]:
        early = self._early.pop((Path(path), output_type), None)
        return early if early is not None else self._pool.submit(read_stage, Path(path), output_type, self.threads)

    def close(self, *, wait: bool = True) -> None:
        """Cancel the reads not yet begun; ``wait`` for the one under way (False: it ends on its own)."""
        self._early.clear()  # a prefetched read nobody asked for is dropped with its voxels
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # After an error, say it now rather than after a read that is no longer needed.
        self.close(wait=exc_type is None)


__all__ = ["Read", "Reader", "read_case", "read_stage"]
