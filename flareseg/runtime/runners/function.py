"""Any callable as a runner: a model being trained, a test double."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flareseg.checkpoint import ModelInfo
from flareseg.errors import FlareSegError
from flareseg.export.metadata import OutputKind
from flareseg.runtime.runners.base import Runner, parse_device


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
        if not isinstance(info, ModelInfo):  # what shapes the slices and the outputs' check
            raise FlareSegError(f"FunctionRunner needs the model's ModelInfo, got {type(info).__name__}")
        if output_kind not in ("logits", "labels"):
            raise FlareSegError(f"output_kind must be 'logits' or 'labels', got {output_kind!r}")
        self.fn = fn
        self.info = info
        self.input_channels = input_channels or info.network.in_channels
        self.output_kind = output_kind
        self.device = parse_device(device)

    def _describe(self) -> str:
        return f"function ({self.device})"

    def _activate(self) -> None:
        return None

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        return self.fn(batch.to(self.device))
