"""A synthetic abdominal CT phantom, so that tests and demos run without real data.

Anatomy is laid out in patient millimetres (RAS+: +x toward the patient's right, +y
anterior, +z superior) around the volume's centre, so any size and spacing show the same
body: skin and subcutaneous fat, the abdominal wall muscles, a vertebra with its discs
and paraspinal muscles, the aorta and vena cava, bowel, and the four FLARE21 organs with
their own Hounsfield values. Labels follow the FLARE21 convention. The volume can be
written in any orientation; its affine places it correctly in the world.

Run ``python -m flareseg.phantom OUT_DIR`` to write cases in the FLARE21 layout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from flareseg.atomic import atomic_outputs, check_writable
from flareseg.cli import (
    add_common_arguments,
    non_negative_int,
    path_arg,
    positive_float,
    positive_int,
    run_command,
    say,
)
from flareseg.errors import FlareSegError

log = logging.getLogger("flareseg.phantom")  # not __main__ under python -m


_AXIS_OF = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


@dataclass(frozen=True)
class Phantom:
    """Voxels in the orientation given by ``axcodes``; ``affine`` maps them to RAS+ mm."""

    image: np.ndarray  # int16 Hounsfield units
    labels: np.ndarray  # uint8, FLARE21 labels
    affine: np.ndarray

    def to_nifti(self) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
        img = nib.Nifti1Image(self.image, self.affine)
        lab = nib.Nifti1Image(self.labels, self.affine)
        for im in (img, lab):
            im.header.set_xyzt_units("mm", "sec")
            im.set_qform(self.affine, code=1)
            im.set_sform(self.affine, code=1)
        return img, lab


def _ellipsoid(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (z - centre[2]) / radii[2]
    ) ** 2 <= 1.0


def _ellipse(x: np.ndarray, y: np.ndarray, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 <= 1.0


def _smooth_noise(shape: tuple[int, ...], sigma_vox: float | Sequence[float], rng: np.random.Generator) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    return n / (n.std() + 1e-6)


def make_phantom(
    shape: Sequence[int] = (128, 128, 64),
    spacing: Sequence[float] = (3.0, 3.0, 4.0),
    axcodes: Sequence[str] = ("R", "A", "S"),
    *,
    seed: int = 0,
    noise_hu: float = 12.0,
) -> Phantom:
    """A phantom of ``shape`` voxels of ``spacing`` mm, both given along R, A, S, stored as ``axcodes``."""
    if len(shape) != 3 or min(shape) < 2:
        raise FlareSegError(f"phantom shape must be three sizes >= 2, got {tuple(shape)}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise FlareSegError(f"phantom spacing must be three positive values, got {tuple(spacing)}")
    codes = tuple(str(c).upper() for c in axcodes)
    if len(codes) != 3 or sorted(_AXIS_OF[c] for c in codes if c in _AXIS_OF) != [0, 1, 2]:
        raise FlareSegError(f"invalid orientation {''.join(codes)}: need one of R/L, A/P and S/I each")
    target = axcodes2ornt(codes)
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in shape)
    sx, sy, sz = (float(s) for s in spacing)
    # Patient mm at voxel centres; +x right (so x grows toward the patient's right), centred.
    x = ((np.arange(nx) - (nx - 1) / 2) * sx)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * sy)[None, :, None]
    z = ((np.arange(nz) - (nz - 1) / 2) * sz)[None, None, :]
    full = (nx, ny, nz)
    # Subject-specific jitter so that cases differ.
    j = rng.uniform(-1, 1, 8)

    hu = np.full(full, -1000.0, dtype=np.float32)
    labels = np.zeros(full, dtype=np.uint8)
    xb, yb = x + 0 * y + 0 * z, y + 0 * x + 0 * z  # broadcast to the full grid

    body = _ellipse(xb, yb, (0, 0), (165 + 8 * j[0], 115 + 6 * j[1]))
    fat_inner = _ellipse(xb, yb, (0, 0), (148 + 8 * j[0], 98 + 6 * j[1]))
    muscle_inner = _ellipse(xb, yb, (0, 0), (138 + 8 * j[0], 88 + 6 * j[1]))
    hu[body] = -100.0  # subcutaneous fat
    hu[fat_inner] = 50.0  # abdominal wall muscle
    # Abdominal cavity: bowel and visceral fat, a mottled texture with a few gas pockets.
    voxel_mm = np.array([sx, sy, sz])
    texture = _smooth_noise(full, sigma_vox=tuple(6.0 / voxel_mm), rng=rng)
    cavity = np.where(texture > 0.6, -80.0, 25.0 + 15 * texture).astype(np.float32)
    cavity[texture < -2.3] = -850.0  # bowel gas
    hu[muscle_inner] = cavity[muscle_inner]

    # Paraspinal muscles and the vertebra (posterior, midline).
    hu[_ellipse(xb, yb, (-35, -80), (28, 22)) | _ellipse(xb, yb, (35, -80), (28, 22))] = 55.0
    vertebra = _ellipse(xb, yb, (0, -62), (22, 19))
    disc = (np.mod(z + 12 * j[2], 32.0) < 6.0) & np.ones(full, dtype=bool)
    hu[vertebra] = 700.0  # cortical rim
    hu[_ellipse(xb, yb, (0, -62), (18, 15))] = 220.0  # cancellous bone
    hu[vertebra & disc] = 90.0
    hu[_ellipse(xb, yb, (0, -98), (6, 16)) & ~disc] = 550.0  # spinous process
    # Vessels: aorta (contrast-enhanced) left-anterior of the spine, vena cava to the right.
    hu[_ellipse(xb, yb, (-18, -32), (12, 12))] = 160.0
    hu[_ellipse(xb, yb, (26, -28), (13, 10))] = 120.0

    # Organs: (label, HU, mask). Later ones win where they touch.
    zs = 25 * j[3]  # the organs' common cranio-caudal shift
    liver = _ellipsoid(x, y, z, (65, 5, 55 + zs), (80, 78, 75)) | _ellipsoid(x, y, z, (5, 35, 70 + zs), (55, 40, 45))
    liver &= yb - 0.35 * xb < 75  # a taper toward the left lobe
    spleen = _ellipsoid(x, y, z, (-100, -30, 55 + zs), (28 + 3 * j[4], 50, 48))
    kidney_r = _ellipsoid(x, y, z, (68, -52, -25 + zs), (26, 30, 55))
    kidney_l = _ellipsoid(x, y, z, (-68, -50, -10 + zs), (26, 30, 55))
    sinus = _ellipsoid(x, y, z, (58, -45, -25 + zs), (9, 12, 25)) | _ellipsoid(
        x, y, z, (-58, -43, -10 + zs), (9, 12, 25)
    )
    # Pancreas: a tube from the head (right, near the duodenum) to the tail (at the spleen).
    t = np.linspace(0.0, 1.0, 40)
    path = np.stack([45 - 135 * t, 5 - 10 * t + 12 * np.sin(np.pi * t), 5 + 20 * t + zs], axis=1)
    radius = 15 - 7 * t
    pancreas = np.zeros(full, dtype=bool)
    for (px, py, pz), r in zip(path, radius, strict=True):
        pancreas |= _ellipsoid(x, y, z, (px, py, pz), (r, r * 0.8, r))
    pancreas &= ~_ellipse(xb, yb, (-18, -32), (14, 14))
    organs = (
        (1, 62.0, liver & muscle_inner),
        (3, 48.0, spleen & muscle_inner),
        (2, 150.0, (kidney_r | kidney_l) & muscle_inner),
        (4, 42.0, pancreas & muscle_inner & ~liver),
    )
    for label, value, mask in organs:
        hu[mask] = value + 6.0 * _smooth_noise(full, 2.0, rng)[mask]
        labels[mask] = label
    hu[(kidney_r | kidney_l) & sinus] = -30.0  # renal sinus fat: not kidney tissue
    labels[(kidney_r | kidney_l) & sinus & (labels == 2)] = 0

    hu += rng.normal(0.0, noise_hu, full).astype(np.float32)
    hu[~body] = -1000.0 + rng.normal(0.0, 5.0, int((~body).sum())).astype(np.float32)
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)

    # Store in the requested orientation, with the affine that keeps the world position.
    ras_affine = np.diag([sx, sy, sz, 1.0])
    ras_affine[:3, 3] = -np.array([(nx - 1) / 2 * sx, (ny - 1) / 2 * sy, (nz - 1) / 2 * sz])
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), target)
    image = np.ascontiguousarray(nib.orientations.apply_orientation(image, transform))
    labels = np.ascontiguousarray(nib.orientations.apply_orientation(labels, transform))
    affine = ras_affine @ inv_ornt_aff(transform, (nx, ny, nz))
    return Phantom(image=image, labels=labels, affine=affine)


def write_phantom_cases(
    out_dir: str | Path,
    num_cases: int = 1,
    *,
    prefix: str = "train",
    start: int = 0,
    overwrite: bool = False,
    **kwargs: Any,
) -> list[tuple[Path, Path]]:
    """Write cases in the FLARE21 layout (``TrainingImg/{prefix}_NNN_0000.nii.gz``, ``TrainingMask/...``).

    Each case is made before anything of it is written (bad arguments leave no folders),
    and each file is written atomically. The names are real FLARE21 names: a file already
    there is refused before anything is written, unless ``overwrite``.
    """
    out = Path(out_dir)
    seed = kwargs.pop("seed", 0)
    cases = [
        (out / "TrainingImg" / f"{prefix}_{i:03d}_0000.nii.gz", out / "TrainingMask" / f"{prefix}_{i:03d}.nii.gz")
        for i in range(start, start + num_cases)
    ]
    there = [p for case in cases for p in case if os.path.lexists(p)]
    if there and not overwrite:
        more = f" and {len(there) - 1} more" if len(there) > 1 else ""
        raise FlareSegError(f"{there[0]}: exists{more}; a phantom replaces no file unasked (--overwrite)")
    written = []
    for i, (img_path, lab_path) in zip(range(start, start + num_cases), cases, strict=True):
        try:
            img, lab = make_phantom(seed=seed + i, **kwargs).to_nifti()
        except MemoryError:
            raise FlareSegError(f"a phantom of {kwargs.get('shape')} voxels needs more memory than there is") from None
        with atomic_outputs() as outputs:  # an image and its mask land together: never an image without a mask
            for image, path in ((img, img_path), (lab, lab_path)):
                check_writable(path)
                with outputs.writing(path, keep_suffix=".nii.gz") as tmp:
                    nib.save(image, tmp)
        written.append((img_path, lab_path))
    return written


def _triple(kind: type[int] | type[float]) -> Callable[[str], tuple[Any, ...]]:
    """argparse type: three comma-separated finite numbers ('128,128,64')."""
    one = positive_int if kind is int else positive_float

    def parse(text: str) -> tuple[Any, ...]:
        values = tuple(one(v) for v in text.split(","))
        if len(values) != 3:
            raise argparse.ArgumentTypeError(f"expected three comma-separated values, got {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flareseg.phantom", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=path_arg)
    parser.add_argument("--cases", type=positive_int, default=1, help="how many cases (default 1)")
    parser.add_argument(
        "--shape", type=_triple(int), default=(128, 128, 64), help="voxels along R,A,S (default 128,128,64)"
    )
    parser.add_argument(
        "--spacing", type=_triple(float), default=(3.0, 3.0, 4.0), help="mm along R,A,S (default 3,3,4)"
    )
    parser.add_argument("--orientation", default="RAS", help="storage axis codes, e.g. RAS, LPS, ASR (default RAS)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed of the first case (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace cases of the same names already there")
    add_common_arguments(parser)
    return parser


def _main(args: argparse.Namespace) -> int:
    paths = write_phantom_cases(
        args.out_dir,
        args.cases,
        shape=args.shape,
        spacing=args.spacing,
        axcodes=tuple(args.orientation),
        seed=args.seed,
        overwrite=args.overwrite,
    )
    for img, _ in paths:
        say(str(img))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
