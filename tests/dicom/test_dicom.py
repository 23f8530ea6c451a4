"""DICOM series in (flareseg.dicom.read_series), DICOM SEG out (write_seg), checked against independent computations.

Series are written here from the phantom (any orientation, shuffled files, random names,
uncompressed and compressed transfer syntaxes); the shared real series is compared with an
independent NIfTI conversion (dicom2nifti).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import LPS_FROM_RAS, SHAPE, SPACING, phantom, write_series
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from flareseg import __version__
from flareseg.dicom import (
    DicomSeries,
    check_seg_writable,
    find_series,
    is_series_dir,
    read_seg,
    read_series,
    series_case_name,
    write_seg,
)
from flareseg.errors import FlareSegError
from flareseg.phantom import make_phantom
from flareseg.volume import IgnoredInput, from_canonical, read_ct, write_labels

ROOT = Path(__file__).resolve().parents[2]

DICOM_SAMPLE = ROOT.parent / "shared" / "data" / "dicom-sample"


def canonical_truth() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phantom HU and labels in the canonical (Z, Y, X) layout, and its RAS affine."""
    p = phantom("RAS")
    return p.image.transpose(2, 1, 0), p.labels.transpose(2, 1, 0), p.affine


def canonical_affine(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """nibabel's affine of the same grid in RAS+ voxel order: world coordinates of the canonical voxel centres."""
    return nib.as_closest_canonical(nib.Nifti1Image(np.zeros(shape, np.uint8), affine)).affine


def add_clutter(folder: Path) -> None:
    """Files a series folder may hold beside its slices, which the reader must skip."""
    (folder / "README.txt").write_text("exported by a PACS\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (folder / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + bytes(64))


# --- reading phantom series -------------------------------------------------------------------------------

SERIES_CASES = {
    # name: (axcodes of the stored voxels (i=column, j=row, k=slice), transfer syntax, unsigned, threads)
    "LPS-explicit": ("LPS", ExplicitVRLittleEndian, True, None),
    "row-flipped-feet-first-RLE": ("RAI", RLELossless, False, 1),
    "flipped-J2K-threads": ("LAI", JPEG2000Lossless, True, 2),
    "flipped-J2K-serial": ("LAI", JPEG2000Lossless, True, 1),
    "sagittal-explicit": ("PIL", ExplicitVRLittleEndian, False, None),
    "deflated": ("LPS", DeflatedExplicitVRLittleEndian, True, None),  # inflated whole before its pixels are found
}


@pytest.mark.parametrize("case", list(SERIES_CASES))
def test_read_series_matches_phantom(tmp_path: Path, case: str) -> None:
    axcodes, syntax, unsigned, threads = SERIES_CASES[case]
    ph = phantom(axcodes)
    files = write_series(tmp_path / "s", ph, syntax=syntax, unsigned=unsigned, bare_files=2)
    add_clutter(tmp_path / "s")
    vol = read_series(tmp_path / "s", threads=threads)
    hu, _, affine = canonical_truth()
    assert vol.array.dtype == (np.uint16 if unsigned else np.int16)  # stored integers kept
    assert (vol.slope, vol.inter) == (1.0, -1024.0 if unsigned else 0.0)
    np.testing.assert_array_equal(vol.hu(), hu.astype(np.float32))
    np.testing.assert_allclose(canonical_affine(vol.geometry.affine, vol.geometry.shape), affine, atol=1e-4)
    np.testing.assert_allclose(vol.geometry.canonical_spacing, SPACING[::-1], rtol=1e-6)
    assert vol.geometry.path == tmp_path / "s"
    src = vol.source
    assert isinstance(src, DicomSeries)
    lps = LPS_FROM_RAS @ ph.affine
    along_normal = float(np.cross(lps[:3, 0], lps[:3, 1]) @ lps[:3, 2]) > 0
    assert list(src.files) == (files if along_normal else files[::-1])  # by position, not name or InstanceNumber
    if axcodes[2] in "SI":
        assert src.canonical_slices is not None
        for z, k in enumerate(src.canonical_slices):  # canonical slice z lies at the world height of its file
            world_z = (affine @ [0, 0, z, 1])[2]
            assert float(src.datasets[k].ImagePositionPatient[2]) == pytest.approx(world_z)
    else:
        assert src.canonical_slices is None


def test_write_labels_on_series_geometry_puts_labels_at_the_right_world_position(tmp_path: Path) -> None:
    """A bright voxel placed at a known DICOM (slice, row, column) is labelled; the NIfTI puts it at that point."""
    ph = phantom("RAI")
    k, r, c = 7, 10, 45
    files = write_series(tmp_path / "s", ph, syntax=ExplicitVRLittleEndian, unsigned=False)
    ds = pydicom.dcmread(files[k])
    pixels = ds.pixel_array.copy()
    pixels[r, c] = 3000
    ds.PixelData = pixels.tobytes()
    ds.save_as(files[k])
    row, col = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = np.array(ds.ImagePositionPatient, float) + c * dc * row + r * dr * col
    expected_ras = lps * [-1, -1, 1]

    vol = read_series(tmp_path / "s")
    labels = (vol.array == 3000).astype(np.uint8)
    assert labels.sum() == 1
    out = write_labels(labels, vol.geometry, tmp_path / "labels.nii.gz")
    img = nib.load(out)
    ijk = np.argwhere(np.asanyarray(img.dataobj) == 1)
    assert len(ijk) == 1
    np.testing.assert_allclose((img.affine @ [*ijk[0], 1])[:3], expected_ras, atol=1e-4)


def test_uint16_and_per_slice_rescale(tmp_path: Path) -> None:
    """Slices with different RescaleIntercepts give float32 Hounsfield units, still exact."""
    ph = phantom("LPS")

    def shift(k: int, ds: Dataset) -> None:
        if k % 2:
            pixels = ds.pixel_array.astype(np.int32) + 24
            ds.PixelData = pixels.astype(np.uint16).tobytes()
            ds.RescaleIntercept = -1048

    write_series(tmp_path / "s", ph, unsigned=True, edit=shift)
    vol = read_series(tmp_path / "s")
    assert vol.array.dtype == np.float32 and (vol.slope, vol.inter) == (1.0, 0.0)
    np.testing.assert_array_equal(vol.hu(), canonical_truth()[0].astype(np.float32))


@pytest.mark.parametrize(
    ("every_slice", "slope", "inter", "problem"),
    [
        (True, 1.0, 1e8, r"near 1\.0000\de\+08, where float32 steps by 8: stored values 1 apart would merge"),
        (False, 1.0, 3e38, r"near 3e\+38, where float32 steps by .*: stored values 1 apart would merge"),
        (True, 1e36, 0.0, "take stored values up to .* beyond the float32 range"),
        (False, 1e36, 0.0, "take stored values up to .* beyond the float32 range"),
    ],
)
def test_rescaling_that_float32_cannot_hold_is_refused_naming_the_fields(
    tmp_path: Path, every_slice: bool, slope: float, inter: float, problem: str
) -> None:
    """One RescaleSlope/RescaleIntercept for the series (stored values kept) or one slice's own (converted per
    slice): both are checked, as a NIfTI file's scl_slope/scl_inter are."""

    def rescale(k: int, ds: Dataset) -> None:
        if every_slice or k == 5:
            ds.RescaleSlope, ds.RescaleIntercept = slope, inter

    files = write_series(tmp_path / "s", phantom("LPS"), unsigned=True, edit=rescale)
    where = "s" if every_slice else files[5].name
    with pytest.raises(FlareSegError, match=rf"{where}: RescaleSlope=.* and RescaleIntercept=.* {problem}"):
        read_series(tmp_path / "s")


@pytest.mark.parametrize(
    ("keyword", "raw", "said"),
    [
        ("ImagePositionPatient", "abc\\1\\2", "ImagePositionPatient is 'abc\\\\1\\\\2', expected 3 finite numbers"),
        ("ImageOrientationPatient", "1\\0\\0\\0\\1", "ImageOrientationPatient is '1.*1', expected 6 finite numbers"),
        ("PixelSpacing", "5", "PixelSpacing is '5', expected 2 finite numbers"),
        ("PixelSpacing", "5\\x", "PixelSpacing is '5\\\\x', expected 2 finite numbers"),
        ("RescaleIntercept", "n/a", "RescaleIntercept is 'n/a', expected a finite number"),
        ("RescaleIntercept", "NaN", "RescaleIntercept is 'NaN', expected a finite number"),
        ("RescaleSlope", "1\\1", "RescaleSlope is '1\\\\1', expected a finite number"),
        ("RescaleSlope", "0", "RescaleSlope is 0, which would make every voxel one intensity"),
    ],
)
def test_a_damaged_number_in_one_slice_s_header_is_one_line_naming_the_file(
    tmp_path: Path, keyword: str, raw: str, said: str
) -> None:
    """A hand-edited or damaged decimal string (as written, unchecked) used to end the run in a numpy traceback;
    a RescaleSlope of 0 was taken for 1."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    def damage(k: int, ds: Dataset) -> None:
        if k == 4:
            value = raw.encode() + (b" " if len(raw) % 2 else b"")
            tag = tag_for_keyword(keyword)
            ds[tag] = RawDataElement(pydicom.tag.Tag(tag), "DS", len(value), value, 0, False, True)

    files = write_series(tmp_path / "s", phantom("LPS"), edit=damage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own note on the invalid value
        with pytest.raises(FlareSegError, match=rf"s: {files[4].name}: {said}") as caught:
            read_series(tmp_path / "s")
    assert "\n" not in str(caught.value)


def test_an_enhanced_multi_frame_ct_is_said_to_be_one(tmp_path: Path) -> None:
    """Its geometry lives in functional groups: it was said to lack ImagePositionPatient, not to be multi-frame."""

    def enhanced(k: int, ds: Dataset) -> None:
        if k == 0:
            del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
            ds.NumberOfFrames = 12

    files = write_series(tmp_path / "s", phantom("LPS"), edit=enhanced)
    with pytest.raises(FlareSegError, match=rf"{files[0].name} is a multi-frame image \(12 frames\); expected single"):
        read_series(tmp_path / "s")


def test_slices_that_differ_only_in_rescale_slope_are_each_scaled_by_their_own(tmp_path: Path) -> None:
    """One intercept for all, and a slope of 0.5 on some slices: each slice takes its own slope."""

    def halve(k: int, ds: Dataset) -> None:
        if k % 3 == 1:
            ds.PixelData = (ds.pixel_array.astype(np.int32) * 2).astype(np.uint16).tobytes()
            ds.RescaleSlope = 0.5

    write_series(tmp_path / "s", phantom("LPS"), unsigned=True, edit=halve)
    vol = read_series(tmp_path / "s")
    assert vol.array.dtype == np.float32 and (vol.slope, vol.inter) == (1.0, 0.0)
    np.testing.assert_array_equal(vol.hu(), canonical_truth()[0].astype(np.float32))


# --- folders of series and case names ----------------------------------------------------------------------


def test_find_series_and_case_names(tmp_path: Path) -> None:
    ph = phantom("LPS")
    write_series(tmp_path / "b", ph, patient_id="P 7/x", series_number=4)
    write_series(tmp_path / "a", ph, patient_id="", series_number=None, series_uid="1.2.826.0.1.99")
    write_series(tmp_path / ".hidden", ph, patient_id="H", series_number=1)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("x")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "ct_0000.nii.gz")
    assert is_series_dir(tmp_path / "a") and is_series_dir(tmp_path / "b")
    assert not is_series_dir(tmp_path / "notes") and not is_series_dir(tmp_path) and not is_series_dir(tmp_path / "x")
    assert series_case_name(tmp_path / "b") == "P_7_x_20260101_s4"
    assert series_case_name(tmp_path / "a") == "1.2.826.0.1.99"
    write_series(tmp_path / "dot", ph, patient_id=".PAT", series_number=3)
    assert series_case_name(tmp_path / "dot") == "PAT_20260101_s3"  # never a hidden output file
    shutil.rmtree(tmp_path / "dot")
    assert find_series(tmp_path) == {"1.2.826.0.1.99": tmp_path / "a", "P_7_x_20260101_s4": tmp_path / "b"}

    write_series(tmp_path / "c", ph, patient_id="P 7/x", series_number=4)
    with pytest.raises(FlareSegError, match=r"case P_7_x_20260101_s4 appears twice \(b, c\)"):
        find_series(tmp_path)
    # Not a folder: said as a folder of NIfTI files says it (it used to be "not a directory" for all three).
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for path, said in (("absent", "folder not found"), ("notes/x.txt", "not a directory"), ("gone", "a broken sym")):
        with pytest.raises(FlareSegError, match=f"^{tmp_path / path}: {said}"):
            find_series(tmp_path / path)


def test_results_and_folders_without_dicom_files_are_not_taken_for_series(tmp_path: Path, caplog) -> None:
    ph = phantom("RAS")
    write_series(tmp_path / "in" / "s", ph)
    write_series(tmp_path / "in" / "patient" / "study" / "series", ph, patient_id="DEEP")
    vol = read_series(tmp_path / "in" / "s")
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[2:4, 10:20, 10:20] = 1
    write_seg(labels, vol, tmp_path / "in" / "earlier-run" / "PAT01_20260101_s3.dcm")  # -o in/earlier-run, last time
    write_seg(labels, vol, tmp_path / "in" / "this-run" / "PAT01_20260101_s3.dcm")
    (tmp_path / "in" / "nifti-results").mkdir()
    (tmp_path / "in" / "nifti-results" / "case_001.nii.gz").write_bytes(b"")  # an earlier run's label map
    (tmp_path / "in" / "nifti-results" / "case.v2.nii").write_bytes(b"")  # a dot in a result's name: no image tag
    (tmp_path / "in" / "more-cts").mkdir()
    (tmp_path / "in" / "more-cts" / "case_002_0000.nii.gz").write_bytes(b"")  # a CT, by its name: said louder
    (tmp_path / "in" / "more-cts" / "case_002.nii.gz").write_bytes(b"")
    # A hospital export's CTs carry no _0000 tag: told from label maps by their 8-bit storage (folder review).
    (tmp_path / "in" / "untagged-cts").mkdir()
    ct = nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4))
    for name in ("ctB", "ctC", "ctD", "ctE"):
        nib.save(ct, tmp_path / "in" / "untagged-cts" / f"{name}.nii.gz")
    label_map = nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4))
    nib.save(label_map, tmp_path / "in" / "nifti-results" / "case_003.nii.gz")  # a result: still not counted
    ignored: list[IgnoredInput] = []
    with caplog.at_level("INFO", logger="flareseg.dicom.files"):  # a command run before may have set -q's level
        found = find_series(tmp_path / "in", exclude=tmp_path / "in" / "this-run", ignored=ignored)
    assert found == {"PAT01_20260101_s3": tmp_path / "in" / "s"}
    said = sorted((r.levelname, r.getMessage()) for r in caplog.records if r.name == "flareseg.dicom.files")
    # The warnings, and only they, are counted: an earlier run's NIfTI results are no input gone missing.
    assert sorted(f"{entry.path}: ignored: {entry.why}" for entry in ignored) == [
        message for level, message in said if level == "WARNING"
    ]
    assert said == [
        (
            "INFO",
            f"{tmp_path / 'in' / 'nifti-results'}: ignored: NIfTI files (results of an earlier run?), "
            "not a DICOM series",
        ),
        ("WARNING", f"{tmp_path / 'in' / 'earlier-run'}: ignored: it holds DICOM SEG results, not an image series"),
        (
            "WARNING",
            f"{tmp_path / 'in' / 'more-cts'}: ignored: CT images (case_002_0000.nii.gz) in a subfolder, which is not "
            "searched; give it as the input, or move them up",
        ),
        (
            "WARNING",
            f"{tmp_path / 'in' / 'patient'}: ignored: no DICOM files directly in it "
            "(folders inside it are not searched)",
        ),
        (
            "WARNING",
            f"{tmp_path / 'in' / 'untagged-cts'}: ignored: NIfTI images stored in more than 8 bits a voxel "
            "(ctB.nii.gz, ctC.nii.gz, ctD.nii.gz, and 1 more file not judged: CTs, or wide label maps?) in a "
            "subfolder, which is not searched; give it as the input, or move them up",
        ),
    ]


def test_a_single_slice_takes_its_spacing_between_slices_before_its_thickness(tmp_path: Path) -> None:
    # Overlapping reconstructions (5 mm slices every 2.5 mm): the spacing is the step, not the thickness.
    files = write_series(tmp_path / "s", phantom("LPS"), edit=_set(None, SpacingBetweenSlices=2.5, SliceThickness=5.0))
    for extra in files[1:]:
        extra.unlink()
    vol = read_series(tmp_path / "s")
    assert vol.array.shape[0] == 1 and float(vol.geometry.header.get_zooms()[2]) == 2.5


def test_a_series_folder_whose_first_file_is_not_dicom_is_still_a_series(tmp_path: Path) -> None:
    write_series(tmp_path / "s", phantom("LPS"))
    (tmp_path / "s" / "00README.txt").write_text("exported by the PACS")  # sorts before every slice
    assert is_series_dir(tmp_path / "s")
    assert find_series(tmp_path) == {"PAT01_20260101_s3": tmp_path / "s"}
    for name in ("01-LOCK", "02-VERSION"):  # no suffix and not DICOM: each probed, and more files after them
        (tmp_path / "s" / name).write_text("x")
    assert is_series_dir(tmp_path / "s")


def test_a_kept_result_is_matched_to_a_non_square_series_and_refused_a_slice_past_either_end(tmp_path: Path) -> None:
    # A resumed folder run judges each kept result by the series' first file; every other series here is square.
    from flareseg.dicom.files import first_dicom_file
    from flareseg.dicom.series import result_off_series

    write_series(tmp_path / "wide", make_phantom((64, 48, 12), (5.0, 5.0, 6.0), ("R", "A", "S"), seed=3))
    wide = read_series(tmp_path / "wide").geometry
    assert result_off_series(tmp_path / "wide", wide.shape, wide.affine) is None
    write_series(tmp_path / "s", make_phantom((32, 32, 8), (5.0, 5.0, 6.0), ("R", "A", "S"), seed=3))
    vol = read_series(tmp_path / "s")
    g, files = vol.geometry, list(vol.source.files)
    k0, n = files.index(first_dicom_file(tmp_path / "s")), g.shape[2]
    assert result_off_series(tmp_path / "s", g.shape, g.affine) is None
    for k_new in (n, -1):  # the first file's slice lands one slice outside the result, at either end
        shifted = g.affine.copy()
        shifted[:3, 3] += (k0 - k_new) * g.affine[:3, 2]
        assert result_off_series(tmp_path / "s", g.shape, shifted) is not None, k_new


def test_bare_dicom_files_count_as_series(tmp_path: Path) -> None:
    write_series(tmp_path / "s", phantom("LPS"), bare_files=SHAPE[2])
    assert is_series_dir(tmp_path / "s")
    np.testing.assert_array_equal(read_series(tmp_path / "s").hu(), canonical_truth()[0].astype(np.float32))


def test_files_with_file_meta_but_no_preamble_count_as_series_compressed_too(tmp_path: Path) -> None:
    # pydicom writes these (preamble None, no Part 10 enforcement); the file meta still names the transfer
    # syntax, so unlike a bare data set such a file may be compressed: here RLE, every slice.
    files = write_series(tmp_path / "s", phantom("LPS"), syntax=RLELossless)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.preamble = None
        ds.save_as(path, enforce_file_format=False)
        assert path.read_bytes()[:2] == b"\x02\x00"  # starts with the file meta group, not 128 bytes and DICM
    assert is_series_dir(tmp_path / "s")
    np.testing.assert_array_equal(read_series(tmp_path / "s").hu(), canonical_truth()[0].astype(np.float32))


# --- bad series: one-line errors naming the folder and the problem -----------------------------------------


def _move(dz: float) -> Callable[[int, Dataset], None]:
    def edit(k: int, ds: Dataset) -> None:
        if k == 5:
            pos = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + dz]

    return edit


def _stretch_after(first: int, extra: float) -> Callable[[int, Dataset], None]:
    """Gaps after slice ``first`` made longer by ``extra`` mm each."""

    def edit(k: int, ds: Dataset) -> None:
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + max(0, k - first) * extra]

    return edit


def _tilt_by(degrees: float) -> Callable[[int, Dataset], None]:
    def edit(k: int, ds: Dataset) -> None:
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1] + k * 6.0 * np.tan(np.radians(degrees)), pos[2]]
        ds.GantryDetectorTilt = degrees

    return edit


_tilt = _tilt_by(15)


def _set(k_only: int | None, **values) -> Callable[[int, Dataset], None]:
    def edit(k: int, ds: Dataset) -> None:
        if k_only is None or k == k_only:
            for key, value in values.items():
                setattr(ds, key, value)

    return edit


def _shrink(k: int, ds: Dataset) -> None:
    if k == 3:
        pixels = ds.pixel_array[:32]
        ds.PixelData, ds.Rows = pixels.tobytes(), 32


def _mpeg2(k: int, ds: Dataset) -> None:
    """Label the slice with a transfer syntax pydicom has no decoder for (MPEG2), its data encapsulated."""
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True


def make_bad(kind: str, folder: Path) -> str:
    """Write a bad series of ``kind`` into ``folder``; return the words its error must contain."""
    ph = phantom("LPS")
    if kind == "empty":
        folder.mkdir()
        (folder / ".hidden").write_text("x")
        return "empty folder"
    if kind == "no-dicom":
        folder.mkdir()
        (folder / "a.txt").write_text("hello")
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), folder / "b.nii.gz")
        return "no DICOM files among its 2 files"
    if kind == "two-series":
        write_series(folder, ph, series_uid="1.2.3.4", description="first")
        write_series(folder, ph, series_uid="1.2.3.5", description="second", seed=1)
        return "2 series in one folder, expected one: 1.2.3.4 'first' (12 files); 1.2.3.5 'second' (12 files)"
    if kind == "cut-short":
        files = write_series(folder, ph)
        files[5].write_bytes(files[5].read_bytes()[:300])
        return f"{files[5].name}: no SeriesInstanceUID, unlike the other files (damaged or cut short?)"
    if kind == "empty-slice":  # left out, an end slice would have shortened the volume without a word
        files = write_series(folder, ph)
        lost = next(f for f in files if f.suffix == ".dcm")
        lost.write_bytes(b"")
        return f"{lost.name!r}: empty file; a slice lost?"
    if kind in ("zero-filled-slice", "cut-in-preamble"):  # an interrupted copy: an end slice went without a word
        files = write_series(folder, ph)
        lost = next(f for f in files if f.suffix != ".dcm")  # a name like IM0000: no suffix said it was a slice
        size = 100 if kind == "cut-in-preamble" else lost.stat().st_size
        lost.write_bytes(bytes(size) if kind == "zero-filled-slice" else lost.read_bytes()[:size])
        return f"{lost.name!r}: zero bytes where a DICOM header would be ({size} bytes; an interrupted copy?); a slice"
    if kind == "named-dcm":
        write_series(folder, ph)
        (folder / "x.dcm").write_text("hello")
        return "'x.dcm': named .dcm but not DICOM (5 bytes)"
    if kind == "missing-slice":
        files = write_series(folder, ph)
        files[6].unlink()
        gap = f"gap of 12.00 mm between {files[5].name} and {files[7].name}, expected 6.00 mm"
        return f"not evenly spaced: {gap}: 1 missing slice(s)?"
    if kind == "duplicated-slice":
        files = write_series(folder, ph)
        shutil.copy(files[4], folder / "copy-of-slice")
        return "duplicated slice"
    if kind == "near-duplicate":  # 0.3 mm from another in a 6 mm series: a duplicate, not an uneven gap
        files = write_series(folder, ph)
        ds = pydicom.dcmread(files[4])
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.3]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / "nearly-slice-4")
        return f"duplicated slice: {files[4].name} and nearly-slice-4 are at -9.00 and -8.70 mm"  # was "both at"
    if kind == "uneven":
        write_series(folder, ph, edit=_move(2.5))
        return "not evenly spaced"
    if kind == "spacing-drift":  # every gap within 10 % of the typical one, the sum not
        files = write_series(folder, ph, edit=_stretch_after(5, 0.5))
        return f"not evenly spaced: {files[5].name} lies 1.36 mm from where an even spacing of 6.27 mm puts it"
    if kind == "gantry-tilt":
        write_series(folder, ph, edit=_tilt)
        return "gantry tilt or sheared stack of about 15.0 degrees, GantryDetectorTilt 15"
    if kind == "small-tilt":  # 2 degrees drift 0.2 mm a slice, 2.3 mm over the series: labels would shift that far
        write_series(folder, ph, edit=_tilt_by(2.0))
        return "gantry tilt or sheared stack of about 2.0 degrees, GantryDetectorTilt 2"
    if kind == "zero-pixel-spacing":
        write_series(folder, ph, edit=_set(None, PixelSpacing=[0.0, 5.0]))
        return "invalid PixelSpacing [0.0, 5.0]"
    if kind == "non-parallel":
        c, s = np.cos(np.radians(5)), np.sin(np.radians(5))
        write_series(folder, ph, edit=_set(4, ImageOrientationPatient=[c, s, 0.0, -s, c, 0.0]))
        return "slices are not parallel: ImageOrientationPatient differs"
    if kind == "non-orthogonal":  # a row and column about 84 degrees apart: a sheared affine, had it passed
        write_series(folder, ph, edit=_set(None, ImageOrientationPatient=[1.0, 0.0, 0.0, 0.1, 0.995, 0.0]))
        return "ImageOrientationPatient [1.0, 0.0, 0.0, 0.1, 0.995, 0.0]: row and column are not orthogonal"
    if kind == "modality":
        write_series(folder, ph, modality="MR")
        return "modality MR, expected CT"
    if kind in ("localizer", "localizer-own-series"):  # a flat export's scout: "2 series", or "inconsistent size"
        scout = {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
        if kind == "localizer-own-series":
            scout["SeriesInstanceUID"] = "1.2.3.99"
        files = write_series(folder, ph, edit=_set(3, **scout))
        return f"localizer image(s) among the CT's slices ({files[3].name}: ImageType LOCALIZER, a scout, not a slice)"
    if kind == "modality-one":  # which file is the odd one was not said
        files = write_series(folder, ph, edit=_set(3, Modality="OT"))
        return f"modality CT, OT, expected CT ({files[3].name}: OT)"
    if kind == "rows":
        write_series(folder, ph, edit=_shrink)
        return "inconsistent slice size (Rows x Columns) between slices: 64x64 in 11 files, 32x64 in 1 files"
    if kind == "pixel-spacing":
        write_series(folder, ph, edit=_set(2, PixelSpacing=[4.0, 4.0]))
        return "inconsistent PixelSpacing between slices"
    if kind == "no-decoder":
        write_series(folder, ph, edit=_mpeg2)
        return "cannot be decoded: pydicom has no decoder for it"
    if kind == "no-position":  # a localiser or a secondary capture among the slices
        files = write_series(folder, ph)
        ds = pydicom.dcmread(files[7])
        del ds.ImagePositionPatient
        ds.save_as(files[7])
        return f"{files[7].name} lacks ImagePositionPatient (not a CT image slice?)"
    if kind == "colour":  # a screenshot saved into the series
        files = write_series(folder, ph, edit=_set(2, SamplesPerPixel=3))
        return f"{files[2].name} is not a greyscale image (SamplesPerPixel=3)"
    if kind == "zero-direction":
        write_series(folder, ph, edit=_set(None, ImageOrientationPatient=[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
        return "ImageOrientationPatient [0.0, 0.0, 0.0, 0.0, 1.0, 0.0] has a zero direction"
    if kind in ("dicomdir-only", "dicomdir-renamed"):  # the index of a CD export, copied without its image folders
        folder.mkdir(parents=True)
        meta = pydicom.dataset.FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
        meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        index = Dataset()
        index.file_meta = meta
        index.FileSetID = "EXPORT"
        name = "DICOMDIR" if kind == "dicomdir-only" else "index"  # an index is known by its SOP class too
        index.save_as(folder / name, enforce_file_format=True)  # was said to be an empty folder
        return "no DICOM image files, only a DICOMDIR (a disc's index): give the folder that holds the slices"
    raise AssertionError(kind)


BAD_KINDS = [
    "empty",
    "no-dicom",
    "two-series",
    "cut-short",
    "empty-slice",
    "named-dcm",
    "zero-filled-slice",
    "cut-in-preamble",
    "missing-slice",
    "duplicated-slice",
    "near-duplicate",
    "uneven",
    "spacing-drift",
    "gantry-tilt",
    "small-tilt",
    "zero-pixel-spacing",
    "non-parallel",
    "non-orthogonal",
    "modality",
    "modality-one",
    "localizer",
    "localizer-own-series",
    "rows",
    "pixel-spacing",
    "no-decoder",
    "no-position",
    "colour",
    "zero-direction",
    "dicomdir-only",
    "dicomdir-renamed",
]


def test_a_disc_index_without_its_images_is_said_so_wherever_it_is_given(tmp_path: Path) -> None:
    # Each reader said something else of it: "empty folder", "no DICOM files", "no .nii or .nii.gz files" (diff8).
    from flareseg.runtime.jobs import list_cases

    folder = tmp_path / "cd"
    said = make_bad("dicomdir-only", folder)
    for read in (read_series, series_case_name, list_cases):
        with pytest.raises(FlareSegError) as info:
            read(folder)
        assert str(info.value) == f"{folder}: {said}", read
    # Named in lower case (a disc copied from another file system): the same.
    (folder / "DICOMDIR").rename(folder / "dicomdir")
    for read in (read_series, series_case_name, list_cases):
        with pytest.raises(FlareSegError) as info:
            read(folder)
        assert str(info.value) == f"{folder}: {said}", read
    # Beside the slices it indexes, it is no reason to refuse them: the series is read, and not said to be missing.
    from flareseg.dicom.files import only_dicomdir

    write_series(tmp_path / "series", phantom("LPS"))
    shutil.copy(folder / "dicomdir", tmp_path / "series" / "DICOMDIR")
    assert only_dicomdir(folder) and not only_dicomdir(tmp_path / "series")
    assert read_series(tmp_path / "series").array.shape[0] == SHAPE[2]


def test_zero_bytes_refuse_a_series_only_in_a_file_named_as_slices_are(tmp_path: Path, caplog) -> None:
    # A label mask or raw voxels beside the slices (mask.img, seg.raw) may start with zeros of their own: said and
    # passed over, not taken for a lost slice; the same bytes under a slice's name (IM0000, 1.2.3) are one.
    files = write_series(tmp_path / "s", phantom("LPS"))
    (tmp_path / "s" / "mask.img").write_bytes(bytes(4096))
    with caplog.at_level(logging.WARNING, logger="flareseg.dicom"):
        assert read_series(tmp_path / "s").array.shape[0] == len(files)
    assert any("'mask.img': zero bytes where a DICOM header would be" in m for m in caplog.messages)
    for name in ("IM0000", "1.2.3", "x.IMA"):
        (tmp_path / "s" / name).write_bytes(bytes(4096))
        with pytest.raises(FlareSegError, match=rf"'{name}': zero bytes where a DICOM header would be"):
            read_series(tmp_path / "s")
        (tmp_path / "s" / name).unlink()


def test_localizer_is_read_from_image_type_s_third_value_only(tmp_path: Path) -> None:
    # Value 3 is AXIAL or LOCALIZER for CT; a vendor's fourth value saying LOCALIZER is no scout.
    files = write_series(
        tmp_path / "s", phantom("LPS"), edit=_set(3, ImageType=["ORIGINAL", "PRIMARY", "AXIAL", "LOCALIZER"])
    )
    assert read_series(tmp_path / "s").array.shape[0] == len(files)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_series_one_line_error(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / f"series-{kind}"
    words = make_bad(kind, folder)
    with pytest.raises(FlareSegError) as info:
        read_series(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: ")
    assert words in message
    assert "\n" not in message


def test_a_long_run_of_missing_slices_is_reported_as_missing_not_duplicated(tmp_path: Path) -> None:
    # More than ten times the usual gap: against the largest gap, every ordinary one looked like a duplicate.
    ph = make_phantom((16, 16, 24), SPACING, ("L", "P", "S"), seed=3)
    files = write_series(tmp_path / "gap", ph)
    for path in files[5:15]:
        path.unlink()
    with pytest.raises(FlareSegError) as info:
        read_series(tmp_path / "gap")
    assert str(info.value) == (
        f"{tmp_path / 'gap'}: slice positions are not evenly spaced: gap of 66.00 mm between {files[4].name} and "
        f"{files[15].name}, expected 6.00 mm: 10 missing slice(s)?"
    )
    # A duplicate is still one beside that gap, and so is a series whose every slice is there twice.
    shutil.copy(files[20], tmp_path / "gap" / "copy-of-slice-20")
    with pytest.raises(FlareSegError, match=r"duplicated slice: .* are both at "):
        read_series(tmp_path / "gap")
    twice = write_series(tmp_path / "twice", ph)
    for k, path in enumerate(twice):
        shutil.copy(path, tmp_path / "twice" / f"copy-{k}")
    with pytest.raises(FlareSegError, match=r"duplicated slice: .* are both at "):
        read_series(tmp_path / "twice")


def test_decode_threads_without_sched_getaffinity_follow_the_cpu_count(monkeypatch) -> None:
    from pydicom.pixels import get_decoder

    from flareseg.dicom import series

    if "pillow" not in get_decoder(JPEG2000Lossless).available_plugins:
        pytest.skip("Pillow's JPEG 2000 decoder is not available")
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS and Windows
    plans = {6: ("pillow", 6), 64: ("pillow", series.MAX_DECODE_THREADS), 4: ("pillow", 4), 3: ("", 1), 2: ("", 1)}
    for cores, plan in [*plans.items(), (None, ("", 1))]:
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert series._decode_plan({JPEG2000Lossless}, None) == plan, cores


def test_missing_codec_names_the_package(tmp_path: Path) -> None:
    """In a Python where no JPEG 2000 codec can be imported, the error names the package to install."""
    write_series(tmp_path / "s", phantom("LPS"), syntax=JPEG2000Lossless)
    code = (
        "import sys\n"
        "for name in ('pylibjpeg', 'openjpeg', 'libjpeg', 'gdcm', 'PIL'):\n"
        "    sys.modules[name] = None  # as if not installed: importing them fails\n"
        "from flareseg.dicom import read_series\n"
        "from flareseg.errors import FlareSegError\n"
        "try:\n"
        f"    read_series({str(tmp_path / 's')!r})\n"
        "except FlareSegError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith(f"{tmp_path / 's'}: transfer syntax JPEG 2000 Image Compression (Lossless Only)")
    assert "no codec installed; install pylibjpeg-openjpeg" in out
    assert out.count("\n") == 1


def test_read_series_missing_or_file(tmp_path: Path) -> None:
    with pytest.raises(FlareSegError, match="folder not found"):
        read_series(tmp_path / "absent")
    (tmp_path / "f").write_text("x")
    with pytest.raises(FlareSegError, match="not a directory"):
        read_series(tmp_path / "f")


# --- DICOM SEG ---------------------------------------------------------------------------------------------


def test_a_seg_of_slices_that_are_not_square_holds_each_frame_as_its_slice_lies(tmp_path: Path) -> None:
    # Square slices hide rows and columns swapped in both the writer and the reader: a round trip still agrees,
    # while every viewer would show the organs transposed.
    import highdicom as hd

    ph = make_phantom((64, 40, 12), (5.0, 5.0, 6.0), ("L", "P", "S"), seed=3)
    files = write_series(tmp_path / "s", ph)
    vol = read_series(tmp_path / "s")
    labels = ph.labels.transpose(2, 1, 0)[:, ::-1, ::-1]  # LPS storage (x: L, y: P) to canonical (Z, Y, X) RAS
    labels = np.ascontiguousarray(labels).astype(np.uint8)
    out = write_seg(labels, vol, tmp_path / "case.dcm")
    np.testing.assert_array_equal(read_seg(out, vol), labels)
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(out))
    for path in files:  # each CT file against its frame, both as pydicom lays out a slice: (Rows, Columns)
        ct = pydicom.dcmread(path)
        k = round((float(ct.ImagePositionPatient[2]) - float(ph.affine[2, 3])) / 6.0)
        frame = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[ct.SOPInstanceUID], combine_segments=True, skip_overlap_checks=True
        )[0]
        assert frame.shape == (ct.Rows, ct.Columns) == (40, 64)
        np.testing.assert_array_equal(frame, ph.labels[:, :, k].T)


def test_a_seg_from_another_tool_is_read_by_its_codes_not_its_segment_numbers(tmp_path: Path) -> None:
    """Another tool numbers segments its own way (here kidney 1, pancreas 2, liver 3, and no spleen): each
    segment's SNOMED CT code, not its number, says which FLARE21 label it is; an organ flareseg does not
    segment is refused, naming its segment and code."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    files = write_series(tmp_path / "s", phantom("LPS"))
    vol = read_series(tmp_path / "s")
    _, labels, _ = canonical_truth()
    labels = np.where(labels == 3, 0, labels).astype(np.uint8)  # no spleen
    theirs = {2: 1, 4: 2, 1: 3}  # FLARE21 label -> their segment number
    numbered = np.zeros_like(labels)
    for label, number in theirs.items():
        numbered[labels == label] = number
    per_file = from_canonical(numbered, vol.geometry).transpose(2, 1, 0)  # (slice, row, column) of each file
    sources = [pydicom.dcmread(path) for path in vol.source.files]

    def described(number: int, code: str, meaning: str) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=meaning,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )

    def save(descriptions: list[hd.seg.SegmentDescription], name: str) -> Path:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=np.ascontiguousarray(per_file),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=5,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="another tool",
            manufacturer_model_name="manual contours",
            software_versions="1",
            device_serial_number="1",
        )
        seg.save_as(tmp_path / name)
        return tmp_path / name

    kidney, pancreas, liver = ("64033007", "Kidney"), ("15776009", "Pancreas"), ("10200004", "Liver")
    out = save([described(1, *kidney), described(2, *pancreas), described(3, *liver)], "theirs.dcm")
    assert len(files) == vol.num_slices
    np.testing.assert_array_equal(read_seg(out, vol), labels)
    heart = save([described(1, *kidney), described(2, "80891009", "Heart"), described(3, *liver)], "heart.dcm")
    with pytest.raises(FlareSegError, match=r"heart\.dcm: segment 2 has SNOMED CT code 80891009, not one of"):
        read_seg(heart, vol)


