"""Checks on what an export reads, made before any work: the checkpoint file, its weights, CT volumes.

Each refusal is one line naming the file and the problem, so that a bad input costs
seconds, not the minutes of an export, and leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flareseg.checkpoint import ModelInfo, checkpoint_file_problem, load_model
from flareseg.errors import FlareSegError
from flareseg.network import FlareUNet, non_finite_weights

#: A label map holds the classes 0..4; every real CT holds air, about -1000 HU.


def check_checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """Refuse a checkpoint path that is missing, a folder, empty, or not an intact ``torch.save`` zip archive.

    torch.load reports a cut-short file as a long internal error, and reads past a flipped
    byte in the weights without noticing; the zip members' checksums catch both.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        hint = f" (it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
        raise FlareSegError(f"{path}: is a folder, not a checkpoint file; give the .pt file{hint}")
    if not path.is_file():
        raise FlareSegError(f"{path}: checkpoint not found")
    problem = checkpoint_file_problem(path)
    if problem is not None:
        raise FlareSegError(f"{path}: {problem}")
    return path


def check_finite_weights(net: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Refuse a network with NaN or infinite weights: every output would be NaN, and NaN compares as no error."""
    for name, bad in non_finite_weights(net).items():
        raise FlareSegError(f"{path}: {bad} weight(s) of {name} are not finite (NaN or infinity)")


def load_checked_model(path: str | os.PathLike[str]) -> tuple[FlareUNet, ModelInfo]:
    """The checkpoint's network (eval mode) and its ModelInfo, after the file and weight checks."""
    check_checkpoint_file(path)
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
