"""DICOM CT series written from the phantom, for the tests of every package that reads series.

Files are shuffled, named at random (half without ``.dcm``), with scrambled InstanceNumbers,
in any transfer syntax: what a real export can look like.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from flareseg.phantom import Phantom, make_phantom

SHAPE = (64, 64, 12)  # voxels along R, A, S
SPACING = (5.0, 5.0, 6.0)
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def phantom(axcodes: str = "RAS") -> Phantom:
    return make_phantom(SHAPE, SPACING, tuple(axcodes), seed=3)


def write_series(
    folder: Path,
    ph: Phantom,
    *,
    syntax: str = ExplicitVRLittleEndian,
    unsigned: bool = True,
    modality: str = "CT",
    patient_id: str = "PAT01",
    series_number: int | None = 3,
    series_uid: str | None = None,
    description: str = "phantom abdomen",
    seed: int = 0,
    bare_files: int = 0,
    edit: Callable[[int, Dataset], None] | None = None,
) -> list[Path]:
    """Write ``ph`` as single-frame CT slices along its third voxel axis; returns the files in slice order.

    Files are written in a shuffled order under random names (half without ``.dcm``), with
    scrambled InstanceNumbers; the first ``bare_files`` slices are written without the Part 10
    preamble and file meta. ``edit(k, ds)`` changes slice ``k`` before it is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lps = LPS_FROM_RAS @ ph.affine
    row, col, step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    study, series, frame = generate_uid(), series_uid or generate_uid(), generate_uid()
    n = ph.image.shape[2]
    instance_numbers = rng.permutation(n) + 1
    paths = []
    for k in range(n):
        hu = ph.image[:, :, k].T  # (rows = voxel axis 1, columns = voxel axis 0)
        pixels = (hu.astype(np.int32) + 1024).astype(np.uint16) if unsigned else hu.astype(np.int16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, "Phantom^Test"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "", "O", "20260101", "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Manufacturer, ds.SeriesDescription = "flareseg tests", description
        if series_number is not None:
            ds.SeriesNumber = series_number
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImageOrientationPatient = [float(v) for v in (*(row / np.linalg.norm(row)), *(col / np.linalg.norm(col)))]
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * step]
        ds.PixelSpacing = [float(np.linalg.norm(col)), float(np.linalg.norm(row))]
        ds.SliceThickness = float(np.linalg.norm(step))
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, (12 if unsigned else 16), (11 if unsigned else 15)
        ds.PixelRepresentation = 0 if unsigned else 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = (-1024 if unsigned else 0), 1, "HU"
        ds.PixelData = pixels.tobytes()
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax  # the whole data set deflated as it is saved
        elif syntax != ExplicitVRLittleEndian:
            plugin = "pylibjpeg" if syntax == JPEG2000Lossless else ""
            ds.compress(syntax, pixels, encoding_plugin=plugin)
        if edit is not None:
            edit(k, ds)
        paths.append(ds)
    order = rng.permutation(n)
    files: list[Path] = [Path()] * n
    for k in order:
        name = f"{rng.integers(1 << 40):010x}" + (".dcm" if rng.random() < 0.5 else "")
        path = folder / name
        ds = paths[k]
        if k < bare_files:
            if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            elif ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
                ds.decompress()  # a bare data set is implicit VR little endian: never compressed
            del ds.file_meta  # a bare data set: no preamble, no file meta (implicit VR little endian)
            ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
        else:
            ds.save_as(path, enforce_file_format=True)
        files[k] = path
    return files
