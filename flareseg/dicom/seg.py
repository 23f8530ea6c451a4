"""DICOM SEG output (highdicom): the organs of a label map, referencing the series they were segmented from.

One segment per organ present, coded in SNOMED CT (category Anatomical Structure), made
by an AUTOMATIC algorithm identified as flareseg and its version, BINARY, one frame per
source slice that holds an organ. highdicom is imported only here, when a SEG is written
or read, so that NIfTI-only use never pays for its import.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from flareseg import __version__
from flareseg.atomic import atomic_output
from flareseg.dicom.series import DicomSeries
from flareseg.errors import FlareSegError
from flareseg.labels import LABELS, NUM_CLASSES, ORGANS
from flareseg.volume import Volume, from_canonical, to_canonical

if TYPE_CHECKING:
    import highdicom

log = logging.getLogger(__name__)

#: SNOMED CT concept of each organ label (FLARE21 labels; both kidneys share "Kidney").
ORGAN_CODES: Final[dict[int, tuple[str, str]]] = {
    1: ("10200004", "Liver"),
    2: ("64033007", "Kidney"),
    3: ("78961009", "Spleen"),
    4: ("15776009", "Pancreas"),
}
#: Display colours (RGB) a viewer uses when the segment is shown.
ORGAN_COLOURS: Final[dict[int, tuple[int, int, int]]] = {
    1: (221, 130, 101),
    2: (185, 102, 83),
    3: (157, 108, 162),
    4: (249, 180, 111),
}
SEG_SERIES_NUMBER: Final[int] = 901
SEG_SERIES_DESCRIPTION: Final[str] = "flareseg organs"


def _series_of(volume: Volume, what: str) -> DicomSeries:
    if not isinstance(volume.source, DicomSeries):
        raise FlareSegError(
            f"{volume.geometry.path}: {what} needs a DICOM series as input; this input is not one, "
            "so there is no series to reference (use NIfTI output)"
        )
    return volume.source


#: Type 2 patient and study attributes (present, possibly empty) a SEG copies from its source: de-identification
#: tools often delete them, and highdicom reads them all.
_TYPE_2_COPIED: Final[tuple[str, ...]] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def _thickness(ds: Dataset) -> float | None:
    """The slice's SliceThickness in mm, or None where it is absent, empty (it is Type 2) or not a number."""
    try:
        value = float(ds.get("SliceThickness"))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _date_or_time(value: str, kind: type) -> str | None:
    """``value`` as a DICOM DA or TM (``kind``) highdicom accepts: as it is, or with the separators of the old
    ACR-NEMA forms (2022-12-08, 12:30:00) dropped; None where neither parses (00000000, 20221308)."""
    bare = value.replace("-", "").replace(".", "") if kind.__name__ == "DA" else value.replace(":", "")
    for text in dict.fromkeys((bare, value)):  # the bare form first: pydicom reads 1950.01.02, but DICOM's is 19500102
        try:
            kind(text)
        except (TypeError, ValueError, OverflowError):
            continue
        return text
    return None


_DATES: Final[tuple[str, ...]] = ("PatientBirthDate", "StudyDate", "StudyTime")


def _stored_text(ds: Dataset, key: str) -> str:
    """A short text value as the file stores it, padding stripped. Not converted: pydicom's conversion warns of an
    invalid value (said by the SEG writer, once, with more), and silencing that would mean changing the process's
    warning filters, which a writer thread cannot do safely (``warnings.catch_warnings`` is not thread-safe: two
    overlapping ones left a service ignoring every warning)."""
    element = ds.get_item(key)
    value = element.value if element is not None else None
    if isinstance(value, bytes):  # read from a file, not yet converted; latin-1 shows any stray byte as a character
        return value.decode("latin-1").strip(" \x00")
    if isinstance(value, MultiValue):  # converted already (read before): shown as stored, backslash-separated
        return "\\".join(str(v).strip() for v in value)
    return str(value or "").strip()


def _seg_values(ds: Dataset) -> tuple[dict[str, Any], list[str]]:
    """Patient and study values copied into a SEG that highdicom refuses, as the SEG writes them instead: a date
    or time in an old form rewritten, an impossible one left empty (they are Type 2), a PatientSex other than M, F
    or O left empty (``U`` is common, and not DICOM's), and a character set whose first value, the default
    repertoire, is empty (``\\ISO 2022 IR 87``) given that repertoire's name. With what each change was, to say so."""
    from pydicom.valuerep import DA, TM

    values = {key: _stored_text(ds, key) for key in ("PatientSex", *_DATES)}
    fixed: dict[str, Any] = {}
    said: list[str] = []
    sex = values["PatientSex"]
    if sex and sex not in ("M", "F", "O"):
        fixed["PatientSex"] = ""
        said.append(f"PatientSex '{sex}' (not M, F or O) left empty")
    for key, kind in zip(_DATES, (DA, DA, TM), strict=True):
        value = values[key]
        if not value:
            continue
        usable = _date_or_time(value, kind)
        if usable != value:
            fixed[key] = usable or ""
            change = f"written {usable}" if usable else "(not a valid date or time) left empty"
            said.append(f"{key} '{value}' {change}")
    charset = ds.get("SpecificCharacterSet")
    if isinstance(charset, list | tuple | MultiValue) and len(charset) > 1 and not charset[0]:
        # PS3.3 C.12.1.1.2: an empty first value is the default repertoire, which with code extensions is named so.
        fixed["SpecificCharacterSet"] = ["ISO 2022 IR 6", *charset[1:]]
        given, written = "\\".join(charset), "\\".join(fixed["SpecificCharacterSet"])
        said.append(f"SpecificCharacterSet '{given}' written '{written}'")
    return fixed, said


