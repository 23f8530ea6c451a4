"""Exact percentiles of integer CT from a histogram of its stored values, without torch.

numpy's ``np.percentile`` sorts a float copy of the volume; counting the stored integers
once gives the same numbers bit for bit (see :func:`exact_percentiles`). This module
imports numpy only, so that the reader thread can count a volume while another thread
imports torch, and :class:`ValueCounter` counts the voxels while they are still being
inflated.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from flareseg.errors import FlareSegError

#: Integer dtypes whose percentiles come from a histogram of the stored values (one pass, exact).
_SMALL_INTS = (np.int8, np.uint8, np.int16, np.uint16)
_WIDE_INTS = (np.int32, np.uint32)
#: Widest value range (max - min + 1) histogrammed for 4-byte integers; wider ranges use np.percentile.
MAX_HISTOGRAM_BINS = 1 << 22
#: Voxels counted per np.bincount call: bounds its temporary intp copy (8 MB) while amortising the call.
_CHUNK = 1 << 20


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, ...]:
    """The percentiles as floats, each checked to lie in [0, 100]."""
    qs = tuple(float(p) for p in percentiles)
    if not all(0.0 <= q <= 100.0 for q in qs):  # also refuses NaN
        raise FlareSegError(f"percentiles must lie in [0, 100], got {tuple(percentiles)}")
    return qs


def order_statistics(n: int, q: float) -> tuple[int, int, float]:
    """numpy's 'linear' method: the two order statistics (0-based) around q and the interpolation weight.

    Written after numpy's ``_quantile``/``_get_indexes``/``_get_gamma`` so that the float64
    arithmetic is the same: virtual index (n - 1) * (q / 100), floor and next; an index at
    or past the last element takes the last one, with weight ``index + 1`` as numpy has it.
    """
    virtual = (n - 1) * (q / 100.0)
    if virtual >= n - 1:
        return n - 1, n - 1, virtual + 1.0
    below = math.floor(virtual)
    return below, below + 1, virtual - below


def numpy_lerp(a: float, b: float, diff: float, t: float) -> float:
    """numpy's ``_lerp``: a + (b - a) t, switching to b - (b - a)(1 - t) for t >= 0.5 (exact at t = 1)."""
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def _memory_order(volume: np.ndarray) -> np.ndarray:
    """A view of the same voxels with flips undone and axes ordered by stride: contiguous if the storage is.

    A histogram does not care about voxel order, so a flipped or transposed view of a
    contiguous buffer (nibabel's Fortran-ordered arrays seen through a reorientation) is
    counted straight from its storage, without a copy.
    """
    flips = tuple(slice(None, None, -1) if st < 0 else slice(None) for st in volume.strides)
    v = volume[flips]
    return v.transpose(sorted(range(v.ndim), key=lambda i: -v.strides[i]))


