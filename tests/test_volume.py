"""NIfTI I/O: orientation round-trips, scaling, and one-line errors for bad input."""

from __future__ import annotations

import gzip
import io
import logging
import mmap
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BAD_INPUT_KINDS, bad_inputs, oblique, reorient, save

from flareseg import volume as volume_module
from flareseg.errors import FlareSegError
from flareseg.phantom import make_phantom
from flareseg.volume import (
    NIFTI_SUFFIXES,
    canonical_order,
    case_id,
    check_ct_intensities,
    check_not_label_map,
    find_cases,
    from_canonical,
    read_ct,
    read_labels,
    to_canonical,
    write_labels,
)

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


def _header_patched(tmp_path, name, image=None, **fields):
    """An uncompressed NIfTI (of ``image``, else a small RAS one) whose header fields are set after nibabel wrote
    it (nibabel would repair them)."""
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)) if image is None else image
    path = save(image, tmp_path / name)
    raw = bytearray(path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)), check=False)
    for key, value in fields.items():
        header[key] = value
    raw[: header.sizeof_hdr] = header.binaryblock
    path.write_bytes(bytes(raw))
    return path


def test_header_repairs_by_nibabel_are_warnings_naming_the_file_said_once(tmp_path, caplog):
    path = _header_patched(tmp_path, "neg pixdim.nii", pixdim=[1.0, -0.8, 0.8, 2.5, 1, 1, 1, 1])
    with caplog.at_level(logging.WARNING):
        vol = read_ct(path)
    assert vol.geometry.spacing == pytest.approx((0.8, 0.8, 2.5))
    ours = [r.getMessage() for r in caplog.records if r.name == "flareseg.volume"]
    assert ours == [f"{path}: pixdim[1,2,3] should be positive; setting to abs of pixdim values"]
    assert not [r for r in caplog.records if r.name == "nibabel.global"]  # not said a second time without the name
    caplog.clear()
    logging.getLogger("nibabel.global").warning("said outside a read")
    assert [r.getMessage() for r in caplog.records] == ["said outside a read"]  # the relay is inert again


def test_a_header_without_orientation_is_read_as_nifti_default_with_a_warning(tmp_path, caplog):
    path = _header_patched(tmp_path, "no_orientation.nii", qform_code=0, sform_code=0)
    with caplog.at_level(logging.WARNING):
        vol = read_ct(path)
    assert vol.geometry.axcodes == ("L", "A", "S")
    assert any(str(path) in m and "no orientation" in m and "LAS" in m for m in caplog.messages)
    caplog.clear()
    read_ct(save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), tmp_path / "ras.nii"))
    assert not caplog.messages


def test_a_qform_and_sform_that_disagree_on_the_orientation_are_read_by_the_sform_with_a_warning(tmp_path, caplog):
    # ITK-based tools may follow the qform: the patient's right would then differ between them and us, unsaid.
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    img.set_qform(np.diag([2.0, 2.0, 3.0, 1.0]), code=1)  # RAS
    img.set_sform(np.diag([-2.0, 2.0, 3.0, 1.0]), code=2)  # LAS
    path = save(img, tmp_path / "two-orientations.nii.gz")
    with caplog.at_level(logging.WARNING, logger="flareseg.volume"):
        vol = read_ct(path)
    assert vol.geometry.axcodes == ("L", "A", "S")
    assert caplog.messages == [
        f"{path}: the qform (RAS) and the sform (LAS) disagree on the orientation; read with the sform, as nibabel "
        "does (ITK-based tools may follow the qform): check that the labels lie on the organs"
    ]
    caplog.clear()
    img.set_sform(np.diag([2.5, 2.0, 3.0, 1.0]), code=2)  # other sizes, the same orientation: nothing to say
    read_ct(save(img, tmp_path / "agree.nii.gz"))
    assert not caplog.messages


@pytest.mark.parametrize(
    "fields",
    [{"pixdim": [1.0, float("nan"), 2.0, 3.0, 1, 1, 1, 1]}, {"quatern_b": 2.0, "quatern_c": 2.0, "quatern_d": 2.0}],
    ids=["nan-pixdim", "not-a-rotation"],
)
def test_a_damaged_qform_beside_an_sform_is_read_with_the_sform_and_mended_in_the_outputs(tmp_path, caplog, fields):
    # nibabel fails to build such a qform (SVD did not converge; w2 should be positive): a traceback in every command.
    sform = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6), sform)
    img.set_qform(sform, code=1)
    img.set_sform(sform, code=1)
    path = _header_patched(tmp_path, "damaged qform.nii", img, **fields)
    with caplog.at_level(logging.WARNING, logger="flareseg.volume"):
        vol = read_ct(path)
    assert caplog.messages == [
        f"{path}: the qform is damaged (quatern_b, c, d, qoffset or pixdim); read with the sform"
    ]
    np.testing.assert_array_equal(vol.geometry.affine, sform)
    assert vol.geometry.spacing == (2.0, 2.0, 3.0)
    out = write_labels(np.zeros((6, 5, 4), np.uint8), vol.geometry, tmp_path / "labels.nii.gz")
    written = nib.load(out).header
    np.testing.assert_allclose(written.get_qform(), sform, atol=1e-6)  # what ITK-based tools read is whole again
    np.testing.assert_allclose(written.get_sform(), sform)
    assert written.get_zooms() == (2.0, 2.0, 3.0)


def test_a_non_finite_pixdim_with_an_sform_alone_takes_the_affines_voxel_sizes(tmp_path, caplog):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine)
    img.set_qform(None, code=0)
    img.set_sform(affine, code=1)
    path = _header_patched(tmp_path, "inf pixdim.nii", img, pixdim=[1.0, 0.8, float("inf"), 2.5, 1, 1, 1, 1])
    with caplog.at_level(logging.WARNING, logger="flareseg.volume"):
        vol = read_ct(path)
    assert caplog.messages == [
        f"{path}: pixdim gives voxels of 0.8 x inf x 2.5 mm; read as the affine's, 0.8 x 0.8 x 2.5 mm"
    ]
    assert vol.geometry.spacing == pytest.approx((0.8, 0.8, 2.5))
    written = nib.load(write_labels(np.zeros((6, 5, 4), np.uint8), vol.geometry, tmp_path / "l.nii.gz")).header
    assert written.get_zooms() == pytest.approx((0.8, 0.8, 2.5))


@pytest.mark.parametrize("version", [1, 2])
def test_a_label_map_takes_the_ct_s_grid_not_what_describes_its_values(tmp_path, version):
    # It inherited the CT's intent (a "t test" statistic), aux_file and extensions, a comment naming the patient
    # among them (niftiV).
    img = (nib.Nifti1Image if version == 1 else nib.Nifti2Image)(
        np.zeros((4, 5, 6), np.int16), np.diag([0.8, 0.7, 2.5, 1.0])
    )
    img.header.set_intent("t test", (12,), name="tstat")
    img.header["aux_file"] = b"lut.txt"
    img.header["xyzt_units"] = 10  # mm and s: the grid's own, kept
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"PatientName=DOE^JOHN"))
    vol = read_ct(save(img, tmp_path / "ct.nii.gz"))
    written = nib.load(write_labels(np.ones((6, 5, 4), np.uint8), vol.geometry, tmp_path / "l.nii.gz")).header
    assert written.get_intent() == ("none", (), "") and written["aux_file"] == b""
    assert len(written.extensions) == 0 and b"DOE" not in gzip.decompress((tmp_path / "l.nii.gz").read_bytes())
    raw = gzip.decompress((tmp_path / "l.nii.gz").read_bytes())
    offset = np.frombuffer(raw[108:112], "<f4")[0] if version == 1 else np.frombuffer(raw[168:176], "<i8")[0]
    assert offset == (352 if version == 1 else 544)  # the voxels follow the header, not the extensions' room
    assert written.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(written.get_best_affine(), img.affine, atol=1e-6)  # float32 in NIfTI-1
    assert len(vol.geometry.header.extensions) == 1  # the CT's header, as read, is left as it was


