"""Which cases a ``flare-infer`` run has and where each result goes, without torch.

This module imports neither torch nor the runners, so that ``flare-infer`` can plan a
folder and start reading the first case it will segment before those imports (see
:mod:`flareseg.runtime.reading`). :func:`plan_folder` is the one place that decides
which cases of a folder run, which are skipped and which are refused.
"""

from __future__ import annotations

import json
import os
import re
import stat
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from flareseg.atomic import check_writable, check_writable_folder
from flareseg.errors import FlareSegError, first_few
from flareseg.volume import NIFTI_SUFFIXES, IgnoredInput, case_id, find_cases, grid_nbytes

OutputType = Literal["nifti", "dicom-seg"]
OUTPUT_SUFFIXES: dict[str, str] = {"nifti": ".nii.gz", "dicom-seg": ".dcm"}


@dataclass(frozen=True)
class CaseJob:
    """One input and where its result goes; ``replace``: whether a file that appears there meanwhile (another
    run's) is replaced, or kept and the case skipped."""

    case: str
    input: Path
    output: Path
    output_type: OutputType = "nifti"
    replace: bool = True


def is_series_input(path: str | os.PathLike[str]) -> bool:
    """A folder that directly holds the files of one DICOM series.

    One that holds NIfTI images beside its DICOM files is refused: taken for a series, its
    NIfTI cases would be left out without a word; taken for a folder of cases, the series.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    from flareseg.dicom import holds_image_series, is_series_dir

    if not is_series_dir(path):
        return False
    nifti = sorted(p.name for p in find_cases(path, series_folders=True).values())
    # Series subfolders beside DICOM files: a stray slice copied to the top of a folder of series would make
    # the whole run one case of one slice, every series left out unsaid.
    series = [] if nifti else sorted(p.name for p in _subfolders(path) if holds_image_series(p))
    if nifti or series:
        beside = f"NIfTI images ({first_few(nifti)})" if nifti else f"series folders ({first_few(series)})"
        raise FlareSegError(
            f"{path}: holds DICOM files and {beside} side by side, so it is neither one series nor a folder of "
            "cases: give a NIfTI file itself as the input, or move the DICOM files into a subfolder of their own "
            "(a series per subfolder)"
        )
    return True


def _subfolders(path: Path) -> list[Path]:
    """Immediate, non-hidden subfolders (none where the folder cannot be listed: reading it says why)."""
    try:
        return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: through links, or another mount of the same folder (device and inode)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def input_case_name(path: str | os.PathLike[str]) -> str:
    """The case name of an input: FLARE21 naming for NIfTI files, PatientID/SeriesNumber for a series."""
    path = Path(path)
    if path.is_dir():
        from flareseg.dicom import series_case_name

        return series_case_name(path)
    return case_id(path)


def _named(path: Path) -> str:
    """The case name an output is named after; refused when empty (``_0000.nii.gz`` would give ``.nii.gz``)."""
    name = input_case_name(path)
    if not name:
        raise FlareSegError(f"{path}: no case name before the suffix (FLARE21 names look like case_001_0000.nii.gz)")
    return name


def output_name(input_path: str | os.PathLike[str], output_type: OutputType = "nifti") -> str:
    """FLARE21 naming: ``test_001_0000.nii.gz`` -> ``test_001.nii.gz`` (``.dcm`` for DICOM SEG)."""
    return f"{_named(Path(input_path))}{output_suffix(output_type)}"


def output_suffix(output_type: str) -> str:
    if output_type not in OUTPUT_SUFFIXES:
        raise FlareSegError(f"output type must be one of {', '.join(OUTPUT_SUFFIXES)}, got {output_type!r}")
    return OUTPUT_SUFFIXES[output_type]


def check_output(job: CaseJob, *, folder_checked: bool = False) -> None:
    """Refuse, before any work, outputs that could never be written.

    ``folder_checked``: the output's folder was checked for all cases already (:func:`plan_folder`).
    """
    suffix = output_suffix(job.output_type)
    if job.output_type == "nifti" and not job.output.name.endswith(NIFTI_SUFFIXES):
        seg = job.output.name.endswith(OUTPUT_SUFFIXES["dicom-seg"])
        dicom = " (for DICOM SEG output add --output-type dicom-seg)" if seg else ""
        raise FlareSegError(f"{job.output}: output must end in .nii.gz or .nii{dicom}")
    if job.output_type == "dicom-seg" and not job.output.name.endswith(suffix):
        raise FlareSegError(f"{job.output}: DICOM SEG output must end in {suffix}")
    if same_file(job.output, job.input):
        raise FlareSegError(f"{job.output}: refusing to overwrite the input")
    if job.output.is_dir():
        raise FlareSegError(f"{job.output}: a folder is in the way of the output")
    if job.input.is_dir() and job.output.parent.resolve() == job.input.resolve():
        raise FlareSegError(
            f"{job.output}: the output would join the input series in {job.input}, which could then no longer "
            "be read as one series; write it to another folder"
        )
    if not folder_checked:  # else made once for all the folder's cases (a probe file each would be waste)
        _check_not_in_a_series(job.output.parent, job.output_type)
        check_writable(job.output)
    if job.output_type == "dicom-seg" and not job.input.is_dir():
        raise FlareSegError(
            f"{job.input}: DICOM SEG output needs a DICOM series as input (a NIfTI file has no series to "
            "reference); use --output-type nifti"
        )


def file_job(input_path: Path, output: Path, output_type: OutputType = "nifti") -> CaseJob:
    """The job of one case whose output is named, checked before any work (a named output needs no case name)."""
    job = CaseJob(input_case_name(input_path) or input_path.name, input_path, output, output_type)
    check_output(job)
    return job


def check_output_folder(out: Path, inputs: Path | None = None, *, probe: bool = True) -> None:
    """Refuse, before any work, an output folder for a folder of cases (``inputs``) that could not hold its results.

    ``probe``: also create and remove a file there (off where :func:`plan_folder` comes next, which does).
    """
    if out.exists() and not out.is_dir():
        raise FlareSegError(f"{out}: the input is a folder of cases, so the output must be a folder")
    if not out.exists() and out.name.lower().endswith((*NIFTI_SUFFIXES, *OUTPUT_SUFFIXES.values())):
        raise FlareSegError(
            f"{out}: the input is a folder of cases, so the output must be a folder, not a name of a file; "
            "give a folder name"
        )
    if inputs is not None:
        _refuse_inside_a_series(out, inputs)
    if inputs is not None and out.exists() and same_file(out, inputs):
        raise FlareSegError(
            f"{out}: the output folder is the input folder, where its label maps would be taken for cases; "
            "choose another folder"
        )
    if probe:
        check_writable_folder(out)


def _holds_image_series(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    from flareseg.dicom import holds_image_series

    return holds_image_series(folder)


def _check_not_in_a_series(folder: Path, output_type: str) -> None:
    """A result written among a series' images would spoil that series: a SEG would join it, and a NIfTI file (or
    the timings beside it) beside DICOM files makes the folder neither one series nor a folder of cases."""
    if _holds_image_series(folder):
        what = "DICOM SEG output" if output_type == "dicom-seg" else "a NIfTI label map"
        raise FlareSegError(
            f"{folder}: {what} here would join the DICOM series in it, which could then no longer be "
            "read as one series; write it to another folder"
        )


def _refuse_inside_a_series(out: Path, inputs: Path) -> None:
    """An output folder that is one of the input's series, or inside one, would leave that series out of the
    run (the output folder is not an input) and, with DICOM SEG results, spoil it as a series."""
    try:
        inside = out.resolve().relative_to(inputs.resolve())
    except ValueError:
        return
    if inside.parts and _holds_image_series(series := inputs / inside.parts[0]):
        raise FlareSegError(
            f"{out}: the output folder is inside the input series {series}, which the run would then leave out; "
            "choose a folder outside it"
        )


def check_timings(path: Path, inputs: Sequence[Path]) -> None:
    """Refuse, before any work, a timings file that would replace an input or a label map, or could not be written."""
    if not path.name.endswith(".json"):
        raise FlareSegError(f"{path}: the timings file must end in .json")
    if any(path.resolve() == p.resolve() for p in inputs):
        raise FlareSegError(f"{path}: refusing to overwrite an input with the timings")
    if path.is_dir():
        raise FlareSegError(f"{path}: a folder is in the way of the timings file")
    if path.is_file() and not _is_timings_file(path):
        raise FlareSegError(
            f"{path}: exists and is not a flare-infer timings file (a model's sidecar?); refusing to replace it"
        )
    check_writable(path)


def _is_timings_file(path: Path) -> bool:
    """Whether an existing file may be replaced by timings: an earlier run's (context and cases), or empty."""
    try:
        size = path.stat().st_size
        if size == 0:  # made for the purpose (`mktemp --suffix .json`)
            return True
        if size > 64 * 2**20:  # far beyond any run's timings
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    return isinstance(data, dict) and isinstance(data.get("context"), dict) and isinstance(data.get("cases"), list)


