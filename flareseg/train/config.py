"""Training configuration: every hyper-parameter, recorded as JSON in the run directory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flareseg.errors import FlareSegError


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's augmentation ranges (Table 3); the same transform for image and mask."""

    rotation_deg: float = 20.0
    translation: float = 0.2  # fraction of the slice size, on each axis
    scale: tuple[float, float] = (0.8, 1.2)
    shear_deg: float = 20.0
    probability: float = 1.0  # share of samples that are augmented

    def __post_init__(self) -> None:
        if self.rotation_deg < 0 or self.shear_deg < 0 or not 0 <= self.translation < 1:
            raise FlareSegError(f"invalid augmentation ranges {self}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise FlareSegError(f"augmentation scale range must satisfy 0 < low <= high, got {self.scale}")
        if not 0 <= self.probability <= 1:
            raise FlareSegError(f"augmentation probability must be in [0, 1], got {self.probability}")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the paper's protocol (Table 3)."""

    data: str
    out: str
    base_width: int = 64
    slice_size: tuple[int, int] = (512, 512)
    epochs: int = 100
    batch_size: int = 4
    lr: float = 1e-5
    loss_weights: tuple[float, float, float, float, float] = (1.0, 0.8, 0.7, 0.6, 0.5)
    augment: AugmentConfig = AugmentConfig()
    val_cases: int = 10
    val_list: tuple[str, ...] = ()
    workers: int = 2
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False
    #: Micro-batches per optimiser step (gradient accumulation; also what a DDP run equals).
    accumulate: int = 1
    #: Optimiser steps per epoch; 0 means one pass over all training slices.
    steps_per_epoch: int = 0
    val_batch_size: int = 8

    def __post_init__(self) -> None:
        checks = {
            "base_width": self.base_width >= 1,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "val_cases": self.val_cases >= 0,
            "workers": self.workers >= 0,
            "accumulate": self.accumulate >= 1,
            "steps_per_epoch": self.steps_per_epoch >= 0,
            "val_batch_size": self.val_batch_size >= 1,
            "loss_weights": len(self.loss_weights) == 5 and min(self.loss_weights) >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise FlareSegError(f"invalid training settings: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
        if self.amp and not self.device.startswith("cuda"):
            raise FlareSegError("--amp (mixed precision) needs a CUDA device")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        d = dict(data)
        try:
            aug = dict(d.pop("augment", {}))
            if "scale" in aug:
                aug["scale"] = tuple(aug["scale"])
            for key in ("slice_size", "loss_weights", "val_list"):
                if key in d:
                    d[key] = tuple(d[key])
            return cls(augment=AugmentConfig(**aug), **d)
        except TypeError as exc:
            raise FlareSegError(f"invalid training config: {exc}") from None

    @classmethod
    def load(cls, run_dir: str | Path) -> TrainConfig:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise FlareSegError(f"{run_dir}: no config.json, not a flare-train run directory")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise FlareSegError(f"{path}: unreadable config ({exc})") from None
