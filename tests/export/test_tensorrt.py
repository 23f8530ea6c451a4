"""The TensorRT path's control flow, driven through a fake ``tensorrt`` module on CPU tensors.

TensorRT cannot be installed on our machines (see ../shared/SPEC.md, Platforms), so these
tests check OUR code around it: timing-cache fallback, write order, sidecar digest, GPU
index, profile bounds, one output buffer, synchronisation on deactivate, the refusal of
uint8 labels and the TF32 choice. They do not check TensorRT itself; the fake follows the
documented TensorRT 10/11 Python API (return values included: False or None where the
real calls may return them). The real engine is checked by test_export.py's
``test_tensorrt_engine_agrees_with_onnx`` where TensorRT and a GPU exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch

import flareseg.export.tensorrt as trt_export
import flareseg.runtime.runners.tensorrt as trt_runner
from flareseg.checkpoint import ModelInfo
from flareseg.errors import FlareSegError
from flareseg.export.metadata import ExportMetadata, embed_in_onnx, read_sidecar, sidecar_path
from flareseg.export.tensorrt import DeviceIdentity, build_engine, load_engine, timing_cache_name
from flareseg.network import NetworkConfig
from flareseg.preprocess import NormalizationStats
from flareseg.runtime.runners import TensorRTRunner

VERSION = "10.9.0.34"
SIZE = (64, 64)
CLASSES = 5
GPUS = {0: DeviceIdentity("NVIDIA H100 80GB HBM3", "9.0"), 1: DeviceIdentity("NVIDIA L4", "8.9")}


def make_fake_tensorrt(version: str = VERSION) -> types.ModuleType:
    """A stand-in for the ``tensorrt`` module: it records calls and can fail where TensorRT's API may.

    It checks our control flow, not TensorRT: names, signatures and return conventions follow
    NVIDIA's Python API documentation (set_timing_cache -> bool, create_timing_cache /
    get_timing_cache / build_serialized_network / deserialize_cuda_engine -> object or None,
    set_input_shape -> bool, get_tensor_profile_shape(name, profile) -> [min, opt, max]).
    """
    trt: Any = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.log = []  # (event, details...) in call order
    trt.memory = {}  # data_ptr -> CPU tensor, filled by FakeCuda: the "device memory" the context reads and writes
    trt.active_gpu = None  # the GPU index made current by on_gpu / the runner's scope
    trt.gpu = 0  # the GPU the fake "builds" on and reads timing caches for
    # Knobs a test turns to make a call fail the way the real one can.
    trt.fail = set()
    trt.input_dtype = "float32"
    trt.output_dtype = "float32"

    class DataType:
        float32, float16, int32, uint8, int64 = "float32", "float16", "int32", "uint8", "int64"

    for name in ("float32", "float16", "int32", "uint8", "int64"):
        setattr(trt, name, getattr(DataType, name))
    trt.DataType = DataType

    class Logger:
        WARNING = "warning"

        def __init__(self, severity: str) -> None:
            trt.log.append(("Logger", severity))

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 5

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        TF32 = "tf32"

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class TimingCache:
        def __init__(self, header: str, entries: int) -> None:
            self.header, self.entries = header, entries

        def serialize(self) -> bytes | None:
            if "serialize" in trt.fail:
                return None
            return f"{self.header}|{self.entries}".encode()

    def cache_header() -> str:
        return f"{trt.__version__}/sm{GPUS[trt.gpu].compute_capability.replace('.', '')}"

    class BuilderConfig:
        def __init__(self) -> None:
            self.flags = {"tf32"}  # TensorRT's default: TF32 on
            self.profiles: list[Any] = []
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            trt.log.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: str) -> None:
            self.flags.discard(flag)

        def add_optimization_profile(self, profile: Any) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache | None:
            trt.log.append(("create_timing_cache", bytes(data)))
            if "create_timing_cache" in trt.fail or (data and b"|" not in data):
                return None
            if not data:
                return TimingCache(cache_header(), 0)
            header, entries = bytes(data).decode().split("|")
            return TimingCache(header, int(entries))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            ok = ignore_mismatch or cache.header == cache_header()
            trt.log.append(("set_timing_cache", cache.header, cache.entries, ignore_mismatch, ok))
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self) -> TimingCache | None:
            return None if "get_timing_cache" in trt.fail else self.cache

    class Profile:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self.name, self.shapes = name, [tuple(lo), tuple(opt), tuple(hi)]

    class Network:
        pass

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            trt.log.append(("create_network", flags))
            return Network()

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
            trt.log.append(("build", trt.active_gpu, sorted(config.flags)))
            if "build" in trt.fail:
                return None
            if config.cache is not None:
                config.cache.entries += 1  # the build timed something new
            (profile,) = config.profiles
            plan = {"name": profile.name, "shapes": profile.shapes, "in": trt.input_dtype, "out": trt.output_dtype}
            return json.dumps(plan).encode()

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            trt.log.append(("parse", Path(path).name))
            if "parse" in trt.fail:
                self.num_errors = 1
                return False
            return True

        def get_error(self, i: int) -> str:
            return "fake parser error"

    class ExecutionContext:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.shape, self.addresses = engine, None, {}

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            lo, _, hi = self.engine.plan["shapes"]
            ok = "set_input_shape" not in trt.fail and len(shape) == 4 and lo[0] <= shape[0] <= hi[0]
            trt.log.append(("set_input_shape", tuple(shape), ok))
            if ok:
                self.shape = tuple(shape)
            return ok

        def get_tensor_shape(self, name: str) -> tuple:
            n, _, h, w = self.shape if self.shape else (-1, 0, *SIZE)
            return (n, CLASSES, h, w) if self.engine.plan["out"].startswith("float") else (n, h, w)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            trt.log.append(("execute", trt.active_gpu, stream_handle, self.shape))
            x = trt.memory[self.addresses["image"]]
            out = trt.memory[self.addresses["logits"]]
            n = self.shape[0]
            # logits[b, k] = (k + 1) * image[b, 0]: an output that depends on the input and the class.
            scale = torch.arange(1, CLASSES + 1, dtype=torch.float32, device=x.device).view(1, CLASSES, 1, 1)
            out[:n] = (x[:, :1] * scale).to(out.dtype)
            if x.is_cuda:
                trt.log.append(("cuda current", torch.cuda.current_device(), x.device.index, out.device.index))
            return "execute" not in trt.fail

        def __del__(self) -> None:
            trt.log.append(("context released",))

    class Engine:
        def __init__(self, plan: dict[str, Any]) -> None:
            self.plan = plan
            self.num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ["image", "logits"][i]

        def get_tensor_mode(self, name: str) -> str:
            return TensorIOMode.INPUT if name == "image" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> str:
            return self.plan["in"] if name == "image" else self.plan["out"]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple]:
            assert name == self.plan["name"] and profile_index == 0
            return [tuple(s) for s in self.plan["shapes"]]

        def create_execution_context(self) -> ExecutionContext | None:
            return None if "create_execution_context" in trt.fail else ExecutionContext(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            trt.log.append(("Runtime",))

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            trt.log.append(("deserialize", trt.active_gpu))
            return None if "deserialize" in trt.fail else Engine(json.loads(data))

    for cls in (Logger, NetworkDefinitionCreationFlag, MemoryPoolType, BuilderFlag, TensorIOMode, Builder):
        setattr(trt, cls.__name__, cls)
    trt.OnnxParser, trt.Runtime = OnnxParser, Runtime
    trt.IBuilderConfig, trt.ICudaEngine, trt.IExecutionContext, trt.ITimingCache = (
        BuilderConfig,
        Engine,
        ExecutionContext,
        TimingCache,
    )
    return trt


class FakeStream:
    def __init__(self, trt: Any, name: str) -> None:
        self.trt, self.name, self.cuda_stream = trt, name, id(self)

    def wait_stream(self, other: FakeStream) -> None:
        self.trt.log.append(("wait", self.name, other.name))

    def synchronize(self) -> None:
        self.trt.log.append(("synchronize", self.name, self.trt.active_gpu))


class FakeCuda(trt_runner.CudaCalls):
    """CPU stand-in for the runner's CUDA calls: tensors live on the CPU and are registered as "device memory"."""

    def __init__(self, device: torch.device, trt: Any) -> None:
        super().__init__(device)
        self.trt = trt
        self.allocations: list[tuple[tuple[int, ...], torch.dtype]] = []

    @contextmanager
    def scope(self):  # type: ignore[override]
        before, self.trt.active_gpu = self.trt.active_gpu, self.device.index
        try:
            yield
        finally:
            self.trt.active_gpu = before

    def new_stream(self) -> FakeStream:
        return FakeStream(self.trt, "runner")

    def current_stream(self) -> FakeStream:
        return FakeStream(self.trt, "current")

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.allocations.append((tuple(shape), dtype))
        t = torch.empty(shape, dtype=dtype)
        self.trt.memory[t.data_ptr()] = t
        return t

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        t = batch.detach().to(torch.float32).contiguous().clone()
        self.trt.memory[t.data_ptr()] = t
        return t

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None:
        self.trt.log.append(("keep_alive", stream.name))


