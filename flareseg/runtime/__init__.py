"""Runtime: batched slice inference on every backend (PyTorch, ONNX Runtime, TensorRT)."""

from flareseg.runtime.inferer import infer_volume
from flareseg.runtime.pipeline import CaseTiming, segment_file, segment_folder
from flareseg.runtime.runners import FunctionRunner, OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner, open_runner

__all__ = [
    "CaseTiming",
    "FunctionRunner",
    "OnnxRuntimeRunner",
    "Runner",
    "TensorRTRunner",
    "TorchRunner",
    "infer_volume",
    "open_runner",
    "segment_file",
    "segment_folder",
]