def _referencable(ds: Dataset, spacing: float | None = None) -> Dataset:
    """A header a SEG can be made from: SOPClassUID/SOPInstanceUID taken from the file meta when the data set lacks
    them, and the Type 2 attributes it copies present (empty where the series has none).

    ``spacing``: the slices' spacing in mm, given as the SliceThickness of a slice without one: the SEG's pixel
    measures need a thickness, and highdicom wrote a SEG that neither it nor we could read back where it was
    empty, and failed in a traceback where it was absent.
    """
    meta = getattr(ds, "file_meta", None)
    uids = {
        key: meta.get(f"MediaStorage{key}", "")
        for key in ("SOPInstanceUID", "SOPClassUID")
        if meta is not None and not ds.get(key)
    }
    absent = [key for key in _TYPE_2_COPIED if key not in ds]
    name = str(ds.get("PatientName", ""))
    # One component ("ANONYMOUS") is a valid name that highdicom warns about on every write; with the trailing
    # caret the standard allows it is the same name, said unambiguously.
    single = bool(name) and "^" not in name and "=" not in name
    thickness = spacing if spacing is not None and _thickness(ds) is None else None
    fixed = _seg_values(ds)[0]
    if not uids and not absent and not single and thickness is None and not fixed:
        return ds
    out = copy.deepcopy(ds)  # the volume's own headers stay as read
    for key, value in fixed.items():
        setattr(out, key, value)
    for key, value in uids.items():
        setattr(out, key, value)
    for key in absent:
        setattr(out, key, "")
    if single:
        out.PatientName = f"{name}^"
    if thickness is not None:
        out.SliceThickness = thickness
    return out


def check_seg_writable(volume: Volume) -> DicomSeries:
    """Refuse, before any work is done, a volume whose series a DICOM SEG cannot reference or whose headers
    highdicom refuses (tried on a SEG of one marked voxel); say which of its values the SEG changes."""
    series = _referenced_series(volume)
    said = _seg_values(series.datasets[0])[1]
    if said:
        log.warning("%s: the DICOM SEG cannot copy the series' values as they are: %s", series.folder, "; ".join(said))
    # Tried on every slice's header (what highdicom compares across them, orientation say, is checked too), with
    # one voxel marked so that a single frame is encoded; the zeros' pages are never touched.
    sources = [_referencable(ds, volume.geometry.spacing[2]) for ds in series.datasets]
    frames = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    frames[0, 0, 0] = 1
    _segmentation(series.folder, sources, frames, present=True, model=None)
    return series


def _referenced_series(volume: Volume) -> DicomSeries:
    """The volume's series, refused where a SEG could not reference its slices (UIDs missing or shared)."""
    series = _series_of(volume, "DICOM SEG output")
    first = _referencable(series.datasets[0])
    missing = [
        key
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID")
        if not first.get(key)
    ]
    if not all(series.sop_instance_uids):
        missing.append("SOPInstanceUID")
    if missing:
        raise FlareSegError(
            f"{series.folder}: the series has no {', '.join(missing)} (anonymised?), so a DICOM SEG "
            "cannot reference it; use NIfTI output"
        )
    seen: dict[str, Path] = {}
    for path, uid in zip(series.files, series.sop_instance_uids, strict=True):
        if uid in seen:  # a broken anonymiser: one instance at two positions, which no frame could reference
            raise FlareSegError(
                f"{series.folder}: {seen[uid].name} and {path.name} share the SOPInstanceUID {uid}, so a DICOM SEG "
                "cannot tell their slices apart; use NIfTI output"
            )
        seen[uid] = path
    return series


def _description(number: int, label: int, model: Mapping[str, str] | None = None) -> highdicom.seg.SegmentDescription:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    value, meaning = ORGAN_CODES[label]
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=LABELS[label],
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept(value, "SCT", meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="flareseg",
            family=codes.cid7162.ArtificialIntelligence,
            version=__version__,
            parameters=dict(model) if model else None,
        ),
        tracking_id=LABELS[label],
        tracking_uid=hd.UID(),
        display_color=hd.color.CIELabColor.from_rgb(*ORGAN_COLOURS[label]),
    )


