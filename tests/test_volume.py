"""NIfTI I/O: orientation round-trips, scaling, and one-line errors for bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import BAD_INPUT_KINDS, bad_inputs, oblique, reorient, save

from flareseg.errors import FlareSegError
from flareseg.phantom import make_phantom
from flareseg.volume import case_id, find_cases, read_ct, read_labels, write_labels

ORIENTATIONS = [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("A", "S", "R"), ("P", "I", "L"), ("S", "R", "A")]


@pytest.mark.parametrize("axcodes", ORIENTATIONS, ids=lambda c: "".join(c))
def test_real_sample_round_trips_in_every_orientation(tmp_path, sample_ct, sample_mask, axcodes):
    ct, mask = nib.load(sample_ct), nib.load(sample_mask)
    ref = read_ct(sample_ct).array
    ct_r = save(reorient(ct, axcodes), tmp_path / "ct.nii.gz")
    mask_r = reorient(mask, axcodes)
    vol = read_ct(ct_r)
    # Every orientation gives the network the same canonical slices.
    assert vol.array.shape == (112, 101, 122)
    np.testing.assert_array_equal(vol.array, ref)
    assert vol.geometry.axcodes == axcodes
    # Labels of the canonical layout go back voxel-exactly onto the file's own grid.
    canonical_labels = read_ct(save(mask_r, tmp_path / "m.nii.gz")).array.astype(np.uint8)
    out = write_labels(canonical_labels, vol.geometry, tmp_path / "pred.nii.gz")
    written = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(mask_r.dataobj))
    np.testing.assert_allclose(written.affine, ct_r_affine := nib.load(ct_r).affine)
    assert nib.aff2axcodes(written.affine) == axcodes
    assert written.get_data_dtype() == np.uint8
    assert written.header.get_slope_inter() == (None, None)  # no scaling stored
    assert np.allclose(written.get_sform(), ct_r_affine)


def test_oblique_volume_uses_closest_canonical_and_round_trips(tmp_path, sample_ct):
    img = oblique(nib.load(sample_ct))
    path = save(img, tmp_path / "oblique.nii.gz")
    vol = read_ct(path)
    np.testing.assert_array_equal(vol.array, read_ct(sample_ct).array)
    labels = (vol.array > 100).astype(np.uint8)
    written = nib.load(write_labels(labels, vol.geometry, tmp_path / "out.nii"))
    np.testing.assert_allclose(written.affine, img.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), (np.asanyarray(img.dataobj) > 100).astype(np.uint8))


def test_phantom_in_lps_matches_ras_after_reading(tmp_path):
    ras, lps = make_phantom((40, 36, 20), axcodes="RAS"), make_phantom((40, 36, 20), axcodes="LPS")
    a = read_ct(save(ras.to_nifti()[0], tmp_path / "ras.nii.gz"))
    b = read_ct(save(lps.to_nifti()[0], tmp_path / "lps.nii.gz"))
    np.testing.assert_array_equal(a.array, b.array)
    assert a.geometry.canonical_spacing == b.geometry.canonical_spacing == (4.0, 3.0, 3.0)


def test_scl_slope_and_intercept_are_honoured(tmp_path):
    raw = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    img.set_data_dtype(np.uint16)
    path = save(img, tmp_path / "scaled.nii.gz")
    vol = read_ct(path)
    expected = raw.astype(np.float32) * 2 - 1024
    assert vol.array.dtype == np.uint16  # stored values kept; scaling applied per slice batch
    np.testing.assert_array_equal(vol.hu(), expected.transpose(2, 1, 0))
    np.testing.assert_array_equal(vol.hu_slices(1, 3), expected.transpose(2, 1, 0)[1:3])


def test_trailing_singleton_fourth_axis_is_a_3d_volume(tmp_path):
    data = np.random.default_rng(0).integers(-1000, 1000, (5, 6, 7, 1)).astype(np.int16)
    vol = read_ct(save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "t.nii.gz"))
    np.testing.assert_array_equal(vol.array, data[..., 0].transpose(2, 1, 0))
    out = nib.load(write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, tmp_path / "o.nii.gz"))
    assert out.shape == (5, 6, 7)


def test_case_id_follows_flare21_names():
    assert case_id("x/test_001_0000.nii.gz") == "test_001"
    assert case_id("train_000.nii.gz") == "train_000"
    assert case_id("validation_001_0000.nii") == "validation_001"


# --- bad input: a one-line error naming the file and the problem ---------------------


@pytest.mark.parametrize("kind", BAD_INPUT_KINDS)
def test_bad_input_gives_one_line_error_naming_the_file(tmp_path, kind):
    path, problem = bad_inputs(tmp_path)[kind]
    with pytest.raises(FlareSegError) as info:
        read_ct(path)
    message = str(info.value)
    assert str(path) in message and problem in message
    assert "\n" not in message


def test_label_values_outside_range_are_refused(tmp_path):
    data = np.zeros((4, 5, 6), np.uint8)
    data[0, 0, 0] = 7
    path = save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "bad_labels.nii.gz")
    with pytest.raises(FlareSegError, match=r"bad_labels.nii.gz: labels \[7\] outside 0..4"):
        read_labels(path)


def test_writer_refuses_to_overwrite_the_input_and_leaves_no_partial_file(tmp_path):
    path = save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), tmp_path / "ct.nii.gz")
    before = path.read_bytes()
    vol = read_ct(path)
    with pytest.raises(FlareSegError, match="refusing to overwrite the input"):
        write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, path)
    assert path.read_bytes() == before
    with pytest.raises(FlareSegError, match="does not fit"):
        write_labels(np.zeros((1, 2, 3), np.uint8), vol.geometry, tmp_path / "out.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_find_cases_names_sorts_skips_hidden_and_refuses_duplicates(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    for name in ("b_002_0000.nii.gz", "a_001.nii", ".a_003.nii.gz"):
        save(img, tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    assert find_cases(tmp_path) == {"a_001": tmp_path / "a_001.nii", "b_002": tmp_path / "b_002_0000.nii.gz"}
    save(img, tmp_path / "a_001_0000.nii.gz")
    with pytest.raises(FlareSegError, match=r"case a_001 appears twice \(a_001.nii, a_001_0000.nii.gz\)"):
        find_cases(tmp_path)
    with pytest.raises(FlareSegError, match="not a directory"):
        find_cases(tmp_path / "notes.txt")