@pytest.mark.parametrize("thickness", ["absent", "empty", "zero"])
def test_a_series_without_a_slice_thickness_gets_a_seg_that_reads_back(tmp_path: Path, thickness: str) -> None:
    """SliceThickness is Type 2: present and empty is valid, and de-identification may delete it. The SEG's
    pixel measures need one: an empty one gave a SEG that neither highdicom nor read_seg could read, an absent
    one a traceback after inference. The slices' spacing stands in for it."""
    import highdicom as hd

    def strip(k: int, ds: Dataset) -> None:
        if thickness == "absent":
            del ds.SliceThickness
        else:
            ds.SliceThickness = "" if thickness == "empty" else 0

    write_series(tmp_path / "s", phantom("LPS"), edit=strip)
    vol = read_series(tmp_path / "s")
    _, labels, _ = canonical_truth()
    out = write_seg(labels.astype(np.uint8), vol, tmp_path / "case.dcm")
    np.testing.assert_array_equal(read_seg(out, vol), labels)
    measures = hd.seg.segread(out).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(SPACING[2])
    # The series' own headers, as read (and kept on the volume), are not changed to make the SEG.
    assert all(ds.get("SliceThickness", None) in (None, "", 0) for ds in vol.source.datasets)


def test_a_series_whose_slices_share_a_sop_instance_uid_cannot_get_a_seg(tmp_path: Path) -> None:
    """A broken anonymiser gave two slices one SOPInstanceUID: a SEG's frames could not say which slice each is
    of; refused before inference, naming both files."""

    def same_uid(k: int, ds: Dataset) -> None:
        if k in (3, 7):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.777"

    files = write_series(tmp_path / "s", phantom("LPS"), edit=same_uid)
    vol = read_series(tmp_path / "s")
    names = sorted([files[3].name, files[7].name], key=[p.name for p in vol.source.files].index)
    with pytest.raises(FlareSegError, match=rf"s: {names[0]} and {names[1]} share the SOPInstanceUID 1\.2\.826"):
        check_seg_writable(vol)


