"""One CT series (a folder of single-frame DICOM files) read into the canonical :class:`Volume` layout.

Slices are ordered by the projection of ImagePositionPatient on the slice normal (the cross
product of the ImageOrientationPatient row and column directions), never by file name or
InstanceNumber, and the slice spacing comes from those positions. The grid's affine is
built in the DICOM patient frame (LPS) and turned into RAS, so the volume, its geometry and
everything downstream (``write_labels`` included) behave exactly as for a NIfTI input.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
import pydicom.uid as dicom_uid
from nibabel.orientations import apply_orientation
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.pixels import pixel_array as decode_pixels

from flareseg.dicom.files import (
    DICOMDIR_SOP_CLASS,
    ONLY_DICOMDIR,
    dicom_files,
    first_dicom_file,
    is_segmentation,
    only_dicomdir,
    read_header,
)
from flareseg.errors import FlareSegError, first_few
from flareseg.volume import Volume, check_intensity_scaling, grid_geometry, to_canonical

log = logging.getLogger(__name__)

_RESCALE = ("RescaleSlope", "RescaleIntercept")  # how the scaling check names DICOM's fields


#: ImageOrientationPatient components may differ this much between slices of one stack.
ORIENTATION_TOLERANCE = 1e-3
#: Slice positions may stray from the slice normal by this fraction of a pixel (else: gantry tilt).
TILT_TOLERANCE_PIXELS = 0.1
#: Gaps between neighbouring slices may differ from the median gap by this fraction of it.
SPACING_TOLERANCE = 0.1
#: Most threads used to decode compressed slices.
MAX_DECODE_THREADS = 8
#: Threaded decoding is the default only with this many usable cores: on 2 busy cores it did not
#: help (benchmarks/dicom_read.md), and Pillow's codec alone can be slower than pylibjpeg's.
MIN_CORES_FOR_THREADS = 4

_JPEG2000 = frozenset(
    {
        dicom_uid.JPEG2000Lossless,
        dicom_uid.JPEG2000,
        dicom_uid.HTJ2KLossless,
        dicom_uid.HTJ2KLosslessRPCL,
        dicom_uid.HTJ2K,
    }
)
_JPEG = frozenset(
    {
        dicom_uid.JPEGBaseline8Bit,
        dicom_uid.JPEGExtended12Bit,
        dicom_uid.JPEGLossless,
        dicom_uid.JPEGLosslessSV1,
        dicom_uid.JPEGLSLossless,
        dicom_uid.JPEGLSNearLossless,
    }
)


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """What a DICOM SEG writer needs to reference the series a volume was read from (``Volume.source``)."""

    folder: Path
    #: The files in slice order along the normal: slice ``k`` of the file grid (``geometry`` axis 2).
    files: tuple[Path, ...]
    #: Their headers (read without pixel data), in the same order.
    datasets: tuple[Dataset, ...]
    #: Canonical axial slice ``z`` -> index into ``files``; None when the series is not axial
    #: (sagittal or coronal slices do not map one to one onto canonical axial slices).
    canonical_slices: tuple[int, ...] | None

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """SOPInstanceUID of each slice in file-grid order (from the file meta when the data set lacks it)."""
        return tuple(_uid(ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID") for ds in self.datasets)


def _uid(ds: Dataset, keyword: str, meta_keyword: str) -> str:
    value = str(ds.get(keyword, "") or "")
    if not value and hasattr(ds, "file_meta"):
        value = str(ds.file_meta.get(meta_keyword, "") or "")
    return value


def _fail(folder: Path, problem: str) -> FlareSegError:
    return FlareSegError(f"{folder}: {problem}")


def _headers(folder: Path) -> list[tuple[Path, Dataset]]:
    files, n_candidates = dicom_files(folder)
    if n_candidates == 0:
        if only_dicomdir(folder):
            raise _fail(folder, ONLY_DICOMDIR)
        if any(p.is_dir() for p in folder.iterdir()):  # listed once already: it lists again
            raise _fail(folder, "no files in it, only folders: give the folder that holds one series' slices")
        raise _fail(folder, "empty folder: no files (expected the DICOM files of one CT series)")
    if not files:
        raise _fail(folder, f"no DICOM files among its {n_candidates} files")
    out = []
    for path in files:
        try:
            ds = read_header(path)
        except Exception as exc:  # a damaged header: pydicom raises from many layers
            raise _fail(folder, f"unreadable DICOM file {path.name} ({exc})") from None
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
            continue
        out.append((path, ds))
    if not out:
        raise _fail(folder, ONLY_DICOMDIR)
    return out


def _series_uid(ds: Dataset) -> str:
    return str(ds.get("SeriesInstanceUID", "") or "")


def _is_localizer(ds: Dataset) -> bool:
    """A scout, by ImageType's third value (for CT, AXIAL or LOCALIZER: PS3.3 C.8.2.1.1.1); later values are the
    vendor's own words."""
    value = ds.get("ImageType", None)
    values = [value] if isinstance(value, str) else list(value or [])
    return len(values) > 2 and str(values[2]).strip().upper() == "LOCALIZER"