@pytest.mark.parametrize("name", ["zero pixdim.nii", "zero pixdim.nii.gz"])
def test_a_zero_pixdim_beside_an_sform_takes_the_affines_voxel_sizes_as_a_nan_one_does(tmp_path, caplog, name):
    # nibabel sets a zero voxel size to 1 as it reads: NSD was then scored with 1 x 3 x 3 mm voxels where the
    # sform says 3 x 3 x 3 (liver NSD 0.94 against 0.56), while a NaN one took the affine's (evalF review).
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine)
    img.set_qform(None, code=0)
    img.set_sform(affine, code=1)
    path = _header_patched(tmp_path, "zero pixdim.nii", img, pixdim=[1.0, 0.0, 3.0, 3.0, 1, 1, 1, 1])
    if name.endswith(".gz"):
        path = path.rename(tmp_path / name)
        path.write_bytes(gzip.compress(path.read_bytes()))
    with caplog.at_level(logging.WARNING):
        vol = read_ct(path)
    said = [r.getMessage() for r in caplog.records if r.name.startswith(("flareseg", "nibabel"))]
    assert said == [f"{path}: pixdim gives voxels of 0 x 3 x 3 mm; read as the affine's, 3 x 3 x 3 mm"]
    assert vol.geometry.spacing == pytest.approx((3.0, 3.0, 3.0))
    written = nib.load(write_labels(np.zeros((6, 5, 4), np.uint8), vol.geometry, tmp_path / "l.nii.gz")).header
    assert written.get_zooms() == pytest.approx((3.0, 3.0, 3.0))


def test_a_zero_pixdim_beside_a_negative_one_is_read_as_the_affines_too(tmp_path, caplog):
    # nibabel says both fixes in one note: the zero's fix was looked for as a note of its own (diff review).
    affine = np.diag([6.0, 6.0, 8.0, 1.0])
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine)
    img.set_qform(None, code=0)
    img.set_sform(affine, code=1)
    path = _header_patched(tmp_path, "zn.nii", img, pixdim=[1.0, 0.0, -6.0, 8.0, 1, 1, 1, 1])
    with caplog.at_level(logging.WARNING):
        vol = read_ct(path)
    said = [r.getMessage() for r in caplog.records if r.name.startswith(("flareseg", "nibabel"))]
    assert said == [
        f"{path}: pixdim[1,2,3] should be non-zero and pixdim[1,2,3] should be positive; setting 0 dims to 1 and "
        "setting to abs of pixdim values",
        f"{path}: pixdim gives voxels of 0 x 6 x 8 mm; read as the affine's, 6 x 6 x 8 mm",
    ]
    assert vol.geometry.spacing == pytest.approx((6.0, 6.0, 8.0))


def test_a_zero_pixdim_with_a_qform_alone_is_read_as_nibabel_repairs_it(tmp_path, caplog):
    # Its affine is made from the pixdim, so nibabel's 1 mm is all there is: read so, and said.
    path = _header_patched(tmp_path, "q.nii", sform_code=0, qform_code=1, pixdim=[1.0, 0.0, 3.0, 3.0, 1, 1, 1, 1])
    with caplog.at_level(logging.WARNING):
        vol = read_ct(path)
    said = [r.getMessage() for r in caplog.records if r.name.startswith(("flareseg", "nibabel"))]
    assert said == [f"{path}: pixdim gives voxels of 0 x 3 x 3 mm; read as the affine's, 1 x 3 x 3 mm"]
    assert vol.geometry.spacing == pytest.approx((1.0, 3.0, 3.0))


def test_a_non_finite_pixdim_of_a_4d_file_keeps_its_other_zooms(tmp_path, caplog):
    # nibabel's set_zooms checks every zoom: a negative time step (which nibabel leaves) made the mend a traceback.
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    img = nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.int16), affine)
    img.set_qform(None, code=0)
    path = _header_patched(tmp_path, "4d.nii", img, pixdim=[1.0, 0.8, float("nan"), 2.5, -2.0, 1, 1, 1])
    with caplog.at_level(logging.WARNING, logger="flareseg.volume"):
        vol = read_ct(path)
    assert vol.geometry.spacing == pytest.approx((0.8, 0.8, 2.5)) and len(caplog.messages) == 1


def test_a_qform_alone_that_is_not_a_rotation_is_named_as_such(tmp_path):
    path = _header_patched(tmp_path, "q.nii", sform_code=0, qform_code=1, quatern_b=2.0, quatern_c=2.0, quatern_d=2.0)
    with pytest.raises(FlareSegError) as err:
        read_ct(path)
    assert str(err.value) == f"{path}: invalid NIfTI header (quatern_b, c, d are not a rotation's)"


