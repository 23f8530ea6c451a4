"""TensorRT engines from the exported ONNX, for TensorRT 10.x and 11.x.

TensorRT is optional (``pip install 'flareseg[gpu]'``) and imported only here, inside
functions. Everything around the TensorRT calls (profile shapes, the sidecar, version
and GPU checks) is plain Python, tested without TensorRT.

Precision comes from the ONNX graph itself: the network is created strongly typed, so
an fp16 ONNX gives an fp16 engine. TensorRT 10.12 deprecated and TensorRT 11 removed the
FP16 builder flag; TensorRT 11 is always strongly typed and ignores the flag we pass.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flareseg.atomic import write_bytes_atomic
from flareseg.checkpoint import file_sha256
from flareseg.errors import FlareSegError
from flareseg.export.metadata import ExportMetadata, read_onnx_metadata, read_sidecar, write_sidecar

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed; on a machine with an NVIDIA GPU and driver run "
    "`pip install 'flareseg[gpu]'` (NVIDIA's tensorrt wheel fetches its libraries from NVIDIA at install time)"
)
SUPPORTED_MAJOR = (10, 11)
DEFAULT_WORKSPACE_MIB = 4096


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a clear error saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise FlareSegError(INSTALL_HINT) from None
    check_tensorrt_version(str(trt.__version__))
    return trt


def check_tensorrt_version(version: str) -> None:
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise FlareSegError(f"unrecognised TensorRT version {version!r}") from None
    if major not in SUPPORTED_MAJOR:
        raise FlareSegError(
            f"TensorRT {version} is not supported; flareseg supports TensorRT "
            + " and ".join(f"{m}.x" for m in SUPPORTED_MAJOR)
        )


@dataclass(frozen=True)
class DeviceIdentity:
    """What a TensorRT engine is tied to besides the TensorRT version."""

    name: str
    compute_capability: str  # "9.0"

    @classmethod
    def current(cls, index: int = 0) -> DeviceIdentity:
        import torch

        if not torch.cuda.is_available():
            raise FlareSegError("TensorRT needs a CUDA GPU, and torch sees none on this machine")
        major, minor = torch.cuda.get_device_capability(index)
        return cls(torch.cuda.get_device_name(index), f"{major}.{minor}")


def profile_shapes(
    batch_profile: tuple[int, int, int], channels: int, size: tuple[int, int]
) -> dict[str, tuple[int, int, int, int]]:
    """The optimisation profile's min/opt/max input shapes (batch varies; channels and size are fixed)."""
    lo, opt, hi = batch_profile
    if not 1 <= lo <= opt <= hi:
        raise FlareSegError(f"batch profile must satisfy 1 <= min <= opt <= max, got {lo},{opt},{hi}")
    return {name: (b, channels, size[0], size[1]) for name, b in (("min", lo), ("opt", opt), ("max", hi))}


def engine_sidecar(
    meta: ExportMetadata,
    *,
    tensorrt_version: str,
    device: DeviceIdentity,
    workspace_mib: int,
    source_onnx_sha256: str,
) -> dict[str, Any]:
    """The JSON written beside an engine: the ONNX's metadata plus what the engine is bound to."""
    data = meta.to_dict()
    data["engine"] = {
        "tensorrt_version": tensorrt_version,
        "gpu_name": device.name,
        "compute_capability": device.compute_capability,
        "profile": {
            k: list(v)
            for k, v in profile_shapes(meta.batch_profile, meta.input_channels, meta.model.slice_size).items()
        },
        "workspace_mib": workspace_mib,
        "strongly_typed": True,
        "source_onnx_sha256": source_onnx_sha256,
    }
    return data


def check_engine_compatibility(
    sidecar: dict[str, Any], engine_path: str | os.PathLike[str], *, tensorrt_version: str, device: DeviceIdentity
) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU, saying which."""
    built = sidecar.get("engine")
    if not isinstance(built, dict):
        raise FlareSegError(f"{engine_path}: its sidecar does not describe a TensorRT engine")
    if built.get("tensorrt_version") != tensorrt_version:
        raise FlareSegError(
            f"{engine_path}: built with TensorRT {built.get('tensorrt_version')}, this machine has TensorRT "
            f"{tensorrt_version}; rebuild it here with `flare-export --engine`"
        )
    if built.get("compute_capability") != device.compute_capability or built.get("gpu_name") != device.name:
        raise FlareSegError(
            f"{engine_path}: built for {built.get('gpu_name')} (compute capability {built.get('compute_capability')}), "
            f"this GPU is {device.name} ({device.compute_capability}); rebuild it here with `flare-export --engine`"
        )


def engine_path_for(onnx_path: str | os.PathLike[str]) -> Path:
    p = Path(onnx_path)
    return p.with_suffix(".engine")


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str] | None = None,
    *,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    timing_cache: str | os.PathLike[str] | None = None,
) -> Path:
    """Build an engine from a flareseg ONNX (one profile over its batch range) and write it with its sidecar.

    The timing cache is read if it exists and written back afterwards, so rebuilding on
    the same GPU takes seconds instead of minutes.
    """
    trt = import_tensorrt()
    device = DeviceIdentity.current()
    onnx_path = Path(onnx_path)
    meta = read_onnx_metadata(onnx_path)
    engine_path = Path(engine_path) if engine_path else engine_path_for(onnx_path)
    cache_path = Path(timing_cache) if timing_cache else onnx_path.parent / "tensorrt.timing-cache"

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FlareSegError(f"{onnx_path}: TensorRT could not parse the ONNX model ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(meta.batch_profile, meta.input_channels, meta.model.slice_size)
    profile.set_shape(meta.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("building TensorRT %s engine for %s (profile %s)", trt.__version__, device.name, shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FlareSegError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    write_bytes_atomic(bytes(serialized), engine_path)
    write_bytes_atomic(bytes(config.get_timing_cache().serialize()), cache_path)
    write_sidecar(
        engine_path,
        engine_sidecar(
            meta,
            tensorrt_version=str(trt.__version__),
            device=device,
            workspace_mib=workspace_mib,
            source_onnx_sha256=file_sha256(onnx_path),
        ),
    )
    log.info("wrote %s", engine_path)
    return engine_path


def load_engine(engine_path: str | os.PathLike[str]) -> tuple[Any, ExportMetadata]:
    """Deserialize an engine after checking its sidecar against this machine's TensorRT and GPU."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise FlareSegError(f"{engine_path}: engine not found")
    sidecar = read_sidecar(engine_path)
    meta = ExportMetadata.from_dict(sidecar, source=str(engine_path))
    trt = import_tensorrt()
    check_engine_compatibility(
        sidecar, engine_path, tensorrt_version=str(trt.__version__), device=DeviceIdentity.current()
    )
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise FlareSegError(f"{engine_path}: TensorRT could not deserialize the engine")
    return engine, meta
