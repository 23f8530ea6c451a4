"""The paper's pre-processing (section 2.1): per-volume percentile clipping, dataset z-score, resizing.

All functions are pure. :class:`NormalizationStats` is computed once from the training
cases and travels with the model (checkpoint, ONNX metadata, engine sidecar), so that
inference reproduces training's normalisation exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flareseg.errors import FlareSegError
from flareseg.percentiles import (
    ValueHistogram,
    exact_percentiles,
)

DEFAULT_PERCENTILES = (1.0, 99.0)
#: Voxels per chunk in compute_stats: bounds its float copies (12 bytes a voxel) to 12 MiB.
_STATS_CHUNK = 1 << 20


@dataclass(frozen=True)
class NormalizationStats:
    """Dataset intensity statistics, measured after per-volume percentile clipping."""

    mean: float
    std: float
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    #: How many voxels the statistics were computed over (provenance).
    num_voxels: int = 0
    num_cases: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std)) or self.std <= 0:
            raise FlareSegError(f"normalisation needs a finite mean and a positive std, got {self.mean}, {self.std}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise FlareSegError(f"clipping percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NormalizationStats:
        try:
            return cls(
                mean=float(data["mean"]),
                std=float(data["std"]),
                percentiles=(float(data["percentiles"][0]), float(data["percentiles"][1])),
                num_voxels=int(data.get("num_voxels", 0)),
                num_cases=int(data.get("num_cases", 0)),
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise FlareSegError(f"invalid normalisation statistics {data!r}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NormalizationStats:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise FlareSegError(f"invalid normalisation statistics JSON: {exc}") from None


def clip_bounds(volume: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> tuple[float, float]:
    """The volume's own intensity percentiles (numpy's linear interpolation, exact; see exact_percentiles)."""
    lo, hi = exact_percentiles(volume, percentiles)
    return lo, hi


def clip_volume(volume: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """A float32 copy of ``volume`` clipped to its own percentiles."""
    lo, hi = clip_bounds(volume, percentiles)
    return np.clip(volume, lo, hi, dtype=np.float32)


def compute_stats(
    volumes: Iterable[np.ndarray], percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> NormalizationStats:
    """Mean and std over all voxels of all (clipped) volumes, given in Hounsfield units; see :func:`stored_stats`."""
    return stored_stats(((volume, 1.0, 0.0) for volume in volumes), percentiles)


def stored_stats(
    volumes: Iterable[tuple[np.ndarray, float, float]], percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> NormalizationStats:
    """Mean and std over all voxels of all (clipped) volumes, streaming: one volume in memory at a time.

    Each volume comes as its stored values with the slope and intercept that make them
    Hounsfield units, and is clipped to its own percentile bounds exactly as inference clips
    it (:func:`volume_normalizer`: exact percentiles of the stored integers, the same float32
    operations), then read in chunks of slices, so the float copies are of one chunk, not of
    the volume. Sums are accumulated per chunk around that chunk's mean and merged with Chan
    et al.'s parallel update, which stays accurate in float64 for billions of voxels.
    """
    identity = NormalizationStats(mean=0.0, std=1.0, percentiles=percentiles)  # clipped values, not z-scored
    n_total, mean_total, m2_total, cases = 0, 0.0, 0.0, 0
    for volume, slope, inter in volumes:
        volume = np.asarray(volume)
        if volume.size == 0:
            raise FlareSegError("cannot take percentiles of an empty volume")
        clip = volume_normalizer(volume, identity, slope, inter)
        slabs = volume.reshape(1, -1) if volume.ndim < 2 else volume
        rows = max(1, _STATS_CHUNK // max(1, slabs[0].size))
        for start in range(0, len(slabs), rows):
            chunk = clip(slabs[start : start + rows]).astype(np.float64)  # (x - 0) / 1: the clipped float32 values
            n = chunk.size
            mean = float(chunk.mean())
            chunk -= mean  # in place: no further chunk-sized temporaries
            np.square(chunk, out=chunk)
            m2 = float(chunk.sum())
            delta = mean - mean_total
            n_new = n_total + n
            mean_total += delta * n / n_new
            m2_total += m2 + delta * delta * n_total * n / n_new
            n_total = n_new
        cases += 1
    if n_total == 0:
        raise FlareSegError("cannot compute normalisation statistics from zero volumes")
    return NormalizationStats(
        mean=mean_total, std=math.sqrt(m2_total / n_total), percentiles=percentiles, num_voxels=n_total, num_cases=cases
    )


@dataclass(frozen=True)
class SliceNormalizer:
    """One volume's intensity transform: stored values -> clipped, z-scored float32.

    ``lo`` and ``hi`` are the volume's own percentile bounds in Hounsfield units; stored
    values become HU through ``slope`` and ``inter`` (the file's scl_slope/scl_inter).
    It is applied a batch of slices at a time, so no float copy of the volume is needed.
    """

    lo: float
    hi: float
    stats: NormalizationStats
    slope: float = 1.0
    inter: float = 0.0

    def __call__(self, stored: np.ndarray) -> np.ndarray:
        out = np.array(stored, dtype=np.float32)  # always a new array: inputs are never modified
        if self.slope != 1.0 or self.inter != 0.0:
            out *= np.float32(self.slope)
            out += np.float32(self.inter)
        np.clip(out, np.float32(self.lo), np.float32(self.hi), out=out)
        out -= np.float32(self.stats.mean)
        out /= np.float32(self.stats.std)
        return out


class TensorNormalizer:
    """SliceNormalizer's twin for torch tensors on any device: stored values (B, Y, X) -> float32.

    The same float32 operations in the same order as :class:`SliceNormalizer` (convert,
    scale, shift, clip, subtract the mean, divide by the std), each correctly rounded, so
    the result is bit-identical to the numpy path. The constants are 0-dim float32 tensors
    on the target device rather than Python numbers: CUDA turns division by a host scalar
    into multiplication by its reciprocal, which can differ from numpy in the last bit.
    """

    def __init__(self, normalizer: SliceNormalizer, device: torch.device | str = "cpu") -> None:
        self.normalizer = normalizer
        self.device = torch.device(device)

        def const(x: float) -> torch.Tensor:
            return torch.tensor(np.float32(x), dtype=torch.float32, device=self.device)

        self._scale = normalizer.slope != 1.0 or normalizer.inter != 0.0
        self._slope, self._inter = const(normalizer.slope), const(normalizer.inter)
        self._lo, self._hi = const(normalizer.lo), const(normalizer.hi)
        self._mean, self._std = const(normalizer.stats.mean), const(normalizer.stats.std)

    def __call__(self, stored: torch.Tensor) -> torch.Tensor:
        out = stored.to(device=self.device, dtype=torch.float32, copy=True)  # never modify the input
        if self._scale:
            out.mul_(self._slope)
            out.add_(self._inter)
        torch.clamp(out, self._lo, self._hi, out=out)
        out.sub_(self._mean)
        out.div_(self._std)
        return out

    def network_batch(self, stored: torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
        """Stored slices (B, Y, X) -> the (B, channels, h, w) float32 network input, on ``stored``'s device."""
        if stored.dim() != 3:
            raise FlareSegError(f"expected (B, H, W) slices, got shape {tuple(stored.shape)}")
        return network_batch(self(stored), size, channels)


def volume_normalizer(
    stored: np.ndarray,
    stats: NormalizationStats,
    slope: float = 1.0,
    inter: float = 0.0,
    histogram: ValueHistogram | None = None,
) -> SliceNormalizer:
    """The normaliser of a whole volume given its stored values (percentiles need all of them).

    Percentiles are taken on the stored values (an int16 volume costs a 2-byte copy, not
    a 4-byte float one) and mapped to HU: linear interpolation commutes with affine
    scaling, so the bounds equal the percentiles of the HU volume. A negative slope
    reverses the order, so HU percentile q is the stored values' percentile 100 - q.
    ``histogram``: the stored values' :func:`~flareseg.percentiles.value_histogram`, when it was counted already.
    """
    q_low, q_high = stats.percentiles
    # Stored-value percentiles that map to HU q_low and q_high; with a negative slope they are 100 - q
    # (swapping the mapped bounds is right only for symmetric percentiles such as (1, 99)).
    qs = (q_low, q_high) if slope >= 0 else (100.0 - q_low, 100.0 - q_high)
    if histogram is not None:
        if histogram.voxels != stored.size:
            raise FlareSegError(
                f"the histogram counts {histogram.voxels} voxels, but the volume has {stored.size}: "
                "it belongs to another volume"
            )
        at_low, at_high = histogram.percentiles(qs)
    else:
        at_low, at_high = clip_bounds(stored, qs)
    if not (math.isfinite(at_low) and math.isfinite(at_high)):  # NaN would clip every voxel to NaN: no organ found
        raise FlareSegError("the volume holds values that are not finite (NaN or infinity)")
    return SliceNormalizer(lo=at_low * slope + inter, hi=at_high * slope + inter, stats=stats, slope=slope, inter=inter)


def normalize_volume(volume: np.ndarray, stats: NormalizationStats) -> np.ndarray:
    """Clip a HU volume to its own percentiles, then z-score with the dataset statistics; float32."""
    return volume_normalizer(volume, stats)(volume)


def resize_slices(slices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (N, C, H, W) float batch bilinearly (never nearest: this is image data)."""
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    return F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=False)


def resize_scores_to_labels(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class scores (N, C, h, w) -> labels (N, H, W) uint8: resize the scores first, then argmax."""
    return resize_slices(scores, size).argmax(dim=1).to(torch.uint8)


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels (N, H, W) -> (N, h, w) uint8, each output pixel taking the label under its centre.

    "nearest-exact" uses pixel centres, as the bilinear image resize does; legacy "nearest"
    shifts labels by up to a pixel against the images wherever the size is not an integer
    multiple (768 -> 512).
    """
    if tuple(labels.shape[-2:]) != tuple(size):
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0]
    return labels.to(torch.uint8)


def network_batch(slices: np.ndarray | torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Normalised (B, H, W) slices -> contiguous (B, channels, h, w) float32 network input.

    The slice is resized once and replicated across ``channels`` (VGG's 3-channel input);
    a folded 1-channel model takes it as it is.
    """
    t = torch.as_tensor(slices, dtype=torch.float32)
    if t.dim() != 3:
        raise FlareSegError(f"expected (B, H, W) slices, got shape {tuple(t.shape)}")
    t = resize_slices(t[:, None], size)
    return t.expand(-1, channels, -1, -1).contiguous() if channels > 1 else t.contiguous()
