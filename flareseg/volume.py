"""NIfTI volumes in, uint8 label maps out (nibabel).

Every volume is brought to one layout for the network: the closest canonical (RAS+)
orientation, stored as a C-contiguous ``(Z, Y, X)`` array so that axial slice ``k`` is
``array[k]``. A :class:`VolumeGeometry` remembers the file's own grid, affine, header and
orientation, so that label maps are written back voxel-exactly on the input's grid.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from flareseg.atomic import atomic_output
from flareseg.errors import FlareSegError
from flareseg.labels import NUM_CLASSES

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CANONICAL = axcodes2ornt(("R", "A", "S"))
_NIFTI1_HEADER_BYTES = 348


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
        sp = self.spacing
        xyz = [0.0, 0.0, 0.0]
        for axis, (target, _flip) in enumerate(self.to_canonical):
            xyz[int(target)] = sp[axis]
        return (xyz[2], xyz[1], xyz[0])

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


def find_cases(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Case name -> NIfTI file of ``folder``, sorted by file name (not recursive; hidden files skipped).

    Two files with the same FLARE21 case name (``a_0000.nii.gz`` and ``a.nii``) are an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FlareSegError(f"{folder}: not a directory")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not is_nifti(path):
            continue
        name = case_id(path)
        if name in cases:
            raise FlareSegError(f"{folder}: case {name} appears twice ({cases[name].name}, {path.name})")
        cases[name] = path
    return cases


def _load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray, float, float]:
    """Load a file: image, raw stored voxels, scl_slope and scl_inter; one-line errors."""
    if not path.exists():
        raise FlareSegError(f"{path}: file not found")
    if not path.is_file():
        raise FlareSegError(f"{path}: not a file")
    try:
        img = nib.load(path)
    except nib.filebasedimages.ImageFileError:
        raise FlareSegError(f"{path}: {_why_not_nifti(path)}") from None
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise FlareSegError(f"{path}: unreadable or truncated file ({exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise FlareSegError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        pass  # a trailing singleton 4th axis is a 3D volume
    elif len(shape) != 3:
        raise FlareSegError(f"{path}: expected a 3D volume, got shape {tuple(shape)}")
    if min(shape[:3]) < 1:
        raise FlareSegError(f"{path}: empty volume of shape {tuple(shape)}")
    proxy = img.dataobj
    try:
        # Raw stored values: scaling is applied later, per slice batch, to keep memory low.
        data = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise FlareSegError(f"{path}: truncated or corrupt voxel data ({exc})") from None
    if data.ndim == 4:
        data = data[..., 0]
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    if not (np.isfinite(slope) and np.isfinite(inter)) or slope == 0:
        raise FlareSegError(f"{path}: invalid intensity scaling scl_slope={slope}, scl_inter={inter}")
    return img, data, slope, inter


def _why_not_nifti(path: Path) -> str:
    """Tell a cut-off gzip stream or a too-short file from a file of another kind."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(_NIFTI1_HEADER_BYTES)
    except EOFError:
        return "truncated gzip stream (the file was cut off inside its header)"
    except (OSError, zlib.error) as exc:
        return f"not a NIfTI image (unreadable: {exc})"
    if len(head) < _NIFTI1_HEADER_BYTES:
        return f"truncated: {len(head)} bytes, shorter than a NIfTI header"
    return "not a NIfTI image (no NIfTI header found)"


def _geometry(path: Path, img: nib.Nifti1Image) -> VolumeGeometry:
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise FlareSegError(f"{path}: the affine is singular or not finite")
    return VolumeGeometry(
        path=path,
        shape=(int(img.shape[0]), int(img.shape[1]), int(img.shape[2])),
        affine=affine,
        header=img.header.copy(),
        to_canonical=ornt_transform(io_orientation(affine), _CANONICAL),
    )


def to_canonical(data: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """File voxel order -> canonical (Z, Y, X), C-contiguous."""
    ras = apply_orientation(data, geometry.to_canonical)
    return np.ascontiguousarray(ras.transpose(2, 1, 0))


def from_canonical(array: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """Canonical (Z, Y, X) -> the file's own voxel order; the inverse of :func:`to_canonical`."""
    expected = tuple(geometry.shape[int(a)] for a in np.argsort(geometry.to_canonical[:, 0]))[::-1]
    if tuple(array.shape) != expected:
        raise FlareSegError(f"label map shape {tuple(array.shape)} does not fit {geometry.path}: expected {expected}")
    back = ornt_transform(_CANONICAL, io_orientation(geometry.affine))
    return np.ascontiguousarray(apply_orientation(array.transpose(2, 1, 0), back))


def read_ct(path: str | os.PathLike[str]) -> Volume:
    """Read a 3D CT volume in the canonical slice layout, keeping its stored dtype and scaling."""
    path = Path(path)
    img, data, slope, inter = _load(path)
    geometry = _geometry(path, img)
    if data.dtype.kind not in "iuf":
        raise FlareSegError(f"{path}: unsupported voxel type {data.dtype}")
    if data.dtype.kind == "f":
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            raise FlareSegError(f"{path}: {bad} voxels are not finite (NaN or infinity)")
    return Volume(to_canonical(data, geometry), geometry, slope, inter)


def read_labels(path: str | os.PathLike[str], *, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, VolumeGeometry]:
    """Read a label map in the file's own voxel order as uint8, refusing values outside 0..num_classes-1."""
    path = Path(path)
    img, data, slope, inter = _load(path)
    geometry = _geometry(path, img)
    if slope != 1.0 or inter != 0.0:
        data = data * slope + inter
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise FlareSegError(f"{path}: label map holds non-integer values")
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > num_classes - 1:
        found = np.unique(data)
        bad = found[(found < 0) | (found > num_classes - 1)]
        raise FlareSegError(f"{path}: labels {bad.tolist()} outside 0..{num_classes - 1}")
    return np.asarray(data, dtype=np.uint8), geometry


def write_labels(labels: np.ndarray, geometry: VolumeGeometry, path: str | os.PathLike[str]) -> Path:
    """Write a canonical (Z, Y, X) label map as uint8 NIfTI on ``geometry``'s grid, atomically.

    The output has the input's affine, qform/sform and orientation, and no intensity scaling.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise FlareSegError(f"{path}: output must end in .nii or .nii.gz")
    if path.resolve() == geometry.path.resolve():
        raise FlareSegError(f"{path}: refusing to overwrite the input volume")
    if labels.dtype != np.uint8:
        raise FlareSegError(f"label map must be uint8, got {labels.dtype}")
    data = from_canonical(labels, geometry)
    header = geometry.header.copy()
    header.set_data_dtype(np.uint8)
    if len(header.get_data_shape()) == 4:
        header.set_data_shape(geometry.shape)
    img = nib.Nifti1Image(data, geometry.affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    img.header["descrip"] = b"flareseg label map"
    suffix = next(sfx for sfx in NIFTI_SUFFIXES if path.name.endswith(sfx))
    with atomic_output(path, keep_suffix=suffix) as tmp:
        nib.save(img, tmp)
    log.debug("wrote %s", path)
    return path
