"""Checkpoints: weights plus everything inference needs to reproduce training exactly.

A checkpoint is a ``torch.save`` dictionary of plain types and tensors, loadable with
``weights_only=True`` (no pickled code runs on load). It holds the training network's
weights, its :class:`NetworkConfig`, the dataset :class:`NormalizationStats`, the label
map, the slice size and the software versions; training adds its own resumable state.
Saving is atomic: a crash during a save never corrupts the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from flareseg.atomic import AtomicOutputs, atomic_output
from flareseg.errors import FlareSegError
from flareseg.labels import LABELS
from flareseg.network import FlareUNet, NetworkConfig, build_training_network
from flareseg.preprocess import NormalizationStats
from flareseg.shapes import check_slice_size

FORMAT = "flareseg-checkpoint"
FORMAT_VERSION = 1
DEFAULT_SLICE_SIZE = (512, 512)


def software_versions() -> dict[str, str]:
    """Versions of what produced an artifact, recorded beside it."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for dist in ("flareseg", "numpy", "onnx", "onnxruntime", "tensorrt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class ModelInfo:
    """What travels with a model to every artifact made from it."""

    network: NetworkConfig
    normalization: NormalizationStats
    slice_size: tuple[int, int] = DEFAULT_SLICE_SIZE
    labels: Mapping[int, str] = field(default_factory=lambda: dict(LABELS))

    def __post_init__(self) -> None:
        check_slice_size(self.slice_size)
        if sorted(self.labels) != list(range(self.network.num_classes)):
            raise FlareSegError(
                f"label map {dict(self.labels)} does not name classes 0..{self.network.num_classes - 1}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "network": self.network.to_dict(),
            "normalization": self.normalization.to_dict(),
            "slice_size": list(self.slice_size),
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model") -> ModelInfo:
        missing = [k for k in ("network", "normalization", "slice_size", "labels") if k not in data]
        if missing:
            raise FlareSegError(f"{source}: missing {', '.join(missing)}")
        try:
            return cls(
                network=NetworkConfig.from_dict(dict(data["network"])),
                normalization=NormalizationStats.from_dict(dict(data["normalization"])),
                slice_size=(int(data["slice_size"][0]), int(data["slice_size"][1])),
                labels={int(k): str(v) for k, v in dict(data["labels"]).items()},
            )
        except FlareSegError as exc:
            raise FlareSegError(f"{source}: {exc}") from None
        except (TypeError, ValueError, IndexError) as exc:
            raise FlareSegError(f"{source}: malformed model information ({exc})") from None


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    info: ModelInfo,
    extra: Mapping[str, Any] | None = None,
    *,
    outputs: AtomicOutputs | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file in the same folder, fsync, rename).

    ``outputs``: a set the checkpoint belongs to (training's best.pt, last.pt and log), renamed with it.
    """
    path = Path(path)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **info.to_dict(),
        "state_dict": state,
        "versions": software_versions(),
    }
    if extra:
        clash = set(extra) & set(payload)
        if clash:
            raise FlareSegError(f"checkpoint extra keys {sorted(clash)} clash with the format's own keys")
        payload.update(extra)
    with atomic_output(path) if outputs is None else outputs.writing(path) as tmp, open(tmp, "wb") as f:
        writer = _KeepWriteError(f)
        try:
            torch.save(payload, cast(BinaryIO, writer))  # torch needs write() alone
        except RuntimeError:
            if writer.error is not None:  # the disk's refusal, as an OSError: said in one line naming the file
                raise writer.error from None
            raise
    return path


class _KeepWriteError:
    """A file for ``torch.save`` that keeps its first write error: torch reports a full disk as an internal
    ``RuntimeError`` ("unexpected pos"), not as the ``OSError`` that says what happened."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def checkpoint_file_problem(f: BinaryIO) -> str | None:
    """What is wrong with the open file ``f`` as a ``torch.save`` zip archive, its members' checksums included;
    None if nothing.

    torch.load reports a cut-short file as a long internal error, and reads past a flipped
    byte in the weights without noticing; the archive's own checks say both plainly.
    """
    try:
        f.seek(0)
        magic = f.read(4)
        if not magic:
            return "the checkpoint file is empty"
        if magic != b"PK\x03\x04":  # flare-train's torch.save always writes a zip archive
            return "not a flareseg checkpoint (not a torch.save zip archive)"
        with zipfile.ZipFile(f) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        return "truncated or damaged checkpoint (its zip archive is incomplete)"
    except (OSError, EOFError, zipfile.LargeZipFile) as exc:
        return f"cannot read the checkpoint ({type(exc).__name__}: {exc})"
    if damaged is not None:
        member = damaged.split("/", 1)[-1]  # every member sits under one folder ("archive" or the name)
        return f"damaged checkpoint (its member {member} fails its checksum)"
    return None


def check_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, where it names a file; a folder or a missing path is a one-line FlareSegError."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        hint = f" (it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
        raise FlareSegError(f"{path}: is a folder, not a checkpoint file; give the .pt file{hint}")
    if not path.is_file():
        raise FlareSegError(f"{path}: checkpoint not found")
    return path


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate a checkpoint's dictionary (weights on the CPU)."""
    return _read_checkpoint(path, digest=False)[0]


def read_checkpoint_and_digest(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """The checkpoint's validated dictionary, and the SHA-256 of the very bytes it was loaded from (what an export
    records as its source, whatever the path holds later)."""
    payload, sha256 = _read_checkpoint(path, digest=True)
    return payload, cast(str, sha256)


def _read_checkpoint(path: str | os.PathLike[str], digest: bool) -> tuple[dict[str, Any], str | None]:
    """The checkpoint's validated dictionary, and with ``digest`` the SHA-256 of the bytes it was loaded from.

    One open file serves the passes (archive checksums, hash, torch.load), so all of them see
    one file even if the path is replaced meanwhile (flare-train saving a new ``best.pt``); the
    later ones read it from the page cache. The checksums come first: torch.load itself reads
    past a flipped byte in the weights. The hash (60 ms at full width) is only taken where it is
    recorded: a runner's activation does without it.
    """
    path = check_checkpoint_path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise FlareSegError(f"{path}: cannot read the checkpoint: {exc.strerror or exc}") from None
    with f:
        problem = checkpoint_file_problem(f)
        if problem is not None:
            raise FlareSegError(f"{path}: {problem}")
        try:
            sha256 = _sha256_of(f) if digest else None
        except OSError as exc:
            raise FlareSegError(f"{path}: cannot read the checkpoint: {exc.strerror or exc}") from None
        f.seek(0)
        payload = _torch_load(path, f)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FlareSegError(f"{path}: not a flareseg checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise FlareSegError(
            f"{path}: checkpoint format version {payload.get('format_version')}, this flareseg reads {FORMAT_VERSION}"
        )
    if "state_dict" not in payload:
        raise FlareSegError(f"{path}: checkpoint has no weights")
    return payload, sha256


def _torch_load(path: Path, f: BinaryIO) -> Any:
    """``torch.load`` of weights only from ``f``; its many errors as one line naming ``path``."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        if isinstance(exc, pickle.UnpicklingError) and str(exc).startswith("Weights only load failed"):
            # torch's own text is a page of advice on loading code from untrusted files, cut short here
            raise FlareSegError(
                f"{path}: holds pickled Python objects (a whole model saved with torch.save?), not a flareseg "
                "checkpoint's weights"
            ) from None
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise FlareSegError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first})") from None


def load_model(
    path: str | os.PathLike[str], *, expect: NetworkConfig | None = None
) -> tuple[FlareUNet, ModelInfo, dict[str, Any]]:
    """The training network with the checkpoint's weights (eval mode), its info, and the raw payload.

    ``expect`` refuses a checkpoint whose network differs (classes, width, channels).
    """
    payload = read_checkpoint(path)
    return (*network_of(payload, path, expect=expect), payload)


def network_of(
    payload: Mapping[str, Any], path: str | os.PathLike[str], *, expect: NetworkConfig | None = None
) -> tuple[FlareUNet, ModelInfo]:
    """The training network (eval mode) with the weights of a checkpoint's payload read from ``path``, and its info.

    ``expect`` refuses a checkpoint whose network differs (classes, width, channels).
    """
    info = ModelInfo.from_dict(payload, source=str(path))
    if expect is not None and expect != info.network:
        diffs = [
            f"{k}: checkpoint {v}, expected {getattr(expect, k)}"
            for k, v in info.network.to_dict().items()
            if getattr(expect, k) != v
        ]
        raise FlareSegError(f"{path}: network does not match ({'; '.join(diffs)})")
    try:
        model = build_training_network(info.network, state=payload["state_dict"])
    except RuntimeError as exc:
        # torch: "Error(s) in loading state_dict for FlareUNet:", then one line per tensor; the first of those says it.
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines or [""])[0]
        raise FlareSegError(f"{path}: weights do not fit the recorded network ({first[:200]})") from None
    return model.eval(), info


def file_sha256(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return _sha256_of(f)


def _sha256_of(f: BinaryIO) -> str:
    """The SHA-256 (hex) of ``f`` from its start."""
    f.seek(0)
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()
