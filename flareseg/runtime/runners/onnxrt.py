"""Exported ONNX models in ONNX Runtime; the requested execution provider must be the one that runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flareseg.errors import FlareSegError
from flareseg.runtime.runners.base import OrtProvider, Runner

_ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a clear error saying which package to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FlareSegError(
            "ONNX Runtime is not installed: `pip install 'flareseg[cpu]'` for the CPU build, "
            "or `pip install 'flareseg[gpu]'` for the CUDA build (never both)"
        ) from None
    return ort


class OnnxRuntimeRunner(Runner):
    """An exported ONNX model in ONNX Runtime; the requested provider must be the one that runs."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        provider: OrtProvider = "cpu",
        threads: int | None = None,
        device_id: int = 0,
    ) -> None:
        super().__init__()
        if provider not in _ORT_PROVIDERS:
            raise FlareSegError(f"ONNX Runtime provider must be one of {sorted(_ORT_PROVIDERS)}, got {provider!r}")
        if threads is not None and threads < 1:
            raise FlareSegError(f"threads must be positive, got {threads}")
        self.path = Path(model)
        self.provider = provider
        self.threads = threads
        self.device = torch.device("cpu") if provider == "cpu" else torch.device("cuda", device_id)
        self.device_id = device_id

    def describe(self) -> str:
        threads = self.threads or "auto"
        return f"ONNX Runtime ({_ORT_PROVIDERS[self.provider]}, {self.meta.precision}, {threads} threads)"

    def _activate(self) -> None:
        from flareseg.export.metadata import read_onnx_metadata

        ort = import_onnxruntime()
        self.meta = read_onnx_metadata(self.path)
        self.info, self.input_channels, self.output_kind = (
            self.meta.model,
            self.meta.input_channels,
            self.meta.output_kind,
        )
        wanted = _ORT_PROVIDERS[self.provider]
        available = ort.get_available_providers()
        if wanted not in available:
            raise FlareSegError(
                f"ONNX Runtime provider {wanted} is not available here (available: {', '.join(available)}); "
                "GPU providers need `pip install 'flareseg[gpu]'`"
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        providers: list[Any] = (
            [wanted] if wanted == "CPUExecutionProvider" else [(wanted, {"device_id": self.device_id})]
        )
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        running = self.session.get_providers()
        if not running or running[0] != wanted:
            raise FlareSegError(f"{self.path}: ONNX Runtime runs {running[:1]} instead of the requested {wanted}")
        self._output_name = self.session.get_outputs()[0].name
        self._input_name = self.session.get_inputs()[0].name

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            arr = batch.detach().to(torch.float32).contiguous().numpy()
            return torch.from_numpy(self.session.run([self._output_name], {self._input_name: arr})[0])
        # GPU providers: bind torch device memory directly, no host round trip.
        x = batch.detach().to(device=self.device, dtype=torch.float32).contiguous()
        n, _, h, w = x.shape
        if self.output_kind == "labels":
            out = torch.empty((n, h, w), device=self.device, dtype=_label_torch_dtype(self.meta.label_dtype))
        else:
            out = torch.empty((n, self.info.network.num_classes, h, w), device=self.device, dtype=torch.float32)
        binding = self.session.io_binding()
        binding.bind_input(self._input_name, "cuda", self.device_id, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(
            self._output_name, "cuda", self.device_id, _np_dtype(out.dtype), tuple(out.shape), out.data_ptr()
        )
        torch.cuda.current_stream(self.device).synchronize()  # the input must be ready before ORT's own stream reads it
        self.session.run_with_iobinding(binding)
        return out

    def _deactivate(self) -> None:
        self.session = None


def _label_torch_dtype(name: str | None) -> torch.dtype:
    return torch.int32 if name == "int32" else torch.uint8


def _np_dtype(dtype: torch.dtype) -> Any:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.uint8: np.uint8, torch.int32: np.int32}[dtype]
