"""TensorRT engines: execute_async_v3 on the runner's own CUDA stream, device buffers owned by torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from flareseg.errors import FlareSegError
from flareseg.runtime.runners.base import Runner, cuda_device


class TensorRTRunner(Runner):
    """A TensorRT engine: execute_async_v3 on its own CUDA stream, device buffers owned by torch."""

    def __init__(self, engine: str | os.PathLike[str], *, device: str | torch.device = "cuda") -> None:
        super().__init__()
        self.path = Path(engine)
        self.device = cuda_device(device)
        if self.device.type != "cuda":
            raise FlareSegError("TensorRT engines run on a CUDA device")

    def describe(self) -> str:
        return f"TensorRT ({self.meta.precision}, {self.device})"

    def _activate(self) -> None:
        from flareseg.export.tensorrt import import_tensorrt, load_engine

        trt = import_tensorrt()
        with torch.cuda.device(self.device):
            self.engine, self.meta = load_engine(self.path)
            self.context = self.engine.create_execution_context()
        self.info, self.input_channels, self.output_kind = (
            self.meta.model,
            self.meta.input_channels,
            self.meta.output_kind,
        )
        self.max_batch = self.meta.batch_profile[2]
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise FlareSegError(f"{self.path}: expected one input and one output, found {inputs} -> {outputs}")
        self._in, self._out = inputs[0], outputs[0]
        self._out_dtype = _trt_to_torch(trt, self.engine.get_tensor_dtype(self._out))
        self.stream = torch.cuda.Stream(self.device)
        self._outputs: dict[int, torch.Tensor] = {}  # by batch size: no allocation per batch after warm-up

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to(device=self.device, dtype=torch.float32).contiguous()
        n = int(x.shape[0])
        self.context.set_input_shape(self._in, tuple(x.shape))
        out = self._outputs.get(n)
        if out is None:
            out = torch.empty(
                tuple(self.context.get_tensor_shape(self._out)), device=self.device, dtype=self._out_dtype
            )
            self._outputs[n] = out
        self.context.set_tensor_address(self._in, x.data_ptr())
        self.context.set_tensor_address(self._out, out.data_ptr())
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise FlareSegError(f"{self.path}: TensorRT execution failed")
        current.wait_stream(self.stream)
        x.record_stream(self.stream)
        return out

    def _deactivate(self) -> None:
        self.context = None
        self.engine = None
        self._outputs = {}


def _trt_to_torch(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.uint8: torch.uint8}
    if dtype not in table:
        raise FlareSegError(f"unsupported TensorRT output type {dtype}")
    return table[dtype]
