"""The paper's post-processing (section 2.3): keep the largest 3D connected components per organ.

Liver, spleen and pancreas keep their largest component, the kidneys their two largest.
Components are 26-connected (voxels touching by a face, an edge or a corner belong
together) and computed by ``connected-components-3d`` in one pass over the bounding box
of the foreground; sizes, labels and removals are then worked out on the foreground
voxels only, through a boolean mask (see ``benchmarks/postprocess.md``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
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
    labels: np.ndarray,
    kept: Mapping[int, int] = COMPONENTS_KEPT,
    connectivity: Connectivity = CONNECTIVITY,
    *,
    in_place: bool = False,
) -> np.ndarray:
    """A copy of a 3D uint8 label map where label ``l`` keeps only its ``kept[l]`` largest components.

    Labels not in ``kept`` (and background) are left as they are. Ties in size keep the
    component met first in raster order (the array's memory order: C, or Fortran for a
    Fortran-ordered map), as cc3d numbers components, so the result is deterministic.
    ``in_place``: filter ``labels`` itself and return it, for a caller that owns the map
    (no second map in memory, no copy).
    """
    _check_map(labels)
    organs = _organs(kept, connectivity)
    out = labels if in_place else labels.copy()
    box = _foreground_box(labels) if organs else None
    if box is None:
        return out
    # The crop keeps the map's memory order, so cc3d numbers components in the same raster
    # order as on the whole map (ties are decided by that order). No copy when the box is everything.
    fortran = labels.flags.f_contiguous and not labels.flags.c_contiguous
    crop = np.asfortranarray(labels[box]) if fortran else np.ascontiguousarray(labels[box])
    components, n = cc3d.connected_components(crop, connectivity=connectivity, return_N=True)
    # Both flattened in memory order (views): voxel i of one is voxel i of the other.
    flat_ids, flat_labels = components.ravel(order="K"), crop.ravel(order="K")
    del components
    ids, values, mask = _voxels_to_count(flat_ids, flat_labels)
    del flat_ids
    sizes, component_label = _component_table(ids, values, n)
    keep = _keep_table(component_label, sizes, organs)
    if keep[1:].all():
        return out
    # Each component's label if it stays, else 0; background (component 0, label 0) stays 0.
    new_label = np.where(keep, component_label, np.uint8(0))
    # The crop is this call's own copy, or the map itself where the box is all of it: the new labels go into it
    # where it may be written (no second box-sized array: 77 MiB of a 600-slice map's peak), into a new array else.
    writable = in_place or not np.may_share_memory(crop, labels)
    # A box mostly foreground takes its new labels over its own voxels (a view of the crop, no longer read); the
    # foreground gathered from a sparse one is a small array of its own.
    new_values = values if writable and mask is None else np.empty_like(values)
    for piece, piece_ids in _intp_pieces(ids, n):
        np.take(new_label, piece_ids, out=new_values[piece])
    if mask is None:
        result = crop if writable else new_values.reshape(crop.shape, order="F" if fortran else "C")
    else:
        result = crop if writable else crop.copy(order="K")
        result.ravel(order="K")[mask] = new_values  # a view: the crop is contiguous
    if not np.may_share_memory(result, out):  # else it is the map's own box, written in place already
        out[box] = result
    return out


def _check_map(labels: np.ndarray) -> None:
    if labels.ndim != 3:
        raise FlareSegError(f"post-processing needs a 3D label map, got shape {labels.shape}")
    if labels.dtype != np.uint8:
        raise FlareSegError(f"post-processing needs a uint8 label map, got {labels.dtype}")


def _organs(kept: Mapping[int, int], connectivity: int) -> dict[int, int]:
    """The labels whose components are filtered, and how many each keeps (background has no components)."""
    if connectivity not in (6, 18, 26):
        raise FlareSegError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    bad = {label: k for label, k in kept.items() if k < 0}
    if bad:
        raise FlareSegError(f"components to keep must be >= 0, got {bad}")
    return {int(label): int(k) for label, k in kept.items() if 0 < label <= 255}


#: A box at least this full of foreground is worked on whole, without gathering its foreground.
_DENSE_FRACTION = 0.5
#: Component ids cast to intp per piece: a small reused buffer, large enough to amortise each call.
_PIECE_VOXELS = 1 << 20


def _voxels_to_count(flat_ids: np.ndarray, flat_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(component ids, labels, mask) of the voxels worth counting.

    All of a mostly-foreground box (mask None); otherwise its foreground voxels only,
    gathered through the mask.
    """
    if np.count_nonzero(flat_labels) >= _DENSE_FRACTION * flat_labels.size:
        return flat_ids, flat_labels, None
    mask = flat_labels != 0
    return flat_ids[mask], flat_labels[mask], mask


