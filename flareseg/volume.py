"""NIfTI volumes in, uint8 label maps out (nibabel for headers, ISA-L for gzip).

Every volume is brought to one layout for the network: the closest canonical (RAS+)
orientation, as a ``(Z, Y, X)`` array so that axial slice ``k`` is ``array[k]``. NIfTI
stores voxels in Fortran order, so the file's ``(X, Y, Z)`` array transposed is already
C-ordered ``(Z, Y, X)``: reading returns a view of the decompressed buffer (flips become
negative strides), and writing hands nibabel the same kind of view, which it writes one
plane at a time. No whole-volume transposing copy is made either way.

A :class:`VolumeGeometry` remembers the file's own grid, affine, header and orientation,
so that label maps are written back voxel-exactly on the input's grid.

``.nii.gz`` files are inflated and deflated by ISA-L (the ``isal`` package, a dependency)
when it imports, by the standard library's zlib otherwise; either way the outputs are
ordinary gzip files. nibabel parses headers and writes the NIfTI stream itself. With
``threads`` other than 1, ``read_ct`` inflates with rapidgzip, which decompresses one
ordinary gzip stream on many cores (an optional package; see :func:`check_read_threads`).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from flareseg.atomic import atomic_output
from flareseg.errors import FlareSegError, interrupts_kept
from flareseg.labels import NUM_CLASSES
from flareseg.provenance import DESCRIP_BYTES, PLAIN_DESCRIPTION


def _import_isal() -> tuple[Any, Any]:
    """ISA-L's gzip file and zlib-like modules, or (None, None): the standard library then does the same, slower."""
    try:
        with interrupts_kept():  # a stop during the import is a stop, not a fallback to the slower zlib
            from isal import igzip, isal_zlib
    except ImportError:  # a declared dependency; a test hides it to check the fallback
        return None, None
    return igzip, isal_zlib


_igzip, _isal_zlib = _import_isal()

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CANONICAL = axcodes2ornt(("R", "A", "S"))
_T = TypeVar("_T")
_NIFTI1_HEADER_BYTES = 348
#: ISA-L level for written label maps, chosen by measurement on a 512 x 512 x 300 phantom
#: label map (benchmarks/host_stages.md): levels 1 and 2 take the time of level 0 for a
#: file 2.5x smaller; level 3 is much slower and larger. nibabel's default, zlib level 1,
#: is over 10x slower than ISA-L level 1 for a file 1.6x larger.
GZIP_LEVEL = 1
#: Compressed bytes read from a file per step, and the most uncompressed bytes taken per step.
#: Each step gives the GIL back and must take it again, which costs up to the interpreter's
#: switch interval while another thread runs Python (imports, the device loop): fewer,
#: larger steps keep a read in a thread near its speed alone.
_READ_CHUNK = 4 << 20
_INFLATE_PIECE = 8 << 20
#: Deflate's best ratio is about 1032:1: a file claiming more voxel bytes than this many times its size
#: cannot hold them (a damaged header), and is refused before its grid is allocated.
_DEFLATE_MAX_RATIO = 1032
#: Least inflated bytes handed to an ``on_voxels`` callback at once (the last piece may be smaller).
_VOXEL_PIECE = 4 << 20

#: Called with each stretch of stored voxels as soon as it is inflated: a 1-D view, in storage order.
VoxelsCallback = Callable[[np.ndarray], None]


@dataclass(frozen=True)
class VolumeGeometry:
    """What is needed to write a result back on a file's own grid."""

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header
    #: Orientation transform from the file's voxel axes to RAS+ (nibabel "ornt" array).
    to_canonical: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the file's own axes."""
        zooms = self.header.get_zooms()[:3]
        return (float(zooms[0]), float(zooms[1]), float(zooms[2]))

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (Z, Y, X) of the canonical slice layout."""
        return canonical_order(self.spacing, self.to_canonical)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        codes = nib.aff2axcodes(self.affine)
        return (str(codes[0]), str(codes[1]), str(codes[2]))


@dataclass(frozen=True)
class Volume:
    """A CT volume in the canonical slice layout: ``array[k]`` is axial slice ``k`` (Y, X).

    ``array`` holds the file's stored values in their own dtype (usually int16, 2 bytes a
    voxel); Hounsfield units are ``array * slope + inter``, applied per slice batch by
    :meth:`hu_slices` so that no float copy of the whole volume is needed.
    """

    array: np.ndarray
    geometry: VolumeGeometry
    slope: float = 1.0
    inter: float = 0.0
    #: Where the volume came from beyond its grid, for writers that must reference it
    #: (a DICOM series' instances, for DICOM SEG output); None for NIfTI input.
    source: Any = None

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[0])

    @property
    def slice_shape(self) -> tuple[int, int]:
        return (int(self.array.shape[1]), int(self.array.shape[2]))

    def to_hu(self, values: np.ndarray) -> np.ndarray:
        """Stored values -> float32 Hounsfield units."""
        out = np.asarray(values, dtype=np.float32)
        if self.slope != 1.0 or self.inter != 0.0:
            out = out * np.float32(self.slope) + np.float32(self.inter)
        return out

    def hu_slices(self, start: int, stop: int) -> np.ndarray:
        """Slices ``start:stop`` in Hounsfield units, float32 (B, Y, X)."""
        return self.to_hu(self.array[start:stop])

    def hu(self) -> np.ndarray:
        """The whole volume in Hounsfield units, float32 (Z, Y, X)."""
        return self.to_hu(self.array)


def case_id(path: str | os.PathLike[str]) -> str:
    """FLARE21 case name: the file name without the NIfTI suffix and the ``_0000`` channel tag."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if name.endswith("_0000") else name


