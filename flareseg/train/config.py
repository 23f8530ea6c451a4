"""Training configuration: every hyper-parameter, recorded as JSON in the run directory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flareseg.cli import is_device_name
from flareseg.errors import FlareSegError

#: The FLARE21 layout's image folder: how a data folder is recognised when it is searched for.
_IMAGE_FOLDER = "TrainingImg"


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


#: The settings that must be integers (bool, though an int to Python, is refused).
_INTEGER_FIELDS = ("base_width", "epochs", "batch_size", "val_cases", "workers", "seed", "accumulate", "val_batch_size")

#: What a run folder holds once training has begun; a new run refuses a folder that has any of them.
RUN_OUTPUTS = ("last.pt", "best.pt", "log.jsonl")


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's augmentation ranges (Table 3); the same transform for image and mask."""

    rotation_deg: float = 20.0
    translation: float = 0.2  # fraction of the slice size, on each axis
    scale: tuple[float, float] = (0.8, 1.2)
    shear_deg: float = 20.0
    probability: float = 1.0  # share of samples that are augmented

    def __post_init__(self) -> None:
        # Each test is written so that NaN fails it (NaN compares False with everything).
        low, high = self.scale if len(self.scale) == 2 else (math.nan, math.nan)
        checks = (
            ("rotation --rotation", self.rotation_deg, "degrees >= 0", self.rotation_deg >= 0),
            (
                "shift --translation",
                self.translation,
                "a fraction of the slice size in [0, 1)",
                0 <= self.translation < 1,
            ),
            ("scale range --scale", self.scale, "LOW,HIGH with 0 < LOW <= HIGH", 0 < low <= high),
            ("shear --shear", self.shear_deg, "degrees in [0, 90)", 0 <= self.shear_deg < 90),  # tan(90) is none
            ("probability --augment-prob", self.probability, "a share in [0, 1]", 0 <= self.probability <= 1),
        )
        for what, value, expected, ok in checks:
            finite = _finite(*value) if isinstance(value, tuple) else _finite(value)
            if not (ok and finite):
                shown = ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"
                raise FlareSegError(f"augmentation {what} {shown}: expected {expected}, finite")


