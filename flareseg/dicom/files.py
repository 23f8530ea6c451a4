"""Which files hold DICOM, which folders hold a series, and what a series folder is called as a case."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from flareseg.errors import FlareSegError, first_few
from flareseg.volume import IgnoredInput, channel_tagged, is_nifti, require_folder, say_ignored

log = logging.getLogger(__name__)

#: How many files :func:`is_series_dir` looks at before deciding.
PROBE_FILES = 8
#: Suffixes of files that a series folder may hold beside its slices and that are never DICOM (thumbnails, notes,
#: reports): not counted among the files probed, which they would otherwise hide the slices from.
_OTHER_FORMATS = frozenset(
    ".jpg .jpeg .png .gif .bmp .tif .tiff .webp .txt .md .csv .json .xml .html .htm .pdf .log .ini .zip .db".split()
)
#: Media Storage SOP Class of a DICOMDIR (an index of a disc, not an image).
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: SOP Class of a DICOM Segmentation (what ``--output-type dicom-seg`` writes).
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_MAX_NAME = 100
_IDENTIFYING_TAGS = [Tag(0x0008, 0x0016), Tag(0x0008, 0x0060)]  # SOPClassUID, Modality


def _candidates(folder: Path) -> list[Path]:
    """Regular, non-hidden files of ``folder`` in name order, DICOMDIR excluded."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise FlareSegError(f"{folder}: cannot list the folder ({exc.strerror})") from None
    return [p for p in entries if not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and p.is_file()]


def _head(path: str | os.PathLike[str]) -> bytes:
    """The first 132 bytes (where the Part 10 preamble ends); empty when the file cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError:
        return b""


def has_preamble(path: str | os.PathLike[str]) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    return _head(path)[128:132] == b"DICM"


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """A DICOM file, with the Part 10 preamble or as a bare data set that pydicom parses."""
    head = _head(path)
    if head[128:132] == b"DICM":
        return True
    # A bare data set starts with an element of group 0002 or 0008 (little endian); anything
    # else is not DICOM, and this keeps pydicom's force mode away from text and NIfTI files.
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=_IDENTIFYING_TAGS)
    except Exception:  # force mode on a damaged file can fail in any layer of the parser
        return False
    return "SOPClassUID" in ds or "Modality" in ds


def count_dicom_files(folder: str | os.PathLike[str]) -> int:
    """How many DICOM image files ``folder`` directly holds: found as :func:`dicom_files` finds them (without a
    word on the others: reading the series says those), a DICOMDIR under any name left out, as reading does."""
    return sum(is_dicom_file(path) and not _is_dicomdir(path) for path in _candidates(Path(folder)))


def _is_dicomdir(path: Path) -> bool:
    """Whether a DICOM file is a DICOMDIR (a media index) by its file meta, whatever its name; a bare data set
    (no file meta) never is."""
    # The file meta comes first and names the SOP class early: a file whose first bytes lack the DICOMDIR's UID
    # is none, and only the rest are parsed (parsing every slice's meta made a resumed series' check 20x slower).
    try:
        with open(path, "rb") as f:
            if DICOMDIR_SOP_CLASS.encode() not in f.read(1024):
                return False
    except OSError:
        return False
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # no file meta, or damaged: not a DICOMDIR, and reading the series says the rest
        return False
    return bool(meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS)


def dicom_files(folder: str | os.PathLike[str]) -> tuple[list[Path], int]:
    """The DICOM files directly in ``folder`` (name order) and how many candidate files it holds.

    Other files are passed over (a text file, a thumbnail, a lock file). A file named
    ``.dcm`` that cannot be read, is empty or is not DICOM is refused, naming it: it is a
    slice lost, and leaving it out would shorten the volume or misreport a gap; so is a file named as slices are
    (no suffix, a number, .dcm, .ima) whose first bytes are all zeros (an interrupted copy of a slice). Another
    file that cannot be read, is empty or starts with zeros is passed over with a warning naming it.
    """
    found = []
    candidates = _candidates(Path(folder))
    for path in candidates:
        if is_dicom_file(path):
            found.append(path)
            continue
        lost = _lost_slice(path)
        if lost is None:
            continue
        problem, surely = lost
        if surely:
            raise FlareSegError(
                f"{path.parent}: {path.name!r}: {problem}; a slice lost? restore it, or remove it if it is none"
            )
        log.warning("%s: skipped %r: %s (a slice lost?)", path.parent, path.name, problem)
    return found, len(candidates)


def _lost_slice(path: Path) -> tuple[str, bool] | None:
    """Why a file that is not DICOM may be a slice lost, and whether it surely is one (named .dcm, or named as a slice
    with zero bytes where the header would be: an interrupted copy leaves a slice so); None if it is no slice."""
    dcm = path.suffix.lower() == ".dcm"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(132)
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or exc})", dcm
    if size == 0:
        return "empty file", dcm
    if dcm:
        return f"named .dcm but not DICOM ({size} bytes)", True
    if not any(head):  # refused where named as a slice is; said where another format's file may start so
        return f"zero bytes where a DICOM header would be ({size} bytes; an interrupted copy?)", _slice_name(path)
    return None


def _slice_name(path: Path) -> bool:
    """Whether a file is named as scanners name slices: no suffix (IM0000), a number (1.2.840.113), or a DICOM one
    (not .img, .raw or .part, whose zero bytes may be their own)."""
    suffix = path.suffix.lower()
    return suffix in ("", ".dcm", ".ima", ".dicom") or suffix[1:].isdigit()


def is_series_dir(path: str | os.PathLike[str]) -> bool:
    """A folder that directly holds DICOM files (judged from its first few files that are not NIfTI or of another
    known format: see :func:`_probed`)."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        listed = _candidates(path)
    except FlareSegError:
        return False
    return _holds_dicom(listed)


