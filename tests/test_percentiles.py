"""Exact percentiles from a histogram of stored integers, counted whole or piece by piece while a file inflates."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import float_bits, numpy_percentiles

import flareseg.percentiles as percentiles
from flareseg.errors import FlareSegError
from flareseg.percentiles import ValueCounter, exact_percentiles, value_histogram

# (dtype, low, high): ranges where adjacent values never differ by more than the dtype's maximum, so
# numpy's in-dtype subtraction does not wrap (that case is tested separately below).
_INT_CASES = [
    (np.int16, -1024, 3071),
    (np.int16, -16000, 16000),
    (np.uint16, 0, 65535),
    (np.int32, -50_000, 2_000_000),
    (np.uint32, 10, 3_000_000),
    (np.int8, -60, 60),
    (np.uint8, 0, 255),
]


@pytest.mark.parametrize(("dtype", "low", "high"), _INT_CASES)
def test_exact_percentiles_equal_numpy_bit_for_bit_on_random_integer_volumes(dtype, low, high):
    rng = np.random.default_rng([np.dtype(dtype).num, abs(low)])
    for trial in range(40):
        n = int(rng.choice([1, 2, 3, 7, 100, 101, 1000, 4099, 30_000]))
        if trial % 3 == 0:  # clustered values: many ties, percentiles between equal neighbours
            vol = rng.integers(low, low + 5, n, endpoint=True)
        else:
            vol = rng.integers(low, high, n, endpoint=True)
        vol = vol.astype(dtype).reshape(n, 1, 1)
        qs = [1.0, 99.0, *rng.uniform(0, 100, 3).tolist(), 0.0, 100.0, 50.0]
        assert float_bits(exact_percentiles(vol, qs)) == float_bits(numpy_percentiles(vol, qs)), (dtype, n, qs)


def test_exact_percentiles_edge_cases():
    # Constant volume, a single voxel, q = 0 and 100.
    assert exact_percentiles(np.full((3, 4, 5), -7, np.int16), (0, 1, 99, 100)) == (-7.0, -7.0, -7.0, -7.0)
    assert exact_percentiles(np.array([[[42]]], np.int16), (0.0, 1.0, 100.0)) == (42.0, 42.0, 42.0)
    assert exact_percentiles(np.array(-5, np.int16), (1.0, 99.0)) == (-5.0, -5.0)  # 0-d
    # Stride-0 (broadcast) views are counted too.
    bcast = np.broadcast_to(np.arange(-3, 4, dtype=np.int16), (5, 6, 7))
    assert float_bits(exact_percentiles(bcast, (1.0, 99.0, 40.0))) == float_bits(
        numpy_percentiles(bcast, (1.0, 99.0, 40.0))
    )
    # 101 voxels: percentile q lands exactly on rank q (no interpolation).
    vol = np.random.default_rng(1).permutation(np.arange(-500, -399)).astype(np.int16).reshape(101, 1, 1)
    assert exact_percentiles(vol, (1.0, 37.0, 99.0)) == (-499.0, -463.0, -401.0)
    assert float_bits(exact_percentiles(vol, (1.0, 37.0, 99.0))) == float_bits(
        numpy_percentiles(vol, (1.0, 37.0, 99.0))
    )
    # t = 0.5 exactly (numpy switches formula there) and negative values.
    two = np.array([-3, 8], np.int16).reshape(2, 1, 1)
    assert float_bits(exact_percentiles(two, (50.0, 25.0, 75.0))) == float_bits(
        numpy_percentiles(two, (50.0, 25.0, 75.0))
    )
    with pytest.raises(FlareSegError, match=r"percentiles must lie in \[0, 100\]"):
        exact_percentiles(two, (1.0, 101.0))
    with pytest.raises(FlareSegError, match="empty volume"):
        exact_percentiles(np.zeros((0, 4, 4), np.int16), (1.0, 99.0))


def test_exact_percentiles_on_views_without_copying_the_volume():
    rng = np.random.default_rng(2)
    base = np.asfortranarray(rng.integers(-1024, 2000, (37, 29, 23)).astype(np.int16))
    views = {
        "fortran": base,
        "canonical (Z, Y, X) of a Fortran array": base.transpose(2, 1, 0),
        "flipped": base[::-1, :, ::-1].transpose(2, 0, 1),
        "strided crop": base[3:30:2, ::3, 1:],
        "C copy": np.ascontiguousarray(base),
        "big-endian": base.astype(">i2"),
        "big-endian int32": base.astype(">i4")[::-1],
        "big-endian uint16": (base.astype(np.int32) + 2000).astype(">u2"),
    }
    for name, view in views.items():
        assert float_bits(exact_percentiles(view, (1.0, 99.0))) == float_bits(numpy_percentiles(view, (1.0, 99.0))), (
            name
        )
    # A flipped, transposed view of contiguous storage is counted from that storage: no copy.
    ordered = percentiles._memory_order(base[::-1, :, ::-1].transpose(2, 0, 1))
    assert ordered.flags.c_contiguous and np.shares_memory(ordered, base)


def test_a_crop_that_is_not_contiguous_is_copied_a_slab_at_a_time():
    """A crop of a larger volume must be copied to be counted: a slice at a time, not the whole crop at once."""
    import tracemalloc

    crop = np.zeros((100, 512, 512), np.int16)[:, 50:450, 50:450]
    tracemalloc.start()
    try:
        assert exact_percentiles(crop, (1.0, 99.0)) == (0.0, 0.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < crop.nbytes / 2, f"{peak / 2**20:.1f} MiB copied for a {crop.nbytes / 2**20:.1f} MiB crop"


def test_numpy_wraps_where_adjacent_values_overflow_the_dtype_and_exact_percentiles_do_not():
    vol = np.array([-32768, 32767], np.int16).reshape(2, 1, 1)
    with np.errstate(over="ignore"):
        wrapped = float(np.percentile(vol, 50.0))
    assert wrapped == 32767.5  # numpy: (b - a) wraps to -1 in int16
    assert exact_percentiles(vol, (50.0,)) == (-0.5,)  # the true midpoint


def test_floats_and_wide_integer_ranges_fall_back_tonumpy_percentiles(monkeypatch):
    rng = np.random.default_rng(3)
    floats = rng.normal(0, 300, (5, 17, 13)).astype(np.float32)
    assert float_bits(exact_percentiles(floats, (1.0, 99.0))) == float_bits(numpy_percentiles(floats, (1.0, 99.0)))
    wide = rng.integers(-(2**29), 2**29, (5, 17, 13)).astype(np.int32)
    assert float_bits(exact_percentiles(wide, (1.0, 99.0))) == float_bits(numpy_percentiles(wide, (1.0, 99.0)))
    # The histogram path itself on a chunked volume: more voxels than one bincount call takes.
    monkeypatch.setattr(percentiles, "_CHUNK", 1000)
    vol = rng.integers(-1024, 3000, (9, 31, 17)).astype(np.int16)
    assert float_bits(exact_percentiles(vol[:, ::-1], (1.0, 99.0))) == float_bits(
        numpy_percentiles(vol[:, ::-1], (1.0, 99.0))
    )
    assert float_bits(exact_percentiles(vol[:, ::2], (1.0, 99.0))) == float_bits(
        numpy_percentiles(vol[:, ::2], (1.0, 99.0))
    )
    # A strided view whose one row (a slab's smallest copy) is larger than a chunk, 16- and 32-bit.
    for dtype in (np.int16, np.int32, np.uint32):
        big = rng.integers(0, 3000, (3, 40, 60)).astype(dtype)[:, :, ::2]  # rows of 1,200 voxels
        assert float_bits(exact_percentiles(big, (1.0, 99.0))) == float_bits(numpy_percentiles(big, (1.0, 99.0)))


# --- Counting while a file inflates ------------------------------------------------------------------------


def _split(flat: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    cuts = np.sort(rng.integers(0, flat.size, int(rng.integers(0, 6))))
    return np.split(flat, cuts)  # empty pieces included


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, ">i2", ">u2"])
def test_counting_pieces_in_any_split_equals_counting_the_volume(dtype, monkeypatch):
    monkeypatch.setattr(percentiles, "_CHUNK", 777)  # pieces longer than one bincount call, too
    rng = np.random.default_rng(11)
    info = np.iinfo(np.dtype(dtype))
    for trial in range(6):
        volume = rng.integers(info.min, info.max, (3, 17, 19), endpoint=True).astype(dtype)
        if trial % 2:
            volume = volume[:, ::-1].transpose(2, 0, 1)  # how the pipeline sees it: a flipped view
        with ValueCounter() as counter:
            for piece in _split(np.asfortranarray(volume).ravel(order="K"), rng):
                counter.add(piece)
            counted = counter.result(volume)
        whole = value_histogram(volume)
        assert counted is not None and whole is not None
        np.testing.assert_array_equal(counted.counts, whole.counts)
        assert counted.low == whole.low
        assert counted.percentiles((0.5, 99.5)) == tuple(numpy_percentiles(volume, (0.5, 99.5)))


def test_a_counter_says_none_unless_its_pieces_were_exactly_the_volume():
    volume = np.arange(-60, 60, dtype=np.int16).reshape(2, 6, 10)
    flat = volume.reshape(-1)
    cases = {
        "nothing added (another reader)": [],
        "too few voxels": [flat[:-1]],
        "too many voxels": [flat, flat[:1]],
        "a wider dtype": [flat.astype(np.int32)],
        "mixed dtypes": [flat[:60], flat[60:].astype(np.uint16)],
        "not 1-D": [volume],
    }
    for name, pieces in cases.items():
        counter = ValueCounter()
        for piece in pieces:
            counter.add(piece)
        assert counter.result(volume) is None, name
    counter = ValueCounter()
    counter.add(flat)
    assert counter.result(volume.astype(np.uint16)) is None  # same count, other dtype
    counter.add(flat)  # added after the result: refused, not counted from zero again
    assert counter.result(volume) is None


def test_a_counting_error_is_raised_by_result_and_leaving_on_an_error_stops_the_thread(monkeypatch):
    def fail(piece, counts):
        raise MemoryError("no room for the bincount temporary")

    monkeypatch.setattr(percentiles, "_count_bit_patterns", fail)
    counter = ValueCounter()
    counter.add(np.zeros(10, np.int16))
    with pytest.raises(MemoryError, match="no room"):
        counter.result(np.zeros(10, np.int16))
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="read failed"), ValueCounter() as counter:
        counter.add(np.zeros(10, np.int16))
        thread = counter._thread
        raise RuntimeError("read failed")
    assert thread is not None and not thread.is_alive() and counter.result(np.zeros(10, np.int16)) is None


def test_without_a_thread_to_count_in_the_counter_says_none(monkeypatch):
    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(percentiles.threading.Thread, "start", no_thread)
    with ValueCounter() as counter:
        counter.add(np.zeros(10, np.int16))
        assert counter.result(np.zeros(10, np.int16)) is None  # the caller counts the whole volume instead
