"""Runtime: batched slice inference on every backend (PyTorch, ONNX Runtime, TensorRT).

The names below are loaded on first use (PEP 562), so that importing a submodule, such
as ``flareseg.runtime.cli`` for ``flare-infer``, does not import torch on the way: the
command's start-up timeline then tells the interpreter's start from torch's import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flareseg.lazy import lazy_names

if TYPE_CHECKING:
    from flareseg.runtime.inferer import infer_volume
    from flareseg.runtime.pipeline import CaseTiming, list_inputs, segment_array, segment_file, segment_folder
    from flareseg.runtime.runners import (
        FunctionRunner,
        OnnxRuntimeRunner,
        OpenVINORunner,
        Runner,
        TensorRTRunner,
        TorchRunner,
        open_runner,
    )

_WHERE = {
    "infer_volume": "flareseg.runtime.inferer",
    "CaseTiming": "flareseg.runtime.pipeline",
    "list_inputs": "flareseg.runtime.pipeline",
    "segment_array": "flareseg.runtime.pipeline",
    "segment_file": "flareseg.runtime.pipeline",
    "segment_folder": "flareseg.runtime.pipeline",
    "FunctionRunner": "flareseg.runtime.runners",
    "OnnxRuntimeRunner": "flareseg.runtime.runners",
    "OpenVINORunner": "flareseg.runtime.runners",
    "Runner": "flareseg.runtime.runners",
    "TensorRTRunner": "flareseg.runtime.runners",
    "TorchRunner": "flareseg.runtime.runners",
    "open_runner": "flareseg.runtime.runners",
}

__all__ = [
    "CaseTiming",
    "FunctionRunner",
    "OnnxRuntimeRunner",
    "OpenVINORunner",
    "Runner",
    "TensorRTRunner",
    "TorchRunner",
    "infer_volume",
    "list_inputs",
    "open_runner",
    "segment_array",
    "segment_file",
    "segment_folder",
]


__getattr__, __dir__ = lazy_names(globals(), _WHERE)