def _probed(listed: list[Path]) -> list[Path]:
    """The files a folder is judged by: its first few that are neither NIfTI nor of another known format (NIfTI
    files or thumbnails sorting first must not hide the DICOM files after them)."""
    return [p for p in listed if not is_nifti(p) and p.suffix.lower() not in _OTHER_FORMATS][:PROBE_FILES]


def _holds_dicom(listed: list[Path]) -> bool:
    """Whether a folder's listed files hold DICOM files, judged from :func:`_probed`'s."""
    return any(is_dicom_file(p) and not _is_dicomdir(p) for p in _probed(listed))  # a DICOMDIR under any name


def _sanitise(text: str) -> str:
    """Safe as a file name: letters, digits, dot, dash and underscore; no leading dot."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:_MAX_NAME]


def case_name_of(ds: Dataset, folder: Path) -> str:
    """``{PatientID}_{StudyDate}_s{SeriesNumber}`` (without the date where there is none), else the
    SeriesInstanceUID, else the folder's name.

    The study date keeps a patient's follow-up studies apart: scanners number their series
    from 1 in every study.
    """
    patient = _sanitise(str(ds.get("PatientID", "") or ""))
    number = ds.get("SeriesNumber")
    number_text = _sanitise(str(number)) if number not in (None, "") else ""
    if patient and number_text:
        date = str(ds.get("StudyDate", "") or "").strip()
        return f"{patient}_{date}_s{number_text}" if re.fullmatch(r"\d{8}", date) else f"{patient}_s{number_text}"
    uid = _sanitise(str(ds.get("SeriesInstanceUID", "") or ""))
    if uid:
        return uid
    return _sanitise(folder.resolve().name) or "series"


def read_header(path: Path) -> Dataset:
    """A file's data set without its pixel data; bare data sets (no preamble) are read in force mode."""
    return pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble(path))


#: A disc's index without its images, as a CD export copied in part: its slices lie in folders of their own.
ONLY_DICOMDIR = "no DICOM image files, only a DICOMDIR (a disc's index): give the folder that holds the slices"


