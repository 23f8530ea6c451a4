"""The ways flare-bench (and ``flare-bench --check``) run the model: a table of backends,
the models each needs, and the runner for each.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flareseg.errors import FlareSegError, interrupts_kept

if TYPE_CHECKING:
    from flareseg.bench.check import CheckPlan
    from flareseg.bench.run import BenchPlan
    from flareseg.export import Int8AgreementError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """One way of running the model: a runner configuration."""

    name: str
    kind: str  # torch | onnxruntime | openvino | tensorrt
    device: str
    #: The math: fp32, fp16, bf16 or int8 (an INT8 model; its float layers run in fp32).
    precision: str
    channels_last: bool = False
    cuda_graph: bool = False


ALL_BACKENDS = {
    b.name: b
    for b in (
        Backend("torch-cpu-fp32", "torch", "cpu", "fp32"),
        Backend("onnxruntime-cpu-fp32", "onnxruntime", "cpu", "fp32"),
        Backend("onnxruntime-cpu-int8", "onnxruntime", "cpu", "int8"),
        Backend("openvino-cpu-fp32", "openvino", "cpu", "fp32"),
        Backend("openvino-cpu-bf16", "openvino", "cpu", "bf16"),
        Backend("openvino-cpu-int8", "openvino", "cpu", "int8"),
        Backend("torch-cuda-fp32", "torch", "cuda", "fp32"),
        Backend("torch-cuda-bf16", "torch", "cuda", "bf16", channels_last=True),
        Backend("torch-cuda-fp16", "torch", "cuda", "fp16", channels_last=True),
        Backend("torch-cuda-fp16-graph", "torch", "cuda", "fp16", channels_last=True, cuda_graph=True),
        Backend("onnxruntime-cuda-fp32", "onnxruntime", "cuda", "fp32"),
        Backend("onnxruntime-cuda-fp16", "onnxruntime", "cuda", "fp16"),
        Backend("tensorrt-fp16", "tensorrt", "cuda", "fp16"),
    )
}


def openvino_cpu_capabilities() -> tuple[str, ...] | None:
    """OpenVINO's CPU capabilities (``FP32``, ``BF16``, ``INT8``...), or None without OpenVINO."""
    try:
        with interrupts_kept():
            import openvino as ov
    except ImportError:
        return None
    from flareseg.runtime.runners.openvino import cpu_capabilities

    return cpu_capabilities(ov.Core())


def available_backends() -> list[str]:
    """The backends this machine can run."""
    return _machine_backends()[0]


def _machine_backends() -> tuple[list[str], dict[str, str]]:
    """The backends this machine can run, and those its runtimes have but its hardware cannot, with why."""
    import torch  # here, so that ``flare-bench --help`` stays light

    names = ["torch-cpu-fp32", "onnxruntime-cpu-fp32", "onnxruntime-cpu-int8"]
    missing: dict[str, str] = {}
    capabilities = openvino_cpu_capabilities()
    if capabilities is not None:
        bf16 = "BF16" in capabilities
        names += ["openvino-cpu-fp32", *(["openvino-cpu-bf16"] if bf16 else []), "openvino-cpu-int8"]
        if not bf16:
            missing["openvino-cpu-bf16"] = "OpenVINO finds no bf16 instructions on this CPU"
    if torch.cuda.is_available():
        names += ["torch-cuda-fp32", "torch-cuda-bf16", "torch-cuda-fp16", "torch-cuda-fp16-graph"]
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            names += ["onnxruntime-cuda-fp32", "onnxruntime-cuda-fp16"]
        try:
            with interrupts_kept():
                import tensorrt  # noqa: F401

            names.append("tensorrt-fp16")
        except ImportError:
            pass
    return names, missing


#: How coarse each arithmetic is: a run is as coarse as the coarser of its backend and its model.
_COARSENESS = {"fp32": 0, "tf32": 1, "fp16": 1, "bf16": 1, "int8": 2}


def run_precision(backend: Backend, onnx_precision: str | None) -> str:
    """The precision ``backend`` runs in: its own, or that of the ONNX model given alone where that is coarser.

    ``onnx_precision``: the given ONNX model's precision, from its own metadata; None when the
    models are exported here (from a checkpoint or random weights), each in its backend's precision.
    An ONNX model given alone runs as it is, so ``onnxruntime-cpu-fp32`` runs an INT8 model in INT8.
    """
    if onnx_precision is None or backend.kind == "torch":
        return backend.precision
    if _COARSENESS.get(onnx_precision, 0) > _COARSENESS.get(backend.precision, 0):
        return onnx_precision
    return backend.precision


