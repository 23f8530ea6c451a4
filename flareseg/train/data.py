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

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flareseg.atomic import atomic_output, write_text_atomic
from flareseg.errors import FlareSegError
from flareseg.preprocess import NormalizationStats, compute_stats, network_batch, volume_normalizer
from flareseg.volume import find_cases, read_ct, read_labels, to_canonical

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    mask: Path


def find_training_cases(data_dir: str | Path) -> list[Case]:
    """Pairs of ``TrainingImg/{case}_0000.nii.gz`` and ``TrainingMask/{case}.nii.gz``."""
    root = Path(data_dir)
    img_dir, mask_dir = root / "TrainingImg", root / "TrainingMask"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise FlareSegError(f"{root}: missing {d.name}/ (expected the FLARE21 layout TrainingImg/, TrainingMask/)")
    masks = find_cases(mask_dir)
    cases, unmatched = [], []
    for name, img in find_cases(img_dir).items():
        if name in masks:
            cases.append(Case(name, img, masks[name]))
        else:
            unmatched.append(img.name)
    if unmatched:
        raise FlareSegError(f"{img_dir}: no mask in {mask_dir.name}/ for {', '.join(unmatched[:5])}")
    if not cases:
        raise FlareSegError(f"{img_dir}: no training cases")
    return cases


def split_cases(
    cases: Sequence[Case], *, val_cases: int, val_list: Sequence[str] = (), seed: int = 0
) -> tuple[list[Case], list[Case]]:
    """(training, validation). ``val_list`` names cases explicitly; else ``val_cases`` are drawn with ``seed``.

    With 0 validation cases the training cases are validated on (small demos).
    """
    by_name = {c.name: c for c in cases}
    if val_list:
        missing = [n for n in val_list if n not in by_name]
        if missing:
            raise FlareSegError(f"validation cases not found: {', '.join(missing)}")
        val = [by_name[n] for n in val_list]
    else:
        if val_cases >= len(cases):
            raise FlareSegError(f"{val_cases} validation cases requested but only {len(cases)} cases exist")
        order = list(cases)
        random.Random(seed).shuffle(order)
        val = sorted(order[:val_cases], key=lambda c: c.name)
    train = [c for c in cases if c not in val]
    if not train:
        raise FlareSegError("no training cases left after the validation split")
    return train, (val or list(train))


def dataset_stats(cases: Sequence[Case], percentiles: tuple[float, float] = (1.0, 99.0)) -> NormalizationStats:
    """Statistics over all training voxels, streaming one volume at a time."""

    def volumes() -> Iterator[np.ndarray]:
        for case in tqdm(cases, desc="dataset statistics", unit="case", leave=False):
            yield read_ct(case.image).hu()

    return compute_stats(volumes(), percentiles)


def _save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_output(path, keep_suffix=".npy") as tmp:
        np.save(tmp, array)


class SliceCache:
    """Memory-mapped pre-processed slices of every case, built once per run."""

    def __init__(self, root: str | Path, stats: NormalizationStats, size: tuple[int, int]) -> None:
        self.root = Path(root)
        self.stats, self.size = stats, size
        self.root.mkdir(parents=True, exist_ok=True)
        key = {"version": CACHE_VERSION, "stats": stats.to_dict(), "size": list(size)}
        manifest = self.root / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()) != key:
            raise FlareSegError(f"{self.root}: the cache was built with other statistics or size; delete it")
        write_text_atomic(json.dumps(key, sort_keys=True), manifest)

    def _paths(self, case: Case) -> dict[str, Path]:
        return {k: self.root / f"{case.name}.{k}.npy" for k in ("slices", "labels", "stored", "truth")}

    def build(self, cases: Sequence[Case], *, full_resolution: bool = False) -> None:
        """Pre-process cases missing from the cache (``full_resolution``: keep validation copies too)."""
        todo = [
            c
            for c in cases
            if not all(p.exists() for k, p in self._paths(c).items() if full_resolution or k in ("slices", "labels"))
        ]
        for case in tqdm(todo, desc="caching slices", unit="case", leave=False):
            paths = self._paths(case)
            volume = read_ct(case.image)
            labels, lab_geom = read_labels(case.mask)
            if lab_geom.shape != volume.geometry.shape:
                raise FlareSegError(
                    f"case {case.name}: mask shape {lab_geom.shape} differs from image shape {volume.geometry.shape}"
                )
            truth = to_canonical(labels, volume.geometry)
            normalizer = volume_normalizer(volume.array, self.stats, volume.slope, volume.inter)
            slices = np.empty((volume.num_slices, *self.size), dtype=np.float16)
            lab_small = np.empty((volume.num_slices, *self.size), dtype=np.uint8)
            for k in range(0, volume.num_slices, 32):
                chunk = network_batch(normalizer(volume.array[k : k + 32]), self.size, 1)[:, 0]
                slices[k : k + 32] = chunk.numpy().astype(np.float16)
                lab = torch.from_numpy(truth[k : k + 32]).float()[:, None]
                lab_small[k : k + 32] = F.interpolate(lab, size=self.size, mode="nearest")[:, 0].numpy()
            _save_npy(slices, paths["slices"])
            _save_npy(lab_small, paths["labels"])
            if full_resolution:
                _save_npy(volume.array, paths["stored"])
                _save_npy(truth, paths["truth"])
                write_text_atomic(
                    json.dumps({"slope": volume.slope, "inter": volume.inter}), self.root / f"{case.name}.scale.json"
                )

    def slices(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        p = self._paths(case)
        return np.load(p["slices"], mmap_mode="r"), np.load(p["labels"], mmap_mode="r")

    def full_resolution(self, case: Case) -> tuple[np.ndarray, np.ndarray, float, float]:
        p = self._paths(case)
        scale = json.loads((self.root / f"{case.name}.scale.json").read_text())
        return np.load(p["stored"], mmap_mode="r"), np.load(p["truth"], mmap_mode="r"), scale["slope"], scale["inter"]


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
