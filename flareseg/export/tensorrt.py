"""TensorRT engines from the exported ONNX, for TensorRT 10.x and 11.x.

TensorRT is optional (``pip install 'flareseg[gpu]'``) and imported only here, inside
functions. Everything around the TensorRT calls (profile shapes, the sidecar, version
and GPU checks, the timing cache) is plain Python, tested without TensorRT.

Precision comes from the ONNX graph itself: the network is created strongly typed, so
an fp16 ONNX gives an fp16 engine. TensorRT 10.12 deprecated and TensorRT 11 removed the
FP16 builder flag; TensorRT 11 is always strongly typed and ignores the flag we pass.
The TF32 builder flag, on by default in TensorRT, is cleared unless asked for: float32
tensors then compute in full fp32, as in ONNX Runtime's CPU verification. The sidecar
records the choice.

Labels from an in-graph argmax must be int32 (or the export must output logits): the ONNX
parser turns ArgMax into TopK, whose integer indices TensorRT cannot cast to uint8 (it
converts to uint8 from float types only). TopK may also break ties between equal scores
differently from ONNX ArgMax, which matters only in fp16 where exact ties occur.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from shlex import quote
from typing import Any

from flareseg.atomic import atomic_outputs, write_bytes_atomic
from flareseg.checkpoint import file_sha256
from flareseg.errors import FlareSegError, interrupts_kept
from flareseg.export.metadata import (
    ExportMetadata,
    check_file_sha256,
    read_onnx_metadata,
    read_sidecar,
    recorded_file_sha256,
    sidecar_path,
    sidecar_text,
)
from flareseg.export.options import DEFAULT_WORKSPACE_MIB, check_batch_profile

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed; on a machine with an NVIDIA GPU and driver run "
    "`pip install 'flareseg[gpu]'` (NVIDIA's tensorrt wheel fetches its libraries from NVIDIA at install time)"
)
SUPPORTED_MAJOR = (10, 11)
#: flareseg's INT8 graph is for CPU runtimes: its activations are asymmetric uint8 (faster there).
TENSORRT_NO_INT8 = (
    "an INT8 model is for the CPU runtimes: its uint8 activations with zero points are not TensorRT's symmetric "
    "INT8; use the fp16 or fp32 ONNX on the GPU"
)


def rebuild_hint(engine_path: Path, sidecar: dict[str, Any]) -> str:
    """How to build the engine again on this machine, as a command to paste: from the ONNX model it was built
    from (the one beside it, flare-export's layout, or the one its sidecar names; either only while its SHA-256
    is still the sidecar's), else the command's form."""
    engine = sidecar.get("engine")
    built: dict[str, Any] = engine if isinstance(engine, dict) else {}
    recorded = built.get("source_onnx")
    for source in (engine_path.with_suffix(".onnx"), Path(recorded) if isinstance(recorded, str) else None):
        if source is not None and source.is_file() and file_sha256(source) == built.get("source_onnx_sha256"):
            out = (
                ""
                if source.parent.resolve() == engine_path.parent.resolve()
                else f" -o {quote(str(engine_path.parent))}"
            )
            named = "" if source.stem == engine_path.stem else f" (it writes {source.stem}.engine there)"
            command = f"flare-export {quote(str(source))} --engine{out} --overwrite"
            return f"rebuild it here from its ONNX model: `{command}`{named}"
    return (
        "rebuild it here from the ONNX model it was built from: "
        f"`flare-export MODEL.onnx --engine -o {quote(str(engine_path.parent))} --overwrite`"
    )


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a clear error saying how to install it."""
    try:
        with interrupts_kept():  # an interrupt in its initialisation comes as an ImportError: it stays one
            import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name != "tensorrt":  # the package is there, a part of it is not
            raise FlareSegError(f"TensorRT is installed but incomplete: {exc}") from None
        raise FlareSegError(INSTALL_HINT) from None
    except ImportError as exc:  # e.g. libnvinfer or libcudart cannot be loaded: installing it again changes nothing
        raise FlareSegError(
            f"TensorRT is installed but could not load its libraries ({exc}); its CUDA build must suit this "
            "machine's NVIDIA driver"
        ) from None
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


class _PerProcess:
    """TensorRT objects made once per process.

    TensorRT keeps the first logger it is given for the whole process (a later one is
    ignored, with a warning), and an engine must not outlive the runtime that deserialized
    it: one logger and one runtime serve every build and load.
    """

    module: Any = None
    logger: Any = None
    runtime: Any = None


def tensorrt_logger(trt: Any) -> Any:
    """This process's TensorRT logger, created on first use."""
    if _PerProcess.module is not trt:
        _PerProcess.module, _PerProcess.runtime = trt, None
        _PerProcess.logger = trt.Logger(trt.Logger.WARNING)
    return _PerProcess.logger


def _tensorrt_runtime(trt: Any) -> Any:
    logger = tensorrt_logger(trt)
    if _PerProcess.runtime is None:
        _PerProcess.runtime = started(trt.Runtime, logger)
    return _PerProcess.runtime


def started(factory: Any, logger: Any) -> Any:
    """``trt.Runtime(logger)`` or ``trt.Builder(logger)``; their bindings raise a bare TypeError ("factory function
    returned nullptr") when TensorRT cannot start on the GPU: that becomes one line saying so."""
    try:
        return factory(logger)
    except TypeError as exc:
        raise FlareSegError(
            f"TensorRT could not start its {getattr(factory, '__name__', 'runtime')} on this GPU ({exc}); the "
            "TensorRT log above says why (often a driver too old for this TensorRT's CUDA build)"
        ) from None


@dataclass(frozen=True)
class DeviceIdentity:
    """What a TensorRT engine is tied to besides the TensorRT version."""

    name: str
    compute_capability: str  # "9.0"

    @classmethod
    def current(cls, index: int | None = None) -> DeviceIdentity:
        """GPU ``index`` (None: torch's current device)."""
        import torch

        if not torch.cuda.is_available():
            raise FlareSegError("TensorRT needs a CUDA GPU, and torch sees none on this machine")
        if index is None:
            index = torch.cuda.current_device()
        if not 0 <= index < torch.cuda.device_count():
            raise FlareSegError(f"GPU {index} requested, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
        major, minor = torch.cuda.get_device_capability(index)
        return cls(torch.cuda.get_device_name(index), f"{major}.{minor}")


@contextmanager
def on_gpu(index: int | None) -> Iterator[DeviceIdentity]:
    """Make GPU ``index`` (None: the current one) current while TensorRT builds or loads, and describe it."""
    import torch

    identity = DeviceIdentity.current(index)
    with torch.cuda.device(torch.cuda.current_device() if index is None else index):
        yield identity


def profile_shapes(
    batch_profile: tuple[int, int, int], channels: int, size: tuple[int, int]
) -> dict[str, tuple[int, int, int, int]]:
    """The optimisation profile's min/opt/max input shapes (batch varies; channels and size are fixed)."""
    lo, opt, hi = check_batch_profile(batch_profile)
    return {name: (b, channels, size[0], size[1]) for name, b in (("min", lo), ("opt", opt), ("max", hi))}


def timing_cache_name(tensorrt_version: str, device: DeviceIdentity) -> str:
    """``tensorrt-10.9.0.34-sm90.timing-cache``: a timing cache serves one TensorRT version and GPU architecture."""
    return f"tensorrt-{tensorrt_version}-sm{device.compute_capability.replace('.', '')}{TIMING_CACHE_SUFFIX}"


def check_engine_output(meta: ExportMetadata, source: str | os.PathLike[str]) -> None:
    """Refuse to build an engine from an INT8 export, or one whose in-graph argmax outputs uint8 labels."""
    if meta.precision == "int8":
        raise FlareSegError(f"{source}: {TENSORRT_NO_INT8}")
    if meta.output_kind == "labels" and meta.label_dtype != "int32":
        raise FlareSegError(
            f"{source}: its in-graph argmax outputs {meta.label_dtype} labels, which TensorRT cannot produce "
            "(ArgMax becomes TopK, whose integer indices TensorRT does not cast to uint8); export it again with "
            "`flare-export --argmax int32`, or without --argmax (logits), before `--engine`"
        )


def engine_sidecar(
    meta: ExportMetadata,
    *,
    tensorrt_version: str,
    device: DeviceIdentity,
    workspace_mib: int,
    source_onnx_sha256: str,
    tf32: bool = False,
    engine_sha256: str | None = None,
    source_onnx: str | None = None,
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
        # False: float32 layers compute in full fp32 (the TF32 builder flag is cleared).
        "tf32": tf32,
        "source_onnx_sha256": source_onnx_sha256,
        "source_onnx": source_onnx,  # where it was, for the command that rebuilds the engine elsewhere
        "engine_sha256": engine_sha256,
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
            f"{tensorrt_version}; {rebuild_hint(Path(engine_path), sidecar)}"
        )
    if built.get("compute_capability") != device.compute_capability or built.get("gpu_name") != device.name:
        raise FlareSegError(
            f"{engine_path}: built for {built.get('gpu_name')} (compute capability {built.get('compute_capability')}), "
            f"this GPU is {device.name} ({device.compute_capability}); {rebuild_hint(Path(engine_path), sidecar)}"
        )


def engine_path_for(onnx_path: str | os.PathLike[str]) -> Path:
    p = Path(onnx_path)
    return p.with_suffix(".engine")


#: A timing cache is replaced after each build: a path named as one of these kinds is some other file (a model,
#: the engine, a sidecar, results), which a mistyped --timing-cache would destroy.
_NOT_A_CACHE = (".onnx", ".json", ".engine", ".plan", ".pt", ".pth", ".nii", ".nii.gz", ".dcm", ".csv", ".md", ".png")
TIMING_CACHE_SUFFIX = ".timing-cache"


def _refuse_overwriting_inputs(onnx_path: Path, engine_path: Path, timing_cache: str | os.PathLike[str] | None) -> None:
    """Refuse, before any work, an engine (or its sidecar) or timing cache that would replace the ONNX input, and
    a timing cache that would replace the engine, its sidecar or a file named as another kind."""
    inputs = {onnx_path.resolve(), sidecar_path(onnx_path).resolve()}
    outputs = [("engine", engine_path), ("engine's sidecar", sidecar_path(engine_path))]
    cache = Path(timing_cache) if timing_cache is not None and not Path(timing_cache).is_dir() else None
    if cache is not None:
        outputs.append(("timing cache", cache))
    for what, path in outputs:
        if path.resolve() in inputs:
            raise FlareSegError(f"{path}: the {what} would replace the input {onnx_path} or its sidecar")
    if cache is None:
        return
    if cache.resolve() in {engine_path.resolve(), sidecar_path(engine_path).resolve()}:
        raise FlareSegError(f"{cache}: the timing cache would replace the engine it is built with, or its sidecar")
    check_timing_cache(cache)


def check_timing_cache(path: str | os.PathLike[str] | None) -> None:
    """Refuse a --timing-cache file named as another kind of file (a model, a sidecar, results): the cache is
    replaced after each build. Before any work: flare-export checks it before the minutes of its ONNX export."""
    if path is None or Path(path).is_dir():
        return
    kind = next((suffix for suffix in _NOT_A_CACHE if Path(path).name.lower().endswith(suffix)), None)
    if kind is not None:
        raise FlareSegError(
            f"{path}: named as a {kind} file, not a timing cache (which is replaced after each build); give a "
            f"name ending in {TIMING_CACHE_SUFFIX}, or a folder"
        )


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str] | None = None,
    *,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    timing_cache: str | os.PathLike[str] | None = None,
    tf32: bool = False,
    device: int | None = None,
) -> Path:
    """Build an engine from a flareseg ONNX (one profile over its batch range) and write it with its sidecar.

    The build runs on GPU ``device`` (None: torch's current one). The timing cache,
    ``tensorrt-<version>-sm<cc>.timing-cache`` beside the ONNX unless given (a file, or a
    folder to hold the file of that name), is read if it
    exists and written back afterwards, so rebuilding on the same kind of GPU takes seconds
    instead of minutes; one made by another TensorRT or GPU is set aside for an empty one. A file that is no cache
    at all is refused unless named ``*.timing-cache`` (see :func:`check_timing_cache` for names refused at once).

    The engine and its sidecar are written to synced temporary files and renamed into
    place one right after the other, then the timing cache: a build that fails or is
    interrupted while writing leaves the earlier engine and sidecar as they were. The
    sidecar records the engine's SHA-256, which :func:`load_engine` checks, so a sidecar
    never passes for another engine (not even after a stop between the two renames).
    """
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else engine_path_for(onnx_path)
    _refuse_overwriting_inputs(onnx_path, engine_path, timing_cache)
    meta = read_onnx_metadata(onnx_path)  # a model TensorRT cannot take is said before TensorRT is asked for
    check_engine_output(meta, onnx_path)
    onnx_sha256 = file_sha256(onnx_path)  # the engine's record of its source, and a damaged copy refused
    check_file_sha256(onnx_path, onnx_sha256, recorded_file_sha256(onnx_path))
    trt = import_tensorrt()
    version = str(trt.__version__)
    with on_gpu(device) as identity:
        cache_path = Path(timing_cache) if timing_cache else onnx_path.parent
        if cache_path.is_dir():
            cache_path = cache_path / timing_cache_name(version, identity)
        shapes = profile_shapes(meta.batch_profile, meta.input_channels, meta.model.slice_size)
        log.info("building TensorRT %s engine for %s (profile %s)", version, identity.name, shapes)
        serialized, config = _build(trt, onnx_path, meta.input_name, shapes, workspace_mib, tf32, cache_path)
    engine = bytes(serialized)
    sidecar = engine_sidecar(
        meta,
        tensorrt_version=version,
        device=identity,
        workspace_mib=workspace_mib,
        source_onnx_sha256=onnx_sha256,
        source_onnx=str(onnx_path.resolve()),
        tf32=tf32,
        engine_sha256=hashlib.sha256(engine).hexdigest(),
    )
    with atomic_outputs() as outputs:
        with outputs.writing(engine_path) as tmp:
            tmp.write_bytes(engine)
        with outputs.writing(sidecar_path(engine_path)) as tmp:
            tmp.write_text(sidecar_text(sidecar))
    _save_timing_cache(config, cache_path)
    log.info("wrote %s", engine_path)
    return engine_path