def cannot_run(backend: Backend, onnx_precision: str | None) -> str | None:
    """Why ``backend`` cannot run with only an ONNX model of ``onnx_precision`` given; None if it can."""
    if onnx_precision is None:
        return None  # a checkpoint or random weights: every model is exported here
    if backend.kind == "torch":
        return "needs the checkpoint, a .pt file"
    if backend.precision in ("int8", "fp16") and onnx_precision != backend.precision:
        flag = "--int8" if backend.precision == "int8" else "--fp16"
        return f"needs an {backend.precision} model, which flare-export {flag} makes from the checkpoint"
    return None


def named_twice(option: str, values: Sequence[object]) -> None:
    """Refuse a value named twice: a backend or batch size would be timed twice, the second run's figures
    replacing the first's."""
    twice = [str(v) for v in dict.fromkeys(values) if values.count(v) > 1]
    if twice:
        raise FlareSegError(f"{option} names {', '.join(twice)} more than once")


def check_backends(names: Sequence[str]) -> None:
    """Refuse unknown backends, backends named twice and backends this machine cannot run."""
    named_twice("--backends", names)
    unknown = [b for b in names if b not in ALL_BACKENDS]
    if unknown:
        raise FlareSegError(f"unknown backends {unknown}; known: {', '.join(ALL_BACKENDS)}")
    available, why = _machine_backends()  # asks each library once (OpenVINO's Core(), ONNX Runtime's providers)
    missing = [f"{b} ({why[b]})" if b in why else b for b in names if b not in available]
    if missing:
        raise FlareSegError(f"backends not available on this machine: {', '.join(missing)}")


