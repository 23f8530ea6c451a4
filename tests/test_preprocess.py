"""Pre-processing: percentile clipping (exact one-pass percentiles), streaming statistics, resizing, torch twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flareseg.errors import FlareSegError
from flareseg.percentiles import value_histogram
from flareseg.preprocess import (
    NormalizationStats,
    TensorNormalizer,
    clip_bounds,
    clip_volume,
    compute_stats,
    network_batch,
    normalize_volume,
    resize_labels,
    resize_scores_to_labels,
    resize_slices,
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


def _whole_volume_stats(volumes, percentiles=(1.0, 99.0)):
    """The statistics as computed before compute_stats streamed slices: float64 copies of each whole volume."""
    n_total, mean_total, m2_total = 0, 0.0, 0.0
    for volume in volumes:
        lo, hi = np.percentile(volume, percentiles)
        clipped = np.clip(volume, lo, hi, dtype=np.float32).astype(np.float64)
        n, mean = clipped.size, float(clipped.mean())
        m2 = float(np.square(clipped - mean).sum())
        delta, n_new = mean - mean_total, n_total + clipped.size
        mean_total += delta * n / n_new
        m2_total += m2 + delta * delta * n_total * n / n_new
        n_total = n_new
    return mean_total, float(np.sqrt(m2_total / n_total)), n_total


@pytest.mark.parametrize("chunk", [1, 300, 1 << 20])  # voxels per chunk: one slice at a time, a few, whole volumes
def test_stats_in_chunks_of_slices_equal_the_whole_volume_formula(monkeypatch, chunk):
    import flareseg.preprocess as preprocess

    monkeypatch.setattr(preprocess, "_STATS_CHUNK", chunk, raising=False)
    rng = np.random.default_rng(3)
    volumes = [
        rng.integers(-1024, 3071, (7, 16, 13)).astype(np.int16),
        rng.normal(40, 300, (5, 12, 20)).astype(np.float32)[:, ::-1].transpose(0, 2, 1),  # a strided view
        rng.integers(0, 255, (3, 9, 9), dtype=np.uint8) * 1000.0,  # float64, a far-off mean
        rng.normal(-500, 50, (11, 17)).astype(np.float32),  # 2-D: rows are the slices
    ]
    mean, std, n = _whole_volume_stats(volumes, (0.5, 99.0))
    stats = compute_stats(iter(volumes), (0.5, 99.0))
    assert stats.mean == pytest.approx(mean, rel=1e-12) and stats.std == pytest.approx(std, rel=1e-12)
    assert stats.num_voxels == n and stats.num_cases == 4


def test_stats_float_copies_are_of_a_chunk_not_of_the_volume(monkeypatch):
    import tracemalloc

    import flareseg.preprocess as preprocess

    monkeypatch.setattr(preprocess, "_STATS_CHUNK", 1 << 16, raising=False)
    volume = np.random.default_rng(1).integers(-1024, 3071, (128, 128, 128)).astype(np.int16)  # 2**21 voxels
    tracemalloc.start()
    try:
        stats = compute_stats([volume])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Float64 copies of the whole volume took 24 bytes a voxel (48 MiB); now the largest temporary is the
    # int16 percentiles' counting of 2**20 voxels at a time (8 MiB), then a chunk's 12 bytes a voxel (0.75 MiB).
    assert peak < 6 * volume.size
    assert stats.num_voxels == volume.size


def test_stats_of_stored_values_clip_each_volume_as_inference_does():
    """Independent reference: HU in float32 as the normaliser makes them, bounds from numpy's percentiles of
    the stored values mapped to HU (linear interpolation commutes with the affine map), clipped in float32."""
    from flareseg.preprocess import stored_stats

    rng = np.random.default_rng(5)
    volumes = [
        (rng.integers(-1024, 3071, (6, 20, 24)).astype(np.int16), 1.0, 0.0),
        (rng.integers(0, 4095, (5, 16, 16)).astype(np.uint16), 1.0, -1024.0),
        (rng.integers(-2000, 6000, (4, 18, 10)).astype(np.int16), 0.5, -1000.25),
        (rng.integers(-1000, 1000, (3, 8, 8)).astype(np.int16), -2.0, 10.0),  # a negative slope reverses the order
    ]
    clipped = []
    for stored, slope, inter in volumes:
        hu = stored.astype(np.float32) * np.float32(slope) + np.float32(inter)
        lo, hi = sorted(float(v) * slope + inter for v in np.percentile(stored, (1.0, 99.0)))
        clipped.append(np.clip(hu, np.float32(lo), np.float32(hi)).astype(np.float64).ravel())
    every = np.concatenate(clipped)
    stats = stored_stats(iter(volumes))
    assert stats.mean == pytest.approx(every.mean(), rel=1e-12) and stats.std == pytest.approx(every.std(), rel=1e-12)
    assert stats.num_voxels == every.size and stats.num_cases == 4


def test_stats_json_round_trip_and_validation():
    stats = NormalizationStats(mean=12.5, std=210.0, num_voxels=10, num_cases=1)
    assert NormalizationStats.from_json(stats.to_json()) == stats
    with pytest.raises(FlareSegError, match="positive std"):
        NormalizationStats(mean=0.0, std=0.0)
    with pytest.raises(FlareSegError, match="invalid normalisation statistics"):
        NormalizationStats.from_dict({"mean": 1.0})
    with pytest.raises(FlareSegError, match="invalid normalisation statistics"):  # a stats.json edited by hand
        NormalizationStats.from_dict({"mean": "abc", "std": 1.0, "percentiles": [1, 99]})
    with pytest.raises(FlareSegError, match="invalid normalisation statistics JSON"):
        NormalizationStats.from_json('{"mean": 1.0, "std"')
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
    # Liver beside pancreas: resizing the labels themselves would put kidney and spleen (2, 3) between them.
    scores = torch.zeros(1, 5, 1, 4)
    scores[0, 1, 0, :2] = 1.0
    scores[0, 4, 0, 2:] = 1.0
    assert resize_scores_to_labels(scores, (1, 8))[0, 0].tolist() == [1, 1, 1, 1, 4, 4, 4, 4]


def test_volume_normalizer_refuses_a_volume_with_nan():
    """The readers refuse NaN themselves; the public normaliser, called on an array, must too (a NaN turns every
    normalised voxel into NaN, and the network then finds no organ)."""
    volume = np.linspace(-1000, 1000, 256, dtype=np.float32).reshape(4, 8, 8)
    volume[0, 0, 0] = np.nan
    with pytest.raises(FlareSegError, match="not finite"):
        volume_normalizer(volume, NormalizationStats(mean=0.0, std=100.0))


@pytest.mark.parametrize("percentiles", [(1.0, 99.0), (5.0, 99.0), (0.0, 42.5)])
@pytest.mark.parametrize("slope", [1.0, 0.5, -2.0, -1.0])
def test_volume_normalizer_bounds_equal_numpy_percentiles_of_the_hu_volume(slope, percentiles):
    stored = np.random.default_rng(4).integers(-1024, 3071, (6, 20, 19)).astype(np.int16)
    stats = NormalizationStats(mean=10.0, std=100.0, percentiles=percentiles)
    normalizer = volume_normalizer(stored, stats, slope=slope, inter=-1024.0)
    # Stored percentiles mapped to HU; a negative slope turns HU percentile q into stored percentile 100 - q.
    q_low, q_high = percentiles if slope > 0 else (100.0 - percentiles[0], 100.0 - percentiles[1])
    lo, hi = (v * slope - 1024.0 for v in np.percentile(stored, (q_low, q_high)))
    assert (normalizer.lo, normalizer.hi) == (lo, hi)
    hu = stored.astype(np.float64) * slope - 1024.0
    assert (normalizer.lo, normalizer.hi) == pytest.approx(tuple(np.percentile(hu, percentiles)), abs=1e-9)
    # The histogram counted beforehand gives the same bounds.
    assert volume_normalizer(stored, stats, slope, -1024.0, value_histogram(stored)) == normalizer


# --- The torch twin ----------------------------------------------------------------------------------------


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


def test_resize_labels_takes_the_label_under_each_pixel_centre():
    labels = torch.tensor([[[0, 1, 2], [3, 4, 0], [1, 2, 3]]], dtype=torch.uint8)
    # 3 -> 2: output centres at input coordinates 0.75 and 2.25 fall in pixels 0 and 2 (legacy "nearest" takes 0 and 1).
    assert resize_labels(labels, (2, 2)).tolist() == [[[0, 2], [1, 3]]]
    # Enlarging repeats pixels; the same size returns the labels as uint8.
    up = resize_labels(labels.to(torch.int64), (6, 6))
    assert up.dtype == torch.uint8
    assert torch.equal(up, labels.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert torch.equal(resize_labels(labels.to(torch.int64), (3, 3)), labels)


def test_percentiles_that_would_clip_every_volume_to_one_value_are_refused():
    from flareseg.errors import FlareSegError
    from flareseg.preprocess import NormalizationStats

    for bad in ((50.0, 50.0), (99.0, 1.0), (-1.0, 99.0), (1.0, 101.0)):
        with pytest.raises(FlareSegError, match="percentiles"):
            NormalizationStats(mean=0.0, std=1.0, percentiles=bad)
    assert NormalizationStats(mean=0.0, std=1.0, percentiles=(0.0, 100.0)).percentiles == (0.0, 100.0)


def test_resizing_keeps_pixel_centres_where_the_label_resize_puts_them():
    # Half-pixel (align_corners=False) geometry, as the labels' nearest-exact resize: [0, 1, 2, 3] halved samples
    # between pixels 0-1 and 2-3. With corners aligned the images would move half a pixel against their labels.
    row = torch.arange(4.0).view(1, 1, 1, 4)
    assert resize_slices(row, (1, 2)).flatten().tolist() == [0.5, 2.5]
    labels = torch.tensor([[[0, 1, 2, 3]]], dtype=torch.uint8)
    assert resize_labels(labels, (1, 2)).flatten().tolist() == [1, 3]  # nearest-exact: pixels 1 and 3


def test_clip_volume_gives_a_float32_copy_within_the_volumes_own_percentiles():
    volume = np.arange(-1000, 1000, dtype=np.int16).reshape(20, 10, 10)
    clipped = clip_volume(volume)
    lo, hi = np.percentile(volume, (1.0, 99.0))  # the spec's [1, 99] percentiles, numpy's linear interpolation
    assert clipped.dtype == np.float32 and clipped.shape == volume.shape
    assert (clipped.min(), clipped.max()) == (np.float32(lo), np.float32(hi))
    assert volume.min() == -1000  # the input is left as it was
