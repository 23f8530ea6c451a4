"""Pre-processing: percentile clipping (exact one-pass percentiles), streaming statistics, resizing, torch twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flareseg.preprocess as pre
from flareseg.errors import FlareSegError
from flareseg.preprocess import (
    NormalizationStats,
    TensorNormalizer,
    clip_bounds,
    compute_stats,
    exact_percentiles,
    network_batch,
    normalize_volume,
    resize_scores_to_labels,
    resize_slices,
    tensor_percentiles,
    value_histogram,
    volume_normalizer,
)


def _volumes(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(40, 300, (4 + i, 20, 17)).astype(np.float32) for i in range(n)]


def test_clip_bounds_are_the_volume_percentiles():
    vol = _volumes(1)[0]
    lo, hi = clip_bounds(vol)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(vol, [1, 99])))
    assert np.mean(vol < lo) == pytest.approx(0.01, abs=0.002)


def test_streaming_stats_equal_stats_of_all_clipped_voxels():
    vols = _volumes()
    clipped = np.concatenate([np.clip(v, *np.percentile(v, [1, 99])).ravel() for v in vols]).astype(np.float64)
    stats = compute_stats(iter(vols))  # a generator: one volume at a time
    # Volumes are clipped in float32, the reference in float64: agreement to float32 rounding.
    assert stats.mean == pytest.approx(clipped.mean(), rel=1e-6)
    assert stats.std == pytest.approx(clipped.std(), rel=1e-6)
    assert stats.num_voxels == clipped.size and stats.num_cases == 3


def test_stats_json_round_trip_and_validation():
    stats = NormalizationStats(mean=12.5, std=210.0, num_voxels=10, num_cases=1)
    assert NormalizationStats.from_json(stats.to_json()) == stats
    with pytest.raises(FlareSegError, match="positive std"):
        NormalizationStats(mean=0.0, std=0.0)
    with pytest.raises(FlareSegError, match="invalid normalisation statistics"):
        NormalizationStats.from_dict({"mean": 1.0})
    with pytest.raises(FlareSegError):
        compute_stats([])


def test_normalize_clips_per_volume_then_z_scores_with_dataset_stats():
    vol = _volumes(1)[0]
    stats = NormalizationStats(mean=30.0, std=200.0)
    lo, hi = np.percentile(vol, [1, 99])
    expected = (np.clip(vol, lo, hi) - 30.0) / 200.0
    out = normalize_volume(vol, stats)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert not np.shares_memory(out, vol)


def test_resize_is_bilinear_and_scores_are_resized_before_argmax():
    # A linear ramp stays linear under bilinear resizing (nearest would give steps).
    ramp = torch.linspace(0, 1, 8).repeat(8, 1)[None, None]
    up = resize_slices(ramp, (16, 16))
    assert len(torch.unique(up)) > 8
    assert resize_slices(ramp, (8, 8)) is ramp
    # Two classes whose scores cross between pixels: the boundary moves to the crossing.
    scores = torch.zeros(1, 2, 1, 4)
    scores[0, 1, 0] = torch.tensor([0.0, 0.2, 0.8, 1.0])
    scores[0, 0, 0] = 0.5
    labels = resize_scores_to_labels(scores, (1, 8))
    assert labels.dtype == torch.uint8
    assert labels[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


# --- Exact one-pass percentiles ------------------------------------------------------------------------------


def _bits(values) -> list[int]:
    """float64 bit patterns: equality of these is bit-identity (also tells 0.0 from -0.0)."""
    return [int(np.float64(v).view(np.int64)) for v in values]


def _numpy(volume, qs) -> list[float]:
    return [float(v) for v in np.percentile(volume, qs, method="linear")]


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
        assert _bits(exact_percentiles(vol, qs)) == _bits(_numpy(vol, qs)), (dtype, n, qs)


def test_exact_percentiles_edge_cases():
    # Constant volume, a single voxel, q = 0 and 100.
    assert exact_percentiles(np.full((3, 4, 5), -7, np.int16), (0, 1, 99, 100)) == (-7.0, -7.0, -7.0, -7.0)
    assert exact_percentiles(np.array([[[42]]], np.int16), (0.0, 1.0, 100.0)) == (42.0, 42.0, 42.0)
    assert exact_percentiles(np.array(-5, np.int16), (1.0, 99.0)) == (-5.0, -5.0)  # 0-d
    # Stride-0 (broadcast) views are counted too.
    bcast = np.broadcast_to(np.arange(-3, 4, dtype=np.int16), (5, 6, 7))
    assert _bits(exact_percentiles(bcast, (1.0, 99.0, 40.0))) == _bits(_numpy(bcast, (1.0, 99.0, 40.0)))
    # 101 voxels: percentile q lands exactly on rank q (no interpolation).
    vol = np.random.default_rng(1).permutation(np.arange(-500, -399)).astype(np.int16).reshape(101, 1, 1)
    assert exact_percentiles(vol, (1.0, 37.0, 99.0)) == (-499.0, -463.0, -401.0)
    assert _bits(exact_percentiles(vol, (1.0, 37.0, 99.0))) == _bits(_numpy(vol, (1.0, 37.0, 99.0)))
    # t = 0.5 exactly (numpy switches formula there) and negative values.
    two = np.array([-3, 8], np.int16).reshape(2, 1, 1)
    assert _bits(exact_percentiles(two, (50.0, 25.0, 75.0))) == _bits(_numpy(two, (50.0, 25.0, 75.0)))
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
        assert _bits(exact_percentiles(view, (1.0, 99.0))) == _bits(_numpy(view, (1.0, 99.0))), name
    # A flipped, transposed view of contiguous storage is counted from that storage: no copy.
    ordered = pre._memory_order(base[::-1, :, ::-1].transpose(2, 0, 1))
    assert ordered.flags.c_contiguous and np.shares_memory(ordered, base)


def test_numpy_wraps_where_adjacent_values_overflow_the_dtype_and_exact_percentiles_do_not():
    vol = np.array([-32768, 32767], np.int16).reshape(2, 1, 1)
    with np.errstate(over="ignore"):
        wrapped = float(np.percentile(vol, 50.0))
    assert wrapped == 32767.5  # numpy: (b - a) wraps to -1 in int16
    assert exact_percentiles(vol, (50.0,)) == (-0.5,)  # the true midpoint


def test_floats_and_wide_integer_ranges_fall_back_to_numpy(monkeypatch):
    rng = np.random.default_rng(3)
    floats = rng.normal(0, 300, (5, 17, 13)).astype(np.float32)
    assert _bits(exact_percentiles(floats, (1.0, 99.0))) == _bits(_numpy(floats, (1.0, 99.0)))
    wide = rng.integers(-(2**29), 2**29, (5, 17, 13)).astype(np.int32)
    assert _bits(exact_percentiles(wide, (1.0, 99.0))) == _bits(_numpy(wide, (1.0, 99.0)))
    # The histogram path itself on a chunked volume: more voxels than one bincount call takes.
    monkeypatch.setattr(pre, "_CHUNK", 1000)
    vol = rng.integers(-1024, 3000, (9, 31, 17)).astype(np.int16)
    assert _bits(exact_percentiles(vol[:, ::-1], (1.0, 99.0))) == _bits(_numpy(vol[:, ::-1], (1.0, 99.0)))
    assert _bits(exact_percentiles(vol[:, ::2], (1.0, 99.0))) == _bits(_numpy(vol[:, ::2], (1.0, 99.0)))


@pytest.mark.parametrize("slope", [1.0, 0.5, -2.0])
def test_volume_normalizer_bounds_equal_numpy_percentiles_of_the_hu_volume(slope):
    stored = np.random.default_rng(4).integers(-1024, 3071, (6, 20, 19)).astype(np.int16)
    stats = NormalizationStats(mean=10.0, std=100.0)
    normalizer = volume_normalizer(stored, stats, slope=slope, inter=-1024.0)
    lo, hi = np.percentile(stored, (1.0, 99.0))  # today's formula: percentiles of stored values mapped to HU
    lo, hi = lo * slope - 1024.0, hi * slope - 1024.0
    if slope < 0:
        lo, hi = hi, lo
    assert (normalizer.lo, normalizer.hi) == (lo, hi)
    hu = stored.astype(np.float64) * slope - 1024.0
    assert (normalizer.lo, normalizer.hi) == pytest.approx(tuple(np.percentile(hu, (1.0, 99.0))), abs=1e-9)


# --- The torch twin ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [(np.int16, -1024, 3071), (np.int32, -70_000, 70_000), (np.uint8, 0, 255), (np.int8, -60, 60), (np.int64, -5, 9)],
)
def test_tensor_percentiles_equal_numpy_on_integer_tensors(dtype, low, high):
    rng = np.random.default_rng(5)
    for n in (1, 2, 101, 2000):
        vol = rng.integers(low, high, (n, 1, 1), endpoint=True).astype(dtype)
        qs = [1.0, 99.0, 0.0, 100.0, *rng.uniform(0, 100, 2).tolist()]
        assert _bits(tensor_percentiles(torch.from_numpy(vol), qs)) == _bits(_numpy(vol, qs)), (dtype, n)


def test_tensor_percentiles_on_floats_and_wide_ranges_use_order_statistics():
    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float64):
        vol = rng.normal(40, 300, (4, 19, 11)).astype(dtype)
        assert _bits(tensor_percentiles(torch.from_numpy(vol), (1.0, 99.0, 50.0))) == _bits(
            _numpy(vol, (1.0, 99.0, 50.0))
        )
    wide = rng.integers(-(2**29), 2**29, (4, 19, 11)).astype(np.int32)
    assert _bits(tensor_percentiles(torch.from_numpy(wide), (1.0, 99.0))) == _bits(_numpy(wide, (1.0, 99.0)))
    # Non-contiguous tensors (a flipped view) give the same numbers.
    vol = rng.integers(-1024, 2000, (4, 19, 11)).astype(np.int16)
    t = torch.from_numpy(vol).flip(1).transpose(0, 2)
    assert _bits(tensor_percentiles(t, (1.0, 99.0))) == _bits(_numpy(vol, (1.0, 99.0)))


@pytest.mark.parametrize(
    ("dtype", "slope", "inter"),
    [
        (np.int16, 1.0, 0.0),
        (np.int16, 0.5, -1024.0),
        (np.uint16, 1.0, -1024.0),
        (np.int32, -1.5, 7.25),
        (np.uint8, 1.0, 0.0),
        (np.float32, 1.0, 0.0),
        (np.float64, 0.3, 1.1),
    ],
)
def test_tensor_normalizer_is_bit_identical_to_the_numpy_normalizer(dtype, slope, inter):
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    low, high = (max(info.min, -3000), min(info.max, 3000)) if info else (-3000, 3000)
    stored = rng.uniform(low, high, (5, 24, 40)).astype(dtype)
    stats = NormalizationStats(mean=-43.21, std=311.7)
    normalizer = volume_normalizer(stored, stats, slope=slope, inter=inter)
    expected = normalizer(stored)
    source = torch.from_numpy(stored if np.dtype(dtype) != np.uint16 else stored.astype(np.int32))
    got = TensorNormalizer(normalizer)(source)
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy().view(np.int32), expected.view(np.int32))  # bit for bit
    # And the network batch: the same resize of the same float32 slices.
    for size, channels in (((64, 64), 3), ((24, 40), 1), ((32, 16), 1)):
        ref = network_batch(expected, size, channels)
        out = TensorNormalizer(normalizer).network_batch(source, size, channels)
        assert out.shape == ref.shape and out.is_contiguous()
        assert torch.equal(out, ref)


def test_tensor_normalizer_never_modifies_its_input():
    stored = torch.linspace(-2000, 2000, 5 * 8 * 8).reshape(5, 8, 8)
    before = stored.clone()
    normalizer = volume_normalizer(stored.numpy(), NormalizationStats(mean=0.0, std=100.0))
    out = TensorNormalizer(normalizer)(stored)
    assert torch.equal(stored, before) and out.data_ptr() != stored.data_ptr()
    with pytest.raises(FlareSegError, match="expected"):
        TensorNormalizer(normalizer).network_batch(stored[0], (8, 8), 1)


def test_a_histogram_counted_beforehand_gives_the_same_normaliser():
    rng = np.random.default_rng(7)
    stats = NormalizationStats(-250.0, 400.0, (0.5, 99.5))
    volumes = [
        rng.normal(0, 500, (6, 30, 40)).astype(np.int16)[:, ::-1],
        rng.integers(0, 255, (5, 20, 20), dtype=np.uint8),
        (rng.normal(0, 3000, (4, 16, 16)).astype(np.int32) * 7).transpose(2, 0, 1),
    ]
    for volume in volumes:
        hist = value_histogram(volume)
        assert hist is not None and hist.voxels == volume.size
        assert hist.percentiles((0.5, 99.5)) == tuple(np.percentile(volume, (0.5, 99.5)))
        for slope, inter in ((1.0, 0.0), (-0.5, 10.0)):
            assert volume_normalizer(volume, stats, slope, inter, hist) == volume_normalizer(
                volume, stats, slope, inter
            )
    assert value_histogram(np.zeros((2, 3, 4), np.float32)) is None  # float CT: np.percentile
    with pytest.raises(FlareSegError, match="counts 24 voxels, but the volume has 12"):
        volume_normalizer(
            np.zeros((1, 3, 4), np.int16), stats, histogram=value_histogram(np.zeros((2, 3, 4), np.int16))
        )
