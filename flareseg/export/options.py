"""What an export is asked for: :class:`ExportOptions` and the defaults it and ``flare-export`` share.

Kept apart from the exporter, which imports torch and onnx, so that ``flare-export --help``
and option errors answer at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from flareseg.errors import FlareSegError

OutputKind = Literal["logits", "labels"]
LabelDType = Literal["uint8", "int32"]
Quantizer = Literal["onnxruntime", "nncf"]
#: Layers that may stay in float: the first convolution (raw intensities in), the last
#: one (logits out, where argmax ties are decided) and the bilinear Resizes.
FloatLayer = Literal["first-conv", "last-conv", "resize"]
FLOAT_LAYERS: tuple[FloatLayer, ...] = ("first-conv", "last-conv", "resize")

DEFAULT_OPSET = 18
#: The oldest opset exported (ONNX's Resize and the exporter's own lowering need 17 or later).
MIN_OPSET = 17
#: Picked by measurement (benchmarks/cpu_paths.md): speed on the target runtimes and label agreement.
DEFAULT_QUANTIZER: Quantizer = "onnxruntime"
DEFAULT_MIN_AGREEMENT = 0.99
DEFAULT_CALIBRATION_SLICES = 16
DEFAULT_HELD_OUT_SLICES = 8
#: Tried in order until one meets the agreement threshold: first the fastest graph that
#: met it in our measurements, then everything sensitive kept in float.
DEFAULT_FLOAT_LADDER: tuple[tuple[FloatLayer, ...], ...] = (
    ("first-conv", "last-conv"),
    ("first-conv", "last-conv", "resize"),
)
DEFAULT_WORKSPACE_MIB = 4096


def max_opset() -> int:
    """The newest ONNX opset the installed onnx package defines; the exporter quietly writes 18 for any later one."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_batch_profile(profile: tuple[int, int, int]) -> tuple[int, int, int]:
    """A batch profile (min, opt, max) that ONNX Runtime's and TensorRT's builders accept, or a FlareSegError."""
    lo, opt, hi = profile
    if not 1 <= lo <= opt <= hi:
        raise FlareSegError(f"batch profile must satisfy 1 <= min <= opt <= max, got {lo},{opt},{hi}")
    return lo, opt, hi


@dataclass(frozen=True)
class ExportOptions:
    fp16: bool = False
    fold_input: bool = True
    output_kind: OutputKind = "logits"
    label_dtype: LabelDType = "uint8"
    batch_profile: tuple[int, int, int] = (1, 8, 32)
    slice_size: tuple[int, int] | None = None  # None: the checkpoint's
    opset: int = DEFAULT_OPSET
    verify_slices: int = 8
    name: str = "flareseg"
    int8: bool = False
    #: INT8: fraction of held-out voxels whose label must equal fp32 PyTorch's.
    int8_min_agreement: float = DEFAULT_MIN_AGREEMENT
    calibration_slices: int = DEFAULT_CALIBRATION_SLICES
    held_out_slices: int = DEFAULT_HELD_OUT_SLICES
    quantizer: Quantizer = DEFAULT_QUANTIZER
    #: Float-layer sets tried in order until one meets the threshold (see flareseg.export.int8).
    int8_float_ladder: tuple[tuple[FloatLayer, ...], ...] = DEFAULT_FLOAT_LADDER

    def __post_init__(self) -> None:
        check_batch_profile(self.batch_profile)
        # onnx >= 1.16 (a dependency) knows opset 21, so only a newer one than the default needs onnx imported.
        if self.opset < MIN_OPSET or (self.opset > DEFAULT_OPSET and self.opset > max_opset()):
            raise FlareSegError(
                f"opset {self.opset} is not one the exporter writes: choose {MIN_OPSET} to {max_opset()} "
                "(the newest this onnx package knows)"
            )
        if not self.name or any(sep in self.name for sep in ("/", "\\", os.sep, os.altsep or "/", "\0")):
            raise FlareSegError(
                f"name {self.name!r}: give a file name stem, not empty and without path separators "
                "(the models are written inside the output folder)"
            )
        if self.name.startswith("."):  # "." and ".." gave hidden files (._fp32.onnx, an AppleDouble name)
            raise FlareSegError(f"name {self.name!r}: a stem starting with '.' gives hidden files; give a plain name")
        if self.output_kind not in ("logits", "labels"):
            raise FlareSegError(f"output kind must be 'logits' or 'labels', got {self.output_kind!r}")
        if self.label_dtype not in ("uint8", "int32"):
            raise FlareSegError(f"label dtype must be 'uint8' or 'int32', got {self.label_dtype!r}")
        if self.verify_slices < 1:
            raise FlareSegError("at least one real slice is needed to verify an export")
        if not 0.0 <= self.int8_min_agreement <= 1.0:
            raise FlareSegError(f"INT8 minimum agreement must lie in [0, 1], got {self.int8_min_agreement}")
        if self.quantizer not in ("onnxruntime", "nncf"):
            raise FlareSegError(f"quantizer must be onnxruntime or nncf, got {self.quantizer!r}")
        if self.int8 and (self.calibration_slices < 1 or self.held_out_slices < 1):
            raise FlareSegError("INT8 needs at least one calibration slice and one held-out slice")
        if not self.int8_float_ladder:
            raise FlareSegError("INT8 needs at least one set of float layers to try (it may be empty)")
