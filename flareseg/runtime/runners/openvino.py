"""Exported ONNX models (fp32 or INT8) in OpenVINO's CPU runtime, f32 or bf16 inference precision.

OpenVINO is optional (``pip install 'flareseg[openvino]'``) and imported on activation
only. The model is compiled for each batch size it is given, with a static shape, at
that size's first batch (the pipeline's warm-up): on the CPU plugin a static shape lets
it pick its kernels and memory layout ahead of time, which is faster than a dynamic batch
axis (measured in benchmarks/cpu_paths.md). A run at batch B compiles B and, where a
volume's slice count leaves a shorter last batch, that size too. Two compiled models are
kept at most, the largest batch's and the latest other's: each holds its own buffers, and
a folder's cases leave up to B - 1 different last batches (kept all, a full-width network
at 256 x 256 grew from 1.9 to 4.6 GB over them). Settings are the compiled model's own
(threads, performance hint, inference precision); nothing global is changed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from flareseg.errors import FlareSegError, interrupts_kept
from flareseg.runtime.runners.base import Runner

log = logging.getLogger(__name__)

OpenVINOPrecision = Literal["fp32", "bf16"]
PerformanceHint = Literal["latency", "throughput"]

INSTALL_HINT = "OpenVINO is not installed: `pip install 'flareseg[openvino]'`"
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def import_openvino() -> Any:
    """The ``openvino`` module, or a clear error saying how to install it."""
    try:
        with interrupts_kept():  # an interrupt in its initialisation comes as an ImportError: it stays one
            import openvino as ov
    except ImportError:
        raise FlareSegError(INSTALL_HINT) from None
    return ov


def cpu_capabilities(core: Any) -> tuple[str, ...]:
    """What OpenVINO's CPU plugin reports it can compute in (``FP32``, ``BF16``, ``INT8``...)."""
    return tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check_precision_supported(
    precision: OpenVINOPrecision, capabilities: tuple[str, ...], model_precision: str = "fp32"
) -> None:
    """Refuse a precision the CPU has no instructions for (bf16 needs AVX-512 BF16 or AMX)."""
    if precision == "bf16" and "BF16" not in capabilities:
        # An INT8 model's float layers were to run in bf16: fp32 is its way here, not "the INT8 model" it is.
        other = "" if model_precision == "int8" else " or the INT8 model"
        raise FlareSegError(
            "bf16 inference needs a CPU with bf16 instructions (AVX-512 BF16 or AMX); OpenVINO reports this CPU's "
            f"capabilities as {', '.join(capabilities) or 'none'}; use --precision fp32{other}"
        )


class OpenVINORunner(Runner):
    """An exported ONNX model (fp32 or INT8) compiled by OpenVINO for the CPU."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        precision: OpenVINOPrecision = "fp32",
        threads: int | None = None,
        hint: PerformanceHint = "latency",
    ) -> None:
        super().__init__()
        if precision not in _OV_PRECISION:
            raise FlareSegError(f"OpenVINO inference precision must be fp32 or bf16, got {precision!r}")
        if threads is not None and threads < 1:
            raise FlareSegError(f"threads must be positive, got {threads}")
        if hint not in ("latency", "throughput"):
            raise FlareSegError(f"performance hint must be latency or throughput, got {hint!r}")
        self.path = self.model_file = Path(model)
        self.precision = precision
        self.threads = threads
        self.hint = hint
        self.device = torch.device("cpu")
        self._compiled: dict[int, Any] = {}
        self._requests: dict[int, Any] = {}
        #: The inference precision the compiled model reports (not only what was asked).
        self.inference_precision = _OV_PRECISION[precision]
        #: The threads the compiled model reports (OpenVINO caps a count beyond the cores); None before compiling.
        self.threads_used: int | None = None

    def _describe(self) -> str:
        used = self.threads_used or self.threads
        threads = f"{used} thread{'' if used == 1 else 's'}" if used else "auto threads"
        if self.threads and used != self.threads:
            threads += f" ({self.threads} asked)"
        return (
            f"OpenVINO {self._version} (CPU, {self.meta.precision} model, {self.inference_precision} inference "
            f"precision, {threads}, {self.hint.upper()} hint)"
        )

    def _activate(self) -> None:
        from flareseg.export.metadata import check_graph_input, read_onnx_metadata

        ov = import_openvino()
        self.meta = read_onnx_metadata(self.path)
        self._check_exported_file()
        self.info, self.input_channels, self.output_kind = (
            self.meta.model,
            self.meta.input_channels,
            self.meta.output_kind,
        )
        self._version = str(ov.get_version()).split("-")[0]
        self.core = ov.Core()
        check_precision_supported(self.precision, cpu_capabilities(self.core), self.meta.precision)
        try:
            self._model = self.core.read_model(str(self.path))
        except RuntimeError as exc:
            raise FlareSegError(f"{self.path}: OpenVINO could not read the model ({_first_line(exc)})") from None
        declared = self._model.inputs[0].get_partial_shape()
        check_graph_input(self.path, self.meta, [d.get_length() if d.is_static else None for d in declared])

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": self.hint.upper(),
            # Explicit even for fp32: on CPUs with AMX, OpenVINO would otherwise pick bf16 by itself.
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[self.precision],
        }
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def _compile(self, batch: int) -> Any:
        compiled = self._compiled.get(batch)
        if compiled is None:
            largest = max([batch, *self._compiled])
            for size in [size for size in self._compiled if size != largest]:  # see the module's docstring
                del self._requests[size], self._compiled[size]
            model = self._model.clone()
            model.reshape({model.input(0).get_any_name(): [batch, self.input_channels, *self.info.slice_size]})
            try:
                compiled = self.core.compile_model(model, "CPU", self._config())
            except RuntimeError as exc:
                raise FlareSegError(f"{self.path}: OpenVINO could not compile the model ({_first_line(exc)})") from None
            used = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type: "f32", "bf16"
            self.inference_precision = used.to_string() if hasattr(used, "to_string") else str(used)
            # The plugin caps a thread count beyond the cores it may use: say what it runs with.
            self.threads_used = int(compiled.get_property("INFERENCE_NUM_THREADS"))
            log.debug("compiled %s for batch %d (%s)", self.path, batch, self.inference_precision)
            self._compiled[batch] = compiled
            self._requests[batch] = compiled.create_infer_request()
        return compiled

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(batch.detach().to(torch.float32).numpy())
        n = int(arr.shape[0])
        self._compile(n)
        request = self._requests[n]
        request.infer({0: arr})
        # The request owns its output buffer and overwrites it on the next call: hand back a copy.
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))

    def _deactivate(self) -> None:
        self._requests = {}
        self._compiled = {}
        self._model = None
        self.core = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