def test_a_qform_alone_with_an_infinite_pixdim_is_one_line_without_numpys_warning(tmp_path):
    path = _header_patched(tmp_path, "q.nii", sform_code=0, qform_code=1, pixdim=[1.0, np.inf, 1, 1, 1, 1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nibabel's np.dot of the inf pixdim warned before our line
        with pytest.raises(FlareSegError) as err:
            read_ct(path)
    assert str(err.value) == f"{path}: the affine is singular or not finite"


@pytest.mark.parametrize("srow", [0.0, float("nan")])
def test_a_damaged_sform_gives_way_to_a_good_qform_as_a_damaged_qform_does_to_the_sform(tmp_path, caplog, srow):
    # It was refused as "the affine is singular or not finite", naming neither form (niftiV).
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 5.0)
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    good = read_ct(save(img, tmp_path / "good.nii"))
    path = _header_patched(tmp_path, "sform.nii", img, srow_x=[srow] * 4, srow_y=[srow] * 4, srow_z=[srow] * 4)
    with caplog.at_level(logging.WARNING, logger="flareseg.volume"):
        vol = read_ct(path)
    assert caplog.messages == [f"{path}: the sform is damaged (singular or not finite); read with the qform"]
    np.testing.assert_allclose(vol.geometry.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(vol.hu(), good.hu())
    out = nib.load(write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, tmp_path / "l.nii.gz")).header
    np.testing.assert_allclose(out.get_sform(), affine, atol=1e-6)  # made from the qform: ITK and nibabel agree
    # Without a qform to fall back on, the line says which form is broken.
    path = _header_patched(tmp_path, "alone.nii", img, qform_code=0, srow_x=[srow] * 4)
    with pytest.raises(FlareSegError) as err:
        read_ct(path)
    assert str(err.value) == f"{path}: the sform (sform_code 1) is singular or not finite"


def test_an_affine_with_voxels_of_nearly_no_volume_places_none():
    """Voxels of 10 nm a side (a determinant of 1e-15) are a damaged header, not a scan; 1 micrometre ones pass."""
    from flareseg.volume import places_voxels

    assert not places_voxels(np.diag([1e-5, 1e-5, 1e-5, 1.0]))
    assert places_voxels(np.diag([1e-3, 1e-3, 1e-3, 1.0]))
    assert not places_voxels(np.diag([1.0, np.nan, 1.0, 1.0]))


@pytest.mark.parametrize("offset", [0, 100])
@pytest.mark.parametrize("version", [1, 2])
def test_a_vox_offset_inside_the_header_is_refused(tmp_path, offset, version):
    # nibabel reads a 0 as it stands, with the header's bytes as the first voxels, and refuses 1 to 351 in words
    # of its own; both are the one line that names the field.
    image = (nib.Nifti1Image if version == 1 else nib.Nifti2Image)(np.zeros((4, 5, 6), np.int16), np.eye(4))
    path = save(image, tmp_path / "a.nii")
    header_type = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    raw = bytearray(path.read_bytes())
    header = header_type.from_fileobj(io.BytesIO(bytes(raw)), check=False)
    header["vox_offset"] = offset
    raw[: header.sizeof_hdr] = header.binaryblock
    path.write_bytes(bytes(raw))
    first = 352 if version == 1 else 544
    with pytest.raises(FlareSegError) as err:
        read_ct(path)
    assert str(err.value) == (
        f"{path}: invalid NIfTI header (vox_offset is {offset}; a single-file NIfTI's voxels start at byte {first} "
        "or later)"
    )


def test_a_vox_offset_beyond_any_file_or_a_pair_headers_other_fault_is_named_as_before(tmp_path):
    # 1e20 does not fit numpy's integers (nibabel holds it as a Python int); a .hdr's offset of 0 is its own.
    path = save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), tmp_path / "far.nii")
    raw = bytearray(path.read_bytes())
    raw[108:112] = np.array(1e20, "<f4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(FlareSegError, match=r"far\.nii: truncated or corrupt voxel data \(the file holds"):
        read_ct(path)
    pair = tmp_path / "p.hdr"
    nib.save(nib.Nifti1Pair(np.zeros((4, 5, 6), np.int16), np.eye(4)), pair)
    raw = bytearray(pair.read_bytes())
    raw[70:72] = b"\0\0"  # datatype 0
    pair.write_bytes(bytes(raw))
    with pytest.raises(FlareSegError) as err:
        read_ct(pair)
    assert str(err.value) == f"{pair}: invalid NIfTI header (data code 0 not supported)"


@pytest.mark.parametrize("dim0", [-3, 0, 8])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("version", [1, 2])
def test_a_dim0_outside_one_to_seven_is_named(tmp_path, dim0, suffix, version):
    # nibabel takes it for a header of the other byte order, and names a field read in that order (NIfTI-1), or
    # reads the other order's dimensions (NIfTI-2), or none at all (0).
    image = (nib.Nifti1Image if version == 1 else nib.Nifti2Image)(np.zeros((4, 5, 6), np.int16), np.eye(4))
    raw = bytearray(save(image, tmp_path / "x.nii").read_bytes())
    if version == 1:
        raw[40:42] = np.int16(dim0).tobytes()
    else:
        raw[16:24] = np.int64(dim0).tobytes()
    path = tmp_path / f"dim0{suffix}"
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    with pytest.raises(FlareSegError) as err:
        read_ct(path)
    assert str(err.value) == f"{path}: invalid NIfTI header (dim[0] is {dim0}; it must be 1 to 7)"


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dims", [(2**21, 2**21, 2**21), (2**40, 2**40, 8), (3 * 2**20, 2**21, 2**21)])
def test_a_nifti2_grid_past_int64_is_a_one_line_error(tmp_path, suffix, dims):
    # The grid's byte count wrapped in int64 to 0 or below, so the size check passed and numpy failed unnamed.
    raw = bytearray(save(nib.Nifti2Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), tmp_path / "x.nii").read_bytes())
    raw[24:48] = np.array(dims, "<i8").tobytes()  # dim[1..3]
    path = tmp_path / f"huge{suffix}"
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    needed = dims[0] * dims[1] * dims[2] * 2
    with pytest.raises(FlareSegError) as err:
        read_ct(path)
    tail = (
        f"the header's grid needs {needed:,} bytes, more than a {path.stat().st_size:,}-byte gzip file can hold"
        if suffix == ".nii.gz"
        else f"the file holds {path.stat().st_size:,} bytes; its header needs {needed + 544:,}"
    )
    assert str(err.value) == f"{path}: truncated or corrupt voxel data ({tail})"


def test_a_gzip_file_cut_just_past_its_header_is_said_to_be_cut_short(tmp_path):
    # It was "corrupt gzip stream (Compressed file ended before the end-of-stream marker was reached)".
    rng = np.random.default_rng(0)
    path = save(
        nib.Nifti1Image(rng.integers(-1024, 3000, (48, 32, 16)).astype(np.int16), np.eye(4)), tmp_path / "c.nii.gz"
    )
    path.write_bytes(path.read_bytes()[:300])
    assert len(gzip.GzipFile(fileobj=io.BytesIO(path.read_bytes())).read(352)) == 352  # the header is all there
    with pytest.raises(FlareSegError) as err:
        read_ct(path)
    assert str(err.value) == f"{path}: truncated gzip stream (the file ends before the stream does: cut short?)"


def test_a_gzip_file_suffixed_in_capitals_reads_as_in_lower_case(tmp_path):
    # nibabel opens CT.NII.GZ as gzip; flareseg sized it as an uncompressed file and called it truncated.
    img = make_phantom((48, 32, 16), (1.0, 1.0, 2.0), seed=2).to_nifti()[0]
    lower = save(img, tmp_path / "ct.nii.gz")
    upper = tmp_path / "CT.NII.GZ"
    upper.write_bytes(lower.read_bytes())
    np.testing.assert_array_equal(read_ct(upper).hu(), read_ct(lower).hu())


def test_nibabel_notes_of_another_thread_are_not_taken_for_this_files(tmp_path):
    notes = volume_module._NibabelNotes()
    logger = logging.getLogger("nibabel.global")
    logger.addFilter(notes)
    try:
        with notes.collecting() as outer:
            other = threading.Thread(target=logger.warning, args=("from another read",))
            other.start()
            other.join()
            logger.warning("from this read")
            logger.error("a fault nibabel raises on")
            with notes.collecting() as inner:
                logger.warning("from a nested read")
            logger.warning("this read again")
        passed = notes.filter(logging.LogRecord("nibabel.global", logging.WARNING, "", 0, "after", None, None))
    finally:
        logger.removeFilter(notes)
    assert outer == ["from this read", "this read again"] and inner == ["from a nested read"]
    assert passed  # outside a read, records go on as usual


def test_label_values_outside_range_are_refused(tmp_path):
    data = np.zeros((4, 5, 6), np.uint8)
    data[0, 0, 0] = 7
    path = save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "bad_labels.nii.gz")
    with pytest.raises(FlareSegError, match=r"bad_labels.nii.gz: labels \[7\] outside 0..4$"):
        read_labels(path)
    # Scaled labels are said as the labels they stand for: a slope of 2 made them [6.0, 8.0] (evalF review).
    scaled = nib.Nifti1Image(np.array([[[0, 3, 4]]], np.uint8), np.eye(4))
    scaled.header.set_slope_inter(2.0, 0.0)
    path = save(scaled, tmp_path / "scaled.nii.gz")
    with pytest.raises(FlareSegError, match=r"scaled.nii.gz: labels \[6, 8\] outside 0..4$"):
        read_labels(path)
    many = nib.Nifti1Image(np.arange(20, dtype=np.uint8).reshape(1, 4, 5), np.eye(4))
    many.header.set_slope_inter(2.0, 0.0)  # 0, 2, ..., 38: 17 of them outside, summed up as whole labels too
    path = save(many, tmp_path / "many.nii.gz")
    with pytest.raises(FlareSegError, match=r"many.nii.gz: 17 label values from 6 to 38 outside 0..4$"):
        read_labels(path)
    # A CT given as a label map: its thousands of values are summed up, not listed.
    ct = np.arange(-1000, 1400, dtype=np.int16).reshape(4, 20, 30)
    path = save(nib.Nifti1Image(ct, np.eye(4)), tmp_path / "a_ct.nii.gz")
    with pytest.raises(FlareSegError) as err:
        read_labels(path)
    assert str(err.value) == (
        f"{path}: 2395 label values from -1000 to 1399 outside 0..4; is it a CT image, not a label map?"
    )


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


