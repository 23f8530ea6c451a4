"""The runner interface: activate / infer / deactivate, also a context manager.

A runner turns a batch of network inputs ``(B, C, h, w)`` float32 into either class
scores ``(B, K, h, w)`` or labels ``(B, h, w)`` (an export with the argmax in the graph).
It is activated once (model loading, session or engine creation, warm-up), used for
many batches, and deactivated. One module per backend implements it; heavy libraries
(ONNX Runtime, TensorRT, OpenVINO) are imported on activation only.

A runner may be shared between threads: activation, inference and deactivation take
turns (one lock per runner), so a model is loaded once and never released under a batch
in flight. The TensorRT runner and a CUDA-graph PyTorch runner return their own output
buffer, valid until their next batch: give each thread its own runner of these.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import torch

from flareseg.checkpoint import ModelInfo
from flareseg.errors import FlareSegError
from flareseg.export.metadata import OutputKind, check_file_sha256, recorded_file_sha256
from flareseg.provenance import FileIdentity, ModelStamp, file_identity

if TYPE_CHECKING:  # typing.Self is Python 3.11's; the annotations are never evaluated at run time
    from typing_extensions import Self

log = logging.getLogger(__name__)

#: A model file that changed while it was loaded: no file can be said to be the one loaded.
_REPLACED: FileIdentity = (-1, -1, -1, -1, -1)

Backend = Literal["torch", "onnxruntime", "tensorrt", "openvino"]
TorchPrecision = Literal["fp32", "fp16", "bf16"]
OrtProvider = Literal["cpu", "cuda", "tensorrt"]


class Runner(ABC):
    """activate / infer / deactivate, usable as a context manager."""

    #: Set on activation.
    info: ModelInfo
    input_channels: int
    output_kind: OutputKind
    device: torch.device
    #: Largest batch the model accepts (an engine's profile); None when unbounded.
    max_batch: int | None = None
    #: Smallest batch the model accepts (an engine's profile); None when any batch goes.
    min_batch: int | None = None
    #: The batch the model was built for (an engine's profile opt), the default where none is given; None: any.
    preferred_batch: int | None = None
    #: The model file the runner loads, which :meth:`stamp` hashes; None where there is none (a callable).
    model_file: Path | None = None

    def __init__(self) -> None:
        self._active = False
        self._deactivated = False  # once active, then deactivated: said apart from never activated
        # Re-entrant: an activation runs batches (warm-up, graph capture) through infer().
        self._lock = threading.RLock()
        #: Seconds the last activation took, and its parts where the backend times them.
        self.activate_s: float | None = None
        self.activation_steps: dict[str, float] = {}
        # Not the runner's lock: the writer's thread asks for the stamp while a batch holds that one.
        self._stamp_lock = threading.Lock()
        self._stamp: tuple[ModelStamp, FileIdentity] | None = None  # the digest, and the file it is of
        self._loaded: FileIdentity | None = None  # the model file as the last activation found it

    @property
    def is_active(self) -> bool:
        return self._active

    @property
    def name(self) -> str:
        return type(self).__name__

    def activate(self) -> Self:
        with self._lock:  # two threads starting a shared runner load its model once
            if not self._active:
                t = time.perf_counter()
                self.activation_steps = {}
                before = self._model_identity()
                try:
                    self._activate()
                except BaseException:
                    self._release_partial()
                    raise
                after = self._model_identity()
                # The stamp must name the file loaded: one replaced while loading cannot be named at all.
                self._loaded = before if before == after else _REPLACED
                self._active = True
                self.activate_s = time.perf_counter() - t
        return self

    def deactivate(self) -> None:
        with self._lock:  # waits for a batch in flight in another thread
            if self._active:
                try:
                    self._deactivate()
                finally:  # what it released is gone even when releasing raised (a CUDA error)
                    self._active = False
                    self._deactivated = True
                    self._loaded = None

    def _release_partial(self) -> None:
        """What an activation that failed half-way holds (a session, an engine) goes at once, not at exit."""
        try:
            self._deactivate()
        except Exception as exc:  # the activation's own error is the one to report
            log.debug("%s: releasing a failed activation: %s", self.name, exc)

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Scores (B, K, h, w) or labels (B, h, w) for a (B, C, h, w) float32 batch on ``self.device``."""
        with self._lock:
            return self._checked_infer(batch)

    def _checked_infer(self, batch: torch.Tensor) -> torch.Tensor:
        if not self._active and self._deactivated:  # a thread's `with` block ended while another's call went on
            raise FlareSegError(
                f"{self.name} was deactivated (a `with` block's end, another thread's too) and must be activated "
                "again before infer(); a runner shared between threads must stay active until all are done"
            )
        if not self._active:
            raise FlareSegError(f"{self.name} must be activated before infer()")
        expected = (self.input_channels, *self.info.slice_size)
        if batch.dim() != 4 or tuple(batch.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise FlareSegError(f"{self.name} expects batches of shape (B, {shape}), got {tuple(batch.shape)}")
        if batch.shape[0] == 0:  # some backends return an empty tensor, others fail in their own words
            raise FlareSegError(f"{self.name}: the batch is empty (shape {tuple(batch.shape)})")
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            raise FlareSegError(f"{self.name}: batch {batch.shape[0]} exceeds the model's maximum {self.max_batch}")
        if self.min_batch is not None and batch.shape[0] < self.min_batch:
            raise FlareSegError(
                f"{self.name}: batch {batch.shape[0]} is below the model's minimum {self.min_batch}; pad it "
                "(flare-infer does) or rebuild the engine with a smaller --batch MIN"
            )
        return self._infer(batch)

    def warm_up(self, batch: int) -> float:
        """Run one batch of zero slices and wait for it, so the backend's first-batch set-up is done; seconds.

        cuDNN, TensorRT and ONNX Runtime choose and load their kernels on the first batch
        of a shape; the pipeline can do this while the first volume is still being read.
        """
        t = time.perf_counter()
        batch = max(batch, self.min_batch or 1)
        if self.max_batch is not None:
            batch = min(batch, self.max_batch)
        x = torch.zeros((batch, self.input_channels, *self.info.slice_size), device=self.device)
        with torch.inference_mode():
            self.infer(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t

    def __enter__(self) -> Self:
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

    def stamp(self, stop: threading.Event | None = None) -> ModelStamp | None:
        """The model file's content for the outputs; None without a file.

        Hashed once per content. Once the runner is active, the stamp is that of the file it
        loaded: hashed before or during loading, it stands whatever the path holds later (a
        touched file, a repointed link); not hashed yet and replaced since (a retrained
        ``best.pt`` saved over it), it is refused, since the outputs would name a model that
        did not make them. ``stop``: see :meth:`ModelStamp.read`.
        """
        if self.model_file is None:
            return None
        with self._stamp_lock:
            if self._stamp is not None and self._loaded is not None and self._stamp[1] == self._loaded:
                return self._stamp[0]  # the file loaded, hashed: what the path holds now does not matter
            try:
                now = file_identity(self.model_file)
                if self._stamp is None or self._stamp[1] != now:
                    self._stamp = ModelStamp.read(self.model_file, stop)
            except OSError as exc:
                why = exc.strerror or str(exc)  # the path is said once, first
                raise FlareSegError(
                    f"{self.model_file}: cannot read the model to name it in the outputs: {why}"
                ) from exc
            stamp, hashed = self._stamp
            if self._loaded is not None and hashed != self._loaded:
                raise FlareSegError(
                    f"{self.model_file}: replaced since this run loaded it, so its outputs could not name the model "
                    "that made them; run again"
                )
            return stamp

    def _check_exported_file(self) -> None:
        """Hash an ONNX model whose sidecar records its SHA-256, before it loads, and refuse it if the two differ:
        a copy damaged in place (same length) would run and give wrong labels. The hash is the outputs' stamp."""
        if self.model_file is None or (recorded := recorded_file_sha256(self.model_file)) is None:
            return
        stamp = self.stamp()  # the writer's thread may have hashed this very file already (a run asks it first)
        if stamp is not None:
            check_file_sha256(self.model_file, stamp.sha256, recorded)

    def _model_identity(self) -> FileIdentity | None:
        try:
            return file_identity(self.model_file) if self.model_file is not None else None
        except OSError:  # the loader says what is wrong with it
            return None

    def describe(self) -> str:
        """The backend in words (precision, device, threads) once active; before that, the runner's name."""
        return self._describe() if self._active else self.name

    def _describe(self) -> str:
        return self.name


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device of ours (cpu, cuda, cuda:i); anything else is a one-line FlareSegError."""
    try:
        dev: torch.device | None = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists its ~20 device types; ours says what we take
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise FlareSegError(f"device must be cpu or cuda[:i], got {device!r}")
    return dev


def cuda_device(device: str | torch.device) -> torch.device:
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FlareSegError(f"device {device}: torch sees no CUDA GPU on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FlareSegError(f"device {device}: only {torch.cuda.device_count()} CUDA GPU(s) exist here")
    return dev
