"""Export: the deploy graph to verified ONNX (fp32/fp16/INT8) and TensorRT engines."""

from flareseg.export.metadata import ExportMetadata, read_onnx_metadata, read_sidecar, sidecar_path
from flareseg.export.onnx_export import ExportedModel, ExportOptions, Int8AgreementError, export_onnx

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
