"""The paper's post-processing (section 2.3): keep the largest 3D connected components per organ.

Liver, spleen and pancreas keep their largest component, the kidneys their two largest.
Components are 26-connected (voxels touching by a face, an edge or a corner belong
together) and computed by ``connected-components-3d`` in one pass over the bounding box
of the foreground; sizes, labels and removals are then worked out on the foreground
voxels only, through a boolean mask (see ``benchmarks/postprocess.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import cc3d
import numpy as np

from flareseg.errors import FlareSegError
from flareseg.labels import COMPONENTS_KEPT

Connectivity = Literal[6, 18, 26]
CONNECTIVITY: Connectivity = 26

Box = tuple[slice, slice, slice]

#: Bytes of the label map scanned at a time while finding the foreground's bounding box.
_SLAB_BYTES = 4 << 20


def keep_largest_components(
    labels: np.ndarray, kept: Mapping[int, int] = COMPONENTS_KEPT, connectivity: Connectivity = CONNECTIVITY
) -> np.ndarray:
    """A copy of a 3D uint8 label map where label ``l`` keeps only its ``kept[l]`` largest components.

    Labels not in ``kept`` (and background) are left as they are. Ties in size keep the
    component met first in raster order (the array's memory order: C, or Fortran for a
    Fortran-ordered map), as cc3d numbers components, so the result is deterministic.
    """
    if labels.ndim != 3:
        raise FlareSegError(f"post-processing needs a 3D label map, got shape {labels.shape}")
    if labels.dtype != np.uint8:
        raise FlareSegError(f"post-processing needs a uint8 label map, got {labels.dtype}")
    if connectivity not in (6, 18, 26):
        raise FlareSegError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    bad = {label: k for label, k in kept.items() if k < 0}
    if bad:
        raise FlareSegError(f"components to keep must be >= 0, got {bad}")
    out = labels.copy()
    organs = {int(label): int(k) for label, k in kept.items() if 0 < label <= 255}  # background has no components
    box = _foreground_box(labels) if organs else None
    if box is None:
        return out
    # The crop keeps the map's memory order, so cc3d numbers components in the same raster
    # order as on the whole map (ties are decided by that order). No copy when the box is everything.
    fortran = labels.flags.f_contiguous and not labels.flags.c_contiguous
    crop = np.asfortranarray(labels[box]) if fortran else np.ascontiguousarray(labels[box])
    components, n = cc3d.connected_components(crop, connectivity=connectivity, return_N=True)
    foreground = crop != 0
    ids = components[foreground]  # one component id per foreground voxel
    del components
    values = crop[foreground]
    sizes = np.bincount(ids, minlength=n + 1)
    component_label = np.zeros(n + 1, dtype=np.uint8)
    component_label[ids] = values  # every voxel of a component has the same label
    keep = np.ones(n + 1, dtype=bool)
    for label, k in organs.items():
        cids = np.flatnonzero(component_label == label)  # ascending: raster order
        if len(cids) > k:
            by_size = cids[np.argsort(-sizes[cids], kind="stable")]
            keep[by_size[k:]] = False
    if not keep.all():
        out[box][foreground] = np.where(keep[ids], values, np.uint8(0))
    return out


def _foreground_box(labels: np.ndarray) -> Box | None:
    """The bounding box of the non-zero voxels, or None if there are none.

    One pass, a slab of about 4 MiB at a time: an OR over each slab's planes says which
    planes along each axis hold a label, with no whole-volume temporary.
    """
    nz, ny, nx = labels.shape
    step = max(1, _SLAB_BYTES // max(1, ny * nx))
    along_z = np.empty(nz, dtype=np.uint8)
    along_y = np.zeros(ny, dtype=np.uint8)
    along_x = np.zeros(nx, dtype=np.uint8)
    for z in range(0, nz, step):
        slab = labels[z : z + step]
        along_z[z : z + slab.shape[0]] = np.bitwise_or.reduce(slab, axis=(1, 2))
        along_y |= np.bitwise_or.reduce(slab, axis=(0, 2))
        along_x |= np.bitwise_or.reduce(slab, axis=(0, 1))
    spans = []
    for present in (along_z, along_y, along_x):
        idx = np.flatnonzero(present)
        if idx.size == 0:
            return None
        spans.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return (spans[0], spans[1], spans[2])