def test_a_folder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    def refuse(self):  # a stand-in for a folder without read permission (root here lists any folder)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(FlareSegError) as info:
        find_cases(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot list the folder (Permission denied)"


# --- no-copy I/O and ISA-L gzip (issue 10) ---------------------------------------------


@pytest.fixture(params=["isal", "stdlib"])
def gzip_backend(request, monkeypatch) -> str:
    """Run a test with ISA-L and again with the standard-library fallback (isal hidden)."""
    if request.param == "stdlib":
        monkeypatch.setattr(volume_module, "_igzip", None)
        monkeypatch.setattr(volume_module, "_isal_zlib", None)
    else:
        assert volume_module._igzip is not None, "isal is a declared dependency and must import here"
    return request.param


def _phantom_file(tmp_path, axcodes, name="ct.nii.gz", shape=(40, 36, 20)):
    ct, lab = make_phantom(shape, axcodes=axcodes, seed=1).to_nifti()
    return save(ct, tmp_path / name), lab


@pytest.mark.parametrize("axcodes", ORIENTATIONS, ids=lambda c: "".join(c))
def test_phantom_round_trips_voxel_exactly_in_every_orientation_with_either_gzip(tmp_path, axcodes, gzip_backend):
    path, lab = _phantom_file(tmp_path, axcodes)
    vol = read_ct(path)
    ras = read_ct(save(make_phantom((40, 36, 20), seed=1).to_nifti()[0], tmp_path / "ras.nii.gz"))
    np.testing.assert_array_equal(vol.array, ras.array)
    canonical_labels = to_canonical(np.asanyarray(lab.dataobj), vol.geometry)
    for suffix in NIFTI_SUFFIXES:
        written = nib.load(write_labels(canonical_labels, vol.geometry, tmp_path / f"pred{suffix}"))
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(lab.dataobj))
        assert nib.aff2axcodes(written.affine) == axcodes


def test_a_nifti_2_input_gets_a_nifti_2_label_map_on_its_exact_grid_without_warnings(tmp_path, gzip_backend, caplog):
    ct, lab = make_phantom((40, 36, 20), axcodes=("L", "P", "S"), seed=1).to_nifti()
    affine = ct.affine.copy()
    affine[0, 3] += 1e-7  # beyond float32: a NIfTI-1 header would round it
    two = nib.Nifti2Image(np.asanyarray(ct.dataobj), affine)
    two.header.set_qform(affine, 1)
    two.header.set_sform(affine, 2)
    nib.save(two, tmp_path / "ct.nii.gz")
    vol = read_ct(tmp_path / "ct.nii.gz")
    with caplog.at_level("WARNING"):
        out = write_labels(to_canonical(np.asanyarray(lab.dataobj), vol.geometry), vol.geometry, tmp_path / "p.nii.gz")
    assert caplog.records == []  # nibabel said "sizeof_hdr should be 348" when a NIfTI-1 image took this header
    written = nib.load(out)
    assert isinstance(written, nib.Nifti2Image) and np.array_equal(written.affine, affine)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(lab.dataobj))


def test_read_returns_a_view_of_one_buffer_with_flips_as_negative_strides(tmp_path):
    path, _ = _phantom_file(tmp_path, ("L", "P", "S"))
    vol = read_ct(path)
    stored = np.asanyarray(nib.load(path).dataobj)  # (X, Y, Z) as nibabel reads it
    np.testing.assert_array_equal(vol.array, stored.transpose(2, 1, 0)[:, ::-1, ::-1])
    assert not vol.array.flags.owndata
    assert vol.array.strides[1] < 0 and vol.array.strides[2] < 0  # L and P flipped, not copied
    assert vol.array.flags.writeable
    base = vol.array.base
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert base.nbytes == vol.array.nbytes  # one buffer, exactly the voxels
    ras = read_ct(_phantom_file(tmp_path, ("R", "A", "S"), "ras.nii.gz")[0]).array
    assert ras.flags.c_contiguous and not ras.flags.owndata


def test_isal_and_stdlib_reads_give_identical_volumes_and_labels(tmp_path, monkeypatch):
    path, lab = _phantom_file(tmp_path, ("P", "I", "L"))
    mask = save(lab, tmp_path / "mask.nii.gz")
    fast, fast_labels = read_ct(path), read_labels(mask)
    monkeypatch.setattr(volume_module, "_isal_zlib", None)
    slow, slow_labels = read_ct(path), read_labels(mask)
    np.testing.assert_array_equal(fast.array, slow.array)
    assert fast.array.dtype == slow.array.dtype and (fast.slope, fast.inter) == (slow.slope, slow.inter)
    np.testing.assert_array_equal(fast.geometry.affine, slow.geometry.affine)
    np.testing.assert_array_equal(fast_labels[0], slow_labels[0])
    np.testing.assert_array_equal(fast_labels[0], np.asanyarray(lab.dataobj))


def test_big_endian_scaled_and_multi_member_gzip_files_read_alike_with_either_gzip(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4000, (9, 8, 7)).astype(np.uint16)
    img = nib.Nifti1Image(raw, np.diag([0.7, 0.8, 2.0, 1.0]), nib.Nifti1Header(endianness=">"))
    img.header.set_slope_inter(1.0, -1024.0)
    big = save(img, tmp_path / "big.nii.gz")
    payload = gzip.decompress(big.read_bytes())
    multi = tmp_path / "multi.nii.gz"  # two gzip members, split inside the voxels (as `cat a.gz b.gz`)
    multi.write_bytes(gzip.compress(payload[:500]) + gzip.compress(payload[500:]))
    expected = raw.astype(np.float32).transpose(2, 1, 0) - 1024
    results = []
    for hide in (False, True):
        if hide:
            monkeypatch.setattr(volume_module, "_isal_zlib", None)
        for path in (big, multi):
            vol = read_ct(path)
            np.testing.assert_array_equal(vol.hu(), expected)
            results.append(vol.array)
    assert all(r.dtype == results[0].dtype for r in results) and results[0].dtype.byteorder == ">"