def list_inputs(
    folder: str | os.PathLike[str], *, exclude: Path | None = None, ignored: list[IgnoredInput] | None = None
) -> dict[str, Path]:
    """Case name -> input of a folder: its NIfTI files and its DICOM series subfolders, sorted by name.

    ``exclude``: a subfolder that is not an input (the run's own output folder, whose DICOM
    SEG files would otherwise be taken for a series on the next run).
    ``ignored``: gets the entries that look like inputs but are left out, each with a warning
    (an upper-case ``.NII.GZ``, a broken link, a patient/study/series tree).
    """
    folder = Path(folder)
    cases = dict(find_cases(folder, keep_clashes=True, ignored=ignored, series_folders=True))
    if not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
        return cases  # no subfolders, so no series: pydicom need not be imported
    from flareseg.dicom import find_series

    # A series whose header cannot be read is listed under its folder's name (with a "/", which
    # no case name has), a second input of a name (NIfTI file or series) as "name/file": the
    # plan then fails that case alone, and the others go on.
    unnamed = lambda sub: f"{sub.name}/"  # noqa: E731
    listed = find_series(folder, unnamed=unnamed, exclude=exclude, keep_clashes=True, ignored=ignored)
    for name, series in listed.items():
        if name in cases:
            raise FlareSegError(f"{folder}: case {name} appears twice ({cases[name].name}, {series.name}/)")
        cases[name] = series
    return dict(sorted(cases.items()))


