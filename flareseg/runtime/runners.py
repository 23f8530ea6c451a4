"""One runner interface, one implementation per backend.

A runner turns a batch of network inputs ``(B, C, h, w)`` float32 into either class
scores ``(B, K, h, w)`` or labels ``(B, h, w)`` (an export with the argmax in the graph).
It is activated once (model loading, session or engine creation, warm-up), used for
many batches, and deactivated; it is also a context manager::

    with open_runner("model.onnx") as runner:
        scores = runner.infer(batch)

Heavy libraries (ONNX Runtime, TensorRT) are imported on activation only.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch

from flareseg.checkpoint import ModelInfo
from flareseg.errors import FlareSegError
from flareseg.export.metadata import OutputKind

log = logging.getLogger(__name__)

Backend = Literal["torch", "onnxruntime", "tensorrt"]
TorchPrecision = Literal["fp32", "fp16", "bf16"]
OrtProvider = Literal["cpu", "cuda", "tensorrt"]
_ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class Runner(ABC):
    """activate / infer / deactivate, usable as a context manager."""

    #: Set on activation.
    info: ModelInfo
    input_channels: int
    output_kind: OutputKind
    device: torch.device
    #: Largest batch the model accepts (an engine's profile); None when unbounded.
    max_batch: int | None = None

    def __init__(self) -> None:
        self._active = False

    @property
    def is_active(self) -> bool:
        return self._active

    @property
    def name(self) -> str:
        return type(self).__name__

    def activate(self) -> Runner:
        if not self._active:
            self._activate()
            self._active = True
        return self

    def deactivate(self) -> None:
        if self._active:
            self._deactivate()
            self._active = False

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Scores (B, K, h, w) or labels (B, h, w) for a (B, C, h, w) float32 batch on ``self.device``."""
        if not self._active:
            raise FlareSegError(f"{self.name} must be activated before infer()")
        expected = (self.input_channels, *self.info.slice_size)
        if batch.dim() != 4 or tuple(batch.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise FlareSegError(f"{self.name} expects batches of shape (B, {shape}), got {tuple(batch.shape)}")
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            raise FlareSegError(f"{self.name}: batch {batch.shape[0]} exceeds the model's maximum {self.max_batch}")
        return self._infer(batch)

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.deactivate()

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, batch: torch.Tensor) -> torch.Tensor: ...

    def _deactivate(self) -> None:
        return None

    def describe(self) -> str:
        return self.name