@pytest.mark.parametrize("kind", ["truncated-header", "truncated-data", "not-nifti-gz", "corrupt-data"])
def test_damaged_gzip_gives_the_same_error_with_isal_and_without(tmp_path, monkeypatch, kind):
    inputs = bad_inputs(tmp_path)
    good = (tmp_path / "good.nii.gz").read_bytes()
    corrupt = bytearray(good)
    corrupt[len(good) // 2 : len(good) // 2 + 64] = bytes(64)  # zeros inside the deflate stream
    (tmp_path / "in8.nii.gz").write_bytes(bytes(corrupt))
    path = tmp_path / "in8.nii.gz" if kind == "corrupt-data" else inputs[kind][0]
    messages = []
    for hide in (False, True):
        if hide:
            monkeypatch.setattr(volume_module, "_isal_zlib", None)
        with pytest.raises(FlareSegError) as info:
            read_ct(path)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    expected = "truncated or corrupt voxel data" if kind == "corrupt-data" else inputs[kind][1]
    assert expected in messages[0] and str(path) in messages[0] and "\n" not in messages[0]


def test_written_gzip_is_ordinary_and_carries_the_same_nifti_stream_as_nibabels_writer(tmp_path, monkeypatch):
    path, lab = _phantom_file(tmp_path, ("L", "P", "S"))
    vol = read_ct(path)
    labels = to_canonical(np.asanyarray(lab.dataobj), vol.geometry)
    fast = write_labels(labels, vol.geometry, tmp_path / "fast.nii.gz").read_bytes()
    monkeypatch.setattr(volume_module, "_igzip", None)
    slow = write_labels(labels, vol.geometry, tmp_path / "slow.nii.gz").read_bytes()
    # The standard library inflates the ISA-L file to the very bytes nibabel's zlib writer stores.
    assert gzip.decompress(fast) == gzip.decompress(slow)
    assert zlib.decompress(fast, wbits=31) == gzip.decompress(slow)  # one member, valid CRC and length
    # No file name (the temporary one would leak) and no time stamp: same labels, same file.
    assert fast[:4] == b"\x1f\x8b\x08\x00" and fast[4:8] == bytes(4)
    monkeypatch.undo()
    assert write_labels(labels, vol.geometry, tmp_path / "again.nii.gz").read_bytes() == fast
    a, b = nib.load(tmp_path / "fast.nii.gz"), nib.load(tmp_path / "slow.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert a.header.binaryblock == b.header.binaryblock
    assert sorted(p.name for p in tmp_path.iterdir() if ".part" in p.name) == []


def test_written_gzip_reads_in_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (ITK's reader) is not installed here")
    path, lab = _phantom_file(tmp_path, ("L", "P", "S"))
    vol = read_ct(path)
    out = write_labels(to_canonical(np.asanyarray(lab.dataobj), vol.geometry), vol.geometry, tmp_path / "o.nii.gz")
    itk_array = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))  # ITK gives (Z, Y, X) of the stored axes
    np.testing.assert_array_equal(itk_array, np.asanyarray(lab.dataobj).transpose(2, 1, 0))


def test_from_canonical_is_a_view_and_to_canonical_copies_only_when_asked(tmp_path):
    path, lab = _phantom_file(tmp_path, ("A", "S", "R"))
    geometry = read_ct(path).geometry
    stored = np.asanyarray(lab.dataobj)
    canonical = to_canonical(stored, geometry)
    assert canonical.flags.c_contiguous and canonical.flags.owndata
    view = to_canonical(stored, geometry, contiguous=False)
    assert np.shares_memory(view, stored)
    np.testing.assert_array_equal(view, canonical)
    back = from_canonical(canonical, geometry)
    assert np.shares_memory(back, canonical)
    np.testing.assert_array_equal(back, stored)


def test_the_module_imports_and_round_trips_without_isal(tmp_path):
    code = (
        "import sys; sys.modules['isal'] = None\n"
        "import numpy as np, nibabel as nib\n"
        "from flareseg import volume\n"
        "assert volume._igzip is None and volume._isal_zlib is None\n"
        f"img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4))\n"
        f"nib.save(img, {str(tmp_path / 'a.nii.gz')!r})\n"
        f"v = volume.read_ct({str(tmp_path / 'a.nii.gz')!r})\n"
        f"out = volume.write_labels((v.array % 5).astype(np.uint8), v.geometry, {str(tmp_path / 'b.nii.gz')!r})\n"
        "assert (np.asanyarray(nib.load(out).dataobj) == np.arange(60).reshape(3, 4, 5) % 5).all()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_streamed_inflate_handles_large_ratios_padding_trailing_bytes_and_checksums(tmp_path, gzip_backend):
    # 10 MB of zeros inflate from a few kB: the output is taken in 8 MiB pieces.
    data = np.zeros((128, 128, 320), np.int16)
    data[5, 6, 300] = 7
    payload = gzip.decompress(save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "z.nii.gz").read_bytes())
    cut = len(payload) - 3
    variants = {
        "padded": gzip.compress(payload[:cut]) + bytes(10) + gzip.compress(payload[cut:]),
        "trailing bytes": gzip.compress(payload + b"extra bytes after the voxels"),
        "three members": b"".join(gzip.compress(payload[a:b]) for a, b in ((0, 100), (100, 9 << 20), (9 << 20, None))),
    }
    for name, blob in variants.items():
        path = tmp_path / f"{name.replace(' ', '_')}.nii.gz"
        path.write_bytes(blob)
        vol = read_ct(path)
        assert vol.array.shape == (320, 128, 128) and vol.array[300, 6, 5] == 7, name
        assert np.count_nonzero(vol.array) == 1, name
    bad_crc = bytearray(gzip.compress(payload))
    bad_crc[-8] ^= 0xFF  # the CRC-32 of the trailer: nibabel alone would not notice
    (tmp_path / "crc.nii.gz").write_bytes(bytes(bad_crc))
    with pytest.raises(FlareSegError, match=r"crc.nii.gz: truncated or corrupt voxel data \(the gzip stream fails"):
        read_ct(tmp_path / "crc.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes(variants["three members"][:-20])  # cut inside the last member
    with pytest.raises(FlareSegError, match=r"cut\.nii\.gz: truncated or corrupt voxel data"):
        read_ct(tmp_path / "cut.nii.gz")


# --- parallel inflate (rapidgzip, --read-threads) --------------------------------------------


def _read_outcome(path, threads: int) -> tuple[str, object]:
    try:
        vol = read_ct(path, threads=threads)
    except FlareSegError as exc:
        return "error", str(exc)
    return "ok", (vol.array.copy(), vol.array.strides, vol.array.dtype, vol.slope, vol.inter, vol.geometry.axcodes)


@pytest.mark.parametrize("threads", [0, 2, 3])
def test_parallel_inflate_reads_what_one_thread_reads_good_files_and_damaged_ones(tmp_path, monkeypatch, threads):
    pytest.importorskip("rapidgzip", reason="rapidgzip (the [dev] and [gpu] extras) is not installed")
    used: list[int] = []
    real = volume_module._inflate_parallel

    def spy(path, offset, out, n):
        ok = real(path, offset, out, n)
        used.append(ok)
        return ok

    monkeypatch.setattr(volume_module, "_inflate_parallel", spy)
    data = np.zeros((96, 80, 300), np.int16)
    data[5, 6, 290], data[90, 70, 3] = 7, -3
    payload = gzip.decompress(save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "z.nii.gz").read_bytes())
    blobs = {
        "one member": gzip.compress(payload),
        "three members": b"".join(gzip.compress(payload[a:b]) for a, b in ((0, 100), (100, 3 << 20), (3 << 20, None))),
        "trailing bytes": gzip.compress(payload + b"extra bytes after the voxels"),
        "padded": gzip.compress(payload[:-3]) + bytes(10) + gzip.compress(payload[-3:]),  # rapidgzip refuses: serial
    }
    one = gzip.compress(payload)
    bad_crc = bytearray(one)
    bad_crc[-8] ^= 0xFF
    blobs["bad crc"] = bytes(bad_crc)
    blobs["bad length"] = one[:-1] + bytes([one[-1] ^ 1])
    blobs["cut in the data"] = one[: len(one) // 2]
    blobs["cut in the trailer"] = one[:-5]
    corrupt = bytearray(one)
    corrupt[len(one) // 2 : len(one) // 2 + 64] = bytes(64)
    blobs["corrupt"] = bytes(corrupt)
    # Megabytes after the voxels in the same member, with a wrong CRC: rapidgzip stops at the
    # voxels and would never see it.
    tail = bytearray(gzip.compress(payload + np.random.default_rng(0).bytes(6 << 20), compresslevel=1))
    tail[-8] ^= 0xFF
    blobs["big tail, bad crc"] = bytes(tail)
    with_fhcrc = bytearray(one)  # FLG.FHCRC set, with a wrong header CRC (two bytes after the header)
    with_fhcrc[3] |= 0x02
    blobs["header crc"] = bytes(with_fhcrc[:10]) + b"\x00\x00" + bytes(with_fhcrc[10:])
    took: dict[str, bool] = {}  # did rapidgzip's own bytes serve, or the serial reader's retry?
    for name, blob in blobs.items():
        path = tmp_path / f"{name.replace(' ', '_')}.nii.gz"
        path.write_bytes(blob)
        used.clear()
        serial, parallel = _read_outcome(path, 1), _read_outcome(path, threads)
        # The parallel reader was tried, except where the header's grid is more than the cut
        # file could hold at deflate's best ratio (zeros come close): refused before either reads.
        assert used or name == "cut in the data", name
        took[name] = bool(used) and used[-1]
        assert serial[0] == parallel[0], (name, serial, parallel)
        if serial[0] == "error":
            assert serial[1] == parallel[1] and str(path) in serial[1], name
        else:
            (array, *rest), (parallel_array, *parallel_rest) = serial[1], parallel[1]  # type: ignore[misc]
            np.testing.assert_array_equal(parallel_array, array)
            assert parallel_rest == rest, name
    assert took["one member"] and took["three members"]
    # The serial reader decided these: more data after the voxels (its checksum lies beyond
    # what rapidgzip reads), a header CRC (rapidgzip ignores it), padding, a short stream.
    assert not any(took[k] for k in ("trailing bytes", "big tail, bad crc", "header crc", "padded", "cut in the data"))


def test_a_cut_off_file_goes_to_the_serial_reader_without_waking_rapidgzip(tmp_path, monkeypatch):
    # rapidgzip prints its own diagnostics to stderr on a damaged stream; the last four
    # bytes of a cut-off file cannot end the voxels' stream, so it is never asked.
    rapidgzip = pytest.importorskip("rapidgzip", reason="rapidgzip (the [dev] and [gpu] extras) is not installed")
    opened: list[str] = []
    real_open = rapidgzip.open
    monkeypatch.setattr(rapidgzip, "open", lambda path, **kw: opened.append(path) or real_open(path, **kw))
    data = np.arange(64 * 64 * 40, dtype=np.int16).reshape(64, 64, 40)
    payload = gzip.decompress(save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "z.nii.gz").read_bytes())
    whole = gzip.compress(payload)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole[: len(whole) - 1000])
    assert int.from_bytes(cut.read_bytes()[-4:], "little") >= len(payload)  # what the check relies on here
    with pytest.raises(FlareSegError, match="truncated or corrupt voxel data"):
        read_ct(cut, threads=2)
    assert opened == []
    members = tmp_path / "members.nii.gz"  # several members: the last one's length is a share of the whole
    members.write_bytes(gzip.compress(payload[:5000]) + gzip.compress(payload[5000:]))
    np.testing.assert_array_equal(read_ct(members, threads=2).array, read_ct(members).array)
    assert opened == [str(members)]


@pytest.mark.parametrize("axcodes", ORIENTATIONS[:3], ids=lambda c: "".join(c))
def test_parallel_inflate_round_trips_every_orientation(tmp_path, axcodes):
    pytest.importorskip("rapidgzip", reason="rapidgzip (the [dev] and [gpu] extras) is not installed")
    path, _ = _phantom_file(tmp_path, axcodes)
    np.testing.assert_array_equal(read_ct(path, threads=2).array, read_ct(path).array)


def test_read_threads_are_refused_without_rapidgzip_or_out_of_range(tmp_path, monkeypatch):
    path, _ = _phantom_file(tmp_path, ("R", "A", "S"))
    for bad in (-1, 2**31):
        with pytest.raises(FlareSegError, match=r"read threads must be 0 \(all cores\) to 1024, got"):
            read_ct(path, threads=bad)
    monkeypatch.setitem(sys.modules, "rapidgzip", None)  # as if it were not installed
    with pytest.raises(FlareSegError, match=r"reading with 4 threads needs rapidgzip: pip install rapidgzip"):
        read_ct(path, threads=4)
    with pytest.raises(FlareSegError, match=r"reading with all threads needs rapidgzip: pip install rapidgzip"):
        read_ct(path, threads=0)  # 0 is "all cores": it needs rapidgzip too
    assert read_ct(path).array.shape == (20, 36, 40)  # one thread needs nothing more


# --- voxels handed over while a file inflates (on_voxels) --------------------------------------------------


def _pieces_seen(path, **kwargs) -> list[np.ndarray]:
    seen: list[np.ndarray] = []
    read_ct(path, on_voxels=seen.append, **kwargs)
    return seen


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("P", "I", "L")], ids="".join)
def test_on_voxels_sees_every_stored_voxel_once_in_storage_order(tmp_path, monkeypatch, axcodes, gzip_backend):
    monkeypatch.setattr(volume_module, "_INFLATE_PIECE", 999)  # many pieces, none aligned to a voxel or a slice
    monkeypatch.setattr(volume_module, "_VOXEL_PIECE", 1000)
    path, _ = _phantom_file(tmp_path, axcodes)
    seen = _pieces_seen(path)
    stored = np.asanyarray(nib.load(path).dataobj)  # nibabel's own reader: (X, Y, Z), Fortran order
    assert len(seen) > 3 and all(p.ndim == 1 and p.dtype == stored.dtype for p in seen)
    assert all(p.size * p.itemsize >= 1000 for p in seen[:-1])
    np.testing.assert_array_equal(np.concatenate(seen), stored.reshape(-1, order="F"))