def is_nifti(path: str | os.PathLike[str]) -> bool:
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def require_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path, refused in one line where it is not a folder: missing, a file, or a broken link."""
    folder = Path(folder)
    if not folder.is_dir():
        if folder.is_symlink() and not folder.exists():
            raise FlareSegError(f"{folder}: a broken symbolic link (to {os.readlink(folder)})")
        raise FlareSegError(f"{folder}: {'not a directory' if folder.exists() else 'folder not found'}")
    return folder


class IgnoredInput(NamedTuple):
    """An entry of a folder that a listing left out although it looks like an input, and why."""

    path: Path
    why: str


def say_ignored(
    logger: logging.Logger, path: Path, why: str, into: list[IgnoredInput] | None, level: int = logging.WARNING
) -> None:
    """Say that a listing leaves ``path`` out, and why; a warning is also added to ``into`` (a run counts them)."""
    logger.log(level, "%s: ignored: %s", path, why)
    if into is not None and level >= logging.WARNING:
        into.append(IgnoredInput(path, why))


def find_cases(
    folder: str | os.PathLike[str],
    *,
    keep_clashes: bool = False,
    ignored: list[IgnoredInput] | None = None,
    series_folders: bool = False,
) -> dict[str, Path]:
    """Case name -> NIfTI file of ``folder``, sorted by file name (not recursive; hidden files skipped).

    Two files with the same FLARE21 case name (``a_0000.nii.gz`` and ``a.nii``) are an error;
    with ``keep_clashes``, the second is listed as ``{name}/{file name}`` instead, the one
    with the ``_0000`` channel tag being the first (the other is likely a result beside it).
    A file named as NIfTI in upper case, a link to nothing, a folder named as NIfTI and anything else not a regular
    file (a named pipe) are left out with a warning, and added to ``ignored``; ``series_folders``: the caller lists
    folders itself (as DICOM series), so they are not said here.
    """
    folder = require_folder(folder)
    cases: dict[str, Path] = {}
    try:
        listed = sorted(folder.iterdir())
    except OSError as exc:  # no permission to list it, or a disk that fails
        raise FlareSegError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    for path in listed:
        if path.name.startswith("."):
            continue
        if not is_nifti(path):
            if path.name.lower().endswith(NIFTI_SUFFIXES):  # said, not skipped silently: a case would go missing
                say_ignored(log, path, "a NIfTI file must end in .nii or .nii.gz, in lower case", ignored)
            continue
        if not path.is_file():
            if not path.exists():
                say_ignored(log, path, "a link to nothing", ignored)
            elif path.is_dir():
                if not series_folders:
                    say_ignored(log, path, "a folder, not a NIfTI file", ignored)
            else:  # a named pipe, a socket, a device: reading one could block the run, or never end
                say_ignored(log, path, "not a regular file (a named pipe, a socket or a device)", ignored)
            continue
        name = case_id(path)
        if name in cases:
            if not keep_clashes:
                raise FlareSegError(f"{folder}: case {name} appears twice ({cases[name].name}, {path.name})")
            first, second = cases[name], path
            if channel_tagged(second) and not channel_tagged(first):
                first, second = second, first
            cases[name], cases[f"{name}/{second.name}"] = first, second
            continue
        cases[name] = path
    return cases


def channel_tagged(path: Path) -> bool:
    """Whether a NIfTI file is named as a CT image, with FLARE21's ``_0000`` channel tag (a result has none)."""
    return any(path.name.endswith(f"_0000{suffix}") for suffix in NIFTI_SUFFIXES)


#: Most threads a read may ask for (rapidgzip allocates per thread).
MAX_READ_THREADS = 1024


def check_read_threads(threads: int) -> None:
    """Refuse a thread count that cannot be honoured: out of range, or above 1 without rapidgzip installed."""
    if not 0 <= threads <= MAX_READ_THREADS:
        raise FlareSegError(f"read threads must be 0 (all cores) to {MAX_READ_THREADS}, got {threads}")
    if threads != 1:
        try:
            with interrupts_kept():
                import rapidgzip  # noqa: F401
        except ImportError:
            raise FlareSegError(
                f"reading with {threads or 'all'} threads needs rapidgzip: pip install rapidgzip "
                "(or 'flareseg[gpu]'), or read with one thread"
            ) from None


class _NibabelNotes(logging.Filter):
    """Takes the header fixes nibabel logs while a thread reads a file, to say them again naming the file.

    nibabel reports what it repairs in a header (a zero voxel size, a bad qfac) through its
    own logger, without the file's name. One instance stays on that logger; each thread that
    reads collects into a list of its own (the folder pipeline reads cases in worker
    threads), so the logger's filter list never changes while another thread logs.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    @contextmanager
    def collecting(self) -> Iterator[list[str]]:
        """This thread's notes, while the block runs (blocks nest: the inner one takes them)."""
        outer: list[str] | None = getattr(self._local, "messages", None)
        messages: list[str] = []
        self._local.messages = messages
        try:
            yield messages
        finally:
            self._local.messages = outer

    def filter(self, record: logging.LogRecord) -> bool:
        messages: list[str] | None = getattr(self._local, "messages", None)
        if messages is None or record.levelno >= logging.ERROR:
            return True  # not reading here, or a fault nibabel raises on: our error line names the file
        messages.append(record.getMessage())
        return False


_NIBABEL_NOTES = _NibabelNotes()


@contextmanager
def nibabel_notes(path: Path, *, say: bool = True) -> Iterator[list[str]]:
    """nibabel's notes on ``path``'s header as our warnings, each naming the file once.

    ``say=False`` drops them, for a header glance whose file is read in full later.
    """
    # Added on the first read, once (the same instance), and inert outside this block.
    logging.getLogger("nibabel.global").addFilter(_NIBABEL_NOTES)
    with _NIBABEL_NOTES.collecting() as messages:
        yield messages  # the block may take a note it says better itself
    for message in dict.fromkeys(messages) if say else ():
        log.warning("%s: %s", path, message)


def _load(
    path: Path, threads: int = 1, on_voxels: VoxelsCallback | None = None, *, intensities: bool = True
) -> tuple[nib.Nifti1Image, np.ndarray, float, float]:
    """Load a file: image, raw stored voxels, scl_slope and scl_inter; one-line errors.

    ``intensities``: the voxels become float32 intensities, so their scaling is checked against float32
    (:func:`check_intensity_scaling`); a label map's are scaled in float64 and judged by their classes.
    """
    with nibabel_notes(path) as notes:
        loaded = _load_named(path, threads, on_voxels, intensities)
        # nibabel made a zero voxel size 1 mm: it is read as the affine's instead, as a NaN one is.
        if any(_ZERO_PIXDIM_FIX in note for note in notes):  # alone, or with a negative one's fix in one note
            _put_back_zero_pixdims(path, loaded[0])
            notes[:] = [n for n in notes if n != _ZERO_PIXDIM]  # alone: said by the geometry's own warning
        return loaded


#: nibabel's fix of a header whose voxel size is 0 along some axis, and its note where that is all it fixed.
_ZERO_PIXDIM_FIX = "setting 0 dims to 1"
_ZERO_PIXDIM = f"pixdim[1,2,3] should be non-zero; {_ZERO_PIXDIM_FIX}"


def _gzipped(path: Path) -> bool:
    """Whether ``path`` names a gzip file; by its suffix in any case (CT.NII.GZ), as nibabel opens it."""
    return path.name.lower().endswith(".gz")


def _put_back_zero_pixdims(path: Path, img: nib.Nifti1Image) -> None:
    """The zero voxel sizes nibabel set to 1 as it read the header, read again from the header's own bytes."""
    try:
        with (gzip.open if _gzipped(path) else open)(path, "rb") as f:
            raw = type(img.header).from_fileobj(f, check=False)
    except (OSError, EOFError, zlib.error, ValueError):  # read once already: left as nibabel made it
        return
    zero = np.asarray(raw["pixdim"][1:4]) == 0
    img.header["pixdim"][1:4][zero] = 0


