"""FLARE21 metrics: Dice similarity coefficient and normalised surface Dice (NSD).

NSD follows the surface-element method of Nikolov et al. (2021), which the FLARE21
evaluation used: the boundary of a binary mask is the marching-cubes surface through
the mid-points between inside and outside voxel centres. Each 2x2x2 cell of voxels
carries a piece of that surface whose area depends on which of its 8 corners are inside,
and the distance from a cell to the other mask's surface is measured on the same cell
grid with the physical voxel spacing. NSD at tolerance t is the area of both surfaces
lying within t of the other, over the total area of both.

FLARE21's rules for absent organs: absent from both ground truth and prediction gives
DSC = NSD = 1; absent from one of them gives 0.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from flareseg.errors import FlareSegError
from flareseg.labels import ORGANS

Spacing = tuple[float, float, float]


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """2|G ∩ P| / (|G| + |P|) of two masks (non-zero is inside); 1.0 when both are empty."""
    gt, pred = _masks(gt, pred)
    g, p = int(np.count_nonzero(gt)), int(np.count_nonzero(pred))
    if g + p == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(gt & pred)) / (g + p)


@functools.cache
def _unit_triangles() -> tuple[np.ndarray, ...]:
    """For each of the 256 corner configurations of a cell, its marching-cubes triangles (T, 3, 3).

    Corner ``b`` of a cell sits at offset ``((b >> 2) & 1, (b >> 1) & 1, b & 1)``. The
    triangles come from the classic (Lorensen) marching-cubes table at level 0.5, so
    vertices lie at edge mid-points: the same surface the challenge's evaluation used.
    """
    from skimage.measure import marching_cubes

    tables: list[np.ndarray] = [np.zeros((0, 3, 3))] * 256
    for code in range(1, 255):
        if bin(code).count("1") > 4:
            continue
        cell = np.zeros((2, 2, 2), dtype=np.float32)
        for b in range(8):
            if code >> b & 1:
                cell[(b >> 2) & 1, (b >> 1) & 1, b & 1] = 1.0
        verts, faces, _, _ = marching_cubes(cell, 0.5, method="lorensen", allow_degenerate=True)
        tables[code] = np.asarray(verts, dtype=np.float64)[faces]
    # A configuration and its complement bound the same surface. skimage's table
    # triangulates some 5-7-corner cases around each outside corner separately; the
    # classic table (used by the challenge's evaluation) does not.
    for code in range(1, 255):
        if bin(code).count("1") > 4:
            tables[code] = tables[255 - code]
    return tuple(tables)


@functools.lru_cache(maxsize=64)
def surface_area_table(spacing: Spacing) -> np.ndarray:
    """Area in mm² of the surface inside a cell, for each of the 256 corner configurations."""
    scale = np.asarray(spacing, dtype=np.float64)
    areas = np.zeros(256)
    for code, tris in enumerate(_unit_triangles()):
        if len(tris):
            t = tris * scale
            areas[code] = 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1).sum()
    areas.flags.writeable = False  # cached and shared by every later call
    return areas


def _cell_codes(mask: np.ndarray) -> np.ndarray:
    """The 8-bit corner configuration of every 2x2x2 cell of the zero-padded mask (shape + 1)."""
    m = np.pad(mask, 1).astype(np.uint8)
    codes = np.zeros(tuple(s - 1 for s in m.shape), dtype=np.uint8)
    for b in range(8):
        i, j, k = (b >> 2) & 1, (b >> 1) & 1, b & 1
        codes |= m[i : i + codes.shape[0], j : j + codes.shape[1], k : k + codes.shape[2]] << b
    return codes


def surface_distances(
    gt: np.ndarray, pred: np.ndarray, spacing: Spacing
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Surface elements of both masks: (distances gt->pred, gt areas, distances pred->gt, pred areas).

    Distances are in mm (inf when the other mask is empty); both masks must be non-empty
    for meaningful distances. Work is confined to the bounding box of the union.
    """
    _check_spacing(spacing, gt)
    gt, pred = _masks(gt, pred)
    union = gt | pred
    if not union.any():
        empty = np.zeros(0)
        return empty, empty, empty, empty
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(union))
    areas_table = surface_area_table((float(spacing[0]), float(spacing[1]), float(spacing[2])))
    out = []
    borders = []
    for mask in (gt[box], pred[box]):
        codes = _cell_codes(mask)
        border = (codes != 0) & (codes != 255)
        borders.append(border)
        out.append(areas_table[codes[border]])
    dist = []
    for border in borders:
        if border.any():
            dist.append(ndimage.distance_transform_edt(~border, sampling=spacing))
        else:
            dist.append(np.full(border.shape, np.inf))
    d_gt_to_pred = dist[1][borders[0]]
    d_pred_to_gt = dist[0][borders[1]]
    return d_gt_to_pred, out[0], d_pred_to_gt, out[1]


def normalized_surface_dice(gt: np.ndarray, pred: np.ndarray, spacing: Spacing, tolerance_mm: float = 1.0) -> float:
    """NSD of two masks (non-zero is inside) at ``tolerance_mm``; FLARE21's rules for empty masks."""
    if not tolerance_mm >= 0:  # NaN too: every distance would fail "<= NaN", and NSD be 0 silently
        raise FlareSegError(f"NSD tolerance must be non-negative, got {tolerance_mm}")
    _check_spacing(spacing, gt)
    gt, pred = _masks(gt, pred)
    g_any, p_any = bool(gt.any()), bool(pred.any())
    if not g_any and not p_any:
        return 1.0
    if not g_any or not p_any:
        return 0.0
    d_gp, a_g, d_pg, a_p = surface_distances(gt, pred, spacing)
    total = a_g.sum() + a_p.sum()
    if total == 0:
        return 0.0
    return float((a_g[d_gp <= tolerance_mm].sum() + a_p[d_pg <= tolerance_mm].sum()) / total)


def organ_scores(
    gt_labels: np.ndarray,
    pred_labels: np.ndarray,
    spacing: Spacing,
    *,
    organs: Sequence[int] = ORGANS,
    tolerance_mm: float = 1.0,
) -> dict[int, tuple[float, float]]:
    """Per organ label: (DSC, NSD) of two label maps on the same grid."""
    _check_pair(gt_labels, pred_labels)
    scores = {}
    for organ in organs:
        g, p = gt_labels == organ, pred_labels == organ
        scores[organ] = (dice(g, p), normalized_surface_dice(g, p, spacing, tolerance_mm))
    return scores


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise FlareSegError(f"ground truth shape {a.shape} differs from prediction shape {b.shape}")


def _masks(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as boolean masks of one shape: the bit operations below hold for booleans only (2 & 1 is 0)."""
    _check_pair(gt, pred)
    return np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)


def _check_spacing(spacing: Sequence[float], mask: np.ndarray) -> None:
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise FlareSegError(f"voxel spacing must be three positive numbers, got {tuple(spacing)}")
    if np.ndim(mask) != 3:
        raise FlareSegError(f"surface distances need 3-D masks, got shape {np.shape(mask)}")
