"""flare-bench's inputs: its arguments, checked before anything is written; the phantom volume it times; the
folders a failed run leaves behind.

A run that is refused spends seconds, not the minutes of an export, and a run that
fails removes the folders it made, so no half-made report folder is taken for a result.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from flareseg.atomic import check_writable_folder, missing_folders, remove_empty_folders
from flareseg.errors import FlareSegError

log = logging.getLogger(__name__)

#: What a run writes inside its report folder, besides the report files themselves.
RUN_FOLDERS = ("models", "pred")
#: The name of a phantom volume it writes (:func:`phantom_volume`).
_PHANTOM = re.compile(r"phantom_[0-9]+_0000\.nii\.gz")
#: The files a run writes at the top of its report folder: names anyone may use, so an earlier one is removed
#: only when it is recognisably flare-bench's (:func:`written_by_flare_bench`).
REPORT_FILES = ("report.json", "report.md", "latency.png", "stages.png", "check.json", "check.md")
#: Where a run in :func:`removed_on_failure` sets aside an earlier run's files, inside the report folder (a rename:
#: no copy, no space): put back if the run fails, removed once its report is written.
SET_ASIDE = ".flare-bench-earlier"


@dataclass
class _Aside:
    """What the run in progress set aside: (where each file was, where it is); and, once it has cleared its report
    folder, that folder and the files it keeps (its --model and --input), to remove what it wrote if it fails."""

    moved: list[tuple[Path, Path]] = field(default_factory=list)
    out: Path | None = None
    kept: set[Path] = field(default_factory=set)


#: The run in progress's :class:`_Aside`, or None outside removed_on_failure.
_set_aside: ContextVar[_Aside | None] = ContextVar("flare_bench_set_aside", default=None)
#: The first line of each markdown report (flareseg.bench.report.markdown, flareseg.bench.check).
_HEADINGS = {"report.md": "# flare-bench report", "check.md": "# flare-bench --check"}
#: The PNG text chunk's value that marks flare-bench's figures (keyword ``Software``).
FIGURE_SOFTWARE = "flare-bench"


def _png_software(path: Path) -> str | None:
    """The value of a PNG's ``Software`` text chunk (matplotlib writes it), or None. Reads chunk headers only."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            size, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"IDAT":  # matplotlib writes its text chunks before the image data
                return None
            if kind == b"tEXt" and size < 65536:
                keyword, _, value = f.read(size).partition(b"\0")
                if keyword == b"Software":
                    return value.decode("latin-1")
                f.seek(4, 1)
            else:
                f.seek(size + 4, 1)


def written_by_flare_bench(path: Path) -> bool:
    """Whether ``path``, one of :data:`REPORT_FILES`, is recognisably an earlier flare-bench run's: a report whose
    heading or keys are flare-bench's, or a figure marked as its own or linked from such a report beside it."""
    import json

    try:
        # utf-8-sig: a report a user opened and saved again may have gained a byte-order mark.
        if path.suffix == ".md":  # its heading, the whole line: a user's "# flare-bench notes" is not one
            with open(path, encoding="utf-8-sig", errors="replace") as f:
                return f.readline(64).rstrip("\n") == _HEADINGS[path.name]
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            report = path.name == "report.json"
            keys = {"machine", "settings", "backends"} if report else {"machine", "rows"}
            if not isinstance(data, dict) or not keys <= data.keys():
                return False
            # Every run writes its command; a report.json of the device kit's own sections does not, and is known
            # by the report.md written with it.
            return str(data.get("command", "")).startswith("flare-bench ") or (
                report and written_by_flare_bench(path.with_name("report.md"))
            )
        if (_png_software(path) or "").startswith(FIGURE_SOFTWARE):
            return True
        # A figure of a run from before the mark: its report beside it links it.
        markdown = path.with_name("report.md")
        return (
            markdown.is_file()
            and written_by_flare_bench(markdown)
            and f"]({path.name})" in markdown.read_text(encoding="utf-8-sig", errors="replace")
        )
    except (OSError, ValueError):
        return False


