"""PyTorch checkpoints: CPU or CUDA; fp32, fp16 or bf16; channels_last; CUDA graphs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from flareseg.errors import FlareSegError
from flareseg.runtime.runners.base import Runner, TorchPrecision, cuda_device


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
        self.checkpoint = self.model_file = Path(checkpoint)
        self.device = cuda_device(device)
        if precision == "fp16" and self.device.type == "cpu":
            raise FlareSegError("fp16 needs a CUDA device; on the CPU use fp32 (or bf16 where the CPU supports it)")
        if cuda_graph_batch is not None and self.device.type != "cuda":
            raise FlareSegError("CUDA graphs need a CUDA device")
        self.precision = precision
        self.channels_last = channels_last
        self.cuda_graph_batch = cuda_graph_batch
        self.preferred_batch = cuda_graph_batch  # the batch the graph is captured at
        self.fold_input = fold_input
        self.output_kind = "logits"
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        #: A captured graph with its static input and output (--cuda-graph).
        self._graph: tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None = None

    def _describe(self) -> str:
        extras = [self.precision, str(self.device)]
        if self.channels_last:
            extras.append("channels_last")
        if self.cuda_graph_batch:
            extras.append(f"CUDA graph @ batch {self.cuda_graph_batch}")
        return f"PyTorch ({', '.join(extras)})"

    def _activate(self) -> None:
        from flareseg.checkpoint import load_model
        from flareseg.network import build_deploy_network

        t0 = time.perf_counter()
        net, self.info, _ = load_model(self.checkpoint)
        # The loaded network is dropped here, so the deploy graph may take its tensors rather than copies.
        model = build_deploy_network(net, fold_input=self.fold_input and net.config.in_channels > 1, copy=False)
        self.input_channels = model.config.in_channels
        t1 = time.perf_counter()
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        model = model.to(device=self.device, dtype=self._dtype)
        self.model: torch.nn.Module | None = model.to(memory_format=fmt).eval()  # type: ignore[call-overload]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the upload (and the CUDA context it creates) is done
        t2 = time.perf_counter()
        # The first CUDA call creates the context: on a GPU, "to_device" is mostly that.
        self.activation_steps.update(load_s=t1 - t0, to_device_s=t2 - t1)
        if self.cuda_graph_batch:
            self._capture_graph(self.cuda_graph_batch)
            self.activation_steps["cuda_graph_s"] = time.perf_counter() - t2

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise FlareSegError("the runner was deactivated")
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.model(x.to(device=self.device, dtype=self._dtype, memory_format=fmt))

    def _capture_graph(self, batch: int) -> None:
        # Warm up on a side stream (cuDNN picks its algorithms), then capture one replayable graph. The
        # device guard: torch.cuda.graph captures on a stream of the current device, which need not be ours.
        with torch.cuda.device(self.device):
            static_in = torch.zeros(
                (batch, self.input_channels, *self.info.slice_size), device=self.device, dtype=torch.float32
            )
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_out = self._forward(static_in)
        self._graph = (graph, static_in, static_out)

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self._graph is None:
                return self._forward(batch)
            graph, static_in, static_out = self._graph
            n = batch.shape[0]
            if n > static_in.shape[0]:
                raise FlareSegError(f"batch {n} exceeds the captured CUDA graph's batch {static_in.shape[0]}")
            static_in[:n].copy_(batch, non_blocking=True)
            if n < static_in.shape[0]:
                static_in[n:].zero_()
            with torch.cuda.device(self.device):  # replay() launches on the current device's stream
                graph.replay()
            # The static output is overwritten by the next replay: callers consume it first.
            return static_out[:n]

    def _deactivate(self) -> None:
        self._graph = None  # with its static tensors, which hold its memory pool too
        self.model = None
