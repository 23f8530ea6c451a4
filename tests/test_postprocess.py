"""Post-processing: largest components per organ, 26-connectivity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from flareseg.errors import FlareSegError
from flareseg.postprocess import keep_largest_components


def test_keeps_largest_component_per_organ_and_two_for_kidneys():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[1:6, 1:6, 1:6] = 1  # liver, 125 voxels: kept
    lab[10:12, 10:12, 10:12] = 1  # liver speck, 8: removed
    lab[1:4, 12:15, 1:4] = 2  # kidney, 27: kept
    lab[15:18, 15:18, 1:4] = 2  # kidney, 27: kept
    lab[18, 1, 18] = 2  # kidney speck, 1: removed
    lab[14:16, 2:4, 14:16] = 3  # spleen, 8: kept (only component)
    lab[7:9, 16:19, 16:19] = 4  # pancreas, 18: kept
    lab[1, 18, 10] = 4  # pancreas speck: removed
    out = keep_largest_components(lab)
    expected = lab.copy()
    expected[10:12, 10:12, 10:12] = 0
    expected[18, 1, 18] = 0
    expected[1, 18, 10] = 0
    np.testing.assert_array_equal(out, expected)
    assert out is not lab


def test_connectivity_is_26_corners_join_components():
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    lab[3, 3, 3] = 1  # touches the cube by a corner only
    lab[5, 0, 5] = 1  # isolated
    out = keep_largest_components(lab)
    assert out[3, 3, 3] == 1 and out[5, 0, 5] == 0
    out6 = keep_largest_components(lab, connectivity=6)
    assert out6[3, 3, 3] == 0  # with faces only it is a separate component


def test_organs_touching_each_other_are_separate_components():
    lab = np.zeros((4, 4, 8), np.uint8)
    lab[:, :, :4] = 1
    lab[:, :, 4:] = 3
    np.testing.assert_array_equal(keep_largest_components(lab), lab)


def test_matches_an_independent_scipy_computation_on_random_labels():
    rng = np.random.default_rng(0)
    lab = (rng.random((30, 30, 30)) < 0.08).astype(np.uint8) * rng.integers(1, 5, (30, 30, 30)).astype(np.uint8)
    out = keep_largest_components(lab)
    structure = np.ones((3, 3, 3), bool)
    for organ, k in {1: 1, 2: 2, 3: 1, 4: 1}.items():
        comp, _n = ndimage.label(lab == organ, structure=structure)
        sizes = np.bincount(comp.ravel())[1:]
        kept = np.unique(comp[out == organ])
        # Exactly the k largest components survive, whole.
        assert sorted(sizes[kept - 1]) == sorted(sizes)[-k:]
        np.testing.assert_array_equal(out == organ, np.isin(comp, kept) & (comp > 0))


def test_rejects_bad_input():
    with pytest.raises(FlareSegError, match="3D"):
        keep_largest_components(np.zeros((3, 3), np.uint8))
    with pytest.raises(FlareSegError, match="uint8"):
        keep_largest_components(np.zeros((3, 3, 3), np.int32))