def only_dicomdir(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a file named DICOMDIR and no DICOM image file beside it."""
    folder = Path(folder)
    try:
        indexed = any(p.name.upper() == "DICOMDIR" for p in folder.iterdir())
    except OSError:  # the caller's own listing says what is wrong
        return False
    return indexed and first_dicom_file(folder) is None


def first_dicom_file(folder: str | os.PathLike[str]) -> Path | None:
    """The first DICOM file of a folder in name order that is not a DICOMDIR (under any name), or None."""
    return next((p for p in _candidates(Path(folder)) if is_dicom_file(p) and not _is_dicomdir(p)), None)


def series_case_name(folder: str | os.PathLike[str]) -> str:
    """The case name of a series folder, from its first DICOM file (see :func:`case_name_of`)."""
    folder = Path(folder)
    path = first_dicom_file(folder)
    if path is None:
        raise FlareSegError(f"{folder}: {ONLY_DICOMDIR if only_dicomdir(folder) else 'no DICOM files'}")
    try:
        return case_name_of(read_header(path), folder)
    except Exception as exc:  # a damaged header: pydicom raises from many layers
        raise FlareSegError(f"{folder}: unreadable DICOM file {path.name} ({exc})") from None


def _segmentations_only(folder: Path) -> bool:
    """Whether the first DICOM files of a folder are all DICOM SEG objects (results, not images)."""
    probed = [p for p in _probed(_candidates(folder)) if is_dicom_file(p)]  # as is_series_dir judges the folder
    for path in probed:
        try:
            ds = pydicom.dcmread(
                path, force=not has_preamble(path), stop_before_pixels=True, specific_tags=_IDENTIFYING_TAGS
            )
        except Exception:  # a damaged file: the series reader says what is wrong
            return False
        if not is_segmentation(ds):
            return False
    return bool(probed)


def is_segmentation(ds: Dataset) -> bool:
    """Whether a data set is a DICOM SEG object (a segmentation result, ours or another tool's), not an image."""
    return str(ds.get("Modality", "")) == "SEG" or str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS


def holds_image_series(folder: str | os.PathLike[str]) -> bool:
    """Whether a folder directly holds the files of a DICOM image series (not only DICOM SEG results)."""
    return is_series_dir(folder) and not _segmentations_only(Path(folder))


def _unjudged(untagged: list[Path]) -> str:
    """The words for the files beyond the first three, whose headers are not read."""
    rest = len(untagged) - 3
    return f", and {rest} more file{'' if rest == 1 else 's'} not judged" if rest > 0 else ""


def _stored_as_image(path: Path) -> bool:
    """Whether a NIfTI file's header stores more than 8 bits a voxel (a CT, not a label map); False where it does
    not read (a damaged file is no input to report as missed)."""
    import nibabel as nib

    try:
        img: Any = nib.load(path)
        return bool(img.get_data_dtype().itemsize > 1)
    except Exception:  # nibabel and gzip raise many types for a damaged header
        return False


def find_series(
    folder: str | os.PathLike[str],
    *,
    unnamed: Callable[[Path], str] | None = None,
    exclude: Path | None = None,
    keep_clashes: bool = False,
    ignored: list[IgnoredInput] | None = None,
) -> dict[str, Path]:
    """Case name -> series folder for each immediate, non-hidden subfolder of ``folder`` that holds DICOM files.

    Sorted by case name; two series with the same case name are an error naming both folders.
    A series whose header cannot be read raises, or with ``unnamed`` is listed under
    ``unnamed(subfolder)`` (its reader then says what is wrong). With ``keep_clashes``, the
    second of two series with one case name is listed as ``{name}/{subfolder name}`` instead of
    refused (a run then fails that one alone, naming the first). A subfolder without DICOM
    files (a patient/study/series tree, whose deeper folders are not searched) and one that
    holds only DICOM SEG files (an earlier run's results) are left out, with a warning, and added to ``ignored``.
    ``exclude``: a subfolder left out silently (the run's own output folder).
    """
    folder = require_folder(folder)
    cases: dict[str, Path] = {}
    try:
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise FlareSegError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    for sub in subfolders:
        if exclude is not None and sub.resolve() == exclude.resolve():
            continue
        try:
            listed = _candidates(sub)
        except FlareSegError as exc:  # lost+found on a data disk, say: not taken for a series, but said why
            say_ignored(log, sub, str(exc).removeprefix(f"{sub}: "), ignored)
            continue
        if not _holds_dicom(listed):  # is_series_dir, on the listing at hand
            images = [p.name for p in listed if is_nifti(p) and channel_tagged(p)]
            untagged = [p for p in listed if is_nifti(p) and not channel_tagged(p)]
            # Hospital exports seldom carry the _0000 tag: a label map is mostly stored in 8 bits, a CT is not. The
            # first three files are judged by their headers, and only where no file is named as a CT already.
            scans = [] if images else [p.name for p in untagged[:3] if _stored_as_image(p)]
            if images or scans:  # named as CT images (the _0000 tag) or stored as ones: said as loudly as a tree
                what = f"CT images ({first_few(images)})" if images else (
                    f"NIfTI images stored in more than 8 bits a voxel ({', '.join(scans)}{_unjudged(untagged)}: CTs, "
                    "or wide label maps?)"
                )  # fmt: skip
                why = f"{what} in a subfolder, which is not searched; give it as the input, or move them up"
                say_ignored(log, sub, why, ignored)
            elif untagged:  # an earlier run's output: said, not counted
                why = "NIfTI files (results of an earlier run?), not a DICOM series"
                say_ignored(log, sub, why, ignored, logging.INFO)
            else:
                say_ignored(log, sub, "no DICOM files directly in it (folders inside it are not searched)", ignored)
            continue
        if _segmentations_only(sub):
            say_ignored(log, sub, "it holds DICOM SEG results, not an image series", ignored)
            continue
        try:
            name = series_case_name(sub)
        except FlareSegError:
            if unnamed is None:
                raise
            name = unnamed(sub)
        if name in cases:
            if not keep_clashes:
                raise FlareSegError(f"{folder}: case {name} appears twice ({cases[name].name}, {sub.name})")
            name = f"{name}/{sub.name}"
        cases[name] = sub
    return dict(sorted(cases.items()))