def list_cases(
    folder: str | os.PathLike[str],
    *,
    num_parts: int = 1,
    part_id: int = 0,
    exclude: Path | None = None,
    ignored: list[IgnoredInput] | None = None,
) -> list[Path]:
    """A folder's inputs (NIfTI files, DICOM series folders), sorted, then this part's share.

    Part ``part_id`` of ``num_parts`` takes the case names that :func:`part_of` gives it: a
    case's part depends on its name alone, never on what else the folder held when the part
    listed it, so a case that arrives (or leaves) while the parts start is in exactly one
    part, not in none or two. A second series of a name goes with the first, so that the
    part that runs the first fails the second (two parts would otherwise each write that name).
    ``exclude``, ``ignored``: see :func:`list_inputs` (every part says, and counts, the folder's ignored entries).
    """
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise FlareSegError(f"part {part_id} of {num_parts} is not valid: need 0 <= part-id < num-parts")
    groups: dict[str, list[Path]] = {}
    for key, path in list_inputs(folder, exclude=exclude, ignored=ignored).items():
        groups.setdefault(key.split("/", 1)[0], []).append(path)
    cases = [path for name, group in groups.items() if part_of(name, num_parts) == part_id for path in group]
    if not groups:
        from flareseg.dicom.files import ONLY_DICOMDIR, only_dicomdir

        if only_dicomdir(folder):
            raise FlareSegError(f"{folder}: {ONLY_DICOMDIR}")
        raise FlareSegError(f"{folder}: no .nii or .nii.gz files and no DICOM series folders")
    return cases


def part_of(case: str, num_parts: int) -> int:
    """The part (of ``num_parts``) that runs ``case``: a stable hash of its name (CRC-32 of its UTF-8 bytes, the
    same on every machine and Python), so parts share a folder by its names, equal on average."""
    return zlib.crc32(case.encode("utf-8", "surrogateescape")) % num_parts