def test_write_seg_round_trip_and_content(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", phantom("LAI"))
    vol = read_series(tmp_path / "s")
    _, labels, _ = canonical_truth()
    labels = labels.copy()
    labels[labels == 3] = 0  # no spleen: its segment is described, without frames
    present = sorted(set(np.unique(labels).tolist()) - {0})
    assert present == [1, 2, 4]
    released = dataclasses.replace(vol, array=np.empty((0, 0, 0), np.int16))  # writers need no CT voxels
    out = write_seg(labels, released, tmp_path / "out" / "case.dcm")
    assert sorted(p.name for p in out.parent.iterdir()) == ["case.dcm"]  # atomic: no temporary left
    np.testing.assert_array_equal(read_seg(out, vol), labels)

    seg = pydicom.dcmread(out)
    src = pydicom.dcmread(files[0])
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    codes = [
        (s.SegmentNumber, s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence
    ]
    assert codes == [  # segment number = FLARE21 label, whatever organs a case has
        (1, "liver", "10200004"),
        (2, "kidneys", "64033007"),
        (3, "spleen", "78961009"),
        (4, "pancreas", "15776009"),
    ]
    for s in seg.SegmentSequence:
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        algo = s.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("flareseg", __version__)
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == expected
    # Frames hold, per segment, as many voxels as the label map has of that organ.
    import highdicom as hd

    hseg = hd.seg.segread(out)
    for label in (1, 2, 3, 4):
        frames = hseg.get_pixels_by_source_instance(
            list(vol.source.sop_instance_uids), segment_numbers=[label], assert_missing_frames_are_empty=True
        )
        assert int(frames.sum()) == int((labels == label).sum())
    assert int(seg.NumberOfFrames) == sum(int(np.any(labels[:, :, :] == label, axis=(1, 2)).sum()) for label in present)
    # Combined by segment number, as a viewer or highdicom does, the frames give the FLARE21 labels themselves.
    combined = hseg.get_pixels_by_source_instance(
        list(vol.source.sop_instance_uids), combine_segments=True, assert_missing_frames_are_empty=True
    )
    assert sorted(np.unique(combined).tolist()) == [0, *present]


def test_write_seg_for_a_series_stripped_of_type_2_patient_and_study_attributes(tmp_path: Path) -> None:
    """De-identification tools often delete PatientBirthDate, AccessionNumber...: a SEG gets them empty."""
    stripped = ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime")

    def strip(_: int, ds) -> None:
        for key in stripped:
            delattr(ds, key)
        ds.PatientName = "ANONYMOUS"  # one component: valid DICOM, which highdicom warns about

    write_series(tmp_path / "s", phantom("LPS"), edit=strip)
    vol = read_series(tmp_path / "s")
    _, labels, _ = canonical_truth()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # highdicom's warning about the one-component name, say
        out = write_seg(labels, vol, tmp_path / "case.dcm")
    np.testing.assert_array_equal(read_seg(out, vol), labels)
    seg = pydicom.dcmread(out)
    assert [seg[key].value for key in stripped] == [""] * len(stripped)  # present and empty: Type 2
    assert (seg.PatientName, seg.PatientID) == ("ANONYMOUS^", "PAT01")  # the same name, unambiguous
    assert all(key not in pydicom.dcmread(f) for f in (tmp_path / "s").iterdir() for key in stripped)  # inputs


def test_write_seg_of_one_slice_gives_the_spacing_the_nifti_output_has(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", phantom("RAS"))
    for path in files[1:]:
        path.unlink()
    vol = read_series(tmp_path / "s")
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[0, 10:20, 10:20] = 1
    seg = pydicom.dcmread(write_seg(labels, vol, tmp_path / "one.dcm"))
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == float(vol.geometry.header.get_zooms()[2]) == SPACING[2]


def test_write_seg_empty_label_map(tmp_path: Path) -> None:
    write_series(tmp_path / "s", phantom("LPS"))
    vol = read_series(tmp_path / "s")
    empty = np.zeros(vol.array.shape, np.uint8)
    out = write_seg(empty, vol, tmp_path / "empty.dcm")
    assert len(pydicom.dcmread(out).SegmentSequence) == 4
    np.testing.assert_array_equal(read_seg(out, vol), empty)


def test_write_seg_refusals_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_series(tmp_path / "s", phantom("LPS"))
    vol = read_series(tmp_path / "s")
    out_dir = tmp_path / "out"
    with pytest.raises(FlareSegError, match="label map shape"):
        write_seg(np.zeros((3, 3, 3), np.uint8), vol, out_dir / "a.dcm")
    with pytest.raises(FlareSegError, match=r"labels \[7\] outside 0..4"):
        write_seg(np.full(vol.array.shape, 7, np.uint8), vol, out_dir / "a.dcm")
    one_off = np.zeros(vol.array.shape, np.uint8)
    one_off[1, 2, 3] = 5  # one voxel, the first label past the organs
    with pytest.raises(FlareSegError, match=r"labels \[5\] outside 0..4$"):
        write_seg(one_off, vol, out_dir / "a.dcm")
    assert not out_dir.exists() or not any(out_dir.iterdir())
    # An input slice named by a relative path, from another working directory, is still that slice.
    first = sorted((tmp_path / "s").iterdir())[0]
    before = first.read_bytes()
    monkeypatch.chdir(tmp_path / "s")
    with pytest.raises(FlareSegError, match="refusing to overwrite an input slice"):
        write_seg(np.zeros(vol.array.shape, np.uint8), vol, Path("..") / "s" / first.name)
    assert first.read_bytes() == before

    p = phantom("RAS")
    nib.save(p.to_nifti()[0], tmp_path / "ct.nii.gz")
    nifti = read_ct(tmp_path / "ct.nii.gz")
    with pytest.raises(FlareSegError, match="there is no series to reference") as info:
        write_seg(np.zeros(nifti.array.shape, np.uint8), nifti, out_dir / "b.dcm")
    assert "\n" not in str(info.value)

    anon = tmp_path / "anon"
    write_series(anon, phantom("LPS"), edit=_set(None, StudyInstanceUID="", FrameOfReferenceUID=""))
    with pytest.raises(FlareSegError, match=r"has no StudyInstanceUID, FrameOfReferenceUID \(anonymised\?\)"):
        check_seg_writable(read_series(anon))

    # One slice without its own UID (bare files: no file meta to take it from either).
    write_series(tmp_path / "no-uid", phantom("LPS"), bare_files=SHAPE[2], edit=_set(4, SOPInstanceUID=""))
    with pytest.raises(FlareSegError, match=r"the series has no SOPInstanceUID \(anonymised\?\)"):
        check_seg_writable(read_series(tmp_path / "no-uid"))


# --- the shared real series --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dicom_sample() -> Path:
    if not any(DICOM_SAMPLE.glob("*.dcm")):
        pytest.skip(f"real DICOM sample not found at {DICOM_SAMPLE} (only present beside the project checkout)")
    return DICOM_SAMPLE


def test_sample_matches_dicom2nifti(dicom_sample: Path, tmp_path: Path) -> None:
    """read_series against an independent conversion (dicom2nifti) read by read_ct: same voxels, same world grid."""
    dicom2nifti = pytest.importorskip("dicom2nifti", reason="dicom2nifti (a test dependency) is not installed")
    nifti = tmp_path / "sample.nii.gz"
    dicom2nifti.dicom_series_to_nifti(str(dicom_sample), str(nifti), reorient_nifti=False)
    ref = read_ct(nifti)
    vol = read_series(dicom_sample)
    assert vol.array.shape == ref.array.shape == (20, 512, 512)
    assert vol.array.dtype == np.uint16 and (vol.slope, vol.inter) == (1.0, -1024.0)
    np.testing.assert_array_equal(vol.hu(), ref.hu())
    np.testing.assert_allclose(
        canonical_affine(vol.geometry.affine, vol.geometry.shape),
        canonical_affine(ref.geometry.affine, ref.geometry.shape),
        atol=1e-4,
    )
    np.testing.assert_allclose(vol.geometry.canonical_spacing, (2.0, 0.9765625, 0.9765625))
    serial = read_series(dicom_sample, threads=1)  # pydicom's default codec, no threads
    np.testing.assert_array_equal(serial.array, vol.array)
    assert series_case_name(dicom_sample) == "dicom-sample"  # anonymised: no PatientID, SeriesNumber or UID


def test_sample_seg_needs_uids_then_round_trips(dicom_sample: Path, tmp_path: Path) -> None:
    """The anonymised sample lacks its study/series UIDs: refused; a copy with them written back round-trips."""
    vol = read_series(dicom_sample)
    with pytest.raises(FlareSegError, match="so a DICOM SEG cannot reference it"):
        check_seg_writable(vol)
    study, series, copy_dir = generate_uid(), generate_uid(), tmp_path / "sample"
    copy_dir.mkdir()
    for path in sorted(dicom_sample.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series  # SOP UIDs stay blank: taken from the file meta
        ds.save_as(copy_dir / path.name)
    vol = read_series(copy_dir)
    labels = np.zeros(vol.array.shape, np.uint8)
    hu = vol.hu()
    labels[(hu > 0) & (hu < 100)] = 1  # soft tissue as "liver", bone as "kidneys": a busy, realistic mask
    labels[hu > 300] = 2
    out = write_seg(labels, vol, tmp_path / "sample.dcm")
    np.testing.assert_array_equal(read_seg(out, vol), labels)
    referenced = {
        r.ReferencedSOPInstanceUID for r in pydicom.dcmread(out).ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {pydicom.dcmread(p).file_meta.MediaStorageSOPInstanceUID for p in dicom_sample.iterdir()}
    assert not vol.source.datasets[0].get("SOPInstanceUID")  # the volume's headers are left as read


# --- flare-infer end to end (needs the lead's wiring of series input and --output-type) ---------------------


def _infer(args: list[str]) -> int:
    from flareseg.runtime.cli import main as infer_main

    return infer_main([*args, "-q"])


def test_cli_series_to_nifti_equals_nifti_input(tmp_path: Path, trained_checkpoint: Path) -> None:
    """The same CT as a DICOM series and as NIfTI gives the same labels, voxel for voxel, on the same world grid."""
    ph = phantom("LAI")
    write_series(tmp_path / "series", ph, syntax=RLELossless, unsigned=False, patient_id="PX", series_number=2)
    nib.save(phantom("RAS").to_nifti()[0], tmp_path / "ct_0000.nii.gz")
    model = str(trained_checkpoint)
    assert _infer(["--model", model, "-i", str(tmp_path / "series"), "-o", str(tmp_path / "out_dcm")]) == 0
    assert _infer(["--model", model, "-i", str(tmp_path / "ct_0000.nii.gz"), "-o", str(tmp_path / "ct.nii.gz")]) == 0
    from_dicom = nib.as_closest_canonical(nib.load(tmp_path / "out_dcm" / "PX_20260101_s2.nii.gz"))
    from_nifti = nib.as_closest_canonical(nib.load(tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
    a, b = np.asanyarray(from_dicom.dataobj), np.asanyarray(from_nifti.dataobj)
    assert a.any()
    np.testing.assert_array_equal(a, b)


def test_cli_dicom_seg_output_matches_nifti_output(tmp_path: Path, trained_checkpoint: Path) -> None:
    write_series(tmp_path / "cases" / "one", phantom("LPS"), patient_id="P1", series_number=1)
    write_series(tmp_path / "cases" / "two", phantom("RAI"), patient_id="P2", series_number=1, seed=2)
    model = str(trained_checkpoint)
    cases = str(tmp_path / "cases")
    assert _infer(["--model", model, "-i", cases, "-o", str(tmp_path / "seg"), "--output-type", "dicom-seg"]) == 0
    assert _infer(["--model", model, "-i", cases, "-o", str(tmp_path / "nii")]) == 0
    for case, folder in (("P1_20260101_s1", "one"), ("P2_20260101_s1", "two")):
        vol = read_series(tmp_path / "cases" / folder)
        from_seg = read_seg(tmp_path / "seg" / f"{case}.dcm", vol)
        nifti = nib.load(tmp_path / "nii" / f"{case}.nii.gz")
        from flareseg.volume import to_canonical

        expected = to_canonical(np.asanyarray(nifti.dataobj), vol.geometry)
        assert expected.any()
        np.testing.assert_array_equal(from_seg, expected)
        # Every segment names the model that made it, as the NIfTI header does.
        digest = hashlib.sha256(trained_checkpoint.read_bytes()).hexdigest()
        for segment in pydicom.dcmread(tmp_path / "seg" / f"{case}.dcm").SegmentSequence:
            (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
            assert algorithm.AlgorithmParameters == f"model={trained_checkpoint.name},model_sha256={digest}"
        assert f"sha256:{digest[:16]} " in bytes(nifti.header["descrip"]).decode()
        # What a resume reads back of each, to say which kept results another model made.
        from flareseg.runtime.jobs import result_model

        assert result_model(tmp_path / "seg" / f"{case}.dcm", "dicom-seg") == (digest, trained_checkpoint.name)
        assert result_model(tmp_path / "nii" / f"{case}.nii.gz", "nifti") == (digest[:16], trained_checkpoint.name)
    # A SEG of flareseg's that names no model (a callable runner's), and one of another tool's.
    seg = pydicom.dcmread(tmp_path / "seg" / "P1_20260101_s1.dcm")
    for segment in seg.SegmentSequence:
        del segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    seg.save_as(tmp_path / "plain.dcm")
    assert result_model(tmp_path / "plain.dcm", "dicom-seg") == (None, None)
    for segment in seg.SegmentSequence:
        segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName = "another"
    seg.save_as(tmp_path / "another.dcm")
    assert result_model(tmp_path / "another.dcm", "dicom-seg") is None
    # Resumed: finished SEG files are done; one cut short, or a CT slice in its place, is no result.
    from flareseg.runtime.jobs import plan_folder

    inputs = [tmp_path / "cases" / "one", tmp_path / "cases" / "two"]
    assert [p.status for p in plan_folder(inputs, tmp_path / "seg", "dicom-seg")] == ["skipped", "skipped"]
    whole = (tmp_path / "seg" / "P1_20260101_s1.dcm").read_bytes()
    (tmp_path / "seg" / "P1_20260101_s1.dcm").write_bytes(whole[: len(whole) - 100])
    other = pydicom.dcmread(tmp_path / "seg" / "P2_20260101_s1.dcm")
    other.Modality = "OT"  # another kind of DICOM object under the SEG's name
    other.save_as(tmp_path / "seg" / "P2_20260101_s1.dcm")
    plan = list(plan_folder(inputs, tmp_path / "seg", "dicom-seg"))
    assert [p.status for p in plan] == ["failed", "failed"]
    assert "exists but" in str(plan[0].error) and "is not a DICOM SEG (Modality OT)" in str(plan[1].error)


def test_cli_dicom_seg_refused_for_nifti_input(tmp_path: Path, trained_checkpoint: Path) -> None:
    nib.save(phantom("RAS").to_nifti()[0], tmp_path / "ct_0000.nii.gz")
    out = tmp_path / "out"
    code = _infer(
        [
            "--model",
            str(trained_checkpoint),
            "-i",
            str(tmp_path / "ct_0000.nii.gz"),
            "-o",
            str(out / "ct.dcm"),
            "--output-type",
            "dicom-seg",
        ]
    )
    assert code == 2
    assert not out.exists() or not any(out.iterdir())


def test_cli_a_folder_with_series_only_deeper_down_is_refused_and_warned_about_once(
    tmp_path: Path, trained_checkpoint: Path, capsys, caplog
) -> None:
    write_series(tmp_path / "in" / "study" / "s1", phantom("LPS"))
    with caplog.at_level("WARNING"):
        code = _infer(["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")])
    assert code == 2
    assert [r.getMessage() for r in caplog.records if r.name == "flareseg.dicom.files"] == [
        f"{tmp_path / 'in' / 'study'}: ignored: no DICOM files directly in it (folders inside it are not searched)"
    ]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"flare-infer: error: {tmp_path / 'in'}: no .nii or .nii.gz files and no DICOM series folders"
    ]


def test_cli_bad_series_exit_2(tmp_path: Path, trained_checkpoint: Path, capsys) -> None:
    folder = tmp_path / "bad"
    make_bad("missing-slice", folder)
    assert _infer(["--model", str(trained_checkpoint), "-i", str(folder), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: slice positions are not evenly spaced" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.nii.gz"))


def test_a_subfolder_that_cannot_be_listed_is_left_out_saying_why(tmp_path: Path, monkeypatch, caplog) -> None:
    # As root, permissions do not stop a listing: a test double of the listing's failure drives our control flow.
    write_series(tmp_path / "in" / "a", phantom("RAS"))
    write_series(tmp_path / "in" / "b", phantom("RAS"), patient_id="PAT02")
    listing = Path.iterdir

    def iterdir(self: Path):
        if self.name == "b":
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with caplog.at_level("WARNING"):
        found = find_series(tmp_path / "in", unnamed=lambda sub: f"{sub.name}/")
    # Left out (lost+found on a data disk is such a folder), but said why: it used to read "no DICOM files".
    assert found == {"PAT01_20260101_s3": tmp_path / "in" / "a"}
    said = [r.getMessage() for r in caplog.records if r.name == "flareseg.dicom.files"]
    assert said == [f"{tmp_path / 'in' / 'b'}: ignored: cannot list the folder (Permission denied)"]
    with pytest.raises(FlareSegError, match=r"in/b: cannot list the folder \(Permission denied\)"):
        read_series(tmp_path / "in" / "b")


def test_an_empty_or_unreadable_file_not_named_dcm_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    # A lock file, macOS's "Icon\r": not slices; refusing the series for them refused good series.
    write_series(tmp_path / "s", phantom("RAS"))
    (tmp_path / "s" / "LOCKFILE").write_bytes(b"")
    (tmp_path / "s" / "Icon\r").write_bytes(b"")
    with caplog.at_level("WARNING"):
        vol = read_series(tmp_path / "s")
    np.testing.assert_array_equal(vol.hu(), canonical_truth()[0].astype(np.float32))
    said = sorted(r.getMessage() for r in caplog.records if r.name == "flareseg.dicom.files")
    assert said == [
        f"{tmp_path / 's'}: skipped 'Icon\\r': empty file (a slice lost?)",
        f"{tmp_path / 's'}: skipped 'LOCKFILE': empty file (a slice lost?)",
    ]


def test_a_seg_is_made_of_header_values_highdicom_refuses_saying_what_it_changed(tmp_path: Path, caplog) -> None:
    """PatientSex U, a zero birth date, old ACR-NEMA dates and times and a Japanese character set's empty first
    value are common in hospital data: highdicom refused each in a traceback after inference."""
    values = {
        "PatientSex": "U",
        "PatientBirthDate": "00000000",
        "StudyDate": "2022-12-08",
        "StudyTime": "12:30:00",
        "SpecificCharacterSet": ["", "ISO 2022 IR 87"],
    }
    files = write_series(tmp_path / "s", phantom("LPS"), edit=_set(None, **values))
    before = [f.read_bytes() for f in files]
    vol = read_series(tmp_path / "s")
    with caplog.at_level(logging.WARNING, logger="flareseg.dicom.seg"), warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom's own warnings of the values are not passed on: said once, here
        check_seg_writable(vol)
    assert [r.getMessage() for r in caplog.records if r.name == "flareseg.dicom.seg"] == [
        f"{tmp_path / 's'}: the DICOM SEG cannot copy the series' values as they are: PatientSex 'U' (not M, F or O) "
        "left empty; PatientBirthDate '00000000' (not a valid date or time) left empty; StudyDate '2022-12-08' "
        "written 20221208; StudyTime '12:30:00' written 123000; SpecificCharacterSet '\\ISO 2022 IR 87' written "
        "'ISO 2022 IR 6\\ISO 2022 IR 87'"
    ]
    _, labels, _ = canonical_truth()
    out = write_seg(labels, vol, tmp_path / "case.dcm")
    np.testing.assert_array_equal(read_seg(out, vol), labels)
    seg = pydicom.dcmread(out)
    assert (seg.PatientSex, seg.PatientBirthDate, seg.StudyDate, seg.StudyTime) == ("", "", "20221208", "123000")
    assert list(seg.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]  # PS3.3 C.12.1.1.2's name for ""
    assert [f.read_bytes() for f in files] == before  # the inputs as they were
    from pydicom.valuerep import DA

    from flareseg.dicom.seg import _date_or_time

    assert _date_or_time("1950.01.02", DA) == "19500102"  # pydicom reads the dotted form; DICOM's has no dots


def test_reading_a_series_values_for_a_seg_leaves_the_warning_filters_alone_in_threads(tmp_path: Path) -> None:
    """The SEG writer read these values inside warnings.catch_warnings, which swaps the process-wide filters: two
    writer threads (two runners, as the README advises) that overlapped left a service ignoring every warning."""
    import threading

    from flareseg.dicom.seg import _seg_values

    values = {"PatientSex": "U", "PatientBirthDate": "00000000", "StudyDate": "2022-12-08", "StudyTime": "12:30:00"}
    files = write_series(tmp_path / "s", phantom("LPS"), edit=_set(None, **values))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files[:2]]
    before, interval = list(warnings.filters), sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: overlaps that would take hours of a service come at once
    try:
        threads = [threading.Thread(target=lambda ds=ds: [_seg_values(ds) for _ in range(5000)]) for ds in headers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert warnings.filters == before
    fixed, said = _seg_values(headers[0])
    assert fixed == {"PatientSex": "", "PatientBirthDate": "", "StudyDate": "20221208", "StudyTime": "123000"}
    assert len(said) == 4


def test_values_a_seg_changes_are_said_as_the_file_stores_them_read_before_or_not(tmp_path: Path) -> None:
    """Several values, and a byte outside ASCII, are said in DICOM's form whether or not pydicom converted them."""
    from flareseg.dicom.seg import _seg_values

    files = write_series(tmp_path / "s", phantom("LPS"), edit=_set(0, PatientSex=["M", "F"]))
    raw = pydicom.dcmread(files[0], stop_before_pixels=True)
    converted = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert list(converted.PatientSex) == ["M", "F"]  # converted now, by this access
    for ds in (raw, converted):
        assert _seg_values(ds) == ({"PatientSex": ""}, ["PatientSex 'M\\F' (not M, F or O) left empty"])
    raw = pydicom.dcmread(files[0], stop_before_pixels=True)
    raw["PatientSex"] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag("PatientSex"), "CS", 2, b"\xe9 ", 0, True, True)
    assert _seg_values(raw)[1] == ["PatientSex '\xe9' (not M, F or O) left empty"]
    # NUL padding (a common non-conformance) and spaces set by an API caller are padding, not the value.
    raw["PatientSex"] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag("PatientSex"), "CS", 2, b"M\x00", 0, True, True)
    assert _seg_values(raw) == ({}, [])
    converted.PatientSex = " M "
    assert _seg_values(converted) == ({}, [])


def test_a_header_highdicom_refuses_otherwise_is_refused_before_inference_in_one_line(tmp_path: Path) -> None:
    # Orientations 5e-4 apart, which the series reader allows and highdicom does not: tried on every slice's header.
    def tilted(k: int, ds: Dataset) -> None:
        if k % 2:
            ds.ImageOrientationPatient = [
                v + (5e-4 if i == 1 else 0.0) for i, v in enumerate(ds.ImageOrientationPatient)
            ]

    write_series(tmp_path / "iop", phantom("LPS"), edit=tilted)
    with pytest.raises(
        FlareSegError, match=r"highdicom cannot make a DICOM SEG .*shared orientation.*use NIfTI output$"
    ):
        check_seg_writable(read_series(tmp_path / "iop"))
    write_series(tmp_path / "s", phantom("LPS"), edit=_set(None, SpecificCharacterSet="ISO_IR 999"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warning of the unknown character set
        vol = read_series(tmp_path / "s")
        with pytest.raises(FlareSegError) as info:
            check_seg_writable(vol)
    assert str(info.value) == (
        f"{tmp_path / 's'}: highdicom cannot make a DICOM SEG from this series' headers ('ISO_IR 999' is not a valid "
        "SpecificCharacterSetValues); use NIfTI output"
    )


@pytest.mark.parametrize("keyword", ["FrameOfReferenceUID", "StudyInstanceUID"])
def test_slices_of_two_frames_of_reference_or_studies_are_not_one_volume(tmp_path: Path, keyword: str) -> None:
    # Positions in two frames of reference cannot share one affine; the NIfTI output took them as one.
    files = write_series(tmp_path / "s", phantom("LPS"), edit=_set(5, **{keyword: "1.2.3.4.6"}))
    common = str(pydicom.dcmread(files[0]).get(keyword))
    with pytest.raises(FlareSegError) as info:
        read_series(tmp_path / "s")
    assert str(info.value) == (
        f"{tmp_path / 's'}: inconsistent {keyword} between slices: {common} in 11 files, 1.2.3.4.6 in 1 files "
        f"(e.g. {files[5].name})"
    )


def test_a_rescale_missing_from_some_slices_is_refused_and_from_all_is_said(tmp_path: Path, caplog) -> None:
    def lose(keyword: str, only: int | None) -> Callable[[int, Dataset], None]:
        def edit(k: int, ds: Dataset) -> None:
            if only is None or k == only:
                delattr(ds, keyword)

        return edit

    files = write_series(tmp_path / "one", phantom("LPS"), edit=lose("RescaleIntercept", 3))
    with pytest.raises(FlareSegError) as info:  # read as intercept 0, that slice was 1024 HU above its neighbours
        read_series(tmp_path / "one")
    assert (
        str(info.value)
        == f"{tmp_path / 'one'}: {files[3].name}: no RescaleIntercept, unlike the other slices (damaged?)"
    )
    write_series(tmp_path / "all", phantom("LPS"), edit=lose("RescaleIntercept", None))
    with caplog.at_level(logging.WARNING, logger="flareseg.dicom.series"):
        read_series(tmp_path / "all")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'all'}: no RescaleIntercept in any slice (Type 1 for CT); taken as RescaleIntercept 0"
    ]


def test_a_damaged_frame_count_is_one_line(tmp_path: Path) -> None:
    # pydicom checks an IS value as it is set: the damaged one is patched into the written file's bytes.
    files = write_series(tmp_path / "s", phantom("LPS"), edit=_set(2, NumberOfFrames="99999"))
    files[2].write_bytes(files[2].read_bytes().replace(b"99999", b"abcde"))
    with pytest.raises(FlareSegError) as info:
        read_series(tmp_path / "s")
    assert str(info.value) == f"{tmp_path / 's'}: {files[2].name}: NumberOfFrames is 'abcde', expected a whole number"


def test_an_enhanced_ct_of_one_frame_is_said_to_be_multi_frame(tmp_path: Path) -> None:
    def enhanced(k: int, ds: Dataset) -> None:
        if k == 0:
            del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
            ds.NumberOfFrames = 1

    files = write_series(tmp_path / "s", phantom("LPS"), edit=enhanced)
    with pytest.raises(FlareSegError, match=rf"{files[0].name} is an Enhanced CT image \(1 frame\); expected single"):
        read_series(tmp_path / "s")


@pytest.mark.parametrize(
    ("values", "thickness", "said"),
    [
        ({"SliceThickness": -3.0}, 3.0, "SliceThickness of {name} is -3; its size, 3 mm, taken"),
        ({"SpacingBetweenSlices": -2.0, "SliceThickness": 5.0}, 2.0, "SpacingBetweenSlices of {name} is -2; its "
         "size, 2 mm, taken"),
        ({"SliceThickness": 0.0}, 1.0, "one slice, without a SpacingBetweenSlices or SliceThickness above 0: taken "
         "as 1 mm thick"),
    ],
)  # fmt: skip
def test_a_single_slice_s_thickness_is_its_size_and_said(tmp_path: Path, caplog, values, thickness, said) -> None:
    # A negative thickness flipped the output's slice axis (L, P, I); 0 became 1 mm unsaid.
    files = write_series(tmp_path / "s", phantom("LPS"), edit=_set(None, **values))
    whole = nib.aff2axcodes(read_series(tmp_path / "s").geometry.affine)  # the axes its positions give the series
    for extra in files[1:]:
        extra.unlink()
    with caplog.at_level(logging.WARNING, logger="flareseg.dicom.series"):
        vol = read_series(tmp_path / "s")
    assert float(vol.geometry.header.get_zooms()[2]) == thickness
    assert nib.aff2axcodes(vol.geometry.affine) == whole
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 's'}: " + said.format(name=files[0].name)]


def test_thumbnails_sorting_first_or_a_dicomdir_under_another_name_do_not_hide_or_name_a_series(tmp_path: Path) -> None:
    write_series(tmp_path / "s", phantom("LPS"), patient_id="P1")
    for i in range(9):  # more than the files probed
        (tmp_path / "s" / f"00_thumb{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 a thumbnail")
    assert is_series_dir(tmp_path / "s")
    assert find_series(tmp_path) == {"P1_20260101_s3": tmp_path / "s"}
    # A DICOMDIR copied under a name that sorts first: no slice, so not what the case is named from.
    index = Dataset()
    index.file_meta = pydicom.dataset.FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    index.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    index.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index.save_as(tmp_path / "s" / "000index.dcm", enforce_file_format=True)
    assert series_case_name(tmp_path / "s") == "P1_20260101_s3"
    assert read_series(tmp_path / "s").array.shape[0] == SHAPE[2]


@pytest.mark.parametrize("count", [1, 2])
def test_a_folder_of_seg_results_given_as_the_ct_says_so(tmp_path: Path, count: int) -> None:
    """Results given back as the input: not "modality SEG" nor "2 series in one folder" (each SEG is a series)."""
    write_series(tmp_path / "s", phantom("LPS"))
    vol = read_series(tmp_path / "s")
    results = tmp_path / "results"
    results.mkdir()
    for i in range(count):
        write_seg(np.zeros(vol.array.shape, np.uint8), vol, results / f"p{i}.dcm")
    files = "1 file" if count == 1 else "2 files"
    with pytest.raises(FlareSegError) as err:
        read_series(results)
    assert str(err.value) == (
        f"{results}: holds DICOM SEG objects ({files}: segmentation results), not a CT series: give the folder of "
        "the CT's slices"
    )
    # Saved among the CT's slices: the SEG files are named, not "2 series in one folder".
    shutil.copy(results / "p0.dcm", tmp_path / "s" / "result.dcm")
    with pytest.raises(FlareSegError) as err:
        read_series(tmp_path / "s")
    assert str(err.value) == (
        f"{tmp_path / 's'}: DICOM SEG objects among the CT's slices (result.dcm: segmentation results): move them "
        "out of the series' folder"
    )
    # Either mark alone says SEG: Modality, or the SOP class.
    for i, (key, other) in enumerate((("Modality", "OT"), ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"))):
        seg = pydicom.dcmread(results / "p0.dcm")
        setattr(seg, key, other)
        (tmp_path / f"one-mark-{i}").mkdir()
        seg.save_as(tmp_path / f"one-mark-{i}" / "p.dcm")
        with pytest.raises(FlareSegError, match="holds DICOM SEG objects"):
            read_series(tmp_path / f"one-mark-{i}")
    # A slice of the CT's own series that calls itself SEG (a mislabelled SOP class) is no result saved there.
    from flareseg.dicom.files import SEG_SOP_CLASS

    write_series(tmp_path / "mislabelled", phantom("LPS"), edit=_set(2, SOPClassUID=SEG_SOP_CLASS))
    assert read_series(tmp_path / "mislabelled").array.shape[0] == SHAPE[2]


def test_a_folder_of_seg_results_behind_nifti_files_is_not_an_image_series(tmp_path: Path) -> None:
    from flareseg.dicom import holds_image_series

    write_series(tmp_path / "s", phantom("LPS"))
    vol = read_series(tmp_path / "s")
    results = tmp_path / "results"
    results.mkdir()
    write_seg(np.zeros(vol.array.shape, np.uint8), vol, results / "p9.dcm")
    for i in range(8):  # as many NIfTI files sorting first as the probe reads: it read no DICOM file, and said True
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), results / f"case_{i:03d}.nii.gz")
    assert is_series_dir(results) and not holds_image_series(results)
