"""The ways flare-bench (and ``flare-bench --check``) run the model: a table of backends,
the models each needs, and the runner for each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flareseg.errors import FlareSegError
from flareseg.network import NetworkConfig


@dataclass(frozen=True)
class Backend:
    """One way of running the model: a runner configuration."""

    name: str
    kind: str  # torch | onnxruntime | tensorrt
    device: str
    precision: str
    channels_last: bool = False
    cuda_graph: bool = False


ALL_BACKENDS = {
    b.name: b
    for b in (
        Backend("torch-cpu-fp32", "torch", "cpu", "fp32"),
        Backend("onnxruntime-cpu-fp32", "onnxruntime", "cpu", "fp32"),
        Backend("torch-cuda-fp32", "torch", "cuda", "fp32"),
        Backend("torch-cuda-bf16", "torch", "cuda", "bf16", channels_last=True),
        Backend("torch-cuda-fp16", "torch", "cuda", "fp16", channels_last=True),
        Backend("torch-cuda-fp16-graph", "torch", "cuda", "fp16", channels_last=True, cuda_graph=True),
        Backend("onnxruntime-cuda-fp32", "onnxruntime", "cuda", "fp32"),
        Backend("onnxruntime-cuda-fp16", "onnxruntime", "cuda", "fp16"),
        Backend("tensorrt-fp16", "tensorrt", "cuda", "fp16"),
    )
}


def available_backends() -> list[str]:
    """The backends this machine can run."""
    names = ["torch-cpu-fp32", "onnxruntime-cpu-fp32"]
    if torch.cuda.is_available():
        names += ["torch-cuda-fp32", "torch-cuda-bf16", "torch-cuda-fp16", "torch-cuda-fp16-graph"]
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            names += ["onnxruntime-cuda-fp32", "onnxruntime-cuda-fp16"]
        try:
            import tensorrt  # noqa: F401

            names.append("tensorrt-fp16")
        except ImportError:
            pass
    return names


def prepare_models(cfg: Any, work: Path) -> dict[str, Path]:
    """Checkpoint, ONNX (fp32, fp16) and engine as the requested backends need them."""
    from flareseg.checkpoint import DEFAULT_SLICE_SIZE, ModelInfo, save_checkpoint
    from flareseg.export import ExportOptions, export_onnx
    from flareseg.network import build_training_network
    from flareseg.preprocess import NormalizationStats

    assert cfg.backends is not None and cfg.batches is not None
    kinds = {ALL_BACKENDS[b].kind for b in cfg.backends}
    models: dict[str, Path] = {}
    if cfg.model is None:
        torch.manual_seed(0)
        net = build_training_network(NetworkConfig(base_width=cfg.base_width)).eval()
        stats = NormalizationStats(mean=-300.0, std=450.0)  # typical CT figures; speed does not depend on them
        info = ModelInfo(network=net.config, normalization=stats, slice_size=cfg.size or DEFAULT_SLICE_SIZE)
        models["checkpoint"] = save_checkpoint(work / "random-weights.pt", net, info)
    elif cfg.model.suffix in (".pt", ".pth"):
        models["checkpoint"] = cfg.model
    elif cfg.model.suffix == ".onnx":
        models["onnx-fp32"] = cfg.model
    else:
        raise FlareSegError(f"{cfg.model}: flare-bench takes a checkpoint (.pt) or an ONNX model")
    needs_onnx = kinds & {"onnxruntime", "tensorrt"}
    if needs_onnx and "checkpoint" in models:
        fp16 = any(ALL_BACKENDS[b].precision == "fp16" and ALL_BACKENDS[b].kind != "torch" for b in cfg.backends)
        profile = (1, max(cfg.batches) // 2 or 1, max(cfg.batches))
        exported = export_onnx(
            models["checkpoint"], work, ExportOptions(fp16=fp16, batch_profile=profile, verify_slices=2)
        )
        for item in exported:
            models[f"onnx-{item.metadata.precision}"] = item.path
    if "torch" in kinds and "checkpoint" not in models:
        raise FlareSegError(
            "PyTorch backends need a checkpoint (.pt); pass --backends onnxruntime-... for an ONNX model"
        )
    if "tensorrt" in kinds:
        from flareseg.export.tensorrt import build_engine

        models["engine"] = build_engine(models["onnx-fp16"])
    return models


def make_runner(backend: Backend, models: dict[str, Path], batch: int) -> Any:
    from flareseg.runtime.runners import OnnxRuntimeRunner, TensorRTRunner, TorchRunner

    if backend.kind == "torch":
        return TorchRunner(
            models["checkpoint"],
            device=backend.device,
            precision=backend.precision,  # type: ignore[arg-type]
            channels_last=backend.channels_last,
            cuda_graph_batch=batch if backend.cuda_graph else None,
        )
    if backend.kind == "onnxruntime":
        return OnnxRuntimeRunner(
            models[f"onnx-{backend.precision}"], provider="cpu" if backend.device == "cpu" else "cuda"
        )
    return TensorRTRunner(models["engine"])