def select_backends(
    requested: Sequence[str] | None, onnx_precision: str | None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The backends to run, and those of this machine left out with the reason for each.

    Asked-for backends must all be able to run (else one line says which cannot, and why).
    By default every available backend runs, except, with an ONNX model given alone, those
    it cannot make (see :func:`cannot_run`) and those that would only run the same model in
    the same runtime again (``onnxruntime-cpu-int8`` is ``onnxruntime-cpu-fp32`` on an INT8 model).
    """
    if requested is not None:
        check_backends(requested)
        refused = [f"{b} {why}" for b in requested if (why := cannot_run(ALL_BACKENDS[b], onnx_precision))]
        if onnx_precision is not None:
            named: dict[tuple[str, str, bool], str] = {}
            for b in requested:
                other = named.setdefault(_runtime_of(ALL_BACKENDS[b]), b)
                if other != b:
                    refused.append(f"{b} would run the same model in the same runtime as {other}")
        if refused:
            raise FlareSegError(f"with an ONNX model ({onnx_precision}) alone: " + "; ".join(refused))
        return tuple(requested), {}
    available, missing = _machine_backends()
    left_out: dict[str, str] = dict(missing)
    chosen: dict[tuple[str, str, bool], str] = {}
    for name in available:
        backend = ALL_BACKENDS[name]
        why = cannot_run(backend, onnx_precision)
        if why:
            left_out[name] = why
            continue
        if onnx_precision is None:
            chosen[(name, "", False)] = name
            continue
        key = _runtime_of(backend)
        kept = chosen.get(key)
        if kept is not None and ALL_BACKENDS[kept].precision == onnx_precision:
            left_out[name] = f"would run the same model in the same runtime as {kept}"
            continue
        if kept is not None:
            left_out[kept] = f"would run the same model in the same runtime as {name}"
        chosen[key] = name
    names = [n for n in available if n in chosen.values()]
    return tuple(names), {n: left_out[n] for n in ALL_BACKENDS if n in left_out}  # in the table's order


def _runtime_of(backend: Backend) -> tuple[str, str, bool]:
    """What tells backends apart that all run one ONNX model: the runtime, its device and OpenVINO's bf16."""
    return backend.kind, backend.device, backend.kind == "openvino" and backend.precision == "bf16"


def onnx_reference(onnx_precision: str) -> str:
    """The reference of ``flare-bench --check`` with an ONNX model alone: ONNX Runtime on the CPU, running it."""
    named = f"onnxruntime-cpu-{onnx_precision}"
    return named if named in ALL_BACKENDS else "onnxruntime-cpu-fp32"


#: The name of the models flare-bench exports into its report's models/ folder.
MODELS_NAME = "bench"


def prepare_models(cfg: BenchPlan | CheckPlan, work: Path) -> dict[str, Path]:
    """Checkpoint, ONNX (fp32, fp16, int8) and engine as the requested backends need them.

    The INT8 export of random weights (no ``cfg.model``) is calibrated on a few phantom
    slices and kept whatever its label agreement: its speed does not depend on the
    weights, and random weights have no labels worth agreeing on.
    """
    import torch

    from flareseg.checkpoint import ModelInfo, save_checkpoint
    from flareseg.export import ExportOptions, export_onnx
    from flareseg.export.options import DEFAULT_FLOAT_LADDER, DEFAULT_MIN_AGREEMENT
    from flareseg.network import NetworkConfig, build_training_network
    from flareseg.preprocess import NormalizationStats

    kinds = {ALL_BACKENDS[b].kind for b in cfg.backends}
    models: dict[str, Path] = {}
    if cfg.model is None:
        with torch.random.fork_rng(devices=[]):  # the same random weights every run; the caller's RNG untouched
            torch.manual_seed(0)
            net = build_training_network(NetworkConfig(base_width=cfg.base_width)).eval()
        stats = NormalizationStats(mean=-300.0, std=450.0)  # typical CT figures; speed does not depend on them
        info = ModelInfo(network=net.config, normalization=stats, slice_size=cfg.size)
        models["checkpoint"] = save_checkpoint(work / "random-weights.pt", net, info)
    elif cfg.model.suffix in (".pt", ".pth"):
        models["checkpoint"] = cfg.model
    elif cfg.model.suffix == ".onnx":
        from flareseg.export.metadata import read_onnx_metadata

        # Under its own precision, and as "the given model" that the float runtimes run as it is.
        models["onnx"] = cfg.model
        models[f"onnx-{read_onnx_metadata(cfg.model).precision}"] = cfg.model
    else:
        raise FlareSegError(f"{cfg.model}: flare-bench takes a checkpoint (.pt) or an ONNX model")
    needs_onnx = kinds & {"onnxruntime", "openvino", "tensorrt"}
    if needs_onnx and "checkpoint" in models:
        fp16 = any(ALL_BACKENDS[b].precision == "fp16" and ALL_BACKENDS[b].kind != "torch" for b in cfg.backends)
        int8 = any(ALL_BACKENDS[b].precision == "int8" for b in cfg.backends)
        profile = (1, max(cfg.batches) // 2 or 1, max(cfg.batches))
        random_weights = cfg.model is None
        options = ExportOptions(
            name=MODELS_NAME,
            fp16=fp16,
            batch_profile=profile,
            verify_slices=2,
            int8=int8,
            calibration_slices=4 if random_weights else 16,
            held_out_slices=2 if random_weights else 8,
            int8_min_agreement=0.0 if random_weights else DEFAULT_MIN_AGREEMENT,
            int8_float_ladder=DEFAULT_FLOAT_LADDER[:1] if random_weights else DEFAULT_FLOAT_LADDER,
        )
        # Its own name: replacing an earlier flare-bench's set never touches a deploy set kept in the same folder.
        # The export's bar goes with the info lines: `flare-bench -q` shows neither.
        progress = logging.getLogger("flareseg").isEnabledFor(logging.INFO)
        exported = export_onnx(models["checkpoint"], work, options, overwrite=True, progress=progress)
        for item in exported:
            models[f"onnx-{item.metadata.precision}"] = item.path
    if "torch" in kinds and "checkpoint" not in models:
        raise FlareSegError(
            "PyTorch backends need a checkpoint (.pt); pass --backends onnxruntime-... for an ONNX model"
        )
    if "tensorrt" in kinds:
        from flareseg.export.tensorrt import build_engine

        if "onnx-fp16" not in models:
            raise FlareSegError("tensorrt-fp16 needs an fp16 ONNX model to build its engine from")
        # In the bench's own folder, never beside a given model, whose engine and timing cache the user may keep.
        models["engine"] = build_engine(models["onnx-fp16"], work / f"{MODELS_NAME}_fp16.engine", timing_cache=work)
    return models


PlanT = TypeVar("PlanT", "BenchPlan", "CheckPlan")


def prepare_models_but_int8_below_agreement(
    cfg: PlanT, work: Path
) -> tuple[PlanT, dict[str, Path], Int8AgreementError | None]:
    """:func:`prepare_models`; where the INT8 export misses its agreement (a trained model the phantom
    calibration does not suit), the plan without its INT8 backends, their models, and that error.

    The INT8 export verifies itself and writes nothing below its threshold: one backend
    that cannot run, not a reason to stop measuring or checking the others.
    """
    from flareseg.export import Int8AgreementError

    try:
        return cfg, prepare_models(cfg, work), None
    except Int8AgreementError as exc:
        rest = dataclasses.replace(cfg, backends=tuple(b for b in cfg.backends if ALL_BACKENDS[b].precision != "int8"))
        if not rest.backends:
            raise  # nothing else was asked for: the run has nothing to measure
        log.error("INT8 export: %s", exc)
        return rest, prepare_models(rest, work), exc


def model_file(backend: Backend, models: dict[str, Path]) -> Path:
    """The prepared model that runs ``backend``: the checkpoint, an ONNX model or the engine."""
    if backend.kind in ("torch", "tensorrt"):
        key = "checkpoint" if backend.kind == "torch" else "engine"
    elif backend.kind == "openvino":
        # An INT8 model runs its integer layers in int8 whatever the hint; its float layers in fp32.
        key = "onnx-int8" if backend.precision == "int8" else "onnx-fp32"
    else:
        key = f"onnx-{backend.precision}"
    if key == "onnx-fp32" and key not in models and "onnx" in models:
        key = "onnx"  # an ONNX model given alone: the float runtimes run it as it is
    if key not in models:
        raise FlareSegError(f"{backend.name} needs the {key} model, which was not prepared")
    return models[key]


def fresh_process_args(backend: Backend, models: dict[str, Path], threads: int | None = None) -> list[str]:
    """``flare-infer``'s arguments that run ``backend`` (model, backend, device, precision; ``threads`` for a CPU
    backend)."""
    if backend.kind == "openvino" and backend.precision == "bf16":
        raise FlareSegError(f"{backend.name}: flare-infer has no OpenVINO bf16 option to run it in a fresh process")
    # Absolute, as typed: the fresh process runs in a folder of its own (abspath would take "link/.." as text).
    path = str(Path(model_file(backend, models)).absolute())
    if backend.kind == "tensorrt":
        return ["--engine", path]
    args = ["--model", path, "--backend", backend.kind, "--device", backend.device]
    if backend.kind == "torch":
        args += ["--precision", backend.precision]
        args += ["--channels-last"] if backend.channels_last else ["--no-channels-last"]
        args += ["--cuda-graph"] if backend.cuda_graph else []
    if backend.kind == "onnxruntime":
        args += ["--ort-provider", "cpu" if backend.device == "cpu" else "cuda"]
    if threads is not None and backend.device == "cpu":
        args += ["--threads", str(threads)]
    return args


def make_runner(backend: Backend, models: dict[str, Path], batch: int, *, threads: int | None = None) -> Any:
    """The runner of ``backend``; ``threads`` for ONNX Runtime and OpenVINO sessions (PyTorch's are the
    process's, set by the command)."""
    from flareseg.runtime.runners import OnnxRuntimeRunner, OpenVINORunner, TensorRTRunner, TorchRunner

    model = model_file(backend, models)
    if backend.kind == "torch":
        return TorchRunner(
            model,
            device=backend.device,
            precision=backend.precision,  # type: ignore[arg-type]
            channels_last=backend.channels_last,
            cuda_graph_batch=batch if backend.cuda_graph else None,
        )
    if backend.kind == "onnxruntime":
        return OnnxRuntimeRunner(model, provider="cpu" if backend.device == "cpu" else "cuda", threads=threads)
    if backend.kind == "openvino":
        return OpenVINORunner(model, precision="bf16" if backend.precision == "bf16" else "fp32", threads=threads)
    return TensorRTRunner(model)
