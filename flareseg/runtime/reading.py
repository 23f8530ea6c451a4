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
from typing import TYPE_CHECKING

from flareseg.volume import Volume, check_read_threads, read_ct

if TYPE_CHECKING:
    from flareseg.preprocess import ValueHistogram


def read_case(path: str | os.PathLike[str], *, threads: int = 1) -> Volume:
    """A NIfTI file, or a folder holding one DICOM series, in the canonical slice layout.

    ``threads``: cores that inflate a ``.nii.gz`` (see :func:`~flareseg.volume.read_ct`).
    """
    path = Path(path)
    if path.is_dir():
        from flareseg.dicom import read_series

        return read_series(path)
    return read_ct(path, threads=threads)


@dataclass
class Read:
    """What the reader thread hands over: the volume, its value histogram, and when and how long."""

    volume: Volume
    histogram: ValueHistogram | None
    started: float  # time.perf_counter() when the read began
    read_s: float
    histogram_s: float


def read_stage(path: Path, output_type: str = "nifti", threads: int = 1) -> Read:
    """Read a case and count its values (the percentiles' one pass), in the reader thread."""
    t0 = time.perf_counter()
    volume = read_case(path, threads=threads)
    if output_type == "dicom-seg":
        from flareseg.dicom import check_seg_writable

        check_seg_writable(volume)  # an anonymised series without UIDs fails now, not after inference
    t1 = time.perf_counter()
    # Imported here: a read started before torch's import waits for it only at this point.
    from flareseg.preprocess import value_histogram

    histogram = value_histogram(volume.array)
    return Read(volume, histogram, t0, t1 - t0, time.perf_counter() - t1)


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