class RegisteringCuda(trt_runner.CudaCalls):
    """The runner's real CUDA calls, its tensors registered as the fake context's device memory."""

    def __init__(self, device: torch.device, trt: Any) -> None:
        super().__init__(device)
        self.trt = trt
        self.allocations: list[tuple[tuple[int, ...], torch.dtype]] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.allocations.append((tuple(shape), dtype))
        t = super().empty(shape, dtype)
        self.trt.memory[t.data_ptr()] = t
        return t

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        t = super().to_device(batch)
        self.trt.memory[t.data_ptr()] = t
        return t


@pytest.fixture
def trt(monkeypatch) -> Any:
    """The fake module installed as ``tensorrt``, with GPUs 0 (H100) and 1 (L4) made current by ``on_gpu``."""
    fake = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)

    @contextmanager
    def on_gpu(index):
        index = 0 if index is None else index
        before, fake.active_gpu, fake.gpu = fake.active_gpu, index, index
        fake.log.append(("on_gpu", index))
        try:
            yield GPUS[index]
        finally:
            fake.active_gpu = before

    monkeypatch.setattr(trt_export, "on_gpu", on_gpu)
    # Runners are made for cuda:N on this CPU-only machine; their CUDA calls go to FakeCuda.
    monkeypatch.setattr(trt_runner, "cuda_device", lambda d: torch.device(d))
    return fake


