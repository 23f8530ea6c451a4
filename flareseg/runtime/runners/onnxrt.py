"""Exported ONNX models in ONNX Runtime; the requested execution provider must be the one that runs.

On the CPU the session runs lean by default: ONNX Runtime's memory arena without its
memory pattern. At full width and batch 2 that halves the peak RSS of ONNX Runtime's
defaults (the pattern's one large block makes the arena hold about twice the working
memory) at the same CPU time (``benchmarks/ort_memory.md``). The TensorRT provider gets an engine cache and explicit
profile shapes, so it builds its engine once per model and GPU instead of once per session.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from flareseg.errors import FlareSegError, interrupts_kept
from flareseg.runtime.runners.base import OrtProvider, Runner

log = logging.getLogger(__name__)

_ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
#: The pip distributions that install the ``onnxruntime`` module (they cannot co-exist).
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
GPU_INSTALL = "pip install 'flareseg[gpu]'"

#: CPU memory settings (benchmarks/ort_memory.md):
#: "lean": the arena without the memory pattern: ~half the defaults' peak at the same CPU time;
#: "no-arena": no arena, no pattern: the same peak, memory goes back to the system after every run
#: (nothing held between volumes), paid for in page faults on every run (more CPU time);
#: "ort-defaults": ONNX Runtime's defaults (arena and memory pattern).
OrtMemory = Literal["lean", "no-arena", "ort-defaults"]
DEFAULT_CPU_MEMORY: OrtMemory = "lean"
_MEMORY_OPTIONS: dict[str, dict[str, bool]] = {
    "lean": {"enable_cpu_mem_arena": True, "enable_mem_pattern": False},
    "no-arena": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
    "ort-defaults": {"enable_cpu_mem_arena": True, "enable_mem_pattern": True},
}


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a clear error saying which package to install."""
    try:
        with interrupts_kept():  # an interrupt in its initialisation comes as an ImportError: it stays one
            import onnxruntime as ort
    except ImportError:
        raise FlareSegError(
            "ONNX Runtime is not installed: `pip install 'flareseg[cpu]'` for the CPU build, "
            f"or `{GPU_INSTALL}` for the CUDA build (never both)"
        ) from None
    return ort


def installed_onnxruntime() -> dict[str, str]:
    """The ONNX Runtime distributions pip installed here, with their versions."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def missing_provider_message(wanted: str, available: Sequence[str], installed: dict[str, str]) -> str:
    """Why a GPU provider is missing and what to do, from the ONNX Runtime distributions installed."""
    head = f"ONNX Runtime provider {wanted} is not available here (available: {', '.join(available)})"
    if "onnxruntime" in installed and "onnxruntime-gpu" in installed:
        return (
            f"{head}: both onnxruntime {installed['onnxruntime']} (CPU) and onnxruntime-gpu "
            f"{installed['onnxruntime-gpu']} are installed and the CPU one shadows the GPU one; run "
            f"`pip uninstall -y onnxruntime onnxruntime-gpu && {GPU_INSTALL}`"
        )
    if "onnxruntime" in installed:
        return (
            f"{head}: onnxruntime {installed['onnxruntime']} is the CPU build; for GPU providers run "
            f"`pip uninstall -y onnxruntime && {GPU_INSTALL}`"
        )
    if "onnxruntime-gpu" in installed:
        return (
            f"{head}: onnxruntime-gpu {installed['onnxruntime-gpu']} does not offer it; reinstall with "
            f"`pip install --force-reinstall onnxruntime-gpu` on a machine with an NVIDIA driver"
        )
    return f"{head}: no onnxruntime or onnxruntime-gpu distribution is installed by pip; run `{GPU_INSTALL}`"


def cpu_memory_options(memory: OrtMemory) -> dict[str, bool]:
    """The SessionOptions attributes a memory setting stands for."""
    if memory not in _MEMORY_OPTIONS:
        raise FlareSegError(f"ONNX Runtime memory setting must be one of {', '.join(_MEMORY_OPTIONS)}, got {memory!r}")
    return dict(_MEMORY_OPTIONS[memory])


def session_options(ort: Any, *, memory: OrtMemory, threads: int | None) -> Any:
    """ONNX Runtime SessionOptions for a flareseg model."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    for name, value in cpu_memory_options(memory).items():
        setattr(opts, name, value)
    return opts


def tensorrt_cache_dir(model: str | os.PathLike[str]) -> Path:
    """Where the TensorRT provider keeps its engines and timing cache: a folder beside the model, holding one
    folder per model content (:func:`tensorrt_engine_cache`)."""
    p = Path(model)
    return p.with_name(p.name + ".ort-tensorrt-cache")


def tensorrt_engine_cache(model: str | os.PathLike[str]) -> Path:
    """The engine cache of this model's content, made if needed; the caches of earlier contents are removed.

    ONNX Runtime names a cached engine after the model's file name, tensor names and
    versions, never its weights: a model re-exported under the same name (new weights,
    same graph) would silently run the old engine. A folder per content digest cannot.
    """
    from flareseg.checkpoint import file_sha256

    root = tensorrt_cache_dir(model)
    here = root / file_sha256(model)[:16]
    here.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():  # other contents' folders, and engines the one-folder layout left at the top
        if old == here:
            continue
        log.info("%s: removing the TensorRT engines of an earlier model of this name", old)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                old.unlink(missing_ok=True)
            except OSError as exc:  # left where it is: this content's cache works all the same
                log.warning("%s: could not remove it (%s)", old, exc.strerror or exc)
    return here