def _both_at(a: float, b: float) -> str:
    """Two positions in words: "both at 5.00 mm", or "at 5.00 and 5.20 mm" where they differ."""
    return f"both at {a:.2f} mm" if f"{a:.2f}" == f"{b:.2f}" else f"at {a:.2f} and {b:.2f} mm"


def _check_one_series(folder: Path, headers: list[tuple[Path, Dataset]]) -> None:
    images = {_series_uid(ds) for _, ds in headers if not is_segmentation(ds)}
    # A SEG of the images' own series UID is no result saved beside them (a mislabelled slice): the checks below.
    segs = [path.name for path, ds in headers if is_segmentation(ds) and _series_uid(ds) not in images]
    if len(segs) == len(headers):  # results given back as the input: said as such
        n = len(headers)
        raise _fail(
            folder,
            f"holds DICOM SEG objects ({n} file{'' if n == 1 else 's'}: segmentation results), not a CT series: "
            "give the folder of the CT's slices",
        )
    if segs:  # a result saved among the slices: each SEG is a series of its own, so it was "2 series in one folder"
        raise _fail(
            folder,
            f"DICOM SEG objects among the CT's slices ({first_few(segs)}: segmentation results): move them out of "
            "the series' folder",
        )
    # A flat export puts the scout beside the slices, in a series of its own ("2 series in one folder") or in theirs
    # ("inconsistent slice size"): true, but neither said which file to move.
    scouts = [path.name for path, ds in headers if _is_localizer(ds)]
    if scouts and len(scouts) < len(headers):
        raise _fail(
            folder,
            f"localizer image(s) among the CT's slices ({first_few(scouts)}: ImageType LOCALIZER, a scout, not a "
            "slice): move them out of the series' folder",
        )
    groups: dict[str, list[Dataset]] = {}
    for _, ds in headers:
        groups.setdefault(_series_uid(ds), []).append(ds)
    if len(groups) > 1 and "" in groups:
        # Files of a series without its UID beside files with one: most often damaged or cut short.
        lacking = [path.name for path, ds in headers if not _series_uid(ds)]
        why = "no SeriesInstanceUID, unlike the other files (damaged or cut short?)"
        raise _fail(folder, f"{first_few(lacking)}: {why}")
    if len(groups) > 1:
        parts = [
            f"{uid} '{members[0].get('SeriesDescription', '') or ''}' "
            f"({len(members)} file{'s' if len(members) > 1 else ''})"
            for uid, members in sorted(groups.items())
        ]
        raise _fail(folder, f"{len(groups)} series in one folder, expected one: " + "; ".join(parts))
    modality = {path.name: str(ds.get("Modality", "") or "(none)") for path, ds in headers}
    others = sorted(name for name, value in modality.items() if value != "CT")
    if others:
        found = ", ".join(sorted(set(modality.values())))
        odd = f" ({first_few([f'{name}: {modality[name]}' for name in others])})" if len(others) < len(modality) else ""
        raise _fail(folder, f"modality {found}, expected CT{odd}")


#: Decimal-string attributes read as numbers, with how many each holds and, for optional ones, their default.
_NUMBERS: dict[str, tuple[int, float | None]] = {
    "ImagePositionPatient": (3, None),
    "ImageOrientationPatient": (6, None),
    "PixelSpacing": (2, None),
    "RescaleSlope": (1, 1.0),
    "RescaleIntercept": (1, 0.0),
}