def _load_named(
    path: Path, threads: int, on_voxels: VoxelsCallback | None, intensities: bool
) -> tuple[nib.Nifti1Image, np.ndarray, float, float]:
    if not path.exists():
        raise FlareSegError(f"{path}: file not found")
    if not path.is_file():
        raise FlareSegError(f"{path}: not a file")
    try:
        # Read, not memory-mapped: a .nii cut short by another process mid-run would end the run with SIGBUS.
        # numpy's floating-point warnings off: nibabel builds an inf pixdim's affine, which is refused by name below.
        with np.errstate(all="ignore"):
            img = nib.load(path, mmap=False)
    except nib.filebasedimages.ImageFileError:
        raise FlareSegError(f"{path}: {_why_not_nifti(path)}") from None
    except OSError as exc:
        if exc.errno is not None:  # the operating system's refusal (permission, I/O error): not the content's fault
            raise FlareSegError(f"{path}: cannot read ({exc.strerror or exc})") from None
        raise FlareSegError(f"{path}: unreadable or truncated file ({exc})") from None
    except (EOFError, zlib.error, ValueError) as exc:
        if str(exc).startswith("w2 should be positive"):  # the qform, the file's only orientation, is damaged
            raise FlareSegError(f"{path}: invalid NIfTI header (quatern_b, c, d are not a rotation's)") from None
        if isinstance(exc, ValueError) and (fault := _header_fault(path)):
            raise FlareSegError(f"{path}: invalid NIfTI header ({fault})") from None
        raise FlareSegError(f"{path}: unreadable or truncated file ({exc})") from None
    except (nib.spatialimages.HeaderDataError, OverflowError) as exc:  # a damaged field: datatype, dim, vox_offset
        raise FlareSegError(f"{path}: invalid NIfTI header ({_header_fault(path) or exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise FlareSegError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        pass  # a trailing singleton 4th axis is a 3D volume
    elif len(shape) != 3:
        fault = _header_fault(path)  # nibabel may have read dim[0] out of range as another byte order's, or as 0 axes
        raise FlareSegError(
            f"{path}: invalid NIfTI header ({fault})"
            if fault
            else f"{path}: expected a 3D volume, got shape {tuple(shape)}"
        )
    if min(shape[:3]) < 1:
        raise FlareSegError(f"{path}: empty volume of shape {tuple(shape)}")
    stored = np.dtype(img.get_data_dtype())
    if stored.kind not in "iuf":  # complex or RGB: refused before a voxel is read (numpy would drop the imaginary part)
        raise FlareSegError(f"{path}: unsupported voxel type {stored}: a CT or label map stores integers or reals")
    proxy = img.dataobj
    offset, first = getattr(proxy, "offset", None), getattr(img.header, "single_vox_offset", None)
    if isinstance(offset, int) and isinstance(first, int) and (fault := _offset_fault(offset, first)):
        raise FlareSegError(f"{path}: invalid NIfTI header ({fault})")
    try:
        data = _stored_voxels(path, proxy, threads, on_voxels)
    except MemoryError:  # a header whose grid cannot be allocated, whichever reader tried
        grid = tuple(int(n) for n in shape)
        size = int(np.prod(grid, dtype=np.float64)) * np.dtype(img.get_data_dtype()).itemsize
        raise FlareSegError(
            f"{path}: the header's grid {grid} needs {size / 2**30:.1f} GiB, more memory than this machine "
            "could allocate"
        ) from None
    if data.ndim == 4:
        data = data[..., 0]
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    if not (np.isfinite(slope) and np.isfinite(inter)) or slope == 0:
        raise FlareSegError(f"{path}: invalid intensity scaling scl_slope={slope}, scl_inter={inter}")
    if intensities:
        check_intensity_scaling(path, data, slope, inter)
    return img, data, slope, inter


def check_intensity_scaling(
    name: str | os.PathLike[str],
    data: np.ndarray,
    slope: float,
    inter: float,
    fields: tuple[str, str] = ("scl_slope", "scl_inter"),
) -> None:
    """Refuse a linear scaling whose float32 intensities (``data * slope + inter``, as :meth:`Volume.to_hu`
    computes them) would be infinite, or so coarse that distinct stored values merge: an offset such as
    3e38 turns every voxel into one intensity, and the network would segment noise without a word.

    Integers one apart must stay apart: float32's step at the largest intensity at most half of ``slope``
    (the product and the sum are each rounded). Real-valued data with an offset must keep 4,096 levels (12 bits,
    a CT's depth) across its range. ``fields`` names the header's two fields in the message. Where the stored
    type's own bounds rule both problems out, no voxel is read.
    """
    limit = float(np.finfo(np.float32).max)
    size = abs(slope)
    scaling = f"{fields[0]}={slope:g} and {fields[1]}={inter:g}"
    if size < float(np.finfo(np.float32).tiny):  # 1e-50 is 0 in float32 (DICOM's decimal strings can say it)
        raise FlareSegError(f"{name}: {scaling}: the slope is below float32's smallest normal number")
    if data.dtype.kind == "f" and data.dtype.itemsize <= 4 and size <= 1 and inter == 0:
        return  # float32 values scaled down stay float32 values, as finely resolved
    if data.dtype.kind in "iu":
        bounds = np.iinfo(data.dtype)
        top = max(abs(float(bounds.min)), float(bounds.max)) * size + abs(inter)
        if top <= limit and float(np.spacing(np.float32(top))) <= size / 2:
            return
    if data.size == 0:
        return
    lo, hi = float(data.min()), float(data.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return  # a non-finite voxel is refused by the reader with its own message
    top = max(abs(lo), abs(hi)) * size + abs(inter)
    if top > limit:
        raise FlareSegError(
            f"{name}: {scaling} take stored values up to {max(abs(lo), abs(hi)):g} beyond the float32 range "
            "(non-finite intensities)"
        )
    resolution = float(np.spacing(np.float32(top)))
    if data.dtype.kind in "iu":
        step, merged = size, resolution > size / 2
    else:  # without an offset, scaling keeps each real value's relative precision
        step = (hi - lo) * size / 4096
        merged = inter != 0 and step > 0 and resolution > step
    if merged:
        raise FlareSegError(
            f"{name}: {scaling} put intensities near {top:g}, where float32 steps by {resolution:g}: stored "
            f"values {step:g} apart would merge into one intensity"
        )


def _stored_voxels(path: Path, proxy: Any, threads: int, on_voxels: VoxelsCallback | None = None) -> np.ndarray:
    """The raw stored values (scaling is applied later, per slice batch, to keep memory low); one-line errors."""
    layout = _Layout.of(proxy)
    if layout is not None:
        _check_file_size(path, layout)
    try:
        data = _inflate_voxels(path, layout, threads, on_voxels) if layout is not None else None
    except _DamagedStream as damage:
        # Said here, not after nibabel reads the file again: nibabel first allocates and zeroes
        # the header's whole grid, gigabytes for a few damaged bytes that claim a large one.
        log.debug("%s: %s", path, damage.__cause__ or damage)
        raise FlareSegError(f"{path}: truncated or corrupt voxel data ({damage})") from None
    if data is not None:
        return data
    # An uncompressed file, or a proxy of another kind: nibabel reads it.
    try:
        data = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
    except (EOFError, zlib.error, OSError, ValueError, OverflowError) as exc:
        why = " ".join(line.strip() for line in str(exc).splitlines())
        raise FlareSegError(f"{path}: truncated or corrupt voxel data ({why})") from None
    return data


@dataclass(frozen=True)
class _Layout:
    """Where a plain array proxy's voxels lie in its file, and how."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    order: Literal["C", "F"]

    @classmethod
    def of(cls, proxy: Any) -> _Layout | None:
        """The layout of nibabel's array proxy; None for a proxy of another kind (nibabel reads and checks it)."""
        try:
            shape = tuple(int(n) for n in proxy.shape)
            dtype, offset, order = np.dtype(proxy.dtype), int(proxy.offset), str(proxy.order)
        except (AttributeError, TypeError, ValueError):
            return None
        if order not in ("C", "F"):
            return None
        return cls(shape, dtype, offset, "C" if order == "C" else "F")

    @property
    def nbytes(self) -> int:
        return grid_nbytes(self.shape, self.dtype.itemsize)


def grid_nbytes(shape: Sequence[int], itemsize: int) -> int:
    """The bytes a header's grid holds, in Python's integers: a damaged NIfTI-2 header's 64-bit dims can multiply
    past int64, which np.prod wraps to 0 or below without a word (size checks then passed)."""
    return math.prod(int(n) for n in shape) * itemsize


def _check_file_size(path: Path, layout: _Layout) -> None:
    """Refuse a file too small for its header's grid, before anything of that size is allocated.

    An uncompressed file must hold the grid; a gzip one cannot pack it beyond deflate's best ratio.
    """
    size, needed = path.stat().st_size, layout.offset + layout.nbytes
    if _gzipped(path):
        if needed > _DEFLATE_MAX_RATIO * size + (1 << 20):
            start = f" from byte {layout.offset:,} (vox_offset)" if layout.offset > 1 << 20 else ""
            why = (
                f"the header's grid needs {layout.nbytes:,} bytes{start}, more than a {size:,}-byte gzip file can hold"
            )
            raise FlareSegError(f"{path}: truncated or corrupt voxel data ({why})")
    elif size < needed:
        why = f"the file holds {size:,} bytes; its header needs {needed:,}"
        raise FlareSegError(f"{path}: truncated or corrupt voxel data ({why})")


class _DamagedStream(Exception):
    """The gzip stream of a file is truncated or corrupt (raised by :func:`_inflate_voxels`)."""


class _CutAfterVoxels(EOFError):
    """Every voxel inflated, but the stream ends before its member's checksum and length."""


class _CallbackFailed(Exception):
    """An ``on_voxels`` callback raised ``error``: the caller's fault, not a damaged stream."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _inflate_voxels(
    path: Path, layout: _Layout, threads: int = 1, on_voxels: VoxelsCallback | None = None
) -> np.ndarray | None:
    """The stored voxels of a ``.nii.gz``, inflated by ISA-L (zlib without it); None for other files.

    The compressed file is streamed 4 MiB at a time into one buffer of the voxels' size,
    and the array returned is a Fortran-ordered view of that buffer: no copy of the
    compressed file, none of the voxels. The gzip member that holds the last voxel is
    inflated to its end, so its CRC-32 and length are checked (nibabel's reader stops at
    the last voxel and never checks them). Raises :class:`_DamagedStream`.

    ``on_voxels`` sees the voxels a few MiB at a time as the one-core inflater stores them
    (rapidgzip's parallel reads hand over nothing). After a :class:`_DamagedStream` it
    has seen only part of them.
    """
    if not _gzipped(path):
        return None
    shape, dtype, offset, order = layout.shape, layout.dtype, layout.offset, layout.order
    buffer = np.empty(layout.nbytes, dtype=np.uint8)
    if threads != 1 and _inflate_parallel(path, offset, buffer.data, threads):
        return buffer.view(dtype).reshape(shape, order=order)
    inflater = _isal_zlib if _isal_zlib is not None else zlib
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, ValueError, zlib.error, inflater.error)
    filled = _voxel_feeder(buffer, dtype, on_voxels) if on_voxels is not None else None
    try:
        _inflate_into(path, offset, buffer.data, inflater, filled)
    except _CallbackFailed as failed:
        raise failed.error from None
    except _CutAfterVoxels as exc:
        raise _DamagedStream("the gzip stream is cut off after the last voxel, before its checksum") from exc
    except EOFError as exc:
        raise _DamagedStream("the gzip stream ends before the last voxel") from exc
    except OSError as exc:  # the file itself could not be read (a disk or network fault): not a damaged stream
        raise FlareSegError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    except errors as exc:  # one wording for zlib's and ISA-L's messages, which differ
        raise _DamagedStream("the gzip stream fails its integrity check") from exc
    return buffer.view(dtype).reshape(shape, order=order)


def _voxel_feeder(buffer: np.ndarray, dtype: np.dtype, on_voxels: VoxelsCallback) -> Callable[[int], None]:
    """A progress callback for :func:`_inflate_into` that hands ``on_voxels`` each new stretch of whole voxels."""
    sent = 0

    def filled(nbytes: int) -> None:
        nonlocal sent
        ready = nbytes - nbytes % dtype.itemsize
        if ready - sent >= _VOXEL_PIECE or (ready == buffer.size and ready > sent):
            try:
                on_voxels(buffer[sent:ready].view(dtype))
            except Exception as exc:  # told apart from the inflater's own errors, which mean a damaged file
                raise _CallbackFailed(exc) from exc
            sent = ready

    return filled


def _inflate_into(
    path: Path, offset: int, out: memoryview, inflater: Any, filled: Callable[[int], None] | None = None
) -> None:
    """Inflate the gzip file ``path`` (one or more members) and store bytes offset..offset+len(out) in ``out``.

    ``inflater`` is ``zlib`` or ISA-L's ``isal_zlib`` (same interface); ``wbits=31``
    makes it parse the gzip header and check the trailer. Output is taken a bounded piece
    at a time, so memory stays at ``out`` plus a few MiB whatever the compression ratio.
    ``filled(n)`` is called whenever the first ``n`` bytes of ``out`` have been stored.
    """
    end = offset + len(out)
    pos = 0  # uncompressed bytes produced so far
    stream = inflater.decompressobj(wbits=31)
    member_start = True
    with open(path, "rb") as f:
        data = b""
        while True:
            if stream.eof:
                if pos >= end:
                    return  # the member holding the last voxel ended, its checksum verified
                data, member_start = stream.unused_data, True
                stream = inflater.decompressobj(wbits=31)
            if member_start:
                data = data.lstrip(b"\0")  # zero padding between members, as the gzip module allows
                while not data:
                    chunk = f.read(_READ_CHUNK)
                    if not chunk:
                        raise EOFError(f"the data ends after {pos} bytes, {end} expected")
                    data = chunk.lstrip(b"\0")
                member_start = False
            if not data:
                data = f.read(_READ_CHUNK)
                if not data:
                    piece = stream.flush()
                    if not piece:
                        cut = _CutAfterVoxels if pos >= end else EOFError
                        raise cut("Compressed file ended before the end-of-stream marker was reached")
            if data:
                piece = stream.decompress(data, _INFLATE_PIECE)
                data = stream.unconsumed_tail
            lo, hi = max(pos, offset), min(pos + len(piece), end)
            if lo < hi:
                out[lo - offset : hi - offset] = memoryview(piece)[lo - pos : hi - pos]
                if filled is not None:
                    filled(hi - offset)
            pos += len(piece)


def _inflate_parallel(path: Path, offset: int, out: memoryview, threads: int) -> bool:
    """Inflate bytes offset..offset+len(out) of ``path`` into ``out`` with rapidgzip on ``threads`` cores (0: all).

    True only when every byte came and the stream ended right after them, its last
    member's CRC-32 and length checked. Otherwise False, and the serial inflater reads the
    file again and gives the verdict, so that any file, damaged or unusual, gets the same
    result and error whatever the thread count:

    - a stream that goes on after the voxels (rapidgzip would not reach the end of that
      member, so its checksum would go unchecked);
    - a first member whose header carries its own CRC (FHCRC), which rapidgzip ignores;
    - anything rapidgzip cannot parse, such as zero padding between members, which the
      gzip module accepts, or a short stream;
    - a stream whose last four bytes, the last member's length (mod 2**32), cannot end
      the voxels' stream: neither its whole length nor a share of it. Most cut-off files
      show it, and go to the serial reader before rapidgzip prints its own diagnostics.
    """
    import rapidgzip  # read_ct checked that it is installed

    with open(path, "rb") as raw:
        head = raw.read(4)
        raw.seek(0, os.SEEK_END)
        raw.seek(max(raw.tell() - 4, 0))
        tail = raw.read(4)
    if len(head) < 4 or head[3] & 0x02:  # FLG.FHCRC
        return False
    end, last_member = offset + len(out), int.from_bytes(tail, "little")
    if len(tail) < 4 or not (last_member == end % 2**32 or end >= 2**32 or 0 < last_member < end):
        return False
    try:
        with rapidgzip.open(str(path), parallelization=threads) as f:
            f.seek(offset)
            filled = 0
            while filled < len(out):
                n = f.readinto(out[filled:])
                if not n:
                    log.debug("%s: rapidgzip: the data ends after %d bytes", path, offset + filled)
                    return False
                filled += n
            if f.read(1):  # more after the voxels: let the serial reader check that member's end
                return False
    except (RuntimeError, ValueError, OSError, EOFError, MemoryError, OverflowError) as exc:
        log.debug("%s: rapidgzip: %s", path, exc)
        return False
    return True


def _is_nifti_header(head: bytes) -> bool:
    return head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] in (b"n+2\0", b"ni2\0")


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(_NIFTI1_HEADER_BYTES)
    except OSError:
        return b""


def _why_not_nifti(path: Path) -> str:
    """Tell a cut-off gzip stream or a too-short file from a file of another kind."""
    opener = gzip.open if _gzipped(path) else open
    try:
        with opener(path, "rb") as f:
            head = f.read(_NIFTI1_HEADER_BYTES)
    except EOFError:
        return "truncated gzip stream (the file was cut off inside its header)"
    except gzip.BadGzipFile:
        if _is_nifti_header(_head(path)):
            return "an uncompressed NIfTI file named .gz: rename it to end in .nii"
        return "not a NIfTI image (not a gzip file, as its .gz name says)"
    except OSError as exc:
        if exc.errno is not None:  # the operating system's refusal (permission, I/O error): not the content's fault
            return f"cannot read ({exc.strerror or exc})"
        return f"not a NIfTI image (unreadable: {exc})"
    except zlib.error as exc:
        return f"not a NIfTI image (unreadable: {exc})"
    if head[:2] == b"\x1f\x8b" and opener is open:  # gzip's magic number
        return "a gzip file named without .gz: rename it to end in .nii.gz"
    if len(head) < _NIFTI1_HEADER_BYTES:
        return f"truncated: {len(head)} bytes, shorter than a NIfTI header"
    if _is_nifti_header(head):
        # The header is there, so what nibabel tripped on is further on: most often the gzip
        # member holding the header, whose checksum only fails once it is read to its end.
        try:
            with opener(path, "rb") as f:
                while f.read(_READ_CHUNK):
                    pass
        except EOFError:  # the stream stops before its end marker: cut short, not garbled
            return "truncated gzip stream (the file ends before the stream does: cut short?)"
        except (OSError, zlib.error) as exc:
            return f"corrupt gzip stream ({exc})"
        return "a NIfTI header that nibabel cannot read"
    return "not a NIfTI image (no NIfTI header found)"


def canonical_transform(affine: np.ndarray) -> np.ndarray:
    """The orientation transform (nibabel "ornt") from a file's voxel axes to the canonical RAS+."""
    return ornt_transform(io_orientation(affine), _CANONICAL)


def canonical_order(values: Sequence[_T], to_canonical: np.ndarray) -> tuple[_T, _T, _T]:
    """Three values given along a file's voxel axes, in the canonical (Z, Y, X) order."""
    xyz = list(values[:3])
    for axis, (target, _flip) in enumerate(to_canonical):
        xyz[int(target)] = values[axis]
    return (xyz[2], xyz[1], xyz[0])


#: Voxel centres of two grids this close (mm) are the same grid: float32 headers round well below it.
GRID_TOLERANCE_MM = 1e-3


def canonical_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """The (Z, Y, X) shape and the voxel-to-world affine of a file's voxels brought to canonical order."""
    ornt = canonical_transform(affine)
    zyx = canonical_order([int(n) for n in shape[:3]], ornt)
    return zyx, np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, shape[:3])


def grid_offset_mm(
    shape: Sequence[int], affine: np.ndarray, other_shape: Sequence[int], other_affine: np.ndarray
) -> float | None:
    """How far (mm, a distance) the other grid's voxel centres lie from this one's at most, both brought to
    canonical voxel order, so that the same grid stored in another orientation (flipped or permuted axes) is 0
    away; None where their shapes differ in any order. The farthest centre is a corner: the affines differ
    linearly, and a distance is convex."""
    zyx, grid = canonical_grid(shape, affine)
    other_zyx, other = canonical_grid(other_shape, other_affine)
    if zyx != other_zyx:
        return None
    corners = np.array([[i, j, k, 1.0] for i in (0, zyx[2] - 1) for j in (0, zyx[1] - 1) for k in (0, zyx[0] - 1)])
    return float(np.linalg.norm((corners @ (other - grid).T)[:, :3], axis=1).max())


def places_voxels(affine: np.ndarray) -> bool:
    """Whether an affine maps voxels to places at all: finite, and not singular."""
    matrix = np.asarray(affine, dtype=np.float64)
    return bool(np.all(np.isfinite(matrix)) and abs(np.linalg.det(matrix[:3, :3])) >= 1e-12)


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if not places_voxels(affine):
        raise FlareSegError(f"{path}: the affine is singular or not finite")


def _header_fault(path: Path) -> str | None:
    """What is wrong with a header's dim[0] or vox_offset, if anything, read from its raw bytes.

    nibabel takes a dim[0] outside 1..7 for a header of the other byte order, then names a field that only reads
    wrong in that order; a NaN vox_offset fails in its integer conversion, a message that names no field.
    """
    try:
        with (gzip.open if _gzipped(path) else open)(path, "rb") as f:
            raw = f.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    if len(raw) < 48:  # dim[0] needs 48 bytes; vox_offset 176, and the file's magic (NIfTI-1) all 348
        return None
    for order in "<>":
        size = int(np.frombuffer(raw, f"{order}i4", 1)[0])
        if size not in (348, 540):
            continue
        # NIfTI-1: dim is int16 from byte 40, vox_offset float32 at 108, magic at 344; NIfTI-2: int64 from 16,
        # int64 at 168, magic at 4.
        one = size == 348
        dim0 = int(np.frombuffer(raw, f"{order}i2" if one else f"{order}i8", 1, 40 if one else 16)[0])
        if not 1 <= dim0 <= 7:
            return f"dim[0] is {dim0}; it must be 1 to 7"
        magic = raw[344:348] if one else raw[4:8]
        if magic != (b"n+1\0" if one else b"n+2\0") or len(raw) < 176:
            return None  # a header of a .hdr/.img pair, whose voxels start at 0 in the other file; or cut short
        offset = float(np.frombuffer(raw, f"{order}f4" if one else f"{order}i8", 1, 108 if one else 168)[0])
        return _offset_fault(offset, 352 if one else 544)
    return None


def _offset_fault(offset: float, first: int) -> str | None:
    """A single-file NIfTI's voxels start after its header (352 bytes, 544 for NIfTI-2, more with extensions).

    nibabel reads a vox_offset of 0 as it stands, with the header's own bytes taken as the first voxels."""
    if math.isfinite(offset) and offset >= first:  # math: nibabel's offset is a Python int, of any size
        return None
    return f"vox_offset is {offset:g}; a single-file NIfTI's voxels start at byte {first} or later"


def _usable_qform(header: nib.Nifti1Header) -> np.ndarray | None:
    """The header's qform, or None where its fields cannot make one (a NaN pixdim or offset, quatern_b, c, d
    beyond a unit quaternion)."""
    try:
        with np.errstate(all="ignore"):
            qform = np.asarray(header.get_qform(), dtype=np.float64)
    except ValueError:  # nibabel: "w2 should be positive"
        return None
    return qform if places_voxels(qform) else None


def _geometry(path: Path, img: nib.Nifti1Image) -> VolumeGeometry:
    affine = np.asarray(img.affine, dtype=np.float64)
    header = img.header.copy()
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    if sform_code > 0 and not places_voxels(affine):
        qform = _usable_qform(header) if qform_code > 0 else None
        if qform is None:
            raise FlareSegError(f"{path}: the sform (sform_code {sform_code}) is singular or not finite")
        # As a damaged qform gives way to the sform below; the outputs get an sform made from the qform.
        log.warning("%s: the sform is damaged (singular or not finite); read with the qform", path)
        affine = qform
        header.set_sform(affine, code=sform_code)
    _check_affine(path, affine)
    if qform_code == 0 and sform_code == 0:
        # NIfTI's fallback gives voxel sizes but no orientation; the network expects RAS+ slices.
        log.warning(
            "%s: the header gives no orientation (qform_code and sform_code are 0); read as %s, "
            "NIfTI's default: check that the labels lie on the organs",
            path,
            "".join(nib.aff2axcodes(affine)),
        )
    elif qform_code > 0 and sform_code > 0:
        qform = _usable_qform(header)
        if qform is None:
            # Read with the sform alone; the outputs get a qform made from it, as ITK-based tools read the qform.
            log.warning("%s: the qform is damaged (quatern_b, c, d, qoffset or pixdim); read with the sform", path)
            header.set_qform(affine, code=qform_code)
        else:
            codes = nib.aff2axcodes(qform), nib.aff2axcodes(affine)
            if codes[0] != codes[1]:  # a header edited by hand or by a tool that updated one of them
                log.warning(
                    "%s: the qform (%s) and the sform (%s) disagree on the orientation; read with the sform, as "
                    "nibabel does (ITK-based tools may follow the qform): check that the labels lie on the organs",
                    path,
                    "".join(codes[0]),
                    "".join(codes[1]),
                )
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    if not np.all(np.isfinite(zooms) & (zooms > 0)):  # pixdim is the spacing NSD and DICOM SEG use
        sizes = nib.affines.voxel_sizes(affine)
        log.warning(
            "%s: pixdim gives voxels of %s mm; read as the affine's, %s mm",
            path, " x ".join(f"{v:.4g}" for v in zooms), " x ".join(f"{v:.4g}" for v in sizes),
        )  # fmt: skip
        header["pixdim"][1:4] = sizes  # the three spatial ones only: nibabel's set_zooms checks the others too
    return VolumeGeometry(
        path=path,
        shape=(int(img.shape[0]), int(img.shape[1]), int(img.shape[2])),
        affine=affine,
        header=header,
        to_canonical=canonical_transform(affine),
    )


def grid_geometry(
    path: Path, shape: tuple[int, int, int], affine: np.ndarray, dtype: np.dtype | None = None
) -> VolumeGeometry:
    """The geometry of a grid known by its shape and affine, not read from a NIfTI file (a DICOM series, an
    array in memory), with the header a NIfTI file of it would hold (scanner-based qform and sform, mm)."""
    _check_affine(path, affine)
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    if dtype is not None:
        header.set_data_dtype(dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return VolumeGeometry(
        path=path, shape=shape, affine=affine, header=header, to_canonical=canonical_transform(affine)
    )


def to_canonical(data: np.ndarray, geometry: VolumeGeometry, *, contiguous: bool = True) -> np.ndarray:
    """File voxel order -> canonical (Z, Y, X).

    C-contiguous by default (a copy unless the file is stored RAS+ in Fortran order);
    ``contiguous=False`` returns a view, with negative strides for flipped axes.
    """
    ras = apply_orientation(data, geometry.to_canonical).transpose(2, 1, 0)
    return np.ascontiguousarray(ras) if contiguous else ras


def from_canonical(array: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """Canonical (Z, Y, X) -> the file's own voxel order; the inverse of :func:`to_canonical`.

    A view of ``array`` (transposed, flipped): for a C-contiguous canonical array it is
    Fortran-ordered up to flips, the order NIfTI stores, so writing it needs no copy of
    the volume. Copy it if you need a contiguous array.
    """
    expected = tuple(geometry.shape[int(a)] for a in np.argsort(geometry.to_canonical[:, 0]))[::-1]
    if tuple(array.shape) != expected:
        raise FlareSegError(f"label map shape {tuple(array.shape)} does not fit {geometry.path}: expected {expected}")
    back = ornt_transform(_CANONICAL, io_orientation(geometry.affine))
    return apply_orientation(array.transpose(2, 1, 0), back)


def read_ct(path: str | os.PathLike[str], *, threads: int = 1, on_voxels: VoxelsCallback | None = None) -> Volume:
    """Read a 3D CT volume in the canonical slice layout, keeping its stored dtype and scaling.

    ``threads``: cores that inflate a ``.nii.gz`` at once (0: all), through rapidgzip;
    1, the default, is ISA-L on one core, the fastest on a few cores.

    ``Volume.array`` is a view of the file's voxels, not a copy: C-contiguous for a file
    stored RAS+, with negative strides along flipped axes (LPS: Y and X) and permuted
    strides for permuted axes otherwise. numpy accepts any of these; ``torch.from_numpy``
    refuses negative strides, so copy a batch of slices (``np.ascontiguousarray``) or
    ``np.copyto`` it into a staging buffer before handing it to torch.

    ``on_voxels``: called, in the reading thread, with each stretch of stored voxels as
    soon as the one-core inflater of a ``.nii.gz`` has stored it (1-D views in storage
    order and the file's dtype, a few MiB each, together all the voxels). Other reads do
    not call it, and a read that fails may have called it for part of the voxels. The
    pipeline counts the percentiles' histogram this way while the file inflates.
    """
    path = Path(path)
    check_read_threads(threads)
    img, data, slope, inter = _load(path, threads, on_voxels)
    geometry = _geometry(path, img)
    _check_voxels(path, data)
    return Volume(to_canonical(data, geometry, contiguous=False), geometry, slope, inter)


def _check_voxels(path: Path, data: np.ndarray) -> None:
    if data.dtype.kind not in "iuf":
        raise FlareSegError(f"{path}: unsupported voxel type {data.dtype}")
    if data.dtype.kind == "f":
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            voxels = "1 voxel is" if bad == 1 else f"{bad} voxels are"
            raise FlareSegError(f"{path}: {voxels} not finite (NaN or infinity)")


def volume_from_array(array: np.ndarray, affine: np.ndarray, *, name: str = "array") -> Volume:
    """A CT held in memory as a :class:`Volume`, checked as :func:`read_ct` checks a file (a trailing
    singleton fourth axis is accepted, as in a file).

    ``array``: Hounsfield units (integers or floats) on the voxel axes ``(i, j, k)`` that
    ``affine`` maps to RAS+ millimetres, as nibabel gives them (``img.get_fdata()`` or
    ``np.asanyarray(img.dataobj)``, with ``img.affine``). It is viewed, not copied.
    ``name`` stands for the file in error messages.
    """
    path = Path(name)
    data = np.asarray(array)
    if data.ndim == 4 and data.shape[3] == 1:  # a trailing singleton axis, as a file may have
        data = data[..., 0]
    if data.ndim != 3:
        raise FlareSegError(f"{name}: expected a 3D volume (i, j, k), got shape {data.shape}")
    if min(data.shape) < 1:
        raise FlareSegError(f"{name}: empty volume of shape {data.shape}")
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise FlareSegError(f"{name}: expected a 4 x 4 affine, got shape {matrix.shape}")
    _check_affine(path, matrix)
    if not np.array_equal(matrix[3], [0.0, 0.0, 0.0, 1.0]):  # a projective row: no voxel-to-mm map of NIfTI's
        raise FlareSegError(f"{name}: the affine's last row is {matrix[3].tolist()}; expected [0, 0, 0, 1]")
    _check_voxels(path, data)
    shape = (int(data.shape[0]), int(data.shape[1]), int(data.shape[2]))
    geometry = grid_geometry(path, shape, matrix)
    return Volume(to_canonical(data, geometry, contiguous=False), geometry)


#: How far from whole classes a label map's values may read: nibabel saves float labels into uint8 with the slope
#: 4/255, and 2 reads back as 1.992 (see read_labels).
_CLASS_TOLERANCE = 0.01


def check_not_label_map(hu: np.ndarray, path: str | os.PathLike[str], role: str) -> None:
    """Refuse a label map given where a CT is expected: every value a class (0..4), none below -100 HU.

    A CT always holds air (about -1000 HU) around the body, so this never refuses one.
    """
    top = NUM_CLASSES - 1
    near = _CLASS_TOLERANCE
    if (
        hu.size
        and float(hu.min()) >= -near
        and float(hu.max()) <= top + near
        and float(np.max(np.abs(hu - np.round(hu)))) <= near
    ):
        raise FlareSegError(
            f"{path}: looks like a label map, not a CT (every voxel is a class 0..{top}, none is air); "
            f"{role} takes CT images"
        )


def refuse_label_map(
    volume: Volume, path: str | os.PathLike[str], role: str, hu_bounds: tuple[float, float] | None = None
) -> tuple[float, float]:
    """:func:`check_not_label_map` on a read volume: a float copy of it only where its range (a CT holds air
    at about -1000 HU) leaves a label map possible. Returns the bounds it judged by, lowest first.

    ``hu_bounds``: two HU values of the volume known already, such as its normaliser's percentile bounds (a
    label map's lie within 0..4 too); else its minimum and maximum are taken.
    """
    if hu_bounds is None:
        hu_bounds = (
            float(volume.array.min()) * volume.slope + volume.inter,
            float(volume.array.max()) * volume.slope + volume.inter,
        )
    lo, hi = min(hu_bounds), max(hu_bounds)
    if lo >= -_CLASS_TOLERANCE and hi <= NUM_CLASSES - 1 + _CLASS_TOLERANCE:
        check_not_label_map(volume.hu(), path, role)
    return lo, hi


def check_ct_intensities(
    volume: Volume, path: str | os.PathLike[str], role: str, percentile_bounds: tuple[float, float] | None = None
) -> None:
    """Refuse a label map given as a CT (:func:`refuse_label_map`), and warn of intensities that are not
    Hounsfield units: nothing below 0 HU, where a CT holds air (-1000 HU) and fat (-100 HU). That is a CT stored
    as HU + 1024 without its ``scl_inter`` (or RescaleIntercept), or an MR image, or a crop too tight for the
    network: each is segmented without complaint, and wrongly.

    ``percentile_bounds``: the volume's clipping percentiles in HU (its normaliser's ``lo`` and ``hi``), where
    they are known already; else its minimum and maximum are taken. A CT padded outside its scan circle (-2000
    stored, say) and saved without its intercept is not caught: its low bounds lie on the padding.
    """
    lo, hi = refuse_label_map(volume, path, role, percentile_bounds)
    if lo >= 0:
        log.warning(
            "%s: %s are %g and %g HU, with no air (-1000 HU) or fat (-100 HU) below: not Hounsfield units (a CT "
            "stored as HU + 1024 without its intercept, or not a CT), or a crop too tight? Its segmentation may be "
            "wrong",
            path, "its minimum and maximum" if percentile_bounds is None else "its clipping percentiles", lo, hi,
        )  # fmt: skip


def read_labels(path: str | os.PathLike[str], *, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, VolumeGeometry]:
    """Read a label map in the file's own voxel order as uint8, refusing values outside 0..num_classes-1."""
    path = Path(path)
    img, data, slope, inter = _load(path, intensities=False)
    geometry = _geometry(path, img)
    # nibabel saves a float label map into uint8 with the slope 4/255, spreading classes over the type's range:
    # 2 reads back as 1.992 (ITK would truncate it to 1). Such a value lies within half a stored step of its
    # class, and a step below a tenth of a class leaves no doubt which; a coarser one (0.4: 1.2, 2.8) does.
    quantum = abs(slope) / 2 if data.dtype.kind in "iu" and (slope != 1.0 or inter != 0.0) else 0.0
    if slope != 1.0 or inter != 0.0:
        data = data * slope + inter
    if np.issubdtype(data.dtype, np.floating):
        whole = np.round(data)
        if data.size:
            with np.errstate(invalid="ignore"):  # inf - inf: the NaN is refused below, in our words, not numpy's
                np.subtract(data, whole, out=data)  # the scaled copy is not needed past this: no third array
            off = float(np.max(np.abs(data, out=data)))
        else:
            off = 0.0
        if not np.isfinite(off):
            raise FlareSegError(f"{path}: label map holds non-finite values")
        # The header's slope and offset are float32: 1e-6 is their rounding, whatever the step (int32: 4 is 3.9999999).
        if off > 1e-6 and not (quantum < 0.05 and off <= quantum * (1 + 1e-6)):
            raise FlareSegError(f"{path}: label map holds non-integer values")
        if off > 0:
            log.warning(
                "%s: values up to %.3g from whole classes (scl_slope=%g, scl_inter=%g); read rounded to the nearest",
                path, off, slope, inter,
            )  # fmt: skip
        data = whole
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > num_classes - 1:
        found = np.unique(data)
        bad = found[(found < 0) | (found > num_classes - 1)]
        # Scaled values are floats: whole ones are said as the labels they stand for (6, not 6.0).
        said = [int(v) if float(v).is_integer() else v for v in bad.tolist()]
        if len(bad) <= 8:
            shown = f"labels {said}"
        else:  # a CT given by mistake has thousands: the range says it, a list would be kilobytes long
            shown = f"{len(bad)} label values from {said[0]} to {said[-1]}"
        hint = "; is it a CT image, not a label map?" if len(found) > 64 else ""
        raise FlareSegError(f"{path}: {shown} outside 0..{num_classes - 1}{hint}")
    return np.asarray(data, dtype=np.uint8), geometry


def write_labels(
    labels: np.ndarray,
    geometry: VolumeGeometry,
    path: str | os.PathLike[str],
    *,
    replace: bool = True,
    description: str = PLAIN_DESCRIPTION,
) -> Path:
    """Write a canonical (Z, Y, X) label map as uint8 NIfTI on ``geometry``'s grid, atomically.

    The output has the input's affine, qform/sform and orientation, and no intensity scaling, intent,
    ``aux_file`` or header extensions (those describe the CT's values, not the labels),
    in the input's NIfTI format (NIfTI-2 in, NIfTI-2 out: its float64 affine kept exactly).
    ``replace=False``: a file that appeared at ``path`` meanwhile is kept (:class:`~flareseg.atomic.OutputExistsError`).
    ``description``: the header's ``descrip``, at most 79 ASCII characters (what made the map: see
    :class:`~flareseg.provenance.ModelStamp`).
    """
    path = Path(path)
    if not description.isascii() or len(description) > DESCRIP_BYTES:
        raise FlareSegError(f"a NIfTI description holds {DESCRIP_BYTES} ASCII characters at most, got {description!r}")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise FlareSegError(f"{path}: output must end in .nii or .nii.gz")
    if path.resolve() == geometry.path.resolve():
        raise FlareSegError(f"{path}: refusing to overwrite the input volume")
    if labels.dtype != np.uint8:
        raise FlareSegError(f"label map must be uint8, got {labels.dtype}")
    data = from_canonical(labels, geometry)
    header = geometry.header.copy()  # the grid, its qform/sform and units; not what describes the CT's values:
    header.set_intent("none", (), name="")  # a statistic's or a vector's intent does not describe labels,
    header["aux_file"] = b""
    header.extensions.clear()  # nor do the CT's extensions (AFNI's attributes, a comment naming the patient)
    header.set_data_dtype(np.uint8)
    if len(header.get_data_shape()) == 4:
        header.set_data_shape(geometry.shape)
    image_type = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = image_type(data, geometry.affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    img.header["descrip"] = description.encode("ascii")
    suffix = next(sfx for sfx in NIFTI_SUFFIXES if path.name.endswith(sfx))
    with atomic_output(path, keep_suffix=suffix, replace=replace) as tmp:
        if suffix == ".nii.gz" and _igzip is not None:
            _save_gzip_isal(img, tmp, _igzip)
        else:
            nib.save(img, tmp)  # nibabel's gzip (zlib level 1) when ISA-L is missing
    log.debug("wrote %s", path)
    return path


def _save_gzip_isal(img: nib.Nifti1Image, path: Path, igzip: Any) -> None:
    """nibabel writes the NIfTI stream (header, then one plane at a time); ISA-L deflates it.

    Like nibabel's own gzip writer, the gzip header holds no file name and a zero
    modification time, so identical label maps give identical files.
    """
    with (
        open(path, "wb") as raw,
        igzip.IGzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=raw, mtime=0) as gz,
    ):
        img.to_file_map(type(img).make_file_map({"image": gz}))
