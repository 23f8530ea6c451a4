"""Export: the deploy graph to verified ONNX (fp32/fp16/INT8) and TensorRT engines.

The names below are loaded on first use (PEP 562): the runtime imports
``flareseg.export.metadata`` for its types, and must not import the exporter (and onnx,
most of a second of start-up) on the way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flareseg.lazy import lazy_names

if TYPE_CHECKING:
    from flareseg.export.metadata import ExportMetadata, read_onnx_metadata, read_sidecar, sidecar_path
    from flareseg.export.onnx_export import ExportedModel, Int8AgreementError, export_onnx
    from flareseg.export.options import ExportOptions

_WHERE = {
    "ExportMetadata": "flareseg.export.metadata",
    "read_onnx_metadata": "flareseg.export.metadata",
    "read_sidecar": "flareseg.export.metadata",
    "sidecar_path": "flareseg.export.metadata",
    "ExportOptions": "flareseg.export.options",
    "ExportedModel": "flareseg.export.onnx_export",
    "Int8AgreementError": "flareseg.export.onnx_export",
    "export_onnx": "flareseg.export.onnx_export",
}

__all__ = [
    "ExportMetadata",
    "ExportOptions",
    "ExportedModel",
    "Int8AgreementError",
    "export_onnx",
    "read_onnx_metadata",
    "read_sidecar",
    "sidecar_path",
]


__getattr__, __dir__ = lazy_names(globals(), _WHERE)