def header_numbers(folder: Path, path: Path, ds: Dataset, keyword: str) -> list[float]:
    """The finite numbers of one of :data:`_NUMBERS`' attributes (its default where an optional one is absent or
    empty); one line naming the file and the value otherwise: a damaged or hand-edited header (``abc``, five
    orientation values, ``n/a``) would end the run in a traceback from deep inside numpy."""
    count, default = _NUMBERS[keyword]
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom converts a raw value on first access, and can raise then
        raise _fail(folder, f"{path.name}: unreadable {keyword} ({exc})") from None
    if value is None or value == "":
        if default is None:
            raise _fail(folder, f"{path.name} lacks {keyword} (not a CT image slice?)")
        return [default]
    items = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != count or not all(np.isfinite(numbers)):
        shown = "\\".join(str(v) for v in items)
        what = f"{count} finite numbers" if count > 1 else "a finite number"
        raise _fail(folder, f"{path.name}: {keyword} is '{shown}', expected {what}")
    return numbers


#: Enhanced and Legacy Converted Enhanced CT Image Storage: multi-frame, their geometry in functional groups.
_ENHANCED_CT: Final[frozenset[str]] = frozenset({"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"})


def _count(folder: Path, path: Path, ds: Dataset, keyword: str) -> int:
    """An integer attribute that defaults to 1 (NumberOfFrames, SamplesPerPixel), or one line naming a damaged one."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return 1
        return int(value)
    except (TypeError, ValueError):  # pydicom converts the raw value on first access, and can raise then
        raw = ds.get_item(keyword)
        shown = raw.value.decode(errors="replace") if isinstance(raw.value, bytes) else raw.value
        raise _fail(folder, f"{path.name}: {keyword} is '{shown}', expected a whole number") from None


def _require(folder: Path, headers: list[tuple[Path, Dataset]]) -> None:
    needed = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    for path, ds in headers:
        # Multi-frame first: an Enhanced CT keeps its geometry in functional groups, and would be said to lack it,
        # even with one frame.
        frames = _count(folder, path, ds, "NumberOfFrames")
        if str(ds.get("SOPClassUID", "") or "") in _ENHANCED_CT:
            many = f"{frames} frame{'s' if frames != 1 else ''}"
            raise _fail(folder, f"{path.name} is an Enhanced CT image ({many}); expected single-frame slices")
        if frames > 1:
            raise _fail(folder, f"{path.name} is a multi-frame image ({frames} frames); expected single-frame slices")
        missing = [k for k in needed if ds.get(k) in (None, "")]
        if missing:
            raise _fail(folder, f"{path.name} lacks {', '.join(missing)} (not a CT image slice?)")
        if _count(folder, path, ds, "SamplesPerPixel") != 1:
            raise _fail(folder, f"{path.name} is not a greyscale image (SamplesPerPixel={ds.SamplesPerPixel})")
        for keyword in _NUMBERS:
            header_numbers(folder, path, ds, keyword)
    # Positions are comparable only within one frame of reference, and a series lies in one study.
    for keyword in ("FrameOfReferenceUID", "StudyInstanceUID"):
        _check_consistent(folder, headers, keyword, lambda ds, k=keyword: str(ds.get(k, "") or "") or "(none)")
    # CT's rescale is Type 1: one slice without it beside slices with it would be read ~1024 HU off unsaid.
    absent = []  # missing from every slice: taken as the default, and said
    for keyword in _RESCALE:
        lacking = [path.name for path, ds in headers if ds.get(keyword) in (None, "")]
        if len(lacking) == len(headers):
            absent.append(keyword)
        elif lacking:
            raise _fail(folder, f"{first_few(lacking)}: no {keyword}, unlike the other slices (damaged?)")
    if absent:
        taken = ", ".join(f"{k} {_NUMBERS[k][1]:g}" for k in absent)
        log.warning("%s: no %s in any slice (Type 1 for CT); taken as %s", folder, " or ".join(absent), taken)


def _check_consistent(folder: Path, headers: list[tuple[Path, Dataset]], what: str, key: Callable) -> None:
    counts = Counter(key(ds) for _, ds in headers)
    if len(counts) > 1:
        (common, _), *_ = counts.most_common()
        odd = next(path.name for path, ds in headers if key(ds) != common)
        found = ", ".join(f"{value} in {n} files" for value, n in counts.most_common())
        raise _fail(folder, f"inconsistent {what} between slices: {found} (e.g. {odd})")


def _plane(folder: Path, headers: list[tuple[Path, Dataset]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row and column directions (LPS) and their normal, checking that all slices share them."""
    iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in headers])
    if iop.shape[1] != 6 or not np.all(np.isfinite(iop)):
        raise _fail(folder, "ImageOrientationPatient must hold six finite numbers")
    worst = int(np.argmax(np.abs(iop - iop[0]).max(axis=1)))
    if np.abs(iop[worst] - iop[0]).max() > ORIENTATION_TOLERANCE:
        raise _fail(
            folder,
            "slices are not parallel: ImageOrientationPatient differs between "
            f"{headers[0][0].name} {np.round(iop[0], 4).tolist()} and {headers[worst][0].name} "
            f"{np.round(iop[worst], 4).tolist()}",
        )
    row, col = iop[0, :3], iop[0, 3:]
    if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-3:
        raise _fail(folder, f"ImageOrientationPatient {iop[0].tolist()} has a zero direction")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if abs(float(row @ col)) > ORIENTATION_TOLERANCE:
        raise _fail(folder, f"ImageOrientationPatient {iop[0].tolist()}: row and column are not orthogonal")
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _slice_order(
    folder: Path, headers: list[tuple[Path, Dataset]], normal: np.ndarray, pixel: float
) -> tuple[np.ndarray, float]:
    """Indices of ``headers`` sorted along the normal, and the slice spacing; refuses tilt, gaps and duplicates."""
    names = [path.name for path, _ in headers]
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
    if pos.shape[1] != 3 or not np.all(np.isfinite(pos)):
        raise _fail(folder, "ImagePositionPatient must hold three finite numbers")
    s = pos @ normal
    order = np.argsort(s, kind="stable")
    s, pos = s[order], pos[order]
    offsets = (pos - pos[0]) - np.outer(s - s[0], normal)  # in-plane drift of each slice's corner
    drift = np.linalg.norm(offsets, axis=1)
    if drift.max() > TILT_TOLERANCE_PIXELS * pixel:
        span = max(float(s[-1] - s[0]), 1e-6)
        angle = np.degrees(np.arctan2(float(drift.max()), span))
        tilt = headers[0][1].get("GantryDetectorTilt")
        tag = f", GantryDetectorTilt {tilt}" if tilt not in (None, "") else ""
        raise _fail(
            folder,
            f"slice positions do not follow the slice normal (gantry tilt or sheared stack of about {angle:.1f} "
            f"degrees{tag}); tilted series are not supported",
        )
    if len(s) < 2:
        return order, _single_slice_thickness(folder, headers[0][0], headers[0][1])
    gaps = np.diff(s)
    # Duplicates are judged against the typical (median positive) gap: against the largest one, a run of
    # missing slices would make every ordinary gap look like a duplicate.
    positive = gaps[gaps > 1e-3]
    typical = float(np.median(positive)) if positive.size else 0.0
    dup = np.flatnonzero(gaps <= max(1e-3, 0.1 * typical))
    if dup.size:
        k = int(dup[0])
        raise _fail(
            folder,
            f"duplicated slice: {names[order[k]]} and {names[order[k + 1]]} are {_both_at(s[k], s[k + 1])} along the "
            "normal",
        )
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > max(0.01, SPACING_TOLERANCE * step))
    if bad.size:
        k = int(bad[np.argmax(np.abs(gaps[bad] - step))])
        missing = round(gaps[k] / step) - 1
        hint = (
            f": {missing} missing slice(s)?"
            if missing >= 1 and abs(gaps[k] / step - round(gaps[k] / step)) < 0.2
            else ""
        )
        raise _fail(
            folder,
            f"slice positions are not evenly spaced: gap of {gaps[k]:.2f} mm between {names[order[k]]} and "
            f"{names[order[k + 1]]}, expected {step:.2f} mm{hint}",
        )
    # Gaps each within the tolerance can still add up (2.0 mm, then 2.19 mm): the affine's one spacing would
    # put later slices millimetres from where their own positions say.
    spacing = float((s[-1] - s[0]) / (len(s) - 1))
    off = np.abs(s - (s[0] + spacing * np.arange(len(s))))
    k = int(np.argmax(off))
    if off[k] > max(0.01, SPACING_TOLERANCE * spacing):
        raise _fail(
            folder,
            f"slice positions are not evenly spaced: {names[order[k]]} lies {off[k]:.2f} mm from where an even "
            f"spacing of {spacing:.2f} mm puts it (the spacing changes along the series)",
        )
    return order, spacing


