"""Post-processing: largest components per organ, 26-connectivity."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from flareseg import postprocess
from flareseg.errors import FlareSegError
from flareseg.labels import COMPONENTS_KEPT
from flareseg.phantom import make_phantom
from flareseg.postprocess import StreamingPostprocessor, keep_largest_components


def test_keeps_largest_component_per_organ_and_two_for_kidneys():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[1:6, 1:6, 1:6] = 1  # liver, 125 voxels: kept
    lab[10:12, 10:12, 10:12] = 1  # liver speck, 8: removed
    lab[1:4, 12:15, 1:4] = 2  # kidney, 27: kept
    lab[15:18, 15:18, 1:4] = 2  # kidney, 27: kept
    lab[18, 1, 18] = 2  # kidney speck, 1: removed
    lab[14:16, 2:4, 14:16] = 3  # spleen, 8: kept (only component)
    lab[7:9, 16:19, 16:19] = 4  # pancreas, 18: kept
    lab[1, 18, 10] = 4  # pancreas speck: removed
    out = keep_largest_components(lab)
    expected = lab.copy()
    expected[10:12, 10:12, 10:12] = 0
    expected[18, 1, 18] = 0
    expected[1, 18, 10] = 0
    np.testing.assert_array_equal(out, expected)
    assert out is not lab


def test_connectivity_is_26_corners_join_components():
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    lab[3, 3, 3] = 1  # touches the cube by a corner only
    lab[5, 0, 5] = 1  # isolated
    out = keep_largest_components(lab)
    assert out[3, 3, 3] == 1 and out[5, 0, 5] == 0
    out6 = keep_largest_components(lab, connectivity=6)
    assert out6[3, 3, 3] == 0  # with faces only it is a separate component


def test_organs_touching_each_other_are_separate_components():
    lab = np.zeros((4, 4, 8), np.uint8)
    lab[:, :, :4] = 1
    lab[:, :, 4:] = 3
    np.testing.assert_array_equal(keep_largest_components(lab), lab)


def test_matches_an_independent_scipy_computation_on_random_labels():
    rng = np.random.default_rng(0)
    lab = (rng.random((30, 30, 30)) < 0.08).astype(np.uint8) * rng.integers(1, 5, (30, 30, 30)).astype(np.uint8)
    out = keep_largest_components(lab)
    structure = np.ones((3, 3, 3), bool)
    for organ, k in {1: 1, 2: 2, 3: 1, 4: 1}.items():
        comp, _n = ndimage.label(lab == organ, structure=structure)
        sizes = np.bincount(comp.ravel())[1:]
        kept = np.unique(comp[out == organ])
        # Exactly the k largest components survive, whole.
        assert sorted(sizes[kept - 1]) == sorted(sizes)[-k:]
        np.testing.assert_array_equal(out == organ, np.isin(comp, kept) & (comp > 0))


def test_rejects_bad_input():
    with pytest.raises(FlareSegError, match="3D"):
        keep_largest_components(np.zeros((3, 3), np.uint8))
    with pytest.raises(FlareSegError, match="uint8"):
        keep_largest_components(np.zeros((3, 3, 3), np.int32))
    for connectivity in (8, 4, 27):  # 2D neighbourhoods, or none cc3d knows: a one-line error, not cc3d's own
        with pytest.raises(FlareSegError, match=rf"^connectivity must be 6, 18 or 26, got {connectivity}$"):
            keep_largest_components(np.ones((3, 3, 3), np.uint8), connectivity=connectivity)  # type: ignore[arg-type]


# --- equality with the one-pass implementation this module had before (issue 10) ----------


def _reference(labels: np.ndarray, kept: dict[int, int], connectivity: int = 26) -> np.ndarray:
    """The previous implementation, kept verbatim as the reference: one cc3d pass over all labels."""
    components, n = cc3d.connected_components(labels, connectivity=connectivity, return_N=True)
    if n == 0:
        return labels.copy()
    fg = np.flatnonzero(labels)
    ids = components.ravel()[fg]
    fg_labels = labels.ravel()[fg]
    sizes = np.bincount(ids, minlength=n + 1)
    comp_label = np.zeros(n + 1, dtype=np.int64)
    comp_label[ids] = fg_labels
    keep = np.ones(n + 1, dtype=bool)
    for label, k in kept.items():
        cids = np.flatnonzero(comp_label == label)
        if len(cids) > k:
            by_size = cids[np.argsort(-sizes[cids], kind="stable")]
            keep[by_size[k:]] = False
    out = labels.copy()
    out.ravel()[fg[~keep[ids]]] = 0
    return out


def _random_labels(seed: int, shape=(23, 29, 31), density: float = 0.15, num_labels: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fg = rng.random(shape) < density
    return (fg * rng.integers(1, num_labels, shape)).astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("density", [0.03, 0.15, 0.4])
def test_equals_the_previous_implementation_on_random_maps(seed, density):
    lab = _random_labels(seed, density=density)
    out = keep_largest_components(lab)
    np.testing.assert_array_equal(out, _reference(lab, COMPONENTS_KEPT))
    assert 0 < np.count_nonzero(out) < np.count_nonzero(lab)
    if density == 0.03:  # sparse maps: some organ has a tie in size exactly where the kept ones end
        assert any(_tie_at_cut(lab, organ, k) for organ, k in COMPONENTS_KEPT.items())


def _tie_at_cut(lab: np.ndarray, organ: int, k: int) -> bool:
    sizes = np.sort(np.bincount(cc3d.connected_components(lab == organ, connectivity=26).ravel())[1:])[::-1]
    return len(sizes) > k and sizes[k - 1] == sizes[k]


def test_ties_keep_the_component_first_in_raster_order():
    lab = np.zeros((5, 5, 5), np.uint8)
    lab[0, 0, 4] = 1  # first in C raster order
    lab[4, 4, 0] = 1
    lab[2, 2, 2] = 1
    lab[4, 0, 0] = 2
    lab[0, 4, 4] = 2
    lab[2, 0, 2] = 2  # three kidney voxels of size 1: the first two in raster order stay
    out = keep_largest_components(lab)
    np.testing.assert_array_equal(out, _reference(lab, COMPONENTS_KEPT))
    assert out[0, 0, 4] == 1 and out[4, 4, 0] == 0 and out[2, 2, 2] == 0
    assert out[0, 4, 4] == 2 and out[2, 0, 2] == 2 and out[4, 0, 0] == 0
    # A Fortran-ordered map is scanned in its own memory order, as cc3d does for the reference.
    f = np.asfortranarray(lab)
    np.testing.assert_array_equal(keep_largest_components(f), _reference(f, COMPONENTS_KEPT))
    assert keep_largest_components(f)[4, 4, 0] == 1


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_corner_and_edge_contacts_match_the_reference_for_each_connectivity(connectivity):
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    lab[3, 3, 3] = 1  # corner contact
    lab[3, 1, 3] = 1  # edge contact
    lab[5:7, 5:7, 5:7] = 1  # a separate cube of the same size as the first
    lab[0, 7, 0] = lab[1, 6, 1] = 2  # kidney pieces touching by a corner
    lab[7, 0, 7] = 2
    lab[6, 0, 0] = 2
    out = keep_largest_components(lab, connectivity=connectivity)
    np.testing.assert_array_equal(out, _reference(lab, COMPONENTS_KEPT, connectivity))


@pytest.mark.parametrize("seed", range(3))
def test_non_contiguous_views_and_other_kept_tables_match_the_reference(seed):
    lab = _random_labels(seed, shape=(20, 24, 28), density=0.2, num_labels=12)
    kept = {1: 0, 2: 2, 3: 1, 5: 6, 9: 1, 11: 3, 0: 1}  # k = 0 drops an organ; 0 (background) is ignored
    for view in (lab[:, ::-1, ::-1], lab.transpose(2, 0, 1), lab[::2, 1:, ::-3]):
        np.testing.assert_array_equal(keep_largest_components(view, kept), _reference(view, kept))


def test_phantom_labels_match_the_reference_with_false_positive_specks():
    lab = np.ascontiguousarray(make_phantom((96, 96, 40), (4.0, 4.0, 6.0), seed=3).labels.transpose(2, 1, 0))
    rng = np.random.default_rng(0)
    specks = rng.integers(0, lab.size, 400)
    lab.ravel()[specks] = rng.integers(1, 5, specks.size).astype(np.uint8)
    lab = np.concatenate([lab, lab[::-1]])  # two copies of every organ, one mirrored: ties in size
    out = keep_largest_components(lab)
    np.testing.assert_array_equal(out, _reference(lab, COMPONENTS_KEPT))
    assert set(np.unique(out)) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("slab_bytes", [1, 700, 1 << 22])
def test_organs_are_located_alike_in_any_number_of_slabs(monkeypatch, slab_bytes):
    monkeypatch.setattr(postprocess, "_SLAB_BYTES", slab_bytes)
    lab = _random_labels(7, shape=(19, 21, 17), density=0.05)
    lab[0, 0, 0], lab[-1, -1, -1] = 3, 3  # spleen spans the whole map: its box is every slab
    np.testing.assert_array_equal(keep_largest_components(lab), _reference(lab, COMPONENTS_KEPT))


def test_empty_and_organ_free_maps_are_returned_as_copies():
    for lab in (np.zeros((3, 4, 5), np.uint8), np.full((3, 4, 5), 7, np.uint8)):
        out = keep_largest_components(lab)
        np.testing.assert_array_equal(out, lab)
        assert out is not lab


def test_negative_counts_are_refused():
    with pytest.raises(FlareSegError, match="must be >= 0"):
        keep_largest_components(np.zeros((3, 3, 3), np.uint8), {1: -1})


@pytest.mark.parametrize("dense_fraction", [0.0, 2.0])  # every box dense / every box sparse
@pytest.mark.parametrize("piece_voxels", [1, 97, 1 << 20])
def test_whole_and_gathered_boxes_agree_in_any_number_of_pieces(monkeypatch, dense_fraction, piece_voxels):
    monkeypatch.setattr(postprocess, "_DENSE_FRACTION", dense_fraction)
    monkeypatch.setattr(postprocess, "_PIECE_VOXELS", piece_voxels)
    for seed, density in ((0, 0.03), (1, 0.4), (2, 0.9)):
        lab = _random_labels(seed, shape=(11, 13, 17), density=density)
        for view in (lab, np.asfortranarray(lab), lab[:, ::-1, 2:]):
            np.testing.assert_array_equal(keep_largest_components(view), _reference(view, COMPONENTS_KEPT))


@pytest.mark.parametrize("dense_fraction", [0.0, 2.0])  # every box dense / every box sparse
def test_a_copy_leaves_the_map_as_it_was_where_its_box_is_the_whole_map(monkeypatch, dense_fraction):
    # The new labels are written over the crop where it is this call's own (no second box-sized array); where the
    # box is the whole map the crop is the map itself, which only in_place may change.
    monkeypatch.setattr(postprocess, "_DENSE_FRACTION", dense_fraction)
    for seed, density in ((0, 0.9), (1, 0.4), (2, 0.03)):
        base = _random_labels(seed, shape=(11, 13, 17), density=density)
        for view in (np.array(base), np.asfortranarray(base), np.array(base)[:, ::-1, 2:], np.array(base)[2:9]):
            before = view.copy(order="K")  # its memory order: ties are decided by it
            out = keep_largest_components(view)
            np.testing.assert_array_equal(view, before)  # untouched
            np.testing.assert_array_equal(out, _reference(before, COMPONENTS_KEPT))
            assert not np.shares_memory(out, view)
            assert keep_largest_components(view, in_place=True) is view
            np.testing.assert_array_equal(view, out)


def test_only_a_mostly_empty_box_gathers_its_foreground(monkeypatch):
    gathered: list[int] = []
    real = postprocess._intp_pieces
    monkeypatch.setattr(postprocess, "_intp_pieces", lambda ids, n: (gathered.append(ids.size), real(ids, n))[1])
    dense, sparse = _random_labels(0, density=0.9), _random_labels(0, density=0.05)
    keep_largest_components(dense)
    assert gathered[0] == dense.size  # every voxel of the box (here the whole map)
    gathered.clear()
    keep_largest_components(sparse)
    assert gathered[0] == np.count_nonzero(sparse)


# --- streaming: components labelled slab by slab while the slices arrive ----------------------


def _stream(lab: np.ndarray, stops, **kw) -> np.ndarray:
    streaming = StreamingPostprocessor(lab.shape, **kw)
    for stop in stops:
        streaming.add(lab, stop)
    return streaming.finish(lab)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("density", [0.03, 0.15, 0.4, 0.9])
@pytest.mark.parametrize("slab_slices", [1, 2, 5, 32])
def test_streaming_equals_the_whole_map_in_any_slabs(seed, density, slab_slices):
    lab = _random_labels(seed, shape=(23, 19, 21), density=density)
    stops = [0, 3, 3, 4, 11, 17, 23]  # batches of any size, a repeated report, the end
    out = _stream(lab, stops, slab_slices=slab_slices)
    np.testing.assert_array_equal(out, keep_largest_components(lab))
    np.testing.assert_array_equal(out, _reference(lab, COMPONENTS_KEPT))


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_streaming_links_components_across_slabs_by_each_connectivity(connectivity):
    lab = np.zeros((8, 6, 6), np.uint8)
    lab[0:4, 1, 1] = 1  # a U: two liver columns that only meet at their bottom, in the last slab
    lab[0:4, 1, 4] = 1
    lab[4, 1, 1:5] = 1
    lab[1:3, 4, 4] = 1  # a smaller liver piece, removed
    lab[3, 3, 3] = 2  # kidney voxels touching across the cut at z = 3 | 4 by a corner, an edge, a face
    lab[4, 4, 4] = 2
    lab[3, 0, 3], lab[4, 0, 4] = 2, 2
    lab[5, 5, 0] = 2
    for slab in (1, 2, 4):
        out = _stream(lab, range(9), slab_slices=slab, connectivity=connectivity)
        np.testing.assert_array_equal(out, keep_largest_components(lab, connectivity=connectivity))
        np.testing.assert_array_equal(out, _reference(lab, COMPONENTS_KEPT, connectivity))
    assert np.all(out[0:4, 1, 1] == 1) and np.all(out[0:4, 1, 4] == 1)  # the U stays whole
    assert np.all(out[1:3, 4, 4] == 0)


def test_streaming_breaks_ties_across_slabs_by_raster_order():
    lab = np.zeros((9, 4, 4), np.uint8)
    lab[7:9, 0, 0] = 1  # equal liver pieces: the one in the first slab comes first in raster order
    lab[0:2, 3, 3] = 1
    lab[4:6, 2, 2] = 1
    out = _stream(lab, [9], slab_slices=3)
    np.testing.assert_array_equal(out, _reference(lab, COMPONENTS_KEPT))
    assert out[0, 3, 3] == 1 and out[4, 2, 2] == 0 and out[8, 0, 0] == 0


def test_streaming_phantom_labels_with_specks_and_other_tables():
    lab = np.ascontiguousarray(make_phantom((64, 64, 30), (6.0, 6.0, 8.0), seed=5).labels.transpose(2, 1, 0))
    rng = np.random.default_rng(1)
    specks = rng.integers(0, lab.size, 300)
    lab.ravel()[specks] = rng.integers(1, 5, specks.size).astype(np.uint8)
    lab = np.ascontiguousarray(np.concatenate([lab, lab[::-1]]))
    np.testing.assert_array_equal(_stream(lab, range(0, 61, 8), slab_slices=16), _reference(lab, COMPONENTS_KEPT))
    kept = {1: 0, 2: 3, 4: 2, 0: 1}
    np.testing.assert_array_equal(_stream(lab, [60], kept=kept), _reference(lab, kept))
    for same in (np.zeros((5, 4, 4), np.uint8), np.full((5, 4, 4), 9, np.uint8)):
        out = _stream(same, [2, 5], slab_slices=2)
        np.testing.assert_array_equal(out, same)
        assert out is not same


def test_streaming_refuses_maps_it_cannot_follow():
    streaming = StreamingPostprocessor((4, 5, 6))
    with pytest.raises(FlareSegError, match=r"shape \(4, 5, 6\)"):
        streaming.add(np.zeros((4, 5, 7), np.uint8), 1)
    with pytest.raises(FlareSegError, match="not C-ordered"):
        streaming.add(np.asfortranarray(np.zeros((4, 5, 6), np.uint8)), 1)
    with pytest.raises(FlareSegError, match="outside the map's 4 slices"):
        streaming.add(np.zeros((4, 5, 6), np.uint8), 5)
    with pytest.raises(FlareSegError, match="slice -1 is outside the map's 4 slices"):
        streaming.add(np.zeros((4, 5, 6), np.uint8), -1)
    with pytest.raises(FlareSegError, match="uint8"):
        streaming.finish(np.zeros((4, 5, 6), np.int16))
    with pytest.raises(FlareSegError, match="slab_slices"):
        StreamingPostprocessor((4, 5, 6), slab_slices=0)


def test_streaming_lets_go_of_its_ids_when_finished_and_refuses_reuse():
    lab = _random_labels(3, shape=(9, 12, 12), density=0.4)
    streaming = StreamingPostprocessor(lab.shape, slab_slices=2)
    streaming.add(lab, 6)
    assert streaming._slabs  # per-voxel ids held between batches
    streaming.finish(lab)
    assert not streaming._slabs and not streaming._links and streaming._last_plane is None
    with pytest.raises(FlareSegError, match="has finished its map"):
        streaming.add(lab, 9)
    with pytest.raises(FlareSegError, match="has finished its map"):
        streaming.finish(lab)


def test_in_place_filters_the_map_itself_with_the_same_result():
    for seed, density in ((0, 0.05), (1, 0.9)):
        base = _random_labels(seed, shape=(12, 14, 16), density=density)
        for make in (np.array, np.asfortranarray, lambda a: np.array(a)[:, ::-1, 1:]):
            lab = make(base)
            expected = keep_largest_components(lab)
            assert not np.array_equal(expected, lab)  # something is removed
            out = keep_largest_components(lab, in_place=True)
            assert out is lab
            np.testing.assert_array_equal(lab, expected)
        lab = base.copy()
        streaming = StreamingPostprocessor(lab.shape, slab_slices=5)
        streaming.add(lab, 7)
        out = streaming.finish(lab, in_place=True)
        assert out is lab
        np.testing.assert_array_equal(lab, keep_largest_components(base))


@pytest.mark.parametrize("speck_label", [1, 2, 3, 4])
def test_the_only_component_to_remove_is_removed_when_it_comes_first_in_raster_order(speck_label):
    # A one-voxel speck at the origin is component 1 in raster order: a shortcut that skipped filtering whenever
    # components 2.. all stayed would have kept it, on both paths.
    lab = np.zeros((8, 12, 12), np.uint8)
    lab[3:6, 2:6, 2:6] = 1
    lab[3:6, 2:6, 7:11] = 2
    lab[1:3, 7:11, 2:6] = 2
    lab[5:8, 7:11, 7:11] = 3
    lab[1:3, 7:11, 7:11] = 4
    lab[0, 0, 0] = speck_label
    expected = lab.copy()
    expected[0, 0, 0] = 0
    np.testing.assert_array_equal(keep_largest_components(lab), expected)
    streaming = StreamingPostprocessor(lab.shape, slab_slices=2)
    for stop in range(2, 9, 2):
        streaming.add(lab, stop)
    np.testing.assert_array_equal(streaming.finish(lab), expected)


def test_the_box_spans_every_slab_in_y_and_x(monkeypatch):
    # A box taken from the last slab alone kept every speck outside it; the slab test filled both corners.
    monkeypatch.setattr(postprocess, "_SLAB_BYTES", 1)  # one slice a slab
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[0, 0, 0] = 1  # a liver speck in the first slab, at the low y/x corner
    labels[3:6, 4:8, 4:8] = 1  # the liver, in later slabs only
    out = keep_largest_components(labels)
    assert out[0, 0, 0] == 0 and out[3:6, 4:8, 4:8].all() and int(out.sum()) == 48


def test_streaming_removes_the_only_component_of_the_first_slab():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, 0] = 1
    labels[2:4, 2:4, 2:4] = 1
    streaming = StreamingPostprocessor(labels.shape, slab_slices=2)
    streaming.add(labels, 4)
    out = streaming.finish(labels)
    assert out[0, 0, 0] == 0 and out[2:4, 2:4, 2:4].all() and int(out.sum()) == 8