def _onnx(
    path: Path, *, output_kind: str = "logits", label_dtype: str | None = None, batch=(2, 4, 8), precision="fp32"
) -> Path:
    """A file with flareseg export metadata (no graph: the fake parser does not read it)."""
    info = ModelInfo(NetworkConfig(base_width=4, in_channels=1), NormalizationStats(mean=-300.0, std=450.0), SIZE)
    meta = ExportMetadata(
        model=info,
        input_channels=1,
        output_kind=output_kind,  # type: ignore[arg-type]
        label_dtype=label_dtype,
        precision=precision,  # type: ignore[arg-type]
        batch_profile=batch,
        source_checkpoint_sha256="0" * 64,
    )
    model = onnx.ModelProto()
    embed_in_onnx(model, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _runner(trt: Any, engine: Path, gpu: int = 0) -> TensorRTRunner:
    runner = TensorRTRunner(engine, device=f"cuda:{gpu}")
    runner.cuda = FakeCuda(runner.device, trt)
    return runner


def _events(trt: Any, name: str) -> list[tuple]:
    return [e for e in trt.log if e[0] == name]


# --- build_engine -------------------------------------------------------------------


def test_build_writes_engine_then_sidecar_then_cache_named_by_version_and_gpu(trt, tmp_path, monkeypatch):
    model = _onnx(tmp_path / "m.onnx")
    order: list[str] = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: order.append(Path(b).name) or replace(a, b))

    engine = build_engine(model)

    cache = f"tensorrt-{VERSION}-sm90.timing-cache"
    assert timing_cache_name(VERSION, GPUS[0]) == cache
    assert order == ["m.engine", "m.engine.json", cache]
    assert (tmp_path / cache).read_bytes() == f"{VERSION}/sm90|1".encode()
    built = read_sidecar(engine)["engine"]
    assert built["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert built["tf32"] is False and built["compute_capability"] == "9.0" and built["tensorrt_version"] == VERSION
    assert built["profile"] == {"min": [2, 1, 64, 64], "opt": [4, 1, 64, 64], "max": [8, 1, 64, 64]}
    (build,) = _events(trt, "build")
    assert build[2] == []  # TF32 cleared: fp32 layers compute in fp32
    assert _events(trt, "create_network") == [("create_network", 1 << 5)]  # strongly typed
    assert _events(trt, "set_memory_pool_limit") == [("set_memory_pool_limit", "workspace", 4096 << 20)]


def test_tf32_on_request_is_set_and_recorded(trt, tmp_path):
    engine = build_engine(_onnx(tmp_path / "m.onnx"), tf32=True)
    assert _events(trt, "build")[0][2] == ["tf32"]
    assert read_sidecar(engine)["engine"]["tf32"] is True


def test_second_build_reuses_the_timing_cache(trt, tmp_path):
    model = _onnx(tmp_path / "m.onnx")
    build_engine(model)
    build_engine(model)
    sets = _events(trt, "set_timing_cache")
    assert [(s[2], s[4]) for s in sets] == [(0, True), (1, True)]  # second build starts from the saved entry
    assert (tmp_path / f"tensorrt-{VERSION}-sm90.timing-cache").read_bytes().endswith(b"|2")


def test_timing_cache_from_another_gpu_falls_back_to_an_empty_one(trt, tmp_path, caplog):
    model = _onnx(tmp_path / "m.onnx")
    foreign = tmp_path / "shared.timing-cache"
    foreign.write_bytes(f"{VERSION}/sm89|7".encode())  # an L4's cache, given explicitly
    with caplog.at_level(logging.WARNING):
        engine = build_engine(model, timing_cache=foreign)
    sets = _events(trt, "set_timing_cache")
    assert [(s[1], s[2], s[3], s[4]) for s in sets] == [
        (f"{VERSION}/sm89", 7, False, False),  # refused: mismatch is never ignored
        (f"{VERSION}/sm90", 0, False, True),  # the empty one
    ]
    assert "another TensorRT version or GPU" in caplog.text and str(foreign) in caplog.text
    assert foreign.read_bytes() == f"{VERSION}/sm90|1".encode()  # replaced by this GPU's
    assert read_sidecar(engine)["engine"]["compute_capability"] == "9.0"


def test_unreadable_cache_and_none_returns_do_not_stop_the_build(trt, tmp_path, caplog):
    model = _onnx(tmp_path / "m.onnx")
    cache = tmp_path / f"tensorrt-{VERSION}-sm90.timing-cache"
    cache.write_bytes(b"garbage")  # create_timing_cache returns None for it
    build_engine(model)
    assert [e[1] for e in _events(trt, "create_timing_cache")] == [b"garbage", b""]
    assert cache.read_bytes().endswith(b"|1")

    trt.log.clear()
    trt.fail = {"create_timing_cache", "get_timing_cache"}
    cache.unlink()
    with caplog.at_level(logging.WARNING):
        engine = build_engine(model)
    assert _events(trt, "set_timing_cache") == []  # built without a cache
    assert not cache.exists() and "no timing cache to save" in caplog.text
    assert read_sidecar(engine)["engine"]["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()

    trt.fail = {"serialize"}
    build_engine(model)
    assert not cache.exists()


def test_a_timing_cache_path_that_names_another_file_is_refused_and_the_file_kept(trt, tmp_path):
    # The cache is replaced after each build: a mistyped --timing-cache replaced a model, the engine or a results
    # CSV with 16 bytes of cache, and the export said "wrote" (flags review).
    model = _onnx(tmp_path / "m.onnx")
    other = _onnx(tmp_path / "other_fp32.onnx")
    (tmp_path / "scores.csv").write_text("case,organ,dsc\n")
    notes = tmp_path / "notes"
    notes.write_bytes(b"my notes, not a cache")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    refused = {
        other: r"named as a \.onnx file, not a timing cache",
        tmp_path / "m.engine": r"the timing cache would replace the engine it is built with, or its sidecar",
        tmp_path / "m.engine.json": r"the timing cache would replace the engine it is built with, or its sidecar",
        tmp_path / "scores.csv": r"named as a \.csv file",
        notes: r"not a timing cache this TensorRT can read, and not named \*\.timing-cache, so not replaced",
    }
    for cache, said in refused.items():
        with pytest.raises(FlareSegError, match=f"^{re.escape(str(cache))}: {said}"):
            build_engine(model, timing_cache=cache)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing replaced
    # A cache of another GPU under a name of the user's (trtexec's timing.cache) is a cache: replaced, as before;
    # so is anything under a cache's name, in any case.
    for name in ("timing.cache", "NOTES.TIMING-CACHE"):
        (tmp_path / name).write_bytes(f"{VERSION}/sm89|7".encode() if name == "timing.cache" else b"not a cache")
        build_engine(model, timing_cache=tmp_path / name, engine_path=tmp_path / f"{name}.engine")
        assert (tmp_path / name).read_bytes() == f"{VERSION}/sm90|1".encode()
    # A name of the user's that holds a cache this TensorRT reads is used and written back, as before.
    mine = tmp_path / "mine.bin"
    build_engine(model, timing_cache=tmp_path / "fresh.timing-cache")
    mine.write_bytes((tmp_path / "fresh.timing-cache").read_bytes())
    build_engine(model, timing_cache=mine, engine_path=tmp_path / "again.engine")
    assert mine.read_bytes().endswith(b"|2")


def test_a_failed_build_writes_nothing(trt, tmp_path):
    model = _onnx(tmp_path / "m.onnx")
    trt.fail = {"build"}
    with pytest.raises(FlareSegError, match="TensorRT failed to build an engine"):
        build_engine(model)
    trt.fail = {"parse"}
    with pytest.raises(FlareSegError, match=r"could not parse the ONNX model \(fake parser error\)"):
        build_engine(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_interrupted_rebuild_leaves_the_old_engine_and_sidecar_and_never_pairs_them_with_new_ones(
    trt, tmp_path, monkeypatch
):
    model = _onnx(tmp_path / "m.onnx")
    engine = build_engine(model)
    old_engine, old_sidecar = engine.read_bytes(), sidecar_path(engine).read_text()

    def crash(*args):
        raise KeyboardInterrupt  # killed between the engine and its sidecar

    trt.input_dtype = "float16"  # the rebuild makes a different engine
    with monkeypatch.context() as patch:
        patch.setattr(trt_export, "sidecar_text", crash)
        with pytest.raises(KeyboardInterrupt):
            build_engine(model)
    assert engine.read_bytes() == old_engine and sidecar_path(engine).read_text() == old_sidecar
    assert sorted(p.name for p in tmp_path.iterdir() if ".part" in p.name) == []
    load_engine(engine)  # the earlier pair still loads

    build_engine(model)
    assert engine.read_bytes() != old_engine
    sidecar_path(engine).write_text(old_sidecar)  # an old sidecar copied back beside a new engine
    with pytest.raises(FlareSegError, match=r"describes another engine \(SHA-256 differs\); rebuild it here"):
        load_engine(engine)


@pytest.mark.parametrize(
    ("kind", "dtype", "accepted"), [("labels", "uint8", False), ("labels", "int32", True), ("logits", None, True)]
)
def test_uint8_labels_are_refused_for_engines(trt, tmp_path, kind, dtype, accepted):
    model = _onnx(tmp_path / "m.onnx", output_kind=kind, label_dtype=dtype)
    if accepted:
        assert build_engine(model).is_file()
    else:
        with pytest.raises(FlareSegError, match=r"uint8 labels.*`flare-export --argmax int32`, or without --argmax"):
            build_engine(model)
        assert _events(trt, "parse") == []  # refused before any TensorRT work


def test_one_logger_and_one_runtime_per_process(trt, tmp_path):
    model = _onnx(tmp_path / "m.onnx")
    engine = build_engine(model)
    build_engine(model)
    load_engine(engine)
    load_engine(engine)
    assert len(_events(trt, "Logger")) == 1 and len(_events(trt, "Runtime")) == 1


# --- load_engine and TensorRTRunner -------------------------------------------------


def test_engine_is_checked_against_the_runners_own_gpu(trt, tmp_path):
    model = _onnx(tmp_path / "m.onnx")
    trt.gpu = 1
    engine = build_engine(model, device=1)  # built on the L4, GPU 1
    assert _events(trt, "build")[0][1] == 1 and read_sidecar(engine)["engine"]["gpu_name"] == "NVIDIA L4"
    with pytest.raises(FlareSegError, match=r"built for NVIDIA L4 \(compute capability 8.9\), this GPU is NVIDIA H100"):
        _runner(trt, engine, gpu=0).activate()
    trt.log.clear()
    with _runner(trt, engine, gpu=1) as runner:
        runner.infer(torch.zeros(3, 1, *SIZE))
    assert ("on_gpu", 1) in trt.log and _events(trt, "deserialize") == [("deserialize", 1)]
    (execute,) = _events(trt, "execute")
    assert execute[1] == 1  # enqueued with the runner's GPU current
    assert _events(trt, "synchronize") == [("synchronize", "runner", 1)]


def test_runner_takes_its_batch_range_from_the_profile_and_refuses_outside_it(trt, tmp_path):
    engine = build_engine(_onnx(tmp_path / "m.onnx", batch=(2, 4, 8)))
    with _runner(trt, engine) as runner:
        assert (runner.min_batch, runner.max_batch) == (2, 8)
        with pytest.raises(FlareSegError, match=r"batch 1 is below the model's minimum 2; pad it"):
            runner.infer(torch.zeros(1, 1, *SIZE))
        with pytest.raises(FlareSegError, match="exceeds the model's maximum 8"):
            runner.infer(torch.zeros(9, 1, *SIZE))
        assert _events(trt, "execute") == []
        trt.fail = {"set_input_shape"}
        with pytest.raises(FlareSegError, match=r"TensorRT refused the input shape \(3, 1, 64, 64\)"):
            runner.infer(torch.zeros(3, 1, *SIZE))
        assert _events(trt, "execute") == []  # never runs with a stale shape


def test_flare_bench_builds_its_engine_in_its_own_folder_never_beside_the_given_model(trt, tmp_path):
    from types import SimpleNamespace

    from flareseg.bench.backends import prepare_models

    given = _onnx(tmp_path / "deploy" / "m_fp16.onnx", precision="fp16")
    (tmp_path / "deploy" / "m_fp16.engine").write_bytes(b"the user's own engine")
    work = tmp_path / "bench" / "models"
    work.mkdir(parents=True)
    cfg = SimpleNamespace(model=given, backends=("tensorrt-fp16",), batches=(1, 8), base_width=4, size=SIZE)
    models = prepare_models(cfg, work)  # type: ignore[arg-type]
    assert models["engine"] == work / "bench_fp16.engine" and models["engine"].is_file()
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["m_fp16.engine", "m_fp16.onnx"]
    assert (tmp_path / "deploy" / "m_fp16.engine").read_bytes() == b"the user's own engine"
    assert any(p.name.endswith(".timing-cache") for p in work.iterdir())


@pytest.mark.parametrize("profile", [(1, 2, 4), (16, 16, 32), (2, 8, 8)])
def test_flare_infers_default_batch_for_an_engine_is_its_profiles_opt(trt, tmp_path, profile):
    # A fixed default (8) lay outside engines built with --batch 1,2,4 or 16,16,32: every case failed.
    from flareseg.runtime.cli import engine_batch

    engine = build_engine(_onnx(tmp_path / "m.onnx", batch=profile))
    assert engine_batch(engine) == profile[1]
    with _runner(trt, engine) as runner:
        assert runner.min_batch <= engine_batch(engine) <= runner.max_batch
        assert runner.preferred_batch == profile[1]  # the API's default batch for this runner
    sidecar_path(engine).unlink()
    with pytest.raises(FlareSegError, match=r"its sidecar m\.engine\.json is missing"):
        engine_batch(engine)


def test_one_output_buffer_at_profile_max_and_views_of_it(trt, tmp_path):
    engine = build_engine(_onnx(tmp_path / "m.onnx", batch=(1, 4, 8)))
    x = torch.randn(8, 1, *SIZE)
    scale = torch.arange(1, CLASSES + 1, dtype=torch.float32).view(1, CLASSES, 1, 1)
    with _runner(trt, engine) as runner:
        cuda = runner.cuda
        for n in (3, 8, 1, 5):
            out = runner.infer(x[:n])
            assert out.shape == (n, CLASSES, *SIZE)
            assert torch.equal(out, x[:n] * scale)
            assert out.data_ptr() == runner._output.data_ptr()
        assert cuda.allocations == [((8, CLASSES, *SIZE), torch.float32)]
    shapes = [e[3][0] for e in _events(trt, "execute")]
    assert shapes == [3, 8, 1, 5]
    # The runner's stream waits for the caller's stream before, and the caller's for it after, each run.
    waits = [e for e in trt.log if e[0] in ("wait", "execute")][:3]
    assert [w[0] for w in waits] == ["wait", "execute", "wait"]
    assert waits[0][1:] == ("runner", "current") and waits[2][1:] == ("current", "runner")


def test_deactivate_synchronises_before_releasing_the_context(trt, tmp_path):
    engine = build_engine(_onnx(tmp_path / "m.onnx"))
    runner = _runner(trt, engine)
    with runner:
        runner.infer(torch.zeros(2, 1, *SIZE))
        trt.log.clear()
    names = [e[0] for e in trt.log]
    assert names.index("synchronize") < names.index("context released")
    assert runner.context is None and runner.engine is None and runner._output.numel() == 0


def test_a_cuda_error_while_deactivating_still_releases_the_engine(trt, tmp_path):
    engine = build_engine(_onnx(tmp_path / "m.onnx"))
    runner = _runner(trt, engine).activate()

    def sticky_error() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    runner.stream.synchronize = sticky_error
    with pytest.raises(RuntimeError, match="illegal memory access"):
        runner.deactivate()
    assert runner.context is None and runner.engine is None and runner.stream is None and not runner.is_active


def test_engine_input_must_be_float32_and_context_must_exist(trt, tmp_path):
    model = _onnx(tmp_path / "m.onnx")
    trt.input_dtype = "float16"
    engine = build_engine(model)
    with pytest.raises(FlareSegError, match=r"the engine's input 'image' is float16, expected float32"):
        _runner(trt, engine).activate()
    trt.input_dtype = "float32"
    engine = build_engine(model)
    trt.fail = {"create_execution_context"}
    runner = _runner(trt, engine)
    with pytest.raises(FlareSegError, match="could not create an execution context"):
        runner.activate()
    assert runner.engine is None and not runner.is_active  # the deserialised engine is not kept
    trt.fail = {"deserialize"}
    with pytest.raises(FlareSegError, match="could not deserialize the engine"):
        _runner(trt, engine).activate()


def test_int32_label_engine_returns_int32_views(trt, tmp_path):
    trt.output_dtype = "int32"
    engine = build_engine(_onnx(tmp_path / "m.onnx", output_kind="labels", label_dtype="int32", batch=(1, 2, 4)))
    with _runner(trt, engine) as runner:
        assert runner.output_kind == "labels"
        assert runner.cuda.allocations == [((4, *SIZE), torch.int32)]  # type: ignore[attr-defined]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_runner_cuda_calls_on_a_real_gpu(trt, tmp_path):
    """The runner's own CUDA lines (device scope, streams, buffers, record_stream, synchronize) on a real GPU."""
    engine = build_engine(_onnx(tmp_path / "m.onnx", batch=(1, 4, 8)))
    gpu = torch.cuda.device_count() - 1  # the last GPU: not the current one where there are several
    runner = TensorRTRunner(engine, device=f"cuda:{gpu}")
    runner.cuda = RegisteringCuda(runner.device, trt)
    x = torch.randn(8, 1, *SIZE, device=runner.device)
    scale = torch.arange(1, CLASSES + 1, dtype=torch.float32, device=runner.device).view(1, CLASSES, 1, 1)
    with runner:
        for n in (3, 8, 1):
            out = runner.infer(x[:n])
            assert out.device == runner.device and torch.equal(out, x[:n] * scale)
        host = runner.infer(x[:5].cpu())  # a host batch is copied to the runner's GPU
        assert torch.equal(host, x[:5] * scale)
        assert runner.cuda.allocations == [((8, CLASSES, *SIZE), torch.float32)]
        handles = {e[2] for e in _events(trt, "execute")}
        assert handles == {runner.stream.cuda_stream}
    assert all(e[1:] == (gpu, gpu, gpu) for e in _events(trt, "cuda current"))
    assert runner.context is None


# --- TensorRT that is there but cannot start, and models it must not take ------------------------------------


def _failing_import(monkeypatch, exc: ImportError) -> None:
    import builtins

    real = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorrt":
            raise exc
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ModuleNotFoundError("No module named 'tensorrt'", name="tensorrt"), r"^TensorRT is not installed; .*\[gpu\]"),
        (
            ModuleNotFoundError("No module named 'tensorrt_libs'", name="tensorrt_libs"),
            r"^TensorRT is installed but incomplete: No module named 'tensorrt_libs'$",
        ),
        (
            ImportError("libnvinfer.so.10: cannot open shared object file"),
            r"^TensorRT is installed but could not load its libraries \(libnvinfer\.so\.10: cannot open.*driver$",
        ),
    ],
)
def test_tensorrt_that_cannot_be_imported_is_told_apart_from_tensorrt_not_installed(monkeypatch, exc, expected):
    # "pip install" is the wrong advice for a TensorRT that is installed but cannot load its libraries.
    _failing_import(monkeypatch, exc)
    with pytest.raises(FlareSegError, match=expected):
        trt_export.import_tensorrt()