class FunctionRunner(Runner):
    """Any callable ``(B, C, h, w) -> scores or labels`` as a runner (a model being trained, a test double)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        info: ModelInfo,
        *,
        input_channels: int | None = None,
        output_kind: OutputKind = "logits",
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.fn = fn
        self.info = info
        self.input_channels = input_channels or info.network.in_channels
        self.output_kind = output_kind
        self.device = torch.device(device)

    def describe(self) -> str:
        return f"function ({self.device})"

    def _activate(self) -> None:
        return None

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        return self.fn(batch.to(self.device))


def _cuda_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FlareSegError(f"device {device} requested, but torch sees no CUDA GPU on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FlareSegError(f"device {device} requested, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif dev.type != "cpu":
        raise FlareSegError(f"device must be cpu or cuda[:i], got {device}")
    return dev


class TorchRunner(Runner):
    """A checkpoint run by PyTorch: CPU or CUDA; fp32, fp16 or bf16; channels_last; CUDA graphs."""

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        precision: TorchPrecision = "fp32",
        channels_last: bool = False,
        cuda_graph_batch: int | None = None,
        fold_input: bool = True,
    ) -> None:
        super().__init__()
        if precision not in ("fp32", "fp16", "bf16"):
            raise FlareSegError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        self.checkpoint = Path(checkpoint)
        self.device = _cuda_device(device)
        if precision == "fp16" and self.device.type == "cpu":
            raise FlareSegError("fp16 needs a CUDA device; on the CPU use fp32 (or bf16 where the CPU supports it)")
        if cuda_graph_batch is not None and self.device.type != "cuda":
            raise FlareSegError("CUDA graphs need a CUDA device")
        self.precision = precision
        self.channels_last = channels_last
        self.cuda_graph_batch = cuda_graph_batch
        self.fold_input = fold_input
        self.output_kind = "logits"
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self._graph: Any = None

    def describe(self) -> str:
        extras = [self.precision, str(self.device)]
        if self.channels_last:
            extras.append("channels_last")
        if self.cuda_graph_batch:
            extras.append(f"CUDA graph @ batch {self.cuda_graph_batch}")
        return f"PyTorch ({', '.join(extras)})"

    def _activate(self) -> None:
        from flareseg.checkpoint import load_model
        from flareseg.network import build_deploy_network

        net, self.info, _ = load_model(self.checkpoint)
        model = build_deploy_network(net, fold_input=self.fold_input and net.config.in_channels > 1)
        self.input_channels = model.config.in_channels
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        model = model.to(device=self.device, dtype=self._dtype)
        self.model: torch.nn.Module | None = model.to(memory_format=fmt).eval()  # type: ignore[call-overload]
        if self.cuda_graph_batch:
            self._capture_graph(self.cuda_graph_batch)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise FlareSegError("the runner was deactivated")
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.model(x.to(device=self.device, dtype=self._dtype, memory_format=fmt))

    def _capture_graph(self, batch: int) -> None:
        # Warm up on a side stream (cuDNN picks its algorithms), then capture one replayable graph.
        self._static_in = torch.zeros(
            (batch, self.input_channels, *self.info.slice_size), device=self.device, dtype=torch.float32
        )
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):
                self._forward(self._static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph), torch.inference_mode():
            self._static_out = self._forward(self._static_in)

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self._graph is None:
                return self._forward(batch)
            n = batch.shape[0]
            if n > self._static_in.shape[0]:
                raise FlareSegError(f"batch {n} exceeds the captured CUDA graph's batch {self._static_in.shape[0]}")
            self._static_in[:n].copy_(batch, non_blocking=True)
            if n < self._static_in.shape[0]:
                self._static_in[n:].zero_()
            self._graph.replay()
            # The static output is overwritten by the next replay: callers consume it first.
            return self._static_out[:n]

    def _deactivate(self) -> None:
        self._graph = None
        self.model = None


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
        import onnxruntime as ort

        from flareseg.export.metadata import read_onnx_metadata

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


class TensorRTRunner(Runner):
    """A TensorRT engine: execute_async_v3 on its own CUDA stream, device buffers owned by torch."""

    def __init__(self, engine: str | os.PathLike[str], *, device: str | torch.device = "cuda") -> None:
        super().__init__()
        self.path = Path(engine)
        self.device = _cuda_device(device)
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


def backend_for(path: str | os.PathLike[str]) -> Backend:
    """The backend a model file implies: .pt -> torch, .onnx -> onnxruntime, .engine/.plan -> tensorrt."""
    suffix = Path(path).suffix.lower()
    table: dict[str, Backend] = {
        ".pt": "torch",
        ".pth": "torch",
        ".onnx": "onnxruntime",
        ".engine": "tensorrt",
        ".plan": "tensorrt",
    }
    if suffix not in table:
        raise FlareSegError(f"{path}: cannot tell the backend from the suffix {suffix!r}; use --backend")
    return table[suffix]


def open_runner(
    model: str | os.PathLike[str],
    *,
    backend: Backend | None = None,
    device: str = "cpu",
    precision: TorchPrecision = "fp32",
    channels_last: bool = False,
    cuda_graph_batch: int | None = None,
    threads: int | None = None,
    ort_provider: OrtProvider | None = None,
) -> Runner:
    """The runner for a model file (not yet activated).

    ONNX models run on ONNX Runtime's CPU provider for ``device="cpu"`` and its CUDA
    provider otherwise, unless ``ort_provider`` names one (``tensorrt`` included).
    """
    backend = backend or backend_for(model)
    if not Path(model).is_file():
        raise FlareSegError(f"{model}: model not found")
    if backend == "torch":
        return TorchRunner(
            model, device=device, precision=precision, channels_last=channels_last, cuda_graph_batch=cuda_graph_batch
        )
    if backend == "onnxruntime":
        dev = torch.device(device)
        if precision != "fp32":
            raise FlareSegError("ONNX precision is fixed at export (flare-export --fp16); do not pass --precision")
        provider: OrtProvider = ort_provider or ("cpu" if dev.type == "cpu" else "cuda")
        return OnnxRuntimeRunner(model, provider=provider, threads=threads, device_id=dev.index or 0)
    if backend == "tensorrt":
        return TensorRTRunner(model, device=device if device != "cpu" else "cuda")
    raise FlareSegError(f"unknown backend {backend!r}")
