"""Training data: FLARE21 case discovery, the seeded split, dataset statistics and the slice cache.

Each case is read and pre-processed once into memory-mapped ``.npy`` files:

- ``{case}.slices.npy``: normalised slices resized to the network size, float16 (Z, h, w);
- ``{case}.labels.npy``: labels resized by nearest neighbour, uint8 (Z, h, w);
- for validation cases, also the stored volume and labels at their own resolution, so
  that validation runs the runtime's own inference path and scores at full resolution.

Training then draws random axial slices from the memory maps: no NIfTI decoding per step.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from flareseg.atomic import atomic_output, write_text_atomic
from flareseg.errors import FlareSegError, first_few
from flareseg.preprocess import NormalizationStats, network_batch, resize_labels, stored_stats, volume_normalizer
from flareseg.volume import (
    GRID_TOLERANCE_MM,
    canonical_grid,
    check_ct_intensities,
    find_cases,
    grid_offset_mm,
    nibabel_notes,
    read_ct,
    read_labels,
    to_canonical,
)

log = logging.getLogger(__name__)
#: 2: keyed per case by its files (not only by statistics and size), masks brought onto the image's grid.
#: 3: masks resized by their pixel centres (nearest-exact), as the images are (bilinear, half-pixel centres).
CACHE_VERSION = 3


def progress_disabled() -> bool | None:
    """tqdm's ``disable``: None shows a bar on a terminal only; quiet runs (-q) show none."""
    return None if log.isEnabledFor(logging.INFO) else True


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    mask: Path


def find_training_cases(data_dir: str | Path) -> list[Case]:
    """Pairs of ``TrainingImg/{case}_0000.nii.gz`` and ``TrainingMask/{case}.nii.gz``; an unpaired file is an error."""
    root = Path(data_dir)
    img_dir, mask_dir = root / "TrainingImg", root / "TrainingMask"
    if not root.is_dir():
        raise FlareSegError(f"{root}: {'not a folder' if root.exists() else 'no such folder'} (expected the FLARE21 "
                            "layout TrainingImg/, TrainingMask/)")  # fmt: skip
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise FlareSegError(f"{root}: missing {d.name}/ (expected the FLARE21 layout TrainingImg/, TrainingMask/)")
    images, masks = find_cases(img_dir), find_cases(mask_dir)
    no_mask = [p.name for n, p in images.items() if n not in masks]
    if no_mask:
        raise FlareSegError(f"{img_dir}: no mask in {mask_dir.name}/ for {', '.join(no_mask[:5])}")
    # A mask without its image would be silently left out of training: most likely a misnamed image.
    no_image = [p.name for n, p in masks.items() if n not in images]
    if no_image:
        raise FlareSegError(f"{mask_dir}: no image in {img_dir.name}/ for {', '.join(no_image[:5])}")
    if not images:
        raise FlareSegError(f"{img_dir}: no training cases")
    return [Case(name, img, masks[name]) for name, img in images.items()]


def file_key(path: Path) -> dict[str, Any]:
    """What identifies a file's contents cheaply: name, size and modification time."""
    try:
        st = path.stat()
    except OSError as exc:
        raise FlareSegError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def stats_key(cases: Sequence[Case]) -> dict[str, Any]:
    """What dataset statistics are computed from: the training images."""
    return {"cases": [{"name": c.name, "image": file_key(c.image)} for c in cases]}


def case_key(case: Case) -> dict[str, Any]:
    """What a case's cached slices are made from: its image and its mask."""
    return {"image": file_key(case.image), "mask": file_key(case.mask)}


def data_key(cases: Sequence[Case]) -> dict[str, Any]:
    """What a run is trained and validated on: every case's image and mask (a run's ``data.json``).

    A mask also by its SHA-256: masks are small (a few hundred KB compressed), and one relabelled
    keeps its size where it is stored uncompressed; the images are known by name and size.
    """
    cases = sorted(cases, key=lambda c: c.name)
    return {
        "cases": [
            {"name": c.name, "image": file_key(c.image), "mask": {**file_key(c.mask), "sha256": _sha256(c)}}
            for c in cases
        ]
    }


def _sha256(case: Case) -> str:
    from flareseg.checkpoint import file_sha256

    try:
        return file_sha256(case.mask)
    except OSError as exc:
        raise FlareSegError(f"{case.mask}: cannot read ({exc.strerror or exc})") from None


def _holds_digests(key: dict[str, Any]) -> bool:
    try:
        return all("sha256" in c["mask"] for c in key.get("cases", []) if "mask" in c)
    except (AttributeError, KeyError, TypeError):
        return False