def _build(
    trt: Any,
    onnx_path: Path,
    input_name: str,
    shapes: dict[str, tuple[int, int, int, int]],
    workspace_mib: int,
    tf32: bool,
    cache_path: Path,
) -> tuple[Any, Any]:
    """The serialized engine and the builder config that made it (it holds the timing cache)."""
    logger = tensorrt_logger(trt)
    builder = started(trt.Builder, logger)
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
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    if config.add_optimization_profile(profile) < 0:
        raise FlareSegError(f"{onnx_path}: TensorRT rejected the optimisation profile {shapes}")
    _attach_timing_cache(config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FlareSegError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    return serialized, config


def _attach_timing_cache(config: Any, cache_path: Path) -> bool:
    """Give the build the saved timing cache, or an empty one; False when the build runs without one."""
    saved = cache_path.read_bytes() if cache_path.is_file() else b""
    if saved:
        cache = config.create_timing_cache(saved)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return True
        # Read as a cache, but of another TensorRT or GPU: replaced. Not read at all: some other file, unless it
        # is named as a cache.
        if cache is None and not cache_path.name.lower().endswith(TIMING_CACHE_SUFFIX):
            raise FlareSegError(
                f"{cache_path}: not a timing cache this TensorRT can read, and not named *{TIMING_CACHE_SUFFIX}, so "
                f"not replaced; give another --timing-cache (a folder, or a name ending in {TIMING_CACHE_SUFFIX})"
            )
        log.warning(
            "%s: timing cache made by another TensorRT version or GPU, or unreadable; timing from scratch "
            "(it is replaced after the build)",
            cache_path,
        )
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT could not create an empty timing cache; building without one")
        return False
    return True


def _save_timing_cache(config: Any, cache_path: Path) -> None:
    """Write the build's timing cache; a failure only costs time at the next build, so it is logged, not raised."""
    cache = config.get_timing_cache()
    data = cache.serialize() if cache is not None else None
    if data is None:
        log.warning("%s: TensorRT returned no timing cache to save", cache_path)
        return
    try:
        write_bytes_atomic(bytes(data), cache_path)
    except FlareSegError as exc:  # the operating system's refusal, worded by atomic_output
        log.warning("could not save the timing cache: %s", exc)


def load_engine(engine_path: str | os.PathLike[str], *, device: int | None = None) -> tuple[Any, ExportMetadata]:
    """Deserialize an engine on GPU ``device`` after checking its sidecar against this TensorRT and that GPU."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise FlareSegError(f"{engine_path}: engine not found")
    sidecar = read_sidecar(engine_path)
    meta = ExportMetadata.from_dict(sidecar, source=str(engine_path))
    trt = import_tensorrt()
    with on_gpu(device) as identity:
        check_engine_compatibility(sidecar, engine_path, tensorrt_version=str(trt.__version__), device=identity)
        data = engine_path.read_bytes()
        recorded = sidecar["engine"].get("engine_sha256")
        if recorded != hashlib.sha256(data).hexdigest():
            raise FlareSegError(
                f"{engine_path}: its sidecar {sidecar_path(engine_path).name} describes another engine "
                f"(SHA-256 differs); {rebuild_hint(Path(engine_path), sidecar)}"
            )
        engine = _tensorrt_runtime(trt).deserialize_cuda_engine(data)
    if engine is None:
        raise FlareSegError(f"{engine_path}: TensorRT could not deserialize the engine")
    return engine, meta