@dataclass(frozen=True)
class PlannedCase:
    """One input of a folder and what the run does with it: ``run`` its job, ``skipped``, or ``failed``."""

    input: Path
    case: str
    output: Path | None
    status: Literal["run", "skipped", "failed"]
    error: FlareSegError | None = None
    output_type: OutputType = "nifti"
    replace: bool = True  # see CaseJob

    @property
    def job(self) -> CaseJob:
        if self.status != "run" or self.output is None:
            raise FlareSegError(f"{self.input}: case {self.case} is {self.status}, not run")
        return CaseJob(self.case, self.input, self.output, self.output_type, self.replace)


def unfinished_result(output: Path, output_type: str) -> str | None:
    """Why a file at a case's output is no result (empty, a header that does not read, fewer bytes than its header
    says), else None.

    Our outputs are renamed into place whole, so such a file came from elsewhere (a copy cut
    short, a placeholder). Most results are judged from their header and their last bytes:
    a single gzip member (what flareseg, nibabel and ITK write) records its inflated size
    in its trailer. Where that size is not the header's (several members, padding after
    the stream, or a file cut short), the stream is inflated to its end to tell which.
    """
    try:
        size = output.stat().st_size
        if size == 0:
            return "is empty"
        if output_type == "dicom-seg":
            return _unfinished_seg(output)
        import nibabel as nib

        img = nib.load(output)
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            return f"is not a NIfTI image (nibabel read it as {type(img).__name__})"
        voxels = grid_nbytes(img.shape, img.get_data_dtype().itemsize)
        # The proxy's offset: a header loaded from a .nii.gz may say 0.
        needed = int(getattr(img.dataobj, "offset", img.header.get_data_offset())) + voxels
        if output.name.endswith(".gz"):
            with open(output, "rb") as f:
                f.seek(-4, os.SEEK_END)
                stream = int.from_bytes(f.read(4), "little")  # the inflated size, modulo 2**32
            if stream != needed % 2**32:
                inflated = _inflated_size(output)
                if inflated < needed:
                    return f"inflates to {inflated:,} bytes where its header needs {needed:,} (cut short?)"
        elif size < needed:
            return f"holds {size:,} bytes where its header needs {needed:,} (cut short?)"
    except EOFError:
        return "is cut short (its gzip stream ends early)"
    except Exception as exc:  # nibabel and gzip raise many types for a damaged file
        return f"is not a readable result ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def result_of_another_scan(output: Path, input_path: Path, output_type: str) -> str | None:
    """Why a finished result at ``output`` cannot be of ``input_path`` as it is now, else None: a scan sent
    again or reconstructed again under its name, or a series that was still arriving when the result was made.

    From headers and a listing only, so a resumed folder stays quick: a NIfTI input's shape and affine
    against the result's; a DICOM series as :func:`_another_series` judges it. What cannot be read here is left
    for the run to say (None).
    """
    try:
        if input_path.is_dir():
            return _another_series(output, input_path, output_type)
        import nibabel as nib

        scan: Any = nib.load(input_path)
        result: Any = nib.load(output)
    except Exception:  # a damaged input or series: the run reads it and says what is wrong
        return None
    shape, grid = tuple(scan.shape[:3]), tuple(result.shape[:3])
    if grid != shape:
        size = lambda s: " x ".join(map(str, s))  # noqa: E731
        return f"is a {size(grid)} grid, where its input {input_path} now is {size(shape)}"
    from flareseg.volume import GRID_TOLERANCE_MM, canonical_transform, grid_offset_mm, places_voxels

    if not places_voxels(scan.affine):  # the input's: the run reads it and says so
        return None
    if not places_voxels(result.affine):
        return "has an affine that places its voxels nowhere (not finite, or singular)"
    # A result is written in its input's own voxel order: a result of the same grid in another order is not one,
    # and a tool comparing arrays (FLARE21's scorer) would read its labels misplaced.
    if not np.array_equal(canonical_transform(scan.affine), canonical_transform(result.affine)):
        return f"lies elsewhere than its input {input_path} (its voxel axes are ordered or flipped otherwise)"
    apart = grid_offset_mm(shape, scan.affine, grid, result.affine)
    if apart is None or not apart <= GRID_TOLERANCE_MM:
        return f"lies elsewhere than its input {input_path} (voxel centres up to {apart:.3g} mm apart)"
    return None