def _component_table(ids: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel count and label of components 0..n, from each voxel's component id and label."""
    sizes = np.zeros(n + 1, dtype=np.int64)
    component_label = np.zeros(n + 1, dtype=np.uint8)
    for piece, piece_ids in _intp_pieces(ids, n):
        sizes += np.bincount(piece_ids, minlength=n + 1)
        component_label[piece_ids] = values[piece]  # every voxel of a component has the same label
    return sizes, component_label


def _keep_table(component_label: np.ndarray, sizes: np.ndarray, organs: Mapping[int, int]) -> np.ndarray:
    """Which components stay: organ ``l`` keeps its ``organs[l]`` largest, ties to the lowest id (raster order)."""
    keep = np.ones(component_label.size, dtype=bool)
    for label, k in organs.items():
        cids = np.flatnonzero(component_label == label)  # ascending: raster order
        if len(cids) > k:
            by_size = cids[np.argsort(-sizes[cids], kind="stable")]
            keep[by_size[k:]] = False
    return keep


def _intp_pieces(ids: np.ndarray, n: int) -> Iterator[tuple[slice, np.ndarray]]:
    """``ids`` a piece at a time, cast to intp in a reused buffer (consume each piece before the next).

    On a whole uint32 array, np.bincount and fancy indexing first cast it to a whole intp
    temporary (8 bytes an id: 500 MB for an all-organ 300-slice map), whose fresh pages
    cost more than the counting; pieces reuse one small buffer (see
    ``benchmarks/postprocess.md``). np.bincount makes an (n + 1)-long array per call, so
    pieces grow with the component count.
    """
    step = max(_PIECE_VOXELS, 4 * (n + 1))
    buf = np.empty(min(step, ids.size), dtype=np.intp)
    for start in range(0, ids.size, step):
        stop = min(start + step, ids.size)
        piece = buf[: stop - start]
        piece[...] = ids[start:stop]
        yield slice(start, stop), piece


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


class StreamingPostprocessor:
    """:func:`keep_largest_components` of a C-ordered label map, worked on while its slices are produced.

    While the network infers later slices, :meth:`add` labels each complete slab of
    ``slab_slices`` slices with cc3d, counts its components, and links the components that
    touch the previous slab: the slab is labelled together with the previous slab's last
    plane, and each voxel of that plane pairs its id from the previous slab with its id
    here. :meth:`finish` labels the rest, joins linked components (union by smallest id),
    chooses the components to keep and writes the filtered copy. The result equals
    ``keep_largest_components(labels, kept, connectivity)`` voxel for voxel (tested): sizes
    are summed over the joined pieces, and a component's smallest id belongs to its first
    voxel in raster order, so ties in size are broken as there.

    ``seconds`` adds up the time spent in :meth:`add` and :meth:`finish`.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        kept: Mapping[int, int] = COMPONENTS_KEPT,
        connectivity: Connectivity = CONNECTIVITY,
        slab_slices: int = 32,
    ) -> None:
        if len(shape) != 3:
            raise FlareSegError(f"post-processing needs a 3D label map, got shape {tuple(shape)}")
        if slab_slices < 1:
            raise FlareSegError(f"slab_slices must be positive, got {slab_slices}")
        self.shape = tuple(int(n) for n in shape)
        self.organs = _organs(kept, connectivity)
        self.connectivity = connectivity
        self.slab_slices = slab_slices
        self.seconds = 0.0
        self._done = 0  # slices labelled so far
        self._count = 0  # component ids handed out so far (ids start at 1)
        self._slabs: list[tuple[int, int, int, int, np.ndarray]] = []  # start, stop, first id - 1, count, ids
        self._sizes: list[np.ndarray] = [np.zeros(1, np.int64)]  # per id, id 0 (background) first
        self._labels: list[np.ndarray] = [np.zeros(1, np.uint8)]
        self._links: list[np.ndarray] = []  # (2, k) pairs of ids of one component
        self._last_plane: np.ndarray | None = None  # global ids of the last labelled plane
        self._finished = False

    def add(self, labels: np.ndarray, stop: int) -> None:
        """Slices ``[0, stop)`` of ``labels`` are final: label the complete slabs among them."""
        t = time.perf_counter()
        self._check(labels, stop)
        while self.organs and stop - self._done >= self.slab_slices:
            self._label(labels, self._done + self.slab_slices)
        self.seconds += time.perf_counter() - t

    def finish(self, labels: np.ndarray, *, in_place: bool = False) -> np.ndarray:
        """The filtered copy of the complete map ``labels`` (the array passed to :meth:`add`).

        ``in_place``: filter ``labels`` itself and return it (see :func:`keep_largest_components`).
        """
        t = time.perf_counter()
        self._check(labels, self.shape[0])
        out = labels if in_place else labels.copy()
        if self.organs:
            if self._done < self.shape[0]:
                self._label(labels, self.shape[0])
            self._filter(out)
        # Let go of the per-voxel ids (2-4x the label map) now, whoever still holds this object.
        self._slabs, self._links, self._last_plane = [], [], None
        self._sizes, self._labels = self._sizes[:1], self._labels[:1]
        self._finished = True
        self.seconds += time.perf_counter() - t
        return out

    def _check(self, labels: np.ndarray, stop: int) -> None:
        if self._finished:
            raise FlareSegError("this StreamingPostprocessor has finished its map: make a new one for the next")
        _check_map(labels)
        if labels.shape != self.shape or not labels.flags.c_contiguous:
            raise FlareSegError(
                f"expected a C-ordered label map of shape {self.shape}, got shape {labels.shape} "
                f"({'C' if labels.flags.c_contiguous else 'not C'}-ordered)"
            )
        if not 0 <= stop <= self.shape[0]:
            raise FlareSegError(f"slice {stop} is outside the map's {self.shape[0]} slices")

    def _label(self, labels: np.ndarray, stop: int) -> None:
        """Label slices ``[self._done, stop)``, with the previous plane in front to link across the cut."""
        start, before = self._done, self._last_plane  # before: the previous plane's global ids, if any
        block = labels[start if before is None else start - 1 : stop]  # a C-ordered view: no copy
        components, n = cc3d.connected_components(block, connectivity=self.connectivity, return_N=True)
        own, own_labels = (components, block) if before is None else (components[1:], block[1:])
        first = self._count  # ids first + 1 .. first + n are this slab's
        ids, values, _ = _voxels_to_count(own.reshape(-1), own_labels.reshape(-1))
        sizes, component_label = _component_table(ids, values, n)
        del ids, values
        if before is not None:
            # The shared plane: each foreground voxel's id in the previous slab and its id here.
            here = components[0].reshape(-1)
            fg = before != 0
            pairs = np.stack([before[fg], here[fg].astype(np.int64) + first])
            if pairs.shape[1]:
                # Neighbouring voxels mostly repeat a pair: drop repeats before the sort in np.unique.
                new = np.ones(pairs.shape[1], dtype=bool)
                new[1:] = np.any(pairs[:, 1:] != pairs[:, :-1], axis=0)
                self._links.append(np.unique(pairs[:, new], axis=1))
        # Only ids that have voxels of their own can carry a label or a size (others: 0).
        self._sizes.append(sizes[1:])
        self._labels.append(component_label[1:])
        last = own[-1].astype(np.int64).reshape(-1)
        last[last != 0] += first
        self._last_plane = last
        if n:  # a slab without components has nothing to filter
            self._slabs.append((start, stop, first, n, own.astype(np.min_scalar_type(n))))
        self._count += n
        self._done = stop

    def _filter(self, out: np.ndarray) -> None:
        sizes = np.concatenate(self._sizes)
        component_label = np.concatenate(self._labels)
        root = _smallest_linked_id(self._count, np.concatenate(self._links, axis=1) if self._links else None)
        # A joined component is represented by its smallest id (its first voxel in raster order).
        group_size = np.bincount(root, weights=sizes, minlength=root.size).astype(np.int64)
        is_root = root == np.arange(root.size)
        keep = _keep_table(np.where(is_root, component_label, np.uint8(0)), group_size, self.organs)[root]
        if keep[1:].all():
            return
        new_label = np.where(keep, component_label, np.uint8(0))
        for start, stop, first, n, ids in self._slabs:
            table = new_label[first : first + n + 1].copy()
            table[0] = 0  # background
            if np.array_equal(table[1:], component_label[first + 1 : first + n + 1]):
                continue  # nothing removed in this slab
            flat = out[start:stop].reshape(-1)  # a view: out is C-ordered
            for piece, piece_ids in _intp_pieces(ids.reshape(-1), n):
                np.take(table, piece_ids, out=flat[piece])


def _smallest_linked_id(count: int, links: np.ndarray | None) -> np.ndarray:
    """For ids 0..count, the smallest id each is linked to, directly or through others (``links``: (2, k))."""
    root = np.arange(count + 1, dtype=np.int64)
    if links is None or links.shape[1] == 0:
        return root
    a, b = links
    while True:
        ra, rb = root[a], root[b]
        low = np.minimum(ra, rb)
        if np.array_equal(ra, rb):
            return root
        # Hook each linked root under the smaller one, then shortcut every chain to its end.
        np.minimum.at(root, ra, low)
        np.minimum.at(root, rb, low)
        while True:
            shorter = root[root]
            if np.array_equal(shorter, root):
                break
            root = shorter