def clear_earlier_run(out: Path, *, model: Path | None, input: Path | None) -> None:
    """Remove what an earlier flare-bench run left in the report folder that this run may not write again: its
    label maps and timings in ``pred/`` (other backends), and its random-weight checkpoint (this run writes its
    own, or has a ``model``). Only names flare-bench itself writes; anything else there stays, and so do this run's own
    ``model`` and ``input`` (an earlier run's random-weight checkpoint benchmarked again, say). A report or
    figure under one of :data:`REPORT_FILES` that flare-bench did not write is refused (FlareSegError).

    Within :func:`removed_on_failure` the files are set aside (:data:`SET_ASIDE`) rather than removed, so that a
    run that fails (a full disk, a Ctrl-C) leaves the earlier report as it was.
    """
    state = _set_aside.get()
    aside = out / SET_ASIDE
    if state is not None and aside.exists():
        if any(p.is_file() or p.is_symlink() for p in aside.rglob("*")):
            raise FlareSegError(
                f"{aside}: an earlier report set aside, by a flare-bench run writing here now or one killed before "
                "it ended; once none runs, move its files back into the folder, or remove it"
            )
        _remove_empty(aside)  # folders only: what a run stopped before its first move left
    earlier = _run_files(out)
    # Its reports first go: they describe the files removed here, also if this run is stopped before it writes.
    # Under these common names a file flare-bench did not write is refused, before anything is removed.
    in_the_way = [out / name for name in REPORT_FILES if (out / name).exists() and not (out / name).is_file()]
    if in_the_way:  # said now, not after the whole run, when its report could not be written there
        where = f"{in_the_way[0]}: not a file, where this run writes its report"
        raise FlareSegError(f"{where}; move it or choose another -o")
    reports = [out / name for name in REPORT_FILES if (out / name).is_file()]
    foreign = [p for p in reports if not written_by_flare_bench(p)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise FlareSegError(
            f"{foreign[0]}{more}: not an earlier flare-bench report, and this run would replace it; move it or "
            "choose another -o"
        )
    earlier += reports
    given = [p for p in (model, input) if p is not None]
    kept = {q.resolve() for p in given for q in (p, p.with_name(p.name + ".json"))}  # a given model's sidecar too
    if state is not None:
        state.out, state.kept = out, kept
    for path in earlier:
        if path.is_file() and path.resolve() not in kept:
            if state is not None:
                there = aside / path.relative_to(out)
                there.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(path, there)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    # pred/ or models/ a link to another file system: no rename there, so removed as before
                else:
                    state.moved.append((path, there))
                    log.debug("set aside %s, of an earlier run", path)
                    continue
            path.unlink()
            log.debug("removed %s, of an earlier run", path)


def _run_files(out: Path) -> list[Path]:
    """The files of ``out`` under names a run writes besides its report: label maps and timings in ``pred/``, its
    exported set, its phantom volumes (one per --slices) and its random-weight checkpoint."""
    from flareseg.bench.backends import ALL_BACKENDS, MODELS_NAME

    stems = {*ALL_BACKENDS, *(f"reference-{name}" for name in ALL_BACKENDS), "fresh-process"}
    files = [out / "pred" / f"{stem}{suffix}" for stem in stems for suffix in (".nii.gz", ".timings.json")]
    if (out / "models").is_dir():
        files += sorted((out / "models").glob(f"{MODELS_NAME}_*"))
        files += sorted(p for p in (out / "models").glob("phantom_*_0000.nii.gz") if _PHANTOM.fullmatch(p.name))
    files.append(out / "models" / "random-weights.pt")  # a run writes its own, or has a --model
    return files


def _put_back(moved: list[tuple[Path, Path]]) -> None:
    """An earlier run's files, set aside, back where they were (in place of what the failed run wrote there)."""
    for path, there in reversed(moved):
        try:
            os.replace(there, path)
        except OSError as exc:  # left where it is, and said: never lost
            log.warning("could not put %s back from %s: %s", path, there, exc)


def check_report_folder(out: Path) -> None:
    """Refuse a report folder that is a file, or that could not be made or written."""
    if out.exists() and not out.is_dir():
        raise FlareSegError(f"{out}: exists and is not a folder (-o names the report folder)")
    check_writable_folder(out)


def phantom_volume(work: Path, size: tuple[int, int], slices: int, spacing: tuple[float, float, float]) -> Path:
    """A phantom CT of ``slices`` slices of ``size`` (height, width) voxels, written to ``work``.

    ``spacing`` is (x, y, z) in mm. The phantom takes its shape as (x, y, z) too: width first.
    """
    import nibabel as nib

    from flareseg.atomic import atomic_output
    from flareseg.phantom import make_phantom

    h, w = size
    img, _ = make_phantom((w, h, slices), spacing, seed=0).to_nifti()
    path = work / f"phantom_{slices}_0000.nii.gz"
    with atomic_output(path, keep_suffix=".nii.gz") as tmp:
        nib.save(img, tmp)
    return path


def check_model(model: Path | None) -> tuple[str | None, tuple[int, int] | None]:
    """Refuse a ``--model`` that cannot be used; the precision of an ONNX model given alone (its metadata's), and
    the slice size the model runs at.

    (None, None) for no model (random weights); a checkpoint has no precision of its own: every
    model is then exported here.
    """
    if model is None:
        return None, None
    if model.is_dir():
        raise FlareSegError(f"{model}: is a folder; --model takes a checkpoint (.pt) or an ONNX model (.onnx)")
    if model.suffix == ".onnx":
        from flareseg.export.metadata import read_onnx_metadata

        meta = read_onnx_metadata(model)
        return meta.precision, meta.model.slice_size
    if model.suffix in (".pt", ".pth"):
        from flareseg.export.inputs import load_checked_model

        return None, load_checked_model(model)[1].slice_size
    if not model.exists():
        raise FlareSegError(f"{model}: model not found")
    raise FlareSegError(f"{model}: flare-bench takes a checkpoint (.pt) or an ONNX model (.onnx)")


def check_input_volume(path: Path | None) -> None:
    """Read ``--input`` (a NIfTI file or a DICOM series folder) once, so that a bad volume is refused before any
    export."""
    if path is None:
        return
    if not path.exists():
        raise FlareSegError(f"{path}: input volume not found")
    from flareseg.runtime.reading import read_case
    from flareseg.volume import refuse_label_map

    refuse_label_map(read_case(path), path, "--input")  # what its intensities look like is said as it is run


@contextmanager
def removed_on_failure(out: Path) -> Iterator[None]:
    """Remove, if the block raises, what the block made: the report folder, or the run folders inside it; and
    put back the earlier run's files that :func:`clear_earlier_run` set aside in it (removed if it succeeds).

    Folders that were there before stay, with what they held. Missing parents of the report folder, made for it,
    go too while they are empty (another run may have put its report beside this one).
    """
    out = out.resolve()  # "missing/../mine" names an existing folder that, as typed, does not exist
    parents: list[Path] = []
    if not out.exists():
        made = [out]
        parents = missing_folders(out.parent)
    elif out.is_dir():
        made = [out / name for name in RUN_FOLDERS if not (out / name).exists()]
    else:
        made = []  # a file in the way: the run is refused before it writes anything
    state = _Aside()
    token = _set_aside.set(state)
    try:
        yield
    except BaseException:
        if state.out is not None:  # what the failed run wrote under its names goes, before the earlier files return
            for path in [*_run_files(state.out), *(state.out / name for name in REPORT_FILES)]:
                if path.is_file() and path.resolve() not in state.kept:
                    path.unlink(missing_ok=True)
        _put_back(state.moved)
        if state.out is not None and not _remove_empty(state.out / SET_ASIDE):
            log.warning("the earlier report's files that could not be put back are in %s", state.out / SET_ASIDE)
        for path in made:
            try:
                shutil.rmtree(path)
            except (FileNotFoundError, NotADirectoryError):  # never made, or -o runs through a file
                pass
            except OSError as exc:  # a folder that cannot go is left, and said
                log.warning("could not remove %s after the failure: %s", path, exc)
        remove_empty_folders(parents)
        raise
    else:
        aside = state.out / SET_ASIDE if state.out is not None else None
        if aside is not None and aside.exists():  # the new report is written: the earlier one's files go
            try:
                shutil.rmtree(aside)
            except OSError as exc:
                log.warning("could not remove %s, the earlier report's files: %s", aside, exc)
    finally:
        _set_aside.reset(token)


def _remove_empty(folder: Path) -> bool:
    """Remove ``folder`` and the folders in it, deepest first, as long as they hold no file; whether it is gone."""
    if not folder.exists():
        return True
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        try:
            sub.rmdir()
        except OSError:  # holds a file: kept
            pass
    try:
        folder.rmdir()
    except OSError:
        return False
    return True
