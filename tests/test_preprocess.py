"""Pre-processing: percentile clipping, streaming dataset statistics, resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flareseg.errors import FlareSegError
from flareseg.preprocess import (
    NormalizationStats,
    clip_bounds,
    compute_stats,
    normalize_volume,
    resize_scores_to_labels,
    resize_slices,
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
