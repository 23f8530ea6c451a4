"""Shared fixtures: the real sample data in ../shared (skipped when absent) and small phantoms."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE = SHARED_DATA / "flare21-sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real FLARE21-layout CT sample; tests using it skip on a fresh clone without ../shared."""
    if not (SAMPLE / "TrainingImg" / "train_000_0000.nii.gz").exists():
        pytest.skip(f"real sample data not found at {SAMPLE} (only present beside the project checkout)")
    return SAMPLE


@pytest.fixture(scope="session")
def sample_ct(sample_dir: Path) -> Path:
    return sample_dir / "TrainingImg" / "train_000_0000.nii.gz"


@pytest.fixture(scope="session")
def sample_mask(sample_dir: Path) -> Path:
    return sample_dir / "TrainingMask" / "train_000.nii.gz"


def reorient(img: nib.Nifti1Image, axcodes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The same image stored with other voxel axes (world positions unchanged)."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(axcodes)))


def save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, path)
    return path


def oblique(img: nib.Nifti1Image, degrees: float = 12.0) -> nib.Nifti1Image:
    """The same voxels with an affine rotated about the superior axis (an oblique acquisition)."""
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    out = nib.Nifti1Image(np.asanyarray(img.dataobj), rot @ img.affine, img.header.copy())
    out.set_sform(rot @ img.affine, code=1)
    return out