class MadeBy(NamedTuple):
    """The model a result names: its SHA-256 (or the first 16 hex digits a NIfTI header holds) and file name;
    both None for a result flareseg made without naming one (an earlier version, or a callable runner)."""

    sha256: str | None
    name: str | None


def result_model(output: Path, output_type: str) -> MadeBy | None:
    """The model a result names as the one that made it, from the header alone; None where the result is not
    flareseg's (another tool's, a copy of the ground truth) or cannot be read."""
    from flareseg.provenance import PLAIN_DESCRIPTION

    try:
        if output_type == "dicom-seg":
            import pydicom

            seg = pydicom.dcmread(output, stop_before_pixels=True, force=True)
            algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            if str(algorithm.get("AlgorithmName", "")) != "flareseg":
                return None
            params = dict(p.partition("=")[::2] for p in str(algorithm.get("AlgorithmParameters", "")).split(","))
            digest = params.get("model_sha256", "")
            if re.fullmatch("[0-9a-f]{64}", digest):
                return MadeBy(digest, params.get("model", ""))
            return MadeBy(None, None)
        import nibabel as nib

        img: Any = nib.load(output)
        text = bytes(img.header["descrip"].item()).decode("ascii", "replace")
    except Exception:  # a result that reads at all was judged whole already; this is only its label
        return None
    if text == PLAIN_DESCRIPTION:
        return MadeBy(None, None)
    # ModelStamp.nifti_description: "flareseg VERSION sha256:DIGEST16 NAME"
    words = text.split(" ", 3)
    if len(words) == 4 and words[0] == "flareseg" and re.fullmatch("sha256:[0-9a-f]{16}", words[2]):
        return MadeBy(words[2].removeprefix("sha256:"), words[3])
    return None


def why_not_kept(output: Path, input_path: Path, output_type: str) -> str | None:
    """Why a file at a case's output cannot be kept as the case's result, else None: no whole result
    (:func:`unfinished_result`), or one of another version of its input (:func:`result_of_another_scan`)."""
    return unfinished_result(output, output_type) or result_of_another_scan(output, input_path, output_type)


def _another_series(output: Path, series: Path, output_type: str) -> str | None:
    """Why a result is not of the series in ``series`` as it is now, from the result's header (read once) and one
    slice's: its slice count against the series' DICOM files (a NIfTI result's third axis, the instances a SEG
    references); then a SEG's referenced SeriesInstanceUID, or a NIfTI result's grid against the slice."""
    from flareseg.dicom import count_dicom_files
    from flareseg.dicom.files import first_dicom_file, read_header

    slices = count_dicom_files(series)
    if output_type == "dicom-seg":
        import pydicom

        referenced = pydicom.dcmread(output, stop_before_pixels=True, force=True).ReferencedSeriesSequence[0]
        held = len(referenced.ReferencedInstanceSequence)
        if held != slices:
            return f"references {held} slices, where the series {series} now holds {slices}"
        then = str(referenced.get("SeriesInstanceUID", "") or "")
        first = first_dicom_file(series)
        uid = str(read_header(first).get("SeriesInstanceUID", "") or "") if first is not None else ""
        if then and uid and then != uid:
            return f"references the series {then}, where {series} now holds the series {uid}"
        return None
    import nibabel as nib

    from flareseg.dicom.series import result_off_series

    image: Any = nib.load(output)
    if image.shape[2] != slices:
        return f"holds {image.shape[2]} slices, where the series {series} now holds {slices}"
    return result_off_series(series, image.shape[:3], image.affine)


