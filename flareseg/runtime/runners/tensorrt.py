"""TensorRT engines: execute_async_v3 on the runner's own CUDA stream, device buffers owned by torch.

The batch range comes from the engine's optimisation profile: batches outside it are
refused before TensorRT sees them (below the minimum TensorRT would otherwise keep running
the previous shape). The output buffer is allocated once, at the profile's maximum batch;
``infer`` returns a view of its first rows, valid until the next ``infer`` call (clone it
to keep it). Every call runs with the runner's GPU current, so ``cuda:1`` works.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from flareseg.errors import FlareSegError
from flareseg.runtime.runners.base import Runner, cuda_device


class CudaCalls:
    """The CUDA calls the runner makes, for its own device, in one place (tests substitute a CPU stand-in)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def scope(self) -> AbstractContextManager[Any]:
        return torch.cuda.device(self.device)

    def new_stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.detach().to(device=self.device, dtype=torch.float32).contiguous()

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)  # the allocator must not reuse it before TensorRT has read it


class TensorRTRunner(Runner):
    """A TensorRT engine: execute_async_v3 on its own CUDA stream, device buffers owned by torch."""

    #: Smallest batch the engine's profile accepts (set on activation).
    min_batch: int = 1

    def __init__(self, engine: str | os.PathLike[str], *, device: str | torch.device = "cuda") -> None:
        super().__init__()
        self.path = self.model_file = Path(engine)
        try:
            self.device = cuda_device(device)
        except FlareSegError as exc:
            raise FlareSegError(f"{self.path}: a TensorRT engine runs on a CUDA GPU; {exc}") from None
        if self.device.type != "cuda":
            raise FlareSegError(f"{self.path}: a TensorRT engine runs on a CUDA GPU, not on the CPU (device {device})")
        self.cuda = CudaCalls(self.device)
        self.engine: Any = None
        self.context: Any = None
        self.stream: Any = None
        self._output = torch.empty(0)

    def _describe(self) -> str:
        return f"TensorRT ({self.meta.precision}, {self.device})"

    def _activate(self) -> None:
        from flareseg.export.tensorrt import import_tensorrt, load_engine

        trt = import_tensorrt()
        with self.cuda.scope():
            self.engine, self.meta = load_engine(self.path, device=self.device.index)
            self.info, self.input_channels, self.output_kind = (
                self.meta.model,
                self.meta.input_channels,
                self.meta.output_kind,
            )
            self._in, self._out, out_dtype = _io_tensors(trt, self.engine, self.path)
            self.min_batch, self.max_batch = _batch_range(
                self.engine, self._in, (self.input_channels, *self.info.slice_size), self.path
            )
            opt = self.meta.batch_profile[1]  # the sidecar's; kept inside the engine's own range
            self.preferred_batch = min(max(opt, self.min_batch), self.max_batch)
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise FlareSegError(f"{self.path}: TensorRT could not create an execution context (GPU memory?)")
            self.stream = self.cuda.new_stream()
            self._output = self.cuda.empty(self._set_batch(self.max_batch), out_dtype)

    def _set_batch(self, n: int) -> tuple[int, ...]:
        """Give the context a batch of ``n``; the output shape TensorRT then reports."""
        if self.max_batch is None or not self.min_batch <= n <= self.max_batch:
            raise FlareSegError(
                f"{self.path}: batch {n} is outside the engine's profile ({self.min_batch} to {self.max_batch}); "
                "pad it, or rebuild the engine with `flare-export --batch MIN,OPT,MAX --engine`"
            )
        shape = (n, self.input_channels, *self.info.slice_size)
        if not self.context.set_input_shape(self._in, shape):
            raise FlareSegError(f"{self.path}: TensorRT refused the input shape {shape}")
        out = tuple(int(d) for d in self.context.get_tensor_shape(self._out))
        if not out or out[0] != n or min(out) < 0:
            raise FlareSegError(f"{self.path}: TensorRT reports output shape {out} for input {shape}")
        return out

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        with self.cuda.scope():
            n = int(batch.shape[0])
            shape = self._set_batch(n)
            if shape[1:] != tuple(self._output.shape[1:]):
                raise FlareSegError(f"{self.path}: output shape {shape} does not fit the buffer {self._output.shape}")
            x = self.cuda.to_device(batch)
            out = self._output[:n]  # batch is the outer dimension: the first n rows are contiguous
            for name, tensor in ((self._in, x), (self._out, out)):
                if self.context.set_tensor_address(name, tensor.data_ptr()) is False:
                    raise FlareSegError(f"{self.path}: TensorRT refused the address of tensor {name!r}")
            current = self.cuda.current_stream()
            self.stream.wait_stream(current)  # the input (and the output's previous readers) are ready
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise FlareSegError(f"{self.path}: TensorRT execution failed")
            current.wait_stream(self.stream)
            self.cuda.keep_alive(x, self.stream)
        return out

    def _deactivate(self) -> None:
        try:
            if self.stream is not None:
                with self.cuda.scope():
                    # An enqueued execution may still read the input or write the output buffer.
                    self.stream.synchronize()
        finally:  # even after a CUDA error: the engine and its context go
            self.context = None
            self.engine = None
            self._output = torch.empty(0)
            self.stream = None


def _io_tensors(trt: Any, engine: Any, path: Path) -> tuple[str, str, torch.dtype]:
    """The engine's one input (float32) and one output, with the output's torch dtype."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1 or len(outputs) != 1:
        raise FlareSegError(f"{path}: expected one input and one output, found {inputs} -> {outputs}")
    in_dtype = engine.get_tensor_dtype(inputs[0])
    if in_dtype != trt.float32:
        raise FlareSegError(f"{path}: the engine's input {inputs[0]!r} is {in_dtype}, expected float32")
    return inputs[0], outputs[0], _trt_to_torch(trt, engine.get_tensor_dtype(outputs[0]), path)


def _batch_range(engine: Any, name: str, expected: tuple[int, ...], path: Path) -> tuple[int, int]:
    """The minimum and maximum batch of the engine's profile 0, checked against the expected (C, H, W)."""
    lo, _, hi = (tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(name, 0))
    if lo[1:] != expected or hi[1:] != expected:
        raise FlareSegError(f"{path}: the engine's profile {lo} to {hi} does not take (B, {expected}) inputs")
    return lo[0], hi[0]


def _trt_to_torch(trt: Any, dtype: Any, path: Path) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.uint8: torch.uint8}
    if dtype not in table:
        raise FlareSegError(f"{path}: unsupported TensorRT output type {dtype}")
    return table[dtype]
