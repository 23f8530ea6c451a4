"""Checks on what an export reads, made before any work: the checkpoint file, its weights, CT volumes.

Each refusal is one line naming the file and the problem, so that a bad input costs
seconds, not the minutes of an export, and leaves nothing behind.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flareseg.checkpoint import ModelInfo, network_of, read_checkpoint
from flareseg.errors import FlareSegError
from flareseg.network import FlareUNet, non_finite_weights
from flareseg.preprocess import NormalizationStats

#: The stand-in CT that exports verify and calibrate on where the user names none.
PHANTOM_SHAPE, PHANTOM_SPACING = (192, 192, 48), (2.0, 2.0, 5.0)
PHANTOM_DESCRIPTION = f"{'x'.join(map(str, PHANTOM_SHAPE))} at {'x'.join(f'{s:g}' for s in PHANTOM_SPACING)} mm"


@functools.lru_cache(maxsize=4)
def phantom_ct(seed: int) -> np.ndarray:
    """The stand-in CT's values (Z, Y, X) as float32, read-only. Made once per seed (1.3 s each) however many
    exports one process makes (flare-bench's), and shared by verification (seed 0) and calibration (0 and 1)."""
    from flareseg.phantom import make_phantom

    image = make_phantom(PHANTOM_SHAPE, PHANTOM_SPACING, seed=seed).image
    volume = np.ascontiguousarray(np.transpose(image, (2, 1, 0)), dtype=np.float32)
    volume.setflags(write=False)
    return volume


def check_finite_weights(net: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Refuse a network with NaN or infinite weights: every output would be NaN, and NaN compares as no error."""
    for name, bad in non_finite_weights(net).items():
        raise FlareSegError(f"{path}: {bad} weight(s) of {name} are not finite (NaN or infinity)")


def load_checked_model(path: str | os.PathLike[str]) -> tuple[FlareUNet, ModelInfo]:
    """The checkpoint's network (eval mode) and its ModelInfo, its weights checked finite."""
    return checked_network(read_checkpoint(path), path)


def checked_network(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> tuple[FlareUNet, ModelInfo]:
    """The network (eval mode) and ModelInfo of a checkpoint's payload read from ``path``, its weights checked
    finite."""
    net, info = network_of(payload, path)
    check_finite_weights(net, path)
    return net, info


def read_ct_normalized(
    path: str | os.PathLike[str],
    stats: NormalizationStats,
    role: str,
    indices: Callable[[int], Sequence[int]] | None = None,
) -> np.ndarray:
    """A CT volume's slices (Z, Y, X) normalised exactly as flare-infer normalises them, float32; a label map
    refused. ``path``: a NIfTI file, or a folder holding one DICOM series (as flare-infer reads them).
    ``indices(number of slices)`` picks the slices (default: all); only those are converted."""
    from flareseg.dicom import is_dicom_file
    from flareseg.preprocess import volume_normalizer
    from flareseg.runtime.reading import read_case
    from flareseg.volume import check_ct_intensities

    path = Path(path)
    if path.is_file() and is_dicom_file(path):
        raise FlareSegError(f"{path}: one DICOM file; {role} takes the folder that holds the series' slices")
    volume = read_case(path)  # as flare-infer reads it
    normalizer = volume_normalizer(volume.array, stats, volume.slope, volume.inter)
    check_ct_intensities(volume, path, role, (normalizer.lo, normalizer.hi))
    picked = volume.array if indices is None else volume.array[list(indices(volume.num_slices))]
    return normalizer(picked)