def _unfinished_seg(output: Path) -> str | None:
    """Why a file at a DICOM SEG output is no result (not DICOM, not a SEG, fewer pixel bytes than its frames
    need), else None. A SEG is read whole: its frames are packed bits, a few MB."""
    import pydicom

    from flareseg.dicom.files import is_dicom_file

    if not is_dicom_file(output):
        return "is not a DICOM file"
    ds = pydicom.dcmread(output, force=True)
    if ds.get("Modality") != "SEG":
        return f"is not a DICOM SEG (Modality {ds.get('Modality')})"
    frames, rows, columns = int(ds.get("NumberOfFrames", 1)), int(ds.Rows), int(ds.Columns)
    needed = -(-frames * rows * columns * int(ds.BitsAllocated) // 8)
    held = len(ds.get("PixelData", b""))
    return None if held >= needed else f"holds {held:,} pixel bytes where its {frames} frames need {needed:,}"


def _inflated_size(path: Path) -> int:
    """The bytes a gzip file inflates to, every member counted (and zero padding after them skipped)."""
    import gzip

    total = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            total += len(chunk)
    return total


def _file_key(path: Path) -> tuple[int, int] | None:
    """A regular file's (device, inode), through links; None for anything else or nothing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def plan_folder(
    inputs: Sequence[Path], out_dir: Path, output_type: OutputType = "nifti", *, overwrite: bool = False
) -> Iterator[PlannedCase]:
    """Each input in order, lazily: run it into ``out_dir`` (FLARE21 name), skip it, or refuse it.

    A case is skipped when its output exists (unless ``overwrite``) and is a whole result of the input as
    it is now (:func:`unfinished_result`, :func:`result_of_another_scan`; else the case fails); one that
    appears while the case runs (another run's) is kept too, the case then skipped (``CaseJob.replace``).
    It fails at once when
    its name cannot be read (a damaged series header), an earlier input has the same case
    name, or its output could never be written (:func:`check_output`); the others go on. An
    output folder that could not hold any result is refused as a whole (:func:`check_output_folder`).
    """
    suffix = output_suffix(output_type)
    check_output_folder(out_dir)  # probed once here, for every output of the folder
    _check_not_in_a_series(out_dir, output_type)
    first_of: dict[str, Path] = {}  # case name -> its first input: a second one would replace its result
    # An output that is a link to another case's input (or that file through another mount) would have the writer
    # replace that input: every input file is known by device and inode.
    input_files = {key: p for p in inputs if (key := _file_key(p)) is not None}
    for path in inputs:
        try:
            name = _named(path)
        except FlareSegError as exc:
            yield PlannedCase(path, path.name, None, "failed", exc, output_type)
            continue
        output = out_dir / f"{name}{suffix}"
        if name in first_of:
            clash = FlareSegError(
                f"{path}: case {name} again (first from {first_of[name]}); its output would replace that one's"
            )
            yield PlannedCase(path, name, output, "failed", clash, output_type)
            continue
        first_of[name] = path
        key = _file_key(output)
        other = input_files.get(key) if key is not None else None
        if other is not None:  # neither a result (with or without --overwrite) nor to be written through
            why = FlareSegError(f"{output}: refusing to overwrite the input {other} (the output leads to it)")
            yield PlannedCase(path, name, output, "failed", why, output_type)
            continue
        if output.is_file() and not overwrite:  # a folder in the way is refused below, not taken as done
            # Not taken for a result: the case would be counted done without one, or with another scan's.
            damage = why_not_kept(output, path, output_type)
            if damage is not None:
                why = FlareSegError(f"{output}: exists but {damage}; remove it to redo the case")
                yield PlannedCase(path, name, output, "failed", why, output_type)
            else:
                yield PlannedCase(path, name, output, "skipped", None, output_type)
            continue
        try:
            check_output(CaseJob(name, path, output, output_type), folder_checked=True)
        except FlareSegError as exc:
            yield PlannedCase(path, name, output, "failed", exc, output_type)
            continue
        yield PlannedCase(path, name, output, "run", None, output_type, replace=overwrite)


__all__ = [
    "OUTPUT_SUFFIXES",
    "CaseJob",
    "MadeBy",
    "OutputType",
    "PlannedCase",
    "check_output",
    "check_output_folder",
    "check_timings",
    "file_job",
    "input_case_name",
    "is_series_input",
    "list_cases",
    "list_inputs",
    "output_name",
    "output_suffix",
    "part_of",
    "plan_folder",
    "result_model",
    "result_of_another_scan",
    "unfinished_result",
    "why_not_kept",
]