@pytest.mark.parametrize("what", ["Builder", "Runtime"])
def test_tensorrt_that_cannot_start_on_the_gpu_is_one_line_not_a_type_error(trt, tmp_path, what):
    # TensorRT's bindings raise TypeError ("factory function returned nullptr") when the object cannot be made.
    def refuse(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    refuse.__name__ = what
    setattr(trt, what, refuse)
    onnx_path = _onnx(tmp_path / "m.onnx")
    with pytest.raises(FlareSegError, match=rf"TensorRT could not start its {what} on this GPU \(pybind11.*driver"):
        if what == "Builder":
            build_engine(onnx_path)
        else:
            trt_export._PerProcess.runtime = None
            trt_export._tensorrt_runtime(trt)


def test_an_int8_model_is_refused_by_the_engine_build_and_by_onnx_runtimes_tensorrt_provider(trt, tmp_path):
    # flareseg's INT8 graph has uint8 activations with zero points: TensorRT takes symmetric INT8 only.
    model = _onnx(tmp_path / "m_int8.onnx", precision="int8")
    with pytest.raises(FlareSegError, match=r"m_int8\.onnx: an INT8 model is for the CPU runtimes"):
        build_engine(model)
    assert _events(trt, "parse") == []

    from flareseg.runtime.runners import OnnxRuntimeRunner

    with pytest.raises(FlareSegError, match=r"m_int8\.onnx: an INT8 model is for the CPU runtimes"):
        OnnxRuntimeRunner(model, provider="tensorrt").activate()


# --- flare-export MODEL.onnx --engine: an engine for an exported model, e.g. on another GPU ---------------------


def test_an_engine_built_elsewhere_is_rebuilt_here_with_the_command_its_refusal_names(trt, tmp_path, capsys):
    from flareseg.export.cli import main as export_main

    model = _onnx(tmp_path / "deploy" / "m_fp16.onnx", precision="fp16")
    trt.gpu = 1
    engine = build_engine(model, device=1)  # built on the L4; this machine's GPU 0 is an H100
    with pytest.raises(FlareSegError) as refused:
        _runner(trt, engine, gpu=0).activate()
    command = str(refused.value).split("`")[1]
    assert command == f"flare-export {model.resolve()} --engine --overwrite"  # the ONNX its sidecar names
    trt.gpu = 0
    assert export_main(command.split()[1:]) == 0  # the very command the refusal named
    assert f"wrote {engine} (+ m_fp16.engine.json)" in capsys.readouterr().out
    assert read_sidecar(engine)["engine"]["gpu_name"] == "NVIDIA H100 80GB HBM3"
    with _runner(trt, engine, gpu=0) as runner:  # it now loads here
        assert runner.max_batch == 8
    assert sorted(p.name for p in model.parent.iterdir() if not p.name.endswith(".timing-cache")) == [
        "m_fp16.engine",
        "m_fp16.engine.json",
        "m_fp16.onnx",
    ]


def test_the_rebuild_command_names_the_onnx_model_where_it_is(trt, tmp_path, capsys):
    # The engine was built into another folder than its ONNX model's, under another name, in folders with spaces:
    # the command must name the file that is there, paste as it is printed, and say what it writes.
    import shlex

    from flareseg.export.cli import main as export_main

    model = _onnx(tmp_path / "my models" / "m_fp16.onnx", precision="fp16")
    trt.gpu = 1
    engine = build_engine(model, tmp_path / "deploy here" / "liver.engine", device=1)
    with pytest.raises(FlareSegError) as refused:
        _runner(trt, engine, gpu=0).activate()
    command = str(refused.value).split("`")[1]
    assert shlex.split(command) == [
        "flare-export",
        str(model.resolve()),
        "--engine",
        "-o",
        str(engine.parent),
        "--overwrite",
    ]
    assert str(refused.value).endswith("(it writes m_fp16.engine there)")
    trt.gpu = 0
    assert export_main(shlex.split(command)[1:]) == 0  # pasted as printed
    assert (engine.parent / "m_fp16.engine").is_file()
    model.write_bytes(model.read_bytes() + b"\0")  # re-exported since: not the model the engine came from
    with pytest.raises(
        FlareSegError, match=r"from the ONNX model it was built from: `flare-export MODEL\.onnx --engine -o"
    ):
        _runner(trt, engine, gpu=0).activate()


def test_an_onnx_model_takes_only_the_engines_options(trt, tmp_path, capsys):
    from flareseg.export.cli import main as export_main

    model = _onnx(tmp_path / "m.onnx")
    refused = {
        (str(model),): "an ONNX model is exported already; add --engine",
        (str(model), "--engine", "--fp16"): "--fp16 exports a checkpoint; " + str(model) + " is exported already",
        (str(model), "--engine", "--batch", "1,2,4"): "--batch exports a checkpoint",
        (str(model), "--engine", "--opset", "18"): "--opset exports a checkpoint",
        (str(model), "--engine", "--opset", "0"): "--opset exports a checkpoint",
        (str(model), "--quantizer", "nncf"): "--quantizer exports a checkpoint",
        (str(model), "--engine", "-o", str(tmp_path / "m.onnx" / "sub")): "cannot create its folder",
        (str(model), "--tf32"): "an ONNX model is exported already; add --engine",
        (str(tmp_path / "m.pt"),): "m.pt: checkpoint not found",  # said before the missing -o: both need mending
        (str(tmp_path / "folder"), "--engine"): "folder: is a folder, not a checkpoint file",
        (str(tmp_path / "c.pt"),): "-o/--out is required",
    }
    (tmp_path / "folder").mkdir()
    (tmp_path / "c.pt").write_bytes(b"checked when it is read, after -o")
    for argv, message in refused.items():
        assert export_main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("flare-export: error: ") and message in err and "\n" not in err, (argv, err)
    assert _events(trt, "build") == []
    out = tmp_path / "engines"
    out.mkdir()
    assert export_main([str(model), "--engine", "-o", str(out), "--tf32"]) == 0
    assert read_sidecar(out / "m.engine")["engine"]["tf32"] is True
    assert export_main([str(model), "--engine", "-o", str(out)]) == 2
    assert "m.engine: exists; --overwrite replaces it and its sidecar" in capsys.readouterr().err
    assert len(_events(trt, "build")) == 1


def test_an_onnx_damaged_since_its_export_is_refused_before_tensorrt_is_asked_for(tmp_path, monkeypatch):
    # The engine would be built from the damaged graph and keep its wrong weights; no TensorRT needed to refuse it.
    model = _onnx(tmp_path / "m.onnx")
    sidecar_path(model).write_text(json.dumps({"file_sha256": "0" * 64}))
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: pytest.fail("TensorRT was asked for"))
    pattern = r"m.onnx: its SHA-256 is [0-9a-f]{16}\.\.\., where its sidecar m.onnx.json recorded 0000000000000000"
    with pytest.raises(FlareSegError, match=pattern):
        build_engine(model)