def _pieces(volume: np.ndarray) -> Iterator[np.ndarray]:
    """The voxels as 1-D pieces of at most ``_CHUNK`` each: views where the storage is contiguous, else slab copies."""
    v = _memory_order(volume)
    if v.flags.c_contiguous:
        yield from _chunks(v.reshape(-1))
        return
    # Non-contiguous storage (a crop, a strided view): slabs along the slowest axis, copied one at a time
    # (one row may itself be larger than a chunk).
    per_row = max(1, v[0].size) if v.ndim > 1 else 1
    rows = max(1, _CHUNK // per_row)
    for i in range(0, v.shape[0], rows):
        yield from _chunks(np.ascontiguousarray(v[i : i + rows]).reshape(-1))


def _chunks(flat: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, flat.size, _CHUNK):
        yield flat[i : i + _CHUNK]


def _bit_pattern_counts(dtype: np.dtype) -> np.ndarray:
    """Zeroed counts for every bit pattern of an 8- or 16-bit integer dtype."""
    return np.zeros(1 << (8 * dtype.itemsize), dtype=np.int64)


def _count_bit_patterns(piece: np.ndarray, counts: np.ndarray) -> None:
    """Add a 1-D piece of 8/16-bit integers to ``counts``, indexed by unsigned bit pattern.

    Counting the unsigned patterns needs no offset arithmetic and no min/max pass;
    :func:`_by_value` puts a signed type's negative half below its positive half after.
    """
    unsigned = np.dtype(f"u{piece.dtype.itemsize}").newbyteorder(piece.dtype.byteorder)  # NIfTI may be big-endian
    counts += np.bincount(piece.view(unsigned), minlength=counts.size)


def _by_value(counts: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Bit-pattern counts -> counts by value from the dtype's smallest, and that smallest value."""
    if dtype.kind == "i":
        half = counts.size // 2
        return np.roll(counts, half), -half
    return counts, 0


def _integer_histogram(volume: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Counts of every stored integer value from the smallest up, and that smallest value; None if too wide."""
    dtype = volume.dtype
    if dtype.type in _SMALL_INTS:
        counts = _bit_pattern_counts(dtype)
        for piece in _pieces(volume):
            _count_bit_patterns(piece, counts)
        return _by_value(counts, dtype)
    if dtype.type in _WIDE_INTS:
        low, high = int(volume.min()), int(volume.max())
        if high - low + 1 > MAX_HISTOGRAM_BINS:
            return None
        counts = np.zeros(high - low + 1, dtype=np.int64)
        buf = np.empty(_CHUNK, dtype=np.intp)
        for piece in _pieces(volume):
            offsets = buf[: piece.size]
            np.subtract(piece, low, out=offsets, dtype=np.intp, casting="unsafe")
            counts += np.bincount(offsets, minlength=counts.size)
        return counts, low
    return None


def _percentiles_from_counts(counts: np.ndarray, low: int, qs: tuple[float, ...]) -> tuple[float, ...]:
    """Percentiles from a histogram of integer values ``low, low + 1, ...``: numpy's linear method, exactly."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    out = []
    for q in qs:
        i, j, t = order_statistics(n, q)
        # The value of order statistic k is the first bin whose cumulative count exceeds k.
        a, b = (int(v) + low for v in np.searchsorted(cumulative, (i, j), side="right"))
        # (b - a) in float64 is exact for these integers; numpy subtracts in the stored
        # dtype and wraps when they differ by more than the dtype's maximum (see exact_percentiles).
        out.append(numpy_lerp(float(a), float(b), float(b) - float(a), t))
    return tuple(out)


@dataclass(frozen=True, eq=False)  # an array field: equality would be ambiguous
class ValueHistogram:
    """How many voxels hold each stored integer value, from ``low`` up: all that exact percentiles need.

    The pipeline counts it in its reader thread, while a ``.nii.gz`` is inflated
    (:class:`ValueCounter`) or right after any other read, so that the percentiles cost
    nothing on the path to the device.
    """

    counts: np.ndarray
    low: int

    @property
    def voxels(self) -> int:
        return int(self.counts.sum())

    def percentiles(self, percentiles: Sequence[float]) -> tuple[float, ...]:
        """``np.percentile`` of the counted volume (linear method), bit for bit; see :func:`exact_percentiles`."""
        return _percentiles_from_counts(self.counts, self.low, check_percentiles(percentiles))


def value_histogram(volume: np.ndarray) -> ValueHistogram | None:
    """The histogram of an integer volume's stored values, in one pass; None for float volumes and wide ranges."""
    volume = np.asarray(volume)
    if volume.size == 0:
        raise FlareSegError("cannot take percentiles of an empty volume")
    volume = volume.reshape(1) if volume.ndim == 0 else volume
    hist = _integer_histogram(volume) if volume.dtype.kind in "iu" else None
    return ValueHistogram(*hist) if hist is not None else None


def exact_percentiles(volume: np.ndarray, percentiles: Sequence[float]) -> tuple[float, ...]:
    """``np.percentile(volume, percentiles)`` (linear method) in one pass, bit for bit, for integer volumes.

    Integer volumes of up to 16 bits (and 32-bit ones whose value range is at most
    ``MAX_HISTOGRAM_BINS``) are counted with ``np.bincount`` a chunk at a time, straight
    from their storage when it is contiguous in any axis order; the two order statistics
    around each percentile are read off the cumulative counts and interpolated with
    numpy's own formula. No sort, no float copy. Other dtypes (float CT) use np.percentile.

    One deliberate difference: numpy computes ``b - a`` in the stored integer dtype, which
    wraps when adjacent order statistics differ by more than its maximum (e.g. -32768 and
    1 in int16) and then returns a value outside [a, b]; here ``b - a`` is exact.
    """
    qs = check_percentiles(percentiles)
    hist = value_histogram(volume)
    if hist is None:
        return tuple(float(v) for v in np.percentile(volume, qs))
    return hist.percentiles(qs)


class ValueCounter:
    """Counts a volume's 8- or 16-bit stored values while the volume is still being read.

    The reader hands over each stretch of freshly inflated voxels with :meth:`add`; a
    thread of the counter's own counts them, so the counting hides behind the inflate
    (ISA-L and zlib give the GIL back while they work). Order does not matter to a
    histogram, so pieces are counted as they come, in storage order. :meth:`result`
    waits for the last piece and returns the histogram, equal to :func:`value_histogram`
    of the whole volume; it returns None when the pieces did not cover exactly the
    volume's voxels (another reader, a wider dtype), and the caller counts the volume
    as before. A context manager: leaving it stops the thread, after an error too.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[np.ndarray | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._dtype: np.dtype | None = None
        self._counts: np.ndarray | None = None
        self._added = 0
        self._usable = True  # False: result() says None (and pieces still queued are skipped)
        self._closed = False
        self._error: BaseException | None = None

    def add(self, piece: np.ndarray) -> None:
        """Count a 1-D piece of stored values (a view that stays valid); other dtypes turn the counter off."""
        if not self._usable:
            return
        mixed = self._dtype is not None and piece.dtype != self._dtype
        if self._closed or piece.ndim != 1 or piece.dtype.type not in _SMALL_INTS or mixed:
            self._usable = False  # the caller counts the whole volume instead
            return
        if self._thread is None:
            counts = _bit_pattern_counts(piece.dtype)
            thread = threading.Thread(target=self._count, args=(counts,), name="flareseg-count", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: the caller counts the whole volume after the read
                self._usable = False
                return
            self._dtype, self._counts, self._thread = piece.dtype, counts, thread
        self._added += piece.size
        self._queue.put(piece)

    def _count(self, counts: np.ndarray) -> None:
        while (piece := self._queue.get()) is not None:
            if self._error is not None or not self._usable:
                continue  # drain: an error is raised by result(); unusable counts are not needed
            try:
                for i in range(0, piece.size, _CHUNK):
                    _count_bit_patterns(piece[i : i + _CHUNK], counts)
            except BaseException as exc:  # MemoryError for the bincount temporary, say
                self._error = exc

    def close(self, *, discard: bool = False) -> None:
        """Stop the counting thread once it has counted what it was given (``discard``: without counting the rest)."""
        self._closed = True
        if discard:
            self._usable = False
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def result(self, volume: np.ndarray) -> ValueHistogram | None:
        """The histogram of ``volume``'s stored values, if the pieces counted were exactly its voxels; else None."""
        self.close()
        if self._error is not None:
            raise self._error
        if not self._usable or self._counts is None or self._added != volume.size or self._dtype != volume.dtype:
            return None
        return ValueHistogram(*_by_value(self._counts, self._dtype))

    def __enter__(self) -> ValueCounter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(discard=exc_type is not None)