def tensorrt_provider_options(
    *,
    input_name: str,
    input_shape: tuple[int, int, int],
    batch_profile: tuple[int, int, int],
    precision: str,
    device_id: int,
    cache_dir: Path | None,
) -> dict[str, str]:
    """Options for ONNX Runtime's TensorRT provider.

    Explicit profile shapes over the model's whole batch range: without them the provider
    builds for the first shape it sees and rebuilds whenever a larger batch arrives. The
    engine and timing caches (one folder per model content: :func:`tensorrt_engine_cache`)
    let later sessions load the engine instead of building it again.
    """
    from flareseg.export.options import check_batch_profile

    lo, opt, hi = check_batch_profile(batch_profile)
    dims = "x".join(str(d) for d in input_shape)
    options = {
        "device_id": str(device_id),
        "trt_fp16_enable": "True" if precision == "fp16" else "False",
        "trt_profile_min_shapes": f"{input_name}:{lo}x{dims}",
        "trt_profile_opt_shapes": f"{input_name}:{opt}x{dims}",
        "trt_profile_max_shapes": f"{input_name}:{hi}x{dims}",
    }
    if cache_dir is not None:
        options.update(
            {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(cache_dir),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(cache_dir),
            }
        )
    return options


def _preload_tensorrt() -> None:
    """Load TensorRT's libraries through its Python package, where installed.

    ONNX Runtime's TensorRT provider opens ``libnvinfer`` by name, and pip's tensorrt
    wheel keeps it in its own folder, off the loader's path; a library already loaded
    under that name is the one the loader then returns.
    """
    try:
        with interrupts_kept():
            import tensorrt  # noqa: F401
    except ImportError:
        pass  # not installed, or not loadable: ONNX Runtime's own search decides, and the check after it says so


class OnnxRuntimeRunner(Runner):
    """An exported ONNX model in ONNX Runtime; the requested provider must be the one that runs."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        provider: OrtProvider = "cpu",
        threads: int | None = None,
        device_id: int = 0,
        memory: OrtMemory = DEFAULT_CPU_MEMORY,
    ) -> None:
        super().__init__()
        if provider not in _ORT_PROVIDERS:
            raise FlareSegError(f"ONNX Runtime provider must be one of {sorted(_ORT_PROVIDERS)}, got {provider!r}")
        if threads is not None and threads < 1:
            raise FlareSegError(f"threads must be positive, got {threads}")
        cpu_memory_options(memory)  # validates
        self.path = self.model_file = Path(model)
        self.provider = provider
        self.threads = threads
        self.memory = memory
        self.device = torch.device("cpu") if provider == "cpu" else torch.device("cuda", device_id)
        self.device_id = device_id

    def _describe(self) -> str:
        threads = "1 thread" if self.threads == 1 else f"{self.threads or 'auto'} threads"
        memory = f", {self.memory} memory" if self.provider == "cpu" else ""
        return f"ONNX Runtime ({_ORT_PROVIDERS[self.provider]}, {self.meta.precision}, {threads}{memory})"

    def _activate(self) -> None:
        from flareseg.export.metadata import check_graph_input, read_onnx_metadata

        ort = import_onnxruntime()
        self.meta = read_onnx_metadata(self.path)
        self._check_exported_file()
        self.info, self.input_channels, self.output_kind = (
            self.meta.model,
            self.meta.input_channels,
            self.meta.output_kind,
        )
        if self.provider == "tensorrt":
            if self.meta.precision == "int8":
                from flareseg.export.tensorrt import TENSORRT_NO_INT8

                raise FlareSegError(f"{self.path}: {TENSORRT_NO_INT8}")
            self.preferred_batch = self.meta.batch_profile[1]  # its engine is built over the profile, tuned at its opt
        wanted = _ORT_PROVIDERS[self.provider]
        available = ort.get_available_providers()
        if wanted not in available:
            raise FlareSegError(missing_provider_message(wanted, available, installed_onnxruntime()))
        # The setting concerns host memory: GPU sessions keep ONNX Runtime's defaults.
        memory: OrtMemory = self.memory if self.provider == "cpu" else "ort-defaults"
        opts = session_options(ort, memory=memory, threads=self.threads)
        self.session = ort.InferenceSession(str(self.path), opts, providers=self._providers(available))
        running = self.session.get_providers()
        if not running or running[0] != wanted:
            where = (
                "; pip's tensorrt wheel keeps libnvinfer in site-packages/tensorrt_libs, which may need to be on "
                "LD_LIBRARY_PATH"
                if self.provider == "tensorrt"
                else ""
            )
            raise FlareSegError(
                f"{self.path}: ONNX Runtime runs {running[:1]} instead of the requested {wanted} "
                f"(onnxruntime-gpu could not load the provider's CUDA, cuDNN or TensorRT libraries{where})"
            )
        self._output_name = self.session.get_outputs()[0].name
        declared = self.session.get_inputs()[0]
        self._input_name = declared.name
        check_graph_input(self.path, self.meta, [d if isinstance(d, int) else None for d in declared.shape])

    def _providers(self, available: Sequence[str]) -> list[Any]:
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": str(self.device_id)})
        if self.provider == "cuda":
            return [cuda]
        _preload_tensorrt()
        cache: Path | None
        try:
            cache = tensorrt_engine_cache(self.path)
        except OSError as exc:
            log.warning(
                "%s: no TensorRT engine cache (%s); the engine is rebuilt for every session",
                tensorrt_cache_dir(self.path),
                exc,
            )
            cache = None
        trt = tensorrt_provider_options(
            input_name=self.meta.input_name,
            input_shape=(self.meta.input_channels, *self.meta.model.slice_size),
            batch_profile=self.meta.batch_profile,
            precision=self.meta.precision,
            device_id=self.device_id,
            cache_dir=cache,
        )
        # Nodes TensorRT does not take run on CUDA rather than on the CPU.
        fallback = [cuda] if "CUDAExecutionProvider" in available else []
        return [("TensorrtExecutionProvider", trt), *fallback]

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
