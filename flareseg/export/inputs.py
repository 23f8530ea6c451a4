"""Checks on what an export reads, made before any work: the checkpoint file, its weights, CT volumes.

Each refusal is one line naming the file and the problem, so that a bad input costs
seconds, not the minutes of an export, and leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flareseg.checkpoint import ModelInfo, load_model
from flareseg.errors import FlareSegError
from flareseg.network import FlareUNet, non_finite_weights


def check_finite_weights(net: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Refuse a network with NaN or infinite weights: every output would be NaN, and NaN compares as no error."""
    for name, bad in non_finite_weights(net).items():
        raise FlareSegError(f"{path}: {bad} weight(s) of {name} are not finite (NaN or infinity)")


def load_checked_model(path: str | os.PathLike[str]) -> tuple[FlareUNet, ModelInfo]:
    """The checkpoint's network (eval mode) and its ModelInfo, its weights checked finite."""
    net, info, _ = load_model(path)
    check_finite_weights(net, path)
    return net, info


def read_ct_hu(path: str | os.PathLike[str], role: str) -> np.ndarray:
    """A CT volume in Hounsfield units (Z, Y, X), float32, refusing a label map."""
    from flareseg.volume import check_not_label_map, read_ct

    path = Path(path)
    if path.is_dir():
        raise FlareSegError(f"{path}: is a folder; {role} takes a CT NIfTI file")
    hu = read_ct(path).hu()
    check_not_label_map(hu, path, role)
    return hu