def test_on_voxels_covers_multi_member_and_big_endian_files_and_skips_other_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(volume_module, "_INFLATE_PIECE", 63)
    monkeypatch.setattr(volume_module, "_VOXEL_PIECE", 64)
    raw = np.random.default_rng(0).integers(-1000, 3000, (9, 8, 7)).astype(">i2")
    image = nib.Nifti1Image(raw, np.eye(4), nib.Nifti1Header(endianness=">"))
    image.set_data_dtype(">i2")
    big = save(image, tmp_path / "big.nii.gz")
    payload = gzip.decompress(big.read_bytes())
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(payload[:501]) + gzip.compress(payload[501:]))  # split inside a voxel
    for path in (big, multi):
        seen = _pieces_seen(path)
        assert len(seen) > 3 and all(p.dtype == np.dtype(">i2") for p in seen)
        np.testing.assert_array_equal(np.concatenate(seen), raw.reshape(-1, order="F"))
    plain = save(nib.Nifti1Image(raw, np.eye(4)), tmp_path / "plain.nii")  # memory-mapped: nothing to hand over
    assert _pieces_seen(plain) == []
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(big.read_bytes()[:-40])
    seen = []
    with pytest.raises(FlareSegError, match=r"cut\.nii\.gz: truncated or corrupt voxel data"):
        read_ct(cut, on_voxels=seen.append)
    assert sum(p.size for p in seen) < raw.size  # a failed read hands over part of the voxels at most


def test_an_error_in_on_voxels_is_raised_as_it_is_not_as_a_damaged_file(tmp_path):
    path, _ = _phantom_file(tmp_path, ("R", "A", "S"))

    def refuse(piece):
        raise ValueError("the caller's own bug")

    with pytest.raises(ValueError, match="the caller's own bug"):
        read_ct(path, on_voxels=refuse)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_header_claiming_a_huge_grid_fails_without_filling_it(tmp_path, suffix):
    from flareseg.runtime.pipeline import peak_rss_mb, reset_peak_rss

    path = save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), tmp_path / f"small{suffix}")
    raw = bytearray(gzip.decompress(path.read_bytes()) if suffix == ".nii.gz" else path.read_bytes())
    raw[42:48] = np.array([1000, 1000, 500], "<i2").tobytes()  # dim[1..3]: a 1 GB int16 grid
    raw = bytes(raw)
    path.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    if not reset_peak_rss():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak resident memory")
    before = peak_rss_mb()
    with pytest.raises(FlareSegError, match=r"small\.nii(\.gz)?: truncated or corrupt voxel data"):
        read_ct(path)
    after = peak_rss_mb()
    assert before is not None and after is not None
    assert after - before < 256  # nibabel's second read would first zero a 1 GB bytearray


def test_a_vox_offset_far_beyond_the_file_is_named_as_where_the_voxels_start(tmp_path):
    path = save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), tmp_path / "offset.nii.gz")
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[108:112] = np.array([1e12], "<f4").tobytes()  # vox_offset
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(FlareSegError) as err:
        read_ct(path)
    assert "the header's grid needs 512 bytes from byte 999,999,995,904 (vox_offset), more than a" in str(err.value)