def _single_slice_thickness(folder: Path, path: Path, ds: Dataset) -> float:
    """One slice has no neighbour to measure its spacing from: SpacingBetweenSlices, else SliceThickness (their
    size where negative), else 1 mm, said where it is not the header's value as it stands."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(ds.get(keyword))
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value != 0:
            if value < 0:
                log.warning("%s: %s of %s is %g; its size, %g mm, taken", folder, keyword, path.name, value, -value)
            return abs(value)
    log.warning("%s: one slice, without a SpacingBetweenSlices or SliceThickness above 0: taken as 1 mm thick", folder)
    return 1.0


def result_off_series(folder: str | os.PathLike[str], shape: Sequence[int], affine: np.ndarray) -> str | None:
    """Why a NIfTI result of ``shape`` and (RAS) ``affine`` cannot have been made from the series in ``folder`` as
    it is now, judged from one slice's header (a resumed folder stays quick): its size, pixel spacing and
    orientation against the result's in-plane axes, and its position against the result's slices, with the
    tolerances the series reader allows. None where it fits, or where the header cannot be read (the run says).
    """
    folder = Path(folder)
    path = first_dicom_file(folder)
    if path is None:
        return None
    try:
        ds = read_header(path)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        spacing = [float(v) for v in ds.PixelSpacing]
        rows, columns = int(ds.Rows), int(ds.Columns)
    except Exception:  # absent or damaged: reading the series says what is wrong
        return None
    if tuple(shape[:2]) != (columns, rows):
        return (
            f"is {shape[0]} x {shape[1]} in-plane, where the slices of the series {folder} now are {columns} x {rows}"
        )
    row, col = iop[:3], iop[3:]
    if iop.size != 6 or len(spacing) != 2 or min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-3:
        return None
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    expected = _affine(row, col, np.cross(row, col), (*spacing, 1.0), position)
    pixel = min(spacing)
    if not np.allclose(expected[:3, :2], affine[:3, :2], rtol=0, atol=ORIENTATION_TOLERANCE * pixel):
        return f"has other pixel spacing or orientation than the series {folder} now has"
    # The slice's corner in the result's voxels: (0, 0, k), k whole, as far as the series reader's tolerances go.
    try:
        i, j, k = np.linalg.solve(affine[:3, :3], expected[:3, 3] - affine[:3, 3])
    except np.linalg.LinAlgError:
        return None
    if (
        max(abs(i), abs(j)) > TILT_TOLERANCE_PIXELS
        or abs(k - round(k)) > SPACING_TOLERANCE
        or not -0.5 < k < shape[2] - 0.5
    ):
        return f"has no slice where {path.name} of the series {folder} now lies (a scan sent or reconstructed again?)"
    return None


def _affine(
    row: np.ndarray, col: np.ndarray, normal: np.ndarray, spacing: Sequence[float], origin: np.ndarray
) -> np.ndarray:
    """RAS affine of the file grid: voxel (i, j, k) = (column, row, slice along the normal)."""
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]  # PixelSpacing is (between rows, between columns)
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = normal * spacing[2]
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def codec_problem(uid: str) -> str | None:
    """Why pixel data in transfer syntax ``uid`` cannot be decoded here (naming what to install), or None."""
    if not uid:
        return None  # a bare data set: implicit or explicit VR, decoded natively
    ts = dicom_uid.UID(uid)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"transfer syntax {ts.name} ({ts}) cannot be decoded: pydicom has no decoder for it"
    if decoder.is_available:
        return None
    if ts in _JPEG2000:
        package = "pylibjpeg-openjpeg (with pylibjpeg), or python-gdcm"
    elif ts in _JPEG:
        package = "pylibjpeg-libjpeg (with pylibjpeg), or python-gdcm"
    else:
        package = "a pydicom decoder plugin for it (pylibjpeg plugins or python-gdcm)"
    return f"transfer syntax {ts.name} ({ts}) cannot be decoded: no codec installed; install {package}"


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""


def _decode_plan(syntaxes: set[str], threads: int | None) -> tuple[str, int]:
    """(pydicom decoding plugin, threads). Threads only where the codec releases the GIL.

    pydicom's own choice for JPEG 2000 (GDCM where python-gdcm is installed, else pylibjpeg-openjpeg) is taken
    serially: pylibjpeg-openjpeg decodes holding the GIL, so threads do not overlap; Pillow's JPEG 2000 decoder
    releases it and gives the same values for lossless data (benchmarks/dicom_read.md).
    """
    if threads is None:
        # sched_getaffinity (the cores this process may use) exists on Linux only.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = min(MAX_DECODE_THREADS, cores) if cores >= MIN_CORES_FOR_THREADS else 1
    workers = threads
    if workers < 1:
        raise FlareSegError(f"threads must be at least 1, got {threads}")
    if workers > 1 and syntaxes and syntaxes <= _JPEG2000:
        if all("pillow" in get_decoder(dicom_uid.UID(ts)).available_plugins for ts in syntaxes):
            return "pillow", workers
    return "", 1


def _decode(folder: Path, path: Path, header: Dataset, plugin: str) -> np.ndarray:
    try:
        syntax = _transfer_syntax(header)
        if syntax and syntax != dicom_uid.DeflatedExplicitVRLittleEndian:
            return decode_pixels(path, decoding_plugin=plugin)
        # pixel_array(path) reads the pixel data's bytes where they lie in the file, and a deflated data set's
        # lie compressed with the rest of it: dcmread inflates it. A bare data set has no file meta: give pydicom
        # the encoding it was parsed with.
        ds = pydicom.dcmread(path, force=True)
        if not syntax:
            implicit, little = ds.original_encoding
            ds.file_meta = FileMetaDataset()
            if implicit:
                ds.file_meta.TransferSyntaxUID = dicom_uid.ImplicitVRLittleEndian
            else:
                ds.file_meta.TransferSyntaxUID = (
                    dicom_uid.ExplicitVRLittleEndian if little else dicom_uid.ExplicitVRBigEndian
                )
        return ds.pixel_array
    except FlareSegError:
        raise
    except Exception as exc:  # codecs raise many types for corrupt or missing data
        raise _fail(folder, f"cannot decode the pixel data of {path.name} ({type(exc).__name__}: {exc})") from None


def read_series(folder: str | os.PathLike[str], *, threads: int | None = None) -> Volume:
    """Read the CT series in ``folder`` in the canonical layout :func:`flareseg.volume.read_ct` gives.

    Stored integers stay resident with RescaleSlope/RescaleIntercept as ``slope``/``inter``
    (when every slice shares them; otherwise the volume holds float32 Hounsfield units).
    ``volume.source`` is a :class:`DicomSeries`. ``threads``: decoding threads for JPEG 2000
    (default: the usable cores, at most 8, when there are at least 4; else 1); 1 decodes
    serially with pydicom's default codec.
    """
    folder = Path(folder)
    if not folder.exists():
        raise _fail(folder, "folder not found")
    if not folder.is_dir():
        raise _fail(folder, "not a directory (expected a folder holding one DICOM series)")
    headers = _headers(folder)
    _check_one_series(folder, headers)
    _require(folder, headers)
    _check_consistent(folder, headers, "slice size (Rows x Columns)", lambda ds: f"{ds.Rows}x{ds.Columns}")
    _check_consistent(folder, headers, "PixelSpacing", lambda ds: "x".join(f"{float(v):.4f}" for v in ds.PixelSpacing))
    _check_consistent(
        folder,
        headers,
        "pixel format (BitsAllocated/PixelRepresentation)",
        lambda ds: f"{ds.get('BitsAllocated')}/{ds.get('PixelRepresentation')}",
    )
    syntaxes = {_transfer_syntax(ds) for _, ds in headers}
    for ts in sorted(syntaxes):
        problem = codec_problem(ts)
        if problem:
            raise _fail(folder, problem)
    row, col, normal = _plane(folder, headers)
    first = headers[0][1]
    pixel_spacing = [float(v) for v in first.PixelSpacing]
    if len(pixel_spacing) != 2 or min(pixel_spacing) <= 0:
        raise _fail(folder, f"invalid PixelSpacing {first.PixelSpacing}")
    order, step = _slice_order(folder, headers, normal, min(pixel_spacing))
    ordered = [headers[int(i)] for i in order]
    rows, cols, n = int(first.Rows), int(first.Columns), len(ordered)

    slopes = np.array([header_numbers(folder, path, ds, "RescaleSlope")[0] for path, ds in ordered])
    inters = np.array([header_numbers(folder, path, ds, "RescaleIntercept")[0] for path, ds in ordered])
    if np.any(slopes == 0):
        zero = ordered[int(np.flatnonzero(slopes == 0)[0])][0].name
        raise _fail(folder, f"{zero}: RescaleSlope is 0, which would make every voxel one intensity")
    per_slice = bool(np.any(slopes != slopes[0]) or np.any(inters != inters[0]))

    origin = np.array([float(v) for v in ordered[0][1].ImagePositionPatient])
    affine = _affine(row, col, normal, (*pixel_spacing, step), origin)
    plugin, workers = _decode_plan(syntaxes, threads)
    sample = _decode(folder, ordered[0][0], ordered[0][1], plugin)
    if sample.shape != (rows, cols):
        raise _fail(folder, f"{ordered[0][0].name}: decoded pixels of shape {sample.shape}, expected {(rows, cols)}")
    dtype = np.dtype(np.float32) if per_slice else sample.dtype
    geometry = grid_geometry(folder, (cols, rows, n), affine, dtype)  # scanner-based: DICOM positions

    ornt = geometry.to_canonical
    axial = int(ornt[2, 0]) == 2  # file slices are canonical axial slices (possibly reversed)
    canonical_slices: tuple[int, ...] | None = None
    if axial:
        z_of_k = np.arange(n)[::-1] if ornt[2, 1] < 0 else np.arange(n)
        canonical_slices = tuple(int(k) for k in np.argsort(z_of_k))
        plane = ornt[:2]
        shape2d = apply_orientation(np.empty((cols, rows), np.uint8), plane).shape  # (X, Y)
        out = np.empty((n, shape2d[1], shape2d[0]), dtype)
    else:
        out = np.empty((n, rows, cols), dtype)

    def place(k: int, pixels: np.ndarray) -> None:
        if pixels.shape != (rows, cols):
            raise _fail(
                folder, f"{ordered[k][0].name}: decoded pixels of shape {pixels.shape}, expected {(rows, cols)}"
            )
        if per_slice:
            check_intensity_scaling(ordered[k][0], pixels, float(slopes[k]), float(inters[k]), _RESCALE)
            pixels = pixels.astype(np.float32) * np.float32(slopes[k]) + np.float32(inters[k])
        if axial:
            out[z_of_k[k]] = apply_orientation(pixels.T, plane).T
        else:
            out[k] = pixels

    def work(k: int) -> None:
        place(k, _decode(folder, ordered[k][0], ordered[k][1], plugin))

    place(0, sample)
    if workers > 1 and n > 2:
        with ThreadPoolExecutor(max_workers=min(workers, n - 1)) as pool:
            for future in [pool.submit(work, k) for k in range(1, n)]:
                future.result()
    else:
        for k in range(1, n):
            work(k)
    array = out if axial else to_canonical(out.transpose(2, 1, 0), geometry)
    source = DicomSeries(
        folder=folder,
        files=tuple(p for p, _ in ordered),
        datasets=tuple(ds for _, ds in ordered),
        canonical_slices=canonical_slices,
    )
    slope, inter = (1.0, 0.0) if per_slice else (float(slopes[0]), float(inters[0]))
    if not per_slice:
        check_intensity_scaling(folder, array, slope, inter, _RESCALE)
    log.debug("read %s: %d slices of %dx%d, %s, plugin %r x%d", folder, n, rows, cols, dtype, plugin, workers)
    return Volume(array, geometry, slope, inter, source=source)
