"""What an exported model carries: embedded in the ONNX (metadata_props) and in a JSON sidecar.

Inference reads the dataset statistics, slice size, input channels and output kind from
here, never from the input volume, so deployment reproduces training's pre-processing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flareseg.checkpoint import ModelInfo
from flareseg.errors import FlareSegError
from flareseg.export.options import OutputKind

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
METADATA_KEY = "flareseg"
SIDECAR_SUFFIX = ".json"
#: The sidecar's record of its ONNX file's own SHA-256, which the embedded copy cannot hold (it is part of the file).
FILE_SHA256_KEY = "file_sha256"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportMetadata:
    model: ModelInfo
    input_channels: int
    output_kind: OutputKind
    #: dtype of the labels output when ``output_kind == "labels"``.
    label_dtype: str | None
    precision: Precision
    batch_profile: tuple[int, int, int]
    source_checkpoint_sha256: str
    versions: Mapping[str, str] = field(default_factory=dict)
    #: Verification figures measured at export (max logit difference, argmax agreement...).
    verification: Mapping[str, Any] = field(default_factory=dict)
    input_name: str = "image"
    #: INT8 only: quantiser and its settings, the layers kept in float, the calibration data.
    quantization: Mapping[str, Any] = field(default_factory=dict)
    #: The checkpoint's own slice size, where the export was made at another (``--size``).
    trained_slice_size: tuple[int, int] | None = None

    @property
    def output_name(self) -> str:
        return self.output_kind

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "flareseg-export",
            "model": self.model.to_dict(),
            "input_name": self.input_name,
            "input_channels": self.input_channels,
            "output_kind": self.output_kind,
            "label_dtype": self.label_dtype,
            "precision": self.precision,
            "batch_profile": list(self.batch_profile),
            "source_checkpoint_sha256": self.source_checkpoint_sha256,
            "versions": dict(self.versions),
            "verification": dict(self.verification),
            # Only quantised models carry the key, so fp32/fp16 metadata is unchanged.
            **({"quantization": dict(self.quantization)} if self.quantization else {}),
            **({"trained_slice_size": list(self.trained_slice_size)} if self.trained_slice_size else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model") -> ExportMetadata:
        # Parsed JSON may be any value; only an object can hold the metadata.
        if not isinstance(data, Mapping):
            raise FlareSegError(f"{source}: export metadata is not a JSON object (got {type(data).__name__})")
        if data.get("format") != "flareseg-export":
            raise FlareSegError(f"{source}: no flareseg export metadata")
        try:
            lo, opt, hi = (int(v) for v in data["batch_profile"])
            return cls(
                model=ModelInfo.from_dict(data["model"], source=source),
                input_name=str(data.get("input_name", "image")),
                input_channels=int(data["input_channels"]),
                output_kind=_choice(data["output_kind"], ("logits", "labels"), "output_kind"),
                label_dtype=data.get("label_dtype"),
                precision=_choice(data["precision"], PRECISIONS, "precision"),
                batch_profile=(lo, opt, hi),
                source_checkpoint_sha256=str(data["source_checkpoint_sha256"]),
                versions=dict(data.get("versions", {})),
                verification=dict(data.get("verification", {})),
                quantization=dict(data.get("quantization", {})),
                trained_slice_size=_size_or_none(data.get("trained_slice_size")),
            )
        except KeyError as exc:
            raise FlareSegError(f"{source}: export metadata lacks {exc}") from None
        except (TypeError, ValueError) as exc:
            raise FlareSegError(f"{source}: malformed export metadata ({exc})") from None

    def with_verification(self, figures: Mapping[str, Any]) -> ExportMetadata:
        return dataclasses.replace(self, verification=dict(figures))


def _size_or_none(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    h, w = (int(v) for v in value)
    return h, w


def _choice(value: Any, allowed: tuple[str, ...], name: str) -> Any:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def sidecar_path(artifact: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (never overwrites the artifact)."""
    p = Path(artifact)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def embed_in_onnx(model: Any, meta: ExportMetadata) -> None:
    """Put the metadata in the ONNX model's metadata_props (replacing an earlier copy)."""
    props = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta.to_dict(), sort_keys=True)


def read_onnx_metadata(path: str | os.PathLike[str]) -> ExportMetadata:
    """The metadata embedded in an ONNX file, read without the ``onnx`` package (see :func:`onnx_metadata_props`)."""
    path = Path(path)
    if not path.is_file():
        raise FlareSegError(f"{path}: model not found")
    props = onnx_metadata_props(path)
    if METADATA_KEY not in props:
        raise FlareSegError(f"{path}: no flareseg metadata in this ONNX model (export it with flare-export)")
    try:
        data = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise FlareSegError(f"{path}: corrupt flareseg metadata ({exc})") from None
    if not isinstance(data, dict):
        raise FlareSegError(f"{path}: flareseg metadata is not a JSON object (got {type(data).__name__})")
    return ExportMetadata.from_dict(data, source=str(path))


#: ModelProto's ``metadata_props`` field, and the key and value fields of its StringStringEntryProto (onnx.proto).
_METADATA_PROPS_FIELD, _KEY_FIELD, _VALUE_FIELD = 14, 1, 2