def test_a_cut_trailer_and_an_unreadable_disk_are_told_apart_from_a_damaged_stream(tmp_path, monkeypatch):
    path, _ = _phantom_file(tmp_path, ("R", "A", "S"))
    whole = path.read_bytes()
    cut = tmp_path / "trailer.nii.gz"
    cut.write_bytes(whole[:-5])  # every voxel is there; the checksum and length are not
    with pytest.raises(FlareSegError, match=r"cut off after the last voxel, before its checksum"):
        read_ct(cut)

    class FailingDisk:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n=-1):
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(volume_module, "open", FailingDisk, raising=False)  # a double for a failing disk
    with pytest.raises(FlareSegError, match=r"ct\.nii\.gz: cannot read the file \(Input/output error\)"):
        read_ct(path)


def test_a_gzip_file_named_nii_and_scaling_beyond_float32_are_one_line_each(tmp_path):
    data = np.zeros((4, 5, 6), np.int16)
    gz = save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ct.nii.gz")
    misnamed = tmp_path / "ct.nii"
    misnamed.write_bytes(gz.read_bytes())
    with pytest.raises(FlareSegError, match=r"ct.nii: a gzip file named without .gz: rename it to end in .nii.gz"):
        read_ct(misnamed)
    data[0, 0, 0] = 100
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(1e38, 0)
    with pytest.raises(FlareSegError, match=r"scaled.nii.gz: scl_slope=1e\+38 .* beyond the float32 range"):
        read_ct(save(img, tmp_path / "scaled.nii.gz"))
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4))
    img.header.set_slope_inter(1e38, 0)  # every stored value is 0: no intensity overflows
    assert read_ct(save(img, tmp_path / "zeros.nii.gz")).to_hu(np.array([0], np.int16)).tolist() == [0.0]


@pytest.mark.parametrize(
    ("dtype", "slope", "inter", "merged"),
    [
        (np.int16, 1.0, 3e38, True),  # every voxel would be 3e38: one intensity, a segmentation of nothing
        (np.int16, 1.0, 1e8, True),  # float32 steps by 8 there
        (np.int16, 1.0, 1e7, True),  # steps by 1: two roundings of up to half a step each can merge neighbours
        (np.int16, 1.0, 4e6, False),  # steps by 0.25: each stored value keeps its own intensity
        (np.int16, 1e-3, 1e5, True),  # steps by 0.0078 at 1e5: more than 1e-3
        (np.int16, 1e-3, 1e3, False),
        (np.int32, 1.0, 4e6, False),  # the type's bounds rule nothing out: the voxels' range decides
        (np.int32, 1.0, 3e7, True),
        (np.int32, 1.0, 0.0, False),  # values within +-1000: no offset, nothing merges
        (np.float32, 1.0, 1e9, True),  # a range of 2,000 at 1e9 (steps of 64) keeps 31 levels, not 4,096
        (np.float32, 1.0, 1e5, False),
        (np.float32, 2.0, 0.0, False),  # no offset: scaling keeps every value's relative precision
    ],
)
def test_scaling_whose_float32_intensities_would_merge_stored_values_is_refused(tmp_path, dtype, slope, inter, merged):
    data = np.linspace(-1000, 1000, 4 * 5 * 6).reshape(4, 5, 6).astype(dtype)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(slope, inter)
    path = save(img, tmp_path / "ct.nii.gz")
    if merged:
        with pytest.raises(
            FlareSegError,
            match=r"ct\.nii\.gz: scl_slope=.* and scl_inter=.* put intensities near .*, "
            r"where float32 steps by .*: stored values .* apart would merge into one intensity",
        ):
            read_ct(path)
    else:
        volume = read_ct(path)
        stored = np.unique(volume.array)
        assert len(np.unique(volume.to_hu(stored))) == len(stored)  # as many intensities as stored values
        np.testing.assert_allclose(volume.to_hu(stored), stored * slope + inter, rtol=1e-6)


def test_integers_beyond_float32_s_exact_range_or_a_slope_float32_cannot_hold_are_refused(tmp_path):
    """Without an offset too: int32 values near 2**25 step by 4 in float32, so 64 of them made 17 intensities;
    and a slope below float32's smallest normal number (1e-50, which DICOM's decimal strings can say) is 0."""
    from flareseg.volume import check_intensity_scaling

    big = (2**25 + np.arange(64, dtype=np.int32)).reshape(4, 4, 4)
    with pytest.raises(
        FlareSegError,
        match=r"big: scl_slope=1 and scl_inter=0 put intensities near 3\.35.*e\+07, "
        r"where float32 steps by 4: stored values 1 apart would merge",
    ):
        check_intensity_scaling("big", big, 1.0, 0.0)
    check_intensity_scaling("small", big - 2**25, 1.0, 0.0)  # the same count of values, near 0: kept apart
    for data in (np.zeros((2, 2, 2), np.int16), np.zeros((2, 2, 2), np.float32)):
        with pytest.raises(FlareSegError, match=r"tiny: scl_slope=1e-50 and scl_inter=0: the slope is below float32"):
            check_intensity_scaling("tiny", data, 1e-50, 0.0)


def test_a_file_that_is_not_what_its_name_says_or_cannot_be_read_is_named_for_its_real_problem(tmp_path, monkeypatch):
    plain = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), -1000, np.int16), np.eye(4)), plain)
    named_gz = tmp_path / "a_0000.nii.gz"
    named_gz.write_bytes(plain.read_bytes())  # uncompressed, named .nii.gz
    with pytest.raises(FlareSegError, match=r"a_0000\.nii\.gz: an uncompressed NIfTI file named \.gz: rename it"):
        read_ct(named_gz)
    junk = tmp_path / "b_0000.nii.gz"
    junk.write_bytes(b"hello world" * 40)
    with pytest.raises(FlareSegError, match=r"b_0000\.nii\.gz: not a NIfTI image \(not a gzip file, as its \.gz name"):
        read_ct(junk)
    good = tmp_path / "c_0000.nii.gz"
    nib.save(nib.load(plain), good)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(good))

    monkeypatch.setattr(nib, "load", refused)  # as for a file without read permission (root could read it here)
    monkeypatch.setattr(gzip, "open", refused)
    with pytest.raises(FlareSegError, match=r"c_0000\.nii\.gz: cannot read \(Permission denied\)$"):
        read_ct(good)


def test_complex_voxels_are_refused_in_one_line_before_they_are_read(tmp_path):
    # numpy once cast them to real first, printing a ComplexWarning before the error.
    path = tmp_path / "c_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.complex64), np.eye(4)), path)
    for read in (read_ct, volume_module.read_labels):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(FlareSegError, match=r"c_0000\.nii\.gz: unsupported voxel type complex64"):
                read(path)


def test_an_uncompressed_file_is_read_not_memory_mapped(tmp_path):
    # A mapped .nii cut short by another process mid-run ended the whole run with SIGBUS.
    img = make_phantom((20, 24, 6), (4.0, 3.0, 5.0), seed=1).to_nifti()[0]
    vol = read_ct(save(img, tmp_path / "c_0000.nii"))
    base = vol.array
    while base is not None:
        assert not isinstance(base, np.memmap | mmap.mmap)
        base = getattr(base, "base", None)


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("A", "S", "R")])
def test_canonical_spacing_and_layout_keep_y_and_x_apart(tmp_path, axcodes):
    # Every other fixture has equal x and y spacing on square slices, where swapping them goes unseen.
    img = reorient(make_phantom((40, 56, 12), (0.7, 0.8, 2.5), seed=2).to_nifti()[0], axcodes)
    vol = read_ct(save(img, tmp_path / "c_0000.nii.gz"))
    assert vol.geometry.canonical_spacing == pytest.approx((2.5, 0.8, 0.7))
    assert vol.array.shape == (12, 56, 40)
    assert canonical_order(("x", "y", "z"), vol.geometry.to_canonical) == tuple(
        ("x", "y", "z")[int(np.flatnonzero(vol.geometry.to_canonical[:, 0] == axis)[0])] for axis in (2, 1, 0)
    )


