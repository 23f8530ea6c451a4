"""FLARE21 metrics against hand-computed values and an independent implementation (MONAI)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from flareseg.errors import FlareSegError
from flareseg.metrics import dice, normalized_surface_dice, organ_scores, surface_area_table, surface_distances


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def test_dice_of_half_overlapping_cubes_is_one_half():
    a = _box((30, 30, 30), (5, 5, 5), (15, 15, 15))
    b = _box((30, 30, 30), (10, 5, 5), (20, 15, 15))  # 500 of 1000 voxels shared
    assert dice(a, b) == 0.5
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_masks_of_any_dtype_score_as_their_non_zero_voxels():
    a = _box((20, 20, 20), (3, 3, 3), (11, 11, 11))
    b = _box((20, 20, 20), (6, 3, 3), (14, 11, 11))
    spacing = (1.0, 1.5, 2.0)
    want = dice(a, b), normalized_surface_dice(a, b, spacing, tolerance_mm=0.0)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    for dtype, inside_a, inside_b in ((np.uint8, 2, 1), (np.int16, -1, 4), (np.float32, 0.5, 0.25)):
        ga, gb = a.astype(dtype) * dtype(inside_a), b.astype(dtype) * dtype(inside_b)
        assert dice(ga, gb) == want[0], dtype  # as bits, 2 & 1 is 0
        assert normalized_surface_dice(ga, gb, spacing, tolerance_mm=0.0) == want[1], dtype


def test_the_cached_area_table_cannot_be_changed_by_a_caller():
    table = surface_area_table((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="read-only"):
        table[1] = 0.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 1.3)])
def test_surface_area_of_a_box_equals_the_analytic_marching_cubes_area(spacing):
    # The surface through mid-points around an a x b x c voxel box: flat faces between
    # the outer voxel centres, 45-degree chamfers along the 12 edges, a triangle at each corner.
    a, b, c = 7, 5, 9
    sx, sy, sz = spacing
    box = _box((12, 12, 14), (2, 3, 2), (2 + a, 3 + b, 2 + c))
    _, area_gt, _, _ = surface_distances(box, box, spacing)
    lx, ly, lz = (a - 1) * sx, (b - 1) * sy, (c - 1) * sz
    faces = 2 * (lx * ly + ly * lz + lx * lz)
    edges = 4 * (lx * math.hypot(sy / 2, sz / 2) + ly * math.hypot(sx / 2, sz / 2) + lz * math.hypot(sx / 2, sy / 2))
    corners = 8 * 0.5 * math.sqrt((sy * sz / 4) ** 2 + (sx * sz / 4) ** 2 + (sx * sy / 4) ** 2)
    assert area_gt.sum() == pytest.approx(faces + edges + corners, rel=1e-12)


def test_area_table_is_complement_symmetric_and_zero_off_surface():
    table = surface_area_table((1.0, 2.0, 3.0))
    assert table[0] == table[255] == 0
    np.testing.assert_allclose(table, table[::-1], rtol=1e-12)
    # One inside corner: a triangle through the three edge mid-points next to it.
    corner = 0.5 * math.sqrt((2 * 3 / 4) ** 2 + (1 * 3 / 4) ** 2 + (1 * 2 / 4) ** 2)
    assert table[1] == pytest.approx(corner, rel=1e-12)
    assert table[0b00000011] == pytest.approx(3 * math.hypot(1 / 2, 2 / 2), rel=1e-12)  # an edge: a chamfer


@pytest.mark.parametrize("s", [1.0, 1.5])
def test_nsd_of_a_box_against_its_one_voxel_dilation_hand_computed(s):
    # gt: a 6^3 box; pred: its 26-dilation, an 8^3 box. Every gt surface element is one
    # voxel from pred's surface. Pred's flat faces are one voxel from gt's surface, its
    # chamfered edges sqrt(2) voxels and its corner triangles sqrt(3) voxels.
    gt = _box((14, 14, 14), (4, 4, 4), (10, 10, 10))
    pred = ndimage.binary_dilation(gt, structure=np.ones((3, 3, 3)))
    spacing = (s, s, s)

    def parts(n):  # flat faces, edge chamfers, corner triangles of an n^3 box, in mm^2
        return 6 * (n - 1) ** 2 * s * s, 12 * (n - 1) * s * s * math.sqrt(0.5), math.sqrt(3) * s * s

    gt_area = sum(parts(6))
    faces, edges, corners = parts(8)
    total = gt_area + faces + edges + corners
    assert normalized_surface_dice(gt, pred, spacing, 0.999 * s) == 0.0
    assert normalized_surface_dice(gt, pred, spacing, s) == pytest.approx((gt_area + faces) / total, rel=1e-12)
    assert normalized_surface_dice(gt, pred, spacing, math.sqrt(2) * s) == pytest.approx(
        (gt_area + faces + edges) / total, rel=1e-12
    )
    assert normalized_surface_dice(gt, pred, spacing, math.sqrt(3) * s) == 1.0
    assert normalized_surface_dice(gt, gt, spacing, tolerance_mm=0.0) == 1.0


def test_flare21_rules_for_absent_organs():
    empty = np.zeros((8, 8, 8), bool)
    organ = _box((8, 8, 8), (2, 2, 2), (5, 5, 5))
    sp = (1.0, 1.0, 1.0)
    assert (dice(empty, empty), normalized_surface_dice(empty, empty, sp)) == (1.0, 1.0)
    assert (dice(empty, organ), normalized_surface_dice(empty, organ, sp)) == (0.0, 0.0)
    assert (dice(organ, empty), normalized_surface_dice(organ, empty, sp)) == (0.0, 0.0)


def test_far_apart_masks_score_zero_and_large_tolerance_scores_one():
    gt = _box((40, 10, 10), (1, 2, 2), (5, 6, 6))
    pred = _box((40, 10, 10), (30, 2, 2), (34, 6, 6))
    assert normalized_surface_dice(gt, pred, (1.0, 1.0, 1.0), 1.0) == 0.0
    assert normalized_surface_dice(gt, pred, (1.0, 1.0, 1.0), 100.0) == 1.0


def test_organ_scores_per_label_and_shape_check():
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[1:5, 1:5, 1:5] = 1
    pred = gt.copy()
    pred[6:8, 6:8, 6:8] = 3  # spleen predicted but absent from ground truth
    scores = organ_scores(gt, pred, (1.0, 1.0, 1.0))
    assert scores[1] == (1.0, 1.0)
    assert scores[2] == (1.0, 1.0)  # absent from both
    assert scores[3] == (0.0, 0.0)
    with pytest.raises(FlareSegError, match="differs from prediction shape"):
        organ_scores(gt, pred[:-1], (1.0, 1.0, 1.0))
    with pytest.raises(FlareSegError, match="spacing"):
        normalized_surface_dice(gt == 1, pred == 1, (1.0, 0.0, 1.0))


def _blob(rng, shape, sigma=3.0, keep=0.3):
    x = ndimage.gaussian_filter(rng.random(shape), sigma)
    return x > np.quantile(x, 1 - keep)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 0.8), (0.7, 1.3, 3.0)])
@pytest.mark.parametrize("tolerance", [0.5, 1.0, 2.0])
def test_nsd_and_dice_agree_with_monai_surface_element_implementation(spacing, tolerance):
    """MONAI's compute_surface_dice(use_subvoxels=True) ports DeepMind's surface-distance method."""
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics", reason="MONAI (dev extra) is the independent reference")
    rng = np.random.default_rng(int(10 * tolerance + 100 * spacing[0]))
    gt = _blob(rng, (36, 40, 28))
    pred = _blob(rng, (36, 40, 28)) | (ndimage.binary_dilation(gt) & (rng.random(gt.shape) > 0.5))

    def onehot(m):
        return torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))

    ref = metrics.compute_surface_dice(
        onehot(pred), onehot(gt), [tolerance], include_background=False, spacing=spacing, use_subvoxels=True
    ).item()
    assert normalized_surface_dice(gt, pred, spacing, tolerance) == pytest.approx(ref, abs=1e-6)
    ref_dice = metrics.compute_dice(onehot(pred), onehot(gt), include_background=False).item()
    assert dice(gt, pred) == pytest.approx(ref_dice, abs=1e-6)


def test_a_negative_tolerance_is_refused_by_the_library_too():
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    for bad in (-0.5, -1e-9, float("nan")):
        with pytest.raises(FlareSegError, match="tolerance"):
            normalized_surface_dice(mask, mask, (1.0, 1.0, 1.0), bad)
    assert normalized_surface_dice(mask, mask, (1.0, 1.0, 1.0), 0.0) == 1.0


def test_surface_metrics_of_masks_that_are_not_3d_are_refused_in_words():
    # A raw IndexError came out of the area table's lookup (evalF review).
    flat = np.ones((3, 3), bool)
    with pytest.raises(FlareSegError, match=r"surface distances need 3-D masks, got shape \(3, 3\)"):
        normalized_surface_dice(flat, flat, (1.0, 1.0, 1.0))
    with pytest.raises(FlareSegError, match=r"need 3-D masks, got shape \(3, 3\)"):
        surface_distances(flat, flat, (1.0, 1.0, 1.0))