def onnx_metadata_props(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props``, read from the protobuf wire format of its top-level message.

    Runners need only these few hundred bytes; ``onnx.load`` would cost the ``onnx`` import
    (about 0.7 s) and a parse of the whole graph with its weights. The graph and every other
    field are skipped by their length, on a memory map, so their bytes are never read.
    """
    import mmap

    try:
        if path.stat().st_size == 0:
            raise FlareSegError(f"{path}: not an ONNX model (the file is empty)")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            props: dict[str, str] = {}
            for number, value in _fields(data, 0, len(data)):
                if number == _METADATA_PROPS_FIELD and isinstance(value, tuple):
                    entry = {n: v for n, v in _fields(data, *value) if isinstance(v, tuple)}
                    key, text = (bytes(data[slice(*entry.get(n, (0, 0)))]).decode() for n in (_KEY_FIELD, _VALUE_FIELD))
                    props.setdefault(key, text)  # the first of a repeated key, as a loop over the props finds
            return props
    except (ValueError, IndexError, UnicodeDecodeError) as exc:  # a broken message, text that is not UTF-8
        raise FlareSegError(f"{path}: not an ONNX model ({exc})") from None
    except OSError as exc:
        raise FlareSegError(f"{path}: cannot read the model ({exc.strerror or exc})") from None


def _fields(data: Any, start: int, end: int) -> Iterator[tuple[int, int | tuple[int, int]]]:
    """(field number, value) of a protobuf message in ``data[start:end]``: a number for a varint or fixed-size
    field, (start, end) of the bytes of a length-delimited one."""
    i = start
    while i < end:
        key, i = _varint(data, i, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {i}")
        if wire == 0:
            value, i = _varint(data, i, end)
            yield number, value
        elif wire in (1, 5):  # 64- and 32-bit fixed
            i += 8 if wire == 1 else 4
            yield number, 0
        elif wire == 2:
            length, i = _varint(data, i, end)
            if i + length > end:  # checked before its bytes are read: a cut-short file loses its tail first
                raise ValueError("a field runs past the end of its message (cut short?)")
            yield number, (i, i + length)
            i += length
        else:  # groups (3, 4) are not in ONNX's schema; 6 and 7 do not exist
            raise ValueError(f"wire type {wire} at byte {i}")
        if i > end:
            raise ValueError("a field runs past the end of its message (cut short?)")


def _varint(data: Any, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError(f"a broken varint at byte {i}")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


def sidecar_text(data: Mapping[str, Any]) -> str:
    return json.dumps(dict(data), indent=2, sort_keys=True) + "\n"


def check_graph_input(artifact: str | os.PathLike[str], meta: ExportMetadata, dims: Sequence[int | None]) -> None:
    """Refuse a graph whose declared input (None for a dynamic axis) is not the (batch, channels, H, W) of its
    metadata: the runners size every batch from the metadata, so the first would fail inside the runtime."""
    h, w = meta.model.slice_size
    expected = (None, meta.input_channels, h, w)
    if len(dims) != 4 or any(d is not None and e is not None and d != e for d, e in zip(dims, expected, strict=True)):
        shown = " x ".join("N" if d is None else str(d) for d in dims)
        raise FlareSegError(
            f"{artifact}: the graph takes {shown} input, where its flareseg metadata says N x {meta.input_channels} "
            f"x {h} x {w}: the metadata was edited or carried over from another model; export it again"
        )


def recorded_file_sha256(artifact: str | os.PathLike[str]) -> str | None:
    """The SHA-256 of an ONNX model as its export wrote it, from its sidecar; None without a sidecar, or one that
    records none (an export older than the record). An unreadable sidecar is said in a warning, and gives None."""
    if not sidecar_path(artifact).is_file():
        log.debug("%s: no sidecar %s beside it: its SHA-256 is not checked", artifact, sidecar_path(artifact).name)
        return None
    try:
        data = read_sidecar(artifact)
    except FlareSegError as exc:
        log.warning("%s; the model's content is not checked against it", exc)
        return None
    recorded = data.get(FILE_SHA256_KEY)
    return recorded if isinstance(recorded, str) else None


def check_file_sha256(artifact: str | os.PathLike[str], actual: str, recorded: str | None) -> None:
    """Refuse an ONNX model whose SHA-256 is not the one its sidecar recorded at export.

    ONNX files carry no checksum: a copy damaged in place, same length, runs and gives wrong labels.
    """
    if recorded is not None and actual != recorded:
        raise FlareSegError(
            f"{artifact}: its SHA-256 is {actual[:16]}..., where its sidecar {sidecar_path(artifact).name} recorded "
            f"{recorded[:16]}... at export: the file was damaged or changed since, or the sidecar is another "
            "export's; copy or export the model again"
        )


def read_sidecar(artifact: str | os.PathLike[str]) -> dict[str, Any]:
    path = sidecar_path(artifact)
    if not path.is_file():
        raise FlareSegError(f"{artifact}: its sidecar {path.name} is missing (it must sit beside the model)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FlareSegError(f"{path}: unreadable sidecar ({exc})") from None
    if not isinstance(data, dict):
        raise FlareSegError(f"{path}: sidecar is not a JSON object")
    return data