def test_label_maps_are_read_as_uint8_with_their_scaling_and_only_whole_classes(tmp_path):
    stored = np.zeros((4, 5, 6), np.uint8)
    stored[1, 1, 1], stored[2, 2, 2] = 3, 1
    img = nib.Nifti1Image(stored, np.eye(4))
    img.header.set_slope_inter(1.0, 1.0)  # stored 0..3 stand for 1..4
    labels, _ = read_labels(save(img, tmp_path / "scaled.nii.gz"))
    assert labels.dtype == np.uint8 and labels[1, 1, 1] == 4 and labels[0, 0, 0] == 1
    fractional = np.zeros((4, 5, 6), np.float32)
    fractional[0, 0, 0] = 1.5
    with pytest.raises(FlareSegError, match="non-integer values"):
        read_labels(save(nib.Nifti1Image(fractional, np.eye(4)), tmp_path / "probabilities.nii.gz"))
    doubled = nib.Nifti1Image(np.where(stored == 3, 2, stored).astype(np.uint8), np.eye(4))
    doubled.header.set_slope_inter(2.0, 0.0)  # stored 0, 1, 2 stand for 0, 2, 4: the slope is applied
    labels, _ = read_labels(save(doubled, tmp_path / "doubled.nii.gz"))
    assert labels[1, 1, 1] == 4 and labels[2, 2, 2] == 2 and labels[0, 0, 0] == 0
    halves = nib.Nifti1Image(stored, np.eye(4))
    halves.header.set_slope_inter(0.5, 0.0)  # 3 stands for 1.5: a step of half a class leaves it in doubt
    with pytest.raises(FlareSegError, match=r"halves\.nii\.gz: label map holds non-integer values"):
        read_labels(save(halves, tmp_path / "halves.nii.gz"))
    five = np.zeros((4, 5, 6), np.uint8)
    five[0, 0, 0] = 5  # one past the last class
    with pytest.raises(FlareSegError, match=r"labels \[5\] outside 0..4$"):
        read_labels(save(nib.Nifti1Image(five, np.eye(4)), tmp_path / "five.nii.gz"))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
def test_a_float_label_map_saved_to_an_integer_type_reads_back_as_its_classes(tmp_path, dtype, caplog):
    """nibabel saves float labels 0..4 into uint8 with scl_slope 4/255 (int16: 6e-5 and an offset), so 2 reads
    back as 1.992; it was refused as holding non-integer values (int32: as intensities float32 would merge).
    Each is within half a stored step of its class: read rounded, with a warning naming the file. Given as a
    CT, it is still refused as a label map."""
    truth = np.zeros((4, 5, 6), np.float32)
    truth[0, 0, :5] = [0, 1, 2, 3, 4]
    img = nib.Nifti1Image(truth, np.eye(4))
    img.set_data_dtype(dtype)
    path = save(img, tmp_path / "float_labels.nii.gz")
    assert not np.array_equal(nib.load(path).get_fdata(), truth)  # the file really holds inexact classes
    with caplog.at_level(logging.WARNING, logger="flareseg.volume"):
        labels, _ = read_labels(path)
    np.testing.assert_array_equal(labels, truth.astype(np.uint8))
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"{path}: values up to ") and "from whole classes (scl_slope=" in said
    assert said.endswith("; read rounded to the nearest")
    if dtype != np.int32:  # an int32 map of slope 1e-9 is refused as a CT for its scaling, before its values
        with pytest.raises(FlareSegError, match=r"float_labels\.nii\.gz: looks like a label map, not a CT"):
            check_ct_intensities(read_ct(path), path, "segmentation")


@pytest.mark.parametrize(
    ("stored", "slope", "why"),
    [
        ([0, 3, 5, 7, 10], 0.4, "a step of 0.4 class: 1.2 and 2.8 are not one class or the next beyond doubt"),
        ([0, 1, 255], 1 / 255, "code 1 is 0.004: within a class's tolerance, but not half a step of 1/255 from it"),
    ],
)
def test_a_label_map_scaled_coarsely_or_off_its_steps_is_refused(tmp_path, stored, slope, why):
    data = np.zeros((4, 5, 6), np.uint8)
    data[0, 0, : len(stored)] = stored
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(slope, 0.0)
    with pytest.raises(FlareSegError, match=r"coarse\.nii\.gz: label map holds non-integer values"):
        read_labels(save(img, tmp_path / "coarse.nii.gz"))


def test_one_non_finite_voxel_is_enough_to_refuse_a_ct(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(FlareSegError, match=r"one_nan.nii.gz: 1 voxel is not finite \(NaN or infinity\)"):
        read_ct(save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "one_nan.nii.gz"))


def test_the_input_is_not_overwritten_through_a_relative_path_or_a_dot_dot(tmp_path, monkeypatch):
    path = save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), tmp_path / "ct.nii.gz")
    (tmp_path / "sub").mkdir()
    before = path.read_bytes()
    vol = read_ct(path)
    monkeypatch.chdir(tmp_path)
    for other in (Path("ct.nii.gz"), tmp_path / "sub" / ".." / "ct.nii.gz"):
        with pytest.raises(FlareSegError, match="refusing to overwrite the input"):
            write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, other)
    assert path.read_bytes() == before


def test_a_volume_with_an_empty_axis_is_one_line_naming_it(tmp_path):
    path = save(nib.Nifti1Image(np.zeros((4, 0, 6), np.int16), np.eye(4)), tmp_path / "empty.nii.gz")
    for read in (read_ct, read_labels):
        with pytest.raises(FlareSegError, match=r"empty.nii.gz: empty volume of shape \(4, 0, 6\)"):
            read(path)


def test_a_label_map_does_not_keep_the_ct_s_display_window(tmp_path):
    # A viewer opens a file with its cal_min/cal_max: the CT's -1000..1000 would show labels 0..4 as one grey.
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4))
    img.header["cal_min"], img.header["cal_max"] = -1000, 1000
    vol = read_ct(save(img, tmp_path / "ct.nii.gz"))
    write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, tmp_path / "labels.nii.gz")
    header = nib.load(tmp_path / "labels.nii.gz").header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 0.0)


def test_a_label_map_is_told_by_every_value_being_a_class_0_to_4():
    # The bounds were pinned only from outside (an export test, through percentile bounds): one class too many,
    # or a value a little off a class, is no label map; values within rounding of 0..4 are.
    for values in ([0.0, 4.0], [0.0, 1.0, 4.005], [-0.005, 2.0]):
        with pytest.raises(FlareSegError, match=r"x\.nii\.gz: looks like a label map, not a CT"):
            check_not_label_map(np.array(values), "x.nii.gz", "-i")
    for values in ([0.0, 5.0], [0.0, 4.02], [-0.02, 2.0], [0.0, 1.5], [-1000.0, 0.0, 4.0]):
        check_not_label_map(np.array(values), "x.nii.gz", "-i")  # not refused
    check_not_label_map(np.array([], np.float32), "x.nii.gz", "-i")  # nothing to judge


def test_a_label_map_other_than_uint8_is_refused_and_nothing_is_written(tmp_path):
    vol = read_ct(save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), tmp_path / "ct.nii.gz"))
    with pytest.raises(FlareSegError, match=r"^label map must be uint8, got int64$"):
        write_labels(np.zeros(vol.array.shape, np.int64), vol.geometry, tmp_path / "out.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