def _segmentation(
    folder: Path, sources: list[Dataset], frames: np.ndarray, *, present: bool, model: Mapping[str, str] | None
) -> highdicom.seg.Segmentation:
    """The SEG of ``frames`` (slice, row, column) over ``sources``, every organ described; a header highdicom
    refuses in one line naming the series (``present``: some organ was found, so empty frames are left out)."""
    import highdicom as hd

    try:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_description(label, label, model) for label in ORGANS],
            series_instance_uid=hd.UID(),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="flareseg",
            manufacturer_model_name="flareseg FLARE21 2D U-Net",
            software_versions=__version__,
            device_serial_number="0",
            content_label="ORGANS",
            content_description="Liver, kidneys, spleen and pancreas",
            series_description=SEG_SERIES_DESCRIPTION,
            omit_empty_frames=present,
        )
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks of the headers it copies
        raise FlareSegError(
            f"{folder}: highdicom cannot make a DICOM SEG from this series' headers ({exc}); use NIfTI output"
        ) from None


def write_seg(
    labels: np.ndarray,
    volume: Volume,
    path: str | os.PathLike[str],
    *,
    replace: bool = True,
    model: Mapping[str, str] | None = None,
) -> Path:
    """Write a canonical (Z, Y, X) uint8 label map of ``volume`` as a DICOM SEG file, atomically.

    Only ``volume.geometry`` and ``volume.source`` are used (the CT voxels may already be released).
    ``replace=False``: a file that appeared at ``path`` meanwhile is kept (:class:`~flareseg.atomic.OutputExistsError`).
    ``model``: what each segment's algorithm identification names as its parameters (the model file and its
    digest: :meth:`~flareseg.provenance.ModelStamp.dicom_parameters`).

    An empty label map (no organ found) still gives a valid SEG: all four organs are described,
    each with its empty frames (a SEG needs at least one segment and one frame).
    """
    series = _referenced_series(volume)  # its headers were tried, and their changes said, before inference
    path = Path(path)
    if labels.dtype != np.uint8:
        raise FlareSegError(f"label map must be uint8, got {labels.dtype}")
    if any(path.resolve() == p.resolve() for p in series.files):
        raise FlareSegError(f"{path}: refusing to overwrite an input slice")
    file_labels = from_canonical(labels, volume.geometry)  # refuses a shape that does not fit the series
    counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    if counts.size > NUM_CLASSES:
        bad = np.flatnonzero(counts[NUM_CLASSES:]) + NUM_CLASSES
        raise FlareSegError(f"label map holds labels {bad.tolist()} outside 0..{NUM_CLASSES - 1}")
    present = [label for label in ORGANS if counts[label]]
    # Segment number = FLARE21 label, for every organ: a reader that combines the segments by number gets the
    # labels back, and the numbering does not change from case to case with the organs found.
    frames = file_labels.transpose(2, 1, 0)  # (slice, row, column)
    spacing = volume.geometry.spacing[2]  # between the series' slices, as the NIfTI output has it
    sources = [_referencable(ds, spacing) for ds in series.datasets]
    if len(sources) == 1 and "SpacingBetweenSlices" not in sources[0]:
        # One slice has no gap to measure (highdicom would write 1.0): the spacing the NIfTI output has.
        sources[0] = copy.deepcopy(sources[0])
        sources[0].SpacingBetweenSlices = spacing
    seg = _segmentation(series.folder, sources, np.ascontiguousarray(frames), present=bool(present), model=model)
    with atomic_output(path, keep_suffix=".dcm", replace=replace) as tmp:
        seg.save_as(tmp)
    log.debug("wrote %s (%d segments, %d frames)", path, len(ORGANS), int(seg.NumberOfFrames))
    return path


def read_seg(path: str | os.PathLike[str], volume: Volume) -> np.ndarray:
    """Rebuild the canonical (Z, Y, X) uint8 label map of ``volume`` from a DICOM SEG that references its series."""
    import highdicom as hd

    series = _series_of(volume, "reading a DICOM SEG")
    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # pydicom/highdicom raise many types for a file that is not a SEG
        raise FlareSegError(f"{path}: not a readable DICOM SEG ({exc})") from None
    label_of_code = {value: label for label, (value, _) in ORGAN_CODES.items()}
    lut = np.zeros(max(seg.segment_numbers, default=0) + 1, dtype=np.uint8)
    for number in seg.segment_numbers:
        code = seg.get_segment_description(number).segmented_property_type.value
        if code not in label_of_code:
            raise FlareSegError(f"{path}: segment {number} has SNOMED CT code {code}, not one of flareseg's organs")
        lut[number] = label_of_code[code]
    try:
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(series.sop_instance_uids),
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        raise FlareSegError(f"{path}: does not fit the series in {series.folder} ({exc})") from None
    return to_canonical(lut[frames].transpose(2, 1, 0), volume.geometry)
