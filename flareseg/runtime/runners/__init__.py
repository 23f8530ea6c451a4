"""One runner interface, one implementation per backend (the way Polygraphy lays out its backends).

    with open_runner("model.onnx") as runner:
        scores = runner.infer(batch)

Each backend's module imports its heavy library on activation only, so the package
imports without ONNX Runtime's GPU build, TensorRT or OpenVINO.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flareseg.errors import FlareSegError
from flareseg.runtime.runners.base import Backend, OrtProvider, Runner, TorchPrecision, cuda_device, parse_device
from flareseg.runtime.runners.function import FunctionRunner
from flareseg.runtime.runners.onnxrt import DEFAULT_CPU_MEMORY, OnnxRuntimeRunner, OrtMemory
from flareseg.runtime.runners.openvino import OpenVINOPrecision, OpenVINORunner, PerformanceHint
from flareseg.runtime.runners.pytorch import TorchRunner
from flareseg.runtime.runners.tensorrt import TensorRTRunner

__all__ = [
    "Backend",
    "FunctionRunner",
    "OnnxRuntimeRunner",
    "OpenVINORunner",
    "OrtMemory",
    "OrtProvider",
    "Runner",
    "TensorRTRunner",
    "TorchPrecision",
    "TorchRunner",
    "backend_for",
    "check_precision",
    "cuda_device",
    "open_runner",
]


def backend_for(path: str | os.PathLike[str]) -> Backend:
    """The backend a model file implies: .pt -> torch, .onnx -> onnxruntime, .engine/.plan -> tensorrt."""
    _check_model_file(path)
    suffix = Path(path).suffix.lower()
    if suffix not in _BACKEND_OF_SUFFIX:
        raise FlareSegError(f"{path}: cannot tell the backend from the suffix {suffix!r}; use --backend")
    return _BACKEND_OF_SUFFIX[suffix]


_BACKEND_OF_SUFFIX: dict[str, Backend] = {
    ".pt": "torch",
    ".pth": "torch",
    ".onnx": "onnxruntime",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
}
#: What each backend loads, where not what the suffix implies (OpenVINO runs ONNX models too).
_SUFFIXES_OF_BACKEND: dict[str, tuple[str, ...]] = {
    "torch": (".pt", ".pth"),
    "onnxruntime": (".onnx",),
    "openvino": (".onnx",),
    "tensorrt": (".engine", ".plan"),
}


def _check_model_file(path: str | os.PathLike[str], backend: Backend | None = None) -> None:
    """Refuse a folder, a missing file, or a model file of another backend, naming what would fit."""
    model = Path(path)
    if model.is_dir():
        found = sorted(p.name for p in model.iterdir() if p.suffix.lower() in _BACKEND_OF_SUFFIX)[:6]
        hint = f" ({', '.join(found)} in it)" if found else ""
        raise FlareSegError(f"{model}: is a folder, not a model file; give the model file{hint}")
    if not model.is_file():
        raise FlareSegError(f"{model}: model not found")
    suffix = model.suffix.lower()
    if backend is None:
        return
    if backend not in _SUFFIXES_OF_BACKEND:
        raise FlareSegError(f"unknown backend {backend!r}; known: {', '.join(_SUFFIXES_OF_BACKEND)}")
    if suffix in _BACKEND_OF_SUFFIX and suffix not in _SUFFIXES_OF_BACKEND[backend]:
        wanted = " or ".join(_SUFFIXES_OF_BACKEND[backend])
        raise FlareSegError(f"{model}: the {backend} backend runs {wanted} models, not a {suffix} file")


def check_precision(backend: str, precision: str) -> None:
    """Refuse a precision the backend cannot run: an ONNX model's is fixed at export; OpenVINO's CPU plugin
    runs fp32 or bf16."""
    if backend == "onnxruntime" and precision != "fp32":
        raise FlareSegError("ONNX precision is fixed at export (flare-export --fp16); do not pass --precision")
    if backend == "openvino" and precision not in ("fp32", "bf16"):
        raise FlareSegError(f"OpenVINO on the CPU runs fp32 or bf16, got {precision!r}")


def open_runner(
    model: str | os.PathLike[str],
    *,
    backend: Backend | None = None,
    device: str | None = None,
    precision: TorchPrecision = "fp32",
    channels_last: bool = False,
    cuda_graph_batch: int | None = None,
    threads: int | None = None,
    ort_provider: OrtProvider | None = None,
    openvino_hint: PerformanceHint = "latency",
    ort_memory: OrtMemory = DEFAULT_CPU_MEMORY,
) -> Runner:
    """The runner for a model file (not yet activated).

    ONNX models run on ONNX Runtime's CPU provider for ``device="cpu"`` and its CUDA
    provider otherwise, unless ``ort_provider`` names one (``tensorrt`` included). With
    ``backend="openvino"`` an ONNX model (fp32 or INT8) runs on OpenVINO's CPU plugin, in
    fp32 or, with ``precision="bf16"``, bf16 where the CPU has the instructions.

    ``threads``: the CPU threads of an ONNX Runtime or OpenVINO session. PyTorch's are the process's
    (``torch.set_num_threads``), which no runner changes as a side effect; ``flare-infer --threads`` sets them
    for its run.
    """
    if backend is None:
        backend = backend_for(model)  # checks the file; its suffix fits the backend it names
    else:
        _check_model_file(model, backend)
    if device is None:  # an engine runs on the GPU; every other backend defaults to the CPU
        device = "cuda" if backend == "tensorrt" else "cpu"
    if cuda_graph_batch is not None and backend != "torch":
        raise FlareSegError(f"CUDA graphs are captured for the torch backend only, not {backend}")
    if backend == "torch":
        return TorchRunner(
            model, device=device, precision=precision, channels_last=channels_last, cuda_graph_batch=cuda_graph_batch
        )
    check_precision(backend, precision)
    if backend == "onnxruntime":
        dev = parse_device(device)
        provider: OrtProvider = ort_provider or ("cpu" if dev.type == "cpu" else "cuda")
        if provider != "cpu":  # the GPU providers read and write torch's CUDA tensors (no host round trip)
            try:
                cuda_device(device if dev.type == "cuda" else torch.device("cuda", 0))  # said as it was given
            except FlareSegError as exc:
                raise FlareSegError(f"{exc}; ONNX Runtime's {provider} provider needs a CUDA build of torch") from None
        return OnnxRuntimeRunner(model, provider=provider, threads=threads, device_id=dev.index or 0, memory=ort_memory)
    if backend == "openvino":
        if parse_device(device).type != "cpu":
            raise FlareSegError(f"the OpenVINO backend runs on the CPU, got device {device}")
        ov_precision: OpenVINOPrecision = "bf16" if precision == "bf16" else "fp32"  # checked above
        return OpenVINORunner(model, precision=ov_precision, threads=threads, hint=openvino_hint)
    if backend == "tensorrt":
        return TensorRTRunner(model, device=device)
    raise FlareSegError(f"unknown backend {backend!r}")