def check_loss_weights(weights: tuple[float, ...]) -> None:
    """Five finite, non-negative weights, the final output's above 0 (else the output layer learns nothing)."""
    if len(weights) != 5 or not _finite(*weights) or min(weights) < 0:
        raise FlareSegError(f"loss weights must be 5 finite numbers >= 0 (final,aux1..aux4), got {weights}")
    if not weights[0] > 0:
        raise FlareSegError(
            f"the final output's loss weight must be > 0, got {weights}: with 0 the output layer learns nothing"
        )


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
    #: Optimiser steps per epoch; None means one pass over all training slices.
    steps_per_epoch: int | None = None
    val_batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("data", "out"):  # a library caller's Path is as good as a str (config.json records the str)
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        self._check_types()
        checks = {  # name: (holds, what is expected)
            "base_width": (self.base_width >= 1, ">= 1"),
            "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (math.isfinite(self.lr) and self.lr > 0, "finite, > 0"),
            "val_cases": (self.val_cases >= 0, ">= 0"),
            "workers": (self.workers >= 0, ">= 0"),
            "accumulate": (self.accumulate >= 1, ">= 1"),
            "steps_per_epoch": (self.steps_per_epoch is None or self.steps_per_epoch >= 1, ">= 1"),
            "val_batch_size": (self.val_batch_size >= 1, ">= 1"),
        }
        bad = [f"{k}={getattr(self, k)!r} (expected {expected})" for k, (ok, expected) in checks.items() if not ok]
        if bad:
            raise FlareSegError(f"invalid training settings: {', '.join(bad)}")
        check_loss_weights(self.loss_weights)
        if not is_device_name(self.device):  # whether that device exists is checked when training starts
            raise FlareSegError(f"--device {self.device}: expected cpu, cuda or cuda:N")
        if self.amp and not self.device.startswith("cuda"):
            raise FlareSegError("--amp (mixed precision) needs a CUDA device")

    def _check_types(self) -> None:
        """A config read back from JSON may hold anything: each field's type, before any value is compared."""

        def integer(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool)

        wrong = [
            name
            for name, ok in (
                ("data", isinstance(self.data, str)),
                ("out", isinstance(self.out, str)),
                ("device", isinstance(self.device, str)),
                ("slice_size", isinstance(self.slice_size, tuple) and all(map(integer, self.slice_size))),
                ("loss_weights", isinstance(self.loss_weights, tuple) and all(map(number, self.loss_weights))),
                ("augment", isinstance(self.augment, AugmentConfig)),
                ("val_list", isinstance(self.val_list, tuple) and all(isinstance(v, str) for v in self.val_list)),
                ("lr", number(self.lr)),
                ("steps_per_epoch", self.steps_per_epoch is None or integer(self.steps_per_epoch)),
                *((k, integer(getattr(self, k))) for k in _INTEGER_FIELDS),
                *((k, isinstance(getattr(self, k), bool)) for k in ("amp", "channels_last", "cudnn_benchmark")),
            )
            if not ok
        ]
        if wrong:
            raise FlareSegError(
                "invalid training settings: " + ", ".join(f"{k}={getattr(self, k)!r} (wrong type)" for k in wrong)
            )
        if len(self.slice_size) != 2:
            raise FlareSegError(f"invalid training settings: slice_size={self.slice_size!r} (expected height, width)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        d = dict(data)
        try:
            aug = d.pop("augment", {})
            if not isinstance(aug, dict):
                raise FlareSegError(f"invalid training config: augment={aug!r} (expected an object of settings)")
            aug = dict(aug)
            if isinstance(aug.get("scale"), list):
                aug["scale"] = tuple(aug["scale"])
            for key in ("slice_size", "loss_weights", "val_list"):
                if isinstance(d.get(key), list):  # JSON's arrays; anything else is left for the type check
                    d[key] = tuple(d[key])
            if d.get("steps_per_epoch") == 0:  # configs written before None meant "one full pass"
                d["steps_per_epoch"] = None
            return cls(augment=AugmentConfig(**aug), **d)
        except (TypeError, ValueError) as exc:  # an unknown key, or an "augment" that is not an object
            raise FlareSegError(f"invalid training config: {exc}") from None

    @classmethod
    def load(cls, run_dir: str | Path) -> TrainConfig:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise FlareSegError(f"{run_dir}: no config.json, not a flare-train run directory")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FlareSegError(f"{path}: unreadable config ({exc})") from None
        except OSError as exc:
            raise FlareSegError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if not isinstance(data, dict):
            raise FlareSegError(f"{path}: not a training config (expected a JSON object)")
        try:
            return cls.from_dict(data)
        except FlareSegError as exc:
            raise FlareSegError(f"{path}: {exc}") from None


def absolute(path: str | os.PathLike[str]) -> str:
    """An absolute, normalised path (symbolic links kept: the path the user named)."""
    return os.path.abspath(os.fspath(path))


def locate_data(config: TrainConfig, run_dir: str | os.PathLike[str]) -> str:
    """The absolute data folder of a run found in ``run_dir``.

    New configs record it absolute. Older ones recorded ``data`` and ``out`` relative to
    the working directory of the first run: that directory is ``run_dir`` less as many
    trailing parts as ``out`` had (it still holds if the run folder was renamed or moved
    along with its data), then the current directory is tried.
    """
    data = Path(config.data)
    if data.is_absolute():
        candidates = [data]
    else:
        candidates = []
        out = Path(config.out)
        run = Path(absolute(run_dir))
        if not out.is_absolute() and ".." not in out.parts and len(out.parts) <= len(run.parents):
            written_from = run.parents[len(out.parts) - 1] if out.parts else run
            candidates.append(written_from / data)
        candidates.append(Path.cwd() / data)
    for candidate in candidates:
        if (candidate / _IMAGE_FOLDER).is_dir():
            return absolute(candidate)
    tried = ", ".join(dict.fromkeys(absolute(c) for c in candidates))
    raise FlareSegError(
        f"{Path(run_dir) / 'config.json'}: the run's training data {config.data} are not found (looked in {tried}); "
        "give their folder with --data"
    )