def describe_change(
    recorded: dict[str, Any],
    current: dict[str, Any],
    *,
    contents_only: bool = False,
    files: str = "training images",
) -> str | None:
    """How the cases of ``current`` (:func:`stats_key`, :func:`data_key`) differ from ``recorded``; None if they
    do not. Each case's image, and its mask where the key holds it, are compared.

    ``contents_only``: compare names and sizes, not modification times (a copied or
    touched dataset with the same files). ``files``: what the key's cases are, in the message.
    """

    # Masks by content where the record knows them so (data.json before it held digests: by name and size).
    digests = ("sha256",) if _holds_digests(recorded) else ()
    fields = ("file", "size", *digests, *(() if contents_only else ("mtime_ns",)))

    def table(key: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
        try:
            return {
                c["name"]: tuple(tuple(c[kind].get(f) for f in fields) for kind in ("image", "mask") if kind in c)
                for c in key.get("cases", [])
            }
        except (AttributeError, KeyError, TypeError):  # a hand-edited or damaged record: nothing to trust
            return {}

    then, now = table(recorded), table(current)
    if then == now:
        return None
    gone, new = sorted(set(then) - set(now)), sorted(set(now) - set(then))
    changed = sorted(n for n in set(then) & set(now) if then[n] != now[n])
    parts = [f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
             for what, names in (("missing", gone), ("new", new), ("changed", changed)) if names]  # fmt: skip
    return f"{len(then)} {files} then, {len(now)} now; " + "; ".join(parts)


def read_stats_file(path: Path) -> tuple[NormalizationStats, dict[str, Any] | None]:
    """A run's ``stats.json``: the statistics and what they came from (None: a run made before that was kept)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlareSegError(f"{path}: unreadable statistics ({exc})") from None
    if not isinstance(data, dict):
        raise FlareSegError(f"{path}: not dataset statistics (expected a JSON object)")
    source = data.get("source")
    try:
        stats = NormalizationStats.from_dict(data)
    except FlareSegError as exc:
        raise FlareSegError(f"{path}: {exc}") from None
    return stats, source if isinstance(source, dict) else None


def write_stats_file(path: Path, stats: NormalizationStats, source: dict[str, Any]) -> None:
    write_text_atomic(json.dumps({**stats.to_dict(), "source": source}, sort_keys=True), path)


def check_mask_grid(
    case: Case, image_shape: Sequence[int], image_affine: np.ndarray, mask_shape: Sequence[int], mask_affine: np.ndarray
) -> None:
    """Refuse a mask whose voxels do not lie on the image's grid, up to a flip or permutation of its axes.

    Both are brought to canonical voxel order (as the training slices are), so a mask
    stored in another orientation of the same grid pairs with the right image voxels.
    A different grid (shifted, other spacing, other shape, oblique) is refused: training
    would learn organs displaced from the anatomy.
    """
    moved = grid_offset_mm(image_shape, image_affine, mask_shape, mask_affine)
    if moved is None:
        img_shape, lab_shape = canonical_grid(image_shape, image_affine)[0], canonical_grid(mask_shape, mask_affine)[0]
        raise FlareSegError(
            f"{case.mask}: mask grid {'x'.join(map(str, lab_shape[::-1]))} differs from its image's "
            f"{'x'.join(map(str, img_shape[::-1]))} ({case.image.name})"
        )
    if not moved <= GRID_TOLERANCE_MM:
        raise FlareSegError(
            f"{case.mask}: mask voxels lie up to {moved:.3g} mm away from its image's ({case.image.name}): "
            "a different grid (shift, spacing or rotation), not the same grid stored in another orientation"
        )


def check_headers(cases: Sequence[Case]) -> None:
    """Check every mask's grid from the headers alone, before statistics and caching read the voxels.

    A file whose header cannot be read here is left to the full read, which says why.
    """
    for case in cases:
        try:
            with nibabel_notes(case.image, say=False), nibabel_notes(case.mask, say=False):
                img, lab = nib.load(case.image), nib.load(case.mask)  # the full read says nibabel's notes
            spatial = nib.spatialimages.SpatialImage
            if not (isinstance(img, spatial) and isinstance(lab, spatial)):
                continue
            shapes, affines = (tuple(img.shape[:3]), tuple(lab.shape[:3])), (img.affine, lab.affine)
            usable = all(len(s) == 3 for s in shapes) and all(
                a is not None and np.all(np.isfinite(a)) and abs(np.linalg.det(a[:3, :3])) > 1e-12 for a in affines
            )
        except Exception:  # any unreadable header: the full read reports it in one line
            continue
        if usable:
            check_mask_grid(case, shapes[0], affines[0], shapes[1], affines[1])


def split_cases(
    cases: Sequence[Case], *, val_cases: int, val_list: Sequence[str] = (), seed: int = 0
) -> tuple[list[Case], list[Case]]:
    """(training, validation). ``val_list`` names cases explicitly; else ``val_cases`` are drawn with ``seed``.

    With 0 validation cases the training cases are validated on (small demos).
    """
    by_name = {c.name: c for c in cases}
    if val_list:
        twice = sorted({n for n in val_list if val_list.count(n) > 1})
        if twice:  # validated twice, it would count double in the mean DSC that chooses best.pt
            raise FlareSegError(f"--val-list names {', '.join(twice)} more than once")
        missing = [n for n in val_list if n not in by_name]
        if missing:
            raise FlareSegError(
                f"--val-list: no case {', '.join(missing)} in the data (its cases: {first_few(sorted(by_name))})"
            )
        val = [by_name[n] for n in val_list]
    else:
        if val_cases >= len(cases):
            raise FlareSegError(
                f"--val-cases {val_cases} leaves no training case: the data hold {len(cases)} case(s); "
                f"hold out at most {len(cases) - 1}"
            )
        order = list(cases)
        random.Random(seed).shuffle(order)
        val = sorted(order[:val_cases], key=lambda c: c.name)
    train = [c for c in cases if c not in val]
    if not train:
        raise FlareSegError(
            f"--val-list holds all {len(cases)} cases of the data, which leaves none to train on; hold out fewer"
        )
    return train, (val or list(train))


def dataset_stats(cases: Sequence[Case], percentiles: tuple[float, float] = (1.0, 99.0)) -> NormalizationStats:
    """Statistics over all training voxels, streaming one volume at a time, each clipped as inference clips it.

    The stored values go in with their slope and intercept: no float copy of a whole volume is made.
    """

    def volumes() -> Iterator[tuple[np.ndarray, float, float]]:
        for case in tqdm(cases, desc="dataset statistics", unit="case", leave=False, disable=progress_disabled()):
            vol = read_ct(case.image)
            check_ct_intensities(vol, case.image, "TrainingImg/")  # a mask copied there would skew the statistics
            yield vol.array, vol.slope, vol.inter

    return stored_stats(volumes(), percentiles)


def _save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_output(path, keep_suffix=".npy") as tmp:
        np.save(tmp, array)


class SliceCache:
    """Memory-mapped pre-processed slices of every case, built once per run.

    ``manifest.json`` ties the cache to what it was made from: the statistics and slice
    size (any change empties the cache), and each case's image and mask files (a case
    whose files changed, or that another dataset of the same case names left there, is
    built again). A case enters the manifest only once all its files are written, so an
    interrupted build resumes where it stopped.
    """

    def __init__(self, root: str | Path, stats: NormalizationStats, size: tuple[int, int]) -> None:
        self.root = Path(root)
        self.stats, self.size = stats, size
        self._key = {"version": CACHE_VERSION, "stats": stats.to_dict(), "size": list(size)}

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def _paths(self, case: Case) -> dict[str, Path]:
        paths = {k: self.root / f"{case.name}.{k}.npy" for k in ("slices", "labels", "stored", "truth")}
        paths["scale"] = self.root / f"{case.name}.scale.json"
        return paths

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: the cache is rebuilt
            return {"key": self._key, "cases": {}}
        if (
            not isinstance(manifest, dict)
            or manifest.get("key") != self._key
            or not isinstance(manifest.get("cases"), dict)
        ):
            log.info("slice cache: made with other statistics, slice size or format; building it again")
            return {"key": self._key, "cases": {}}
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        write_text_atomic(json.dumps(manifest, sort_keys=True), self.manifest_path)

    def _clear(self) -> None:
        """Remove the cache's own files (made with other statistics, size or format); nothing else."""
        for pattern in ("*.slices.npy", "*.labels.npy", "*.stored.npy", "*.truth.npy", "*.scale.json"):
            for path in self.root.glob(pattern):
                path.unlink(missing_ok=True)

    def build(self, cases: Sequence[Case], *, full_resolution: bool = False) -> None:
        """Pre-process cases missing from the cache or out of date (``full_resolution``: keep validation copies too)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FlareSegError(f"{self.root}: cannot create the slice cache ({exc.strerror or exc})") from None
        manifest = self._read_manifest()
        if not manifest["cases"]:
            self._clear()
        kinds = ("slices", "labels", "stored", "truth", "scale") if full_resolution else ("slices", "labels")
        todo, damaged = [], []
        for case in cases:
            paths = self._paths(case)
            if manifest["cases"].get(case.name) != case_key(case):
                todo.append(case)
            elif not all(_whole(paths[k]) for k in kinds):
                todo.append(case)
                if any(paths[k].exists() and not _whole(paths[k]) for k in kinds):  # not kinds never made (yet)
                    damaged.append(case.name)
        stale = [c.name for c in todo if manifest["cases"].get(c.name, case_key(c)) != case_key(c)]
        if stale:
            log.info("slice cache: %d cases changed since they were cached (%s); caching them again", len(stale),
                     ", ".join(stale[:3]) + (" ..." if len(stale) > 3 else ""))  # fmt: skip
        if damaged:  # cut short by a full disk or a copy, say: the cache is the run's own, and made again
            log.warning("slice cache: files of %d cases are missing or cut short (%s); caching them again",
                        len(damaged), ", ".join(damaged[:3]) + (" ..." if len(damaged) > 3 else ""))  # fmt: skip
        for case in tqdm(todo, desc="caching slices", unit="case", leave=False, disable=progress_disabled()):
            key = case_key(case)  # taken before reading: a file changed meanwhile is built again next time
            if manifest["cases"].pop(case.name, None) is not None:
                self._write_manifest(manifest)
            self._build_case(case, full_resolution)
            manifest["cases"][case.name] = key
            self._write_manifest(manifest)

    def _build_case(self, case: Case, full_resolution: bool) -> None:
        paths = self._paths(case)
        volume = read_ct(case.image)
        labels, lab_geom = read_labels(case.mask)
        geom = volume.geometry
        check_mask_grid(case, geom.shape, geom.affine, lab_geom.shape, lab_geom.affine)
        # The mask in its own canonical order: the same voxels as the image's, whatever its stored orientation.
        truth = to_canonical(labels, lab_geom)
        normalizer = volume_normalizer(volume.array, self.stats, volume.slope, volume.inter)
        slices = np.empty((volume.num_slices, *self.size), dtype=np.float16)
        lab_small = np.empty((volume.num_slices, *self.size), dtype=np.uint8)
        for k in range(0, volume.num_slices, 32):
            chunk = network_batch(normalizer(volume.array[k : k + 32]), self.size, 1)[:, 0]
            slices[k : k + 32] = chunk.numpy().astype(np.float16)
            lab_small[k : k + 32] = resize_labels(torch.from_numpy(truth[k : k + 32]), self.size).numpy()
        _save_npy(slices, paths["slices"])
        _save_npy(lab_small, paths["labels"])
        if full_resolution:
            _save_npy(volume.array, paths["stored"])
            _save_npy(truth, paths["truth"])
            write_text_atomic(json.dumps({"slope": volume.slope, "inter": volume.inter}), paths["scale"])

    def slices(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        p = self._paths(case)
        return np.load(p["slices"], mmap_mode="r"), np.load(p["labels"], mmap_mode="r")

    def full_resolution(self, case: Case) -> tuple[np.ndarray, np.ndarray, float, float]:
        p = self._paths(case)
        scale = json.loads(p["scale"].read_text())
        return np.load(p["stored"], mmap_mode="r"), np.load(p["truth"], mmap_mode="r"), scale["slope"], scale["inter"]


def _whole(path: Path) -> bool:
    """Whether a cached file is all there: an array whose file holds what its header says (mapping one cut short
    fails), a JSON file that parses."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return True


class SliceDataset(torch.utils.data.Dataset):
    """Every axial slice of every training case, read from the memory-mapped cache."""

    def __init__(self, cache: SliceCache, cases: Sequence[Case]) -> None:
        self.cache, self.cases = cache, list(cases)
        self.index: list[tuple[int, int]] = []
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for ci, case in enumerate(self.cases):
            slices, _ = cache.slices(case)
            self.index.extend((ci, k) for k in range(slices.shape[0]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ci, k = self.index[i]
        if ci not in self._maps:  # opened lazily, once per worker process
            self._maps[ci] = self.cache.slices(self.cases[ci])
        img, lab = self._maps[ci]
        return torch.from_numpy(img[k].astype(np.float32)), torch.from_numpy(lab[k].astype(np.int64))
