"""ONNX Runtime runner: CPU memory settings, the TensorRT provider's options, missing-provider advice."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import shutil
from pathlib import Path
from typing import Any, ClassVar

import onnx
import onnxruntime as ort
import pytest
import torch

import flareseg.runtime.runners.onnxrt as onnxrt
from flareseg.checkpoint import ModelInfo, save_checkpoint
from flareseg.errors import FlareSegError
from flareseg.export import ExportOptions, export_onnx
from flareseg.export.metadata import ExportMetadata, embed_in_onnx, sidecar_path
from flareseg.network import NetworkConfig, build_training_network
from flareseg.preprocess import NormalizationStats
from flareseg.runtime.runners import OnnxRuntimeRunner
from flareseg.runtime.runners.onnxrt import (
    missing_provider_message,
    session_options,
    tensorrt_cache_dir,
    tensorrt_engine_cache,
    tensorrt_provider_options,
)

SIZE = (64, 64)
STATS = NormalizationStats(mean=-300.0, std=450.0)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> Path:
    """A real width-4 fp32 export (random weights: only agreement between settings is checked)."""
    out = tmp_path_factory.mktemp("ort")
    torch.manual_seed(0)
    net = build_training_network(NetworkConfig(base_width=4)).eval()
    ckpt = save_checkpoint(out / "w4.pt", net, ModelInfo(net.config, STATS, SIZE))
    return export_onnx(ckpt, out, ExportOptions(batch_profile=(1, 2, 4), verify_slices=1))[0].path


def _metadata_only_onnx(path: Path, precision: str = "fp16") -> Path:
    """A file carrying flareseg metadata and no graph, for sessions that are faked."""
    meta = ExportMetadata(
        model=ModelInfo(NetworkConfig(base_width=4), STATS, (512, 512)),
        input_channels=1,
        output_kind="logits",
        label_dtype=None,
        precision=precision,  # type: ignore[arg-type]
        batch_profile=(1, 8, 32),
        source_checkpoint_sha256="0" * 64,
    )
    model = onnx.ModelProto()
    embed_in_onnx(model, meta)
    onnx.save(model, str(path))
    return path


class RecordingSession:
    """Stands in for ort.InferenceSession where no GPU provider exists: records what the runner passes."""

    made: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, path: str, options: Any, providers: list[Any]) -> None:
        RecordingSession.made.append({"path": path, "options": options, "providers": providers})
        self._providers = [p if isinstance(p, str) else p[0] for p in providers]

    def get_providers(self) -> list[str]:
        return self._providers

    def get_inputs(self) -> list[Any]:
        return [type("Arg", (), {"name": "image", "shape": ["batch", 1, 512, 512]})()]  # as _metadata_only_onnx says

    def get_outputs(self) -> list[Any]:
        return [type("Arg", (), {"name": "logits"})()]


# --- CPU memory ---------------------------------------------------------------------


def test_memory_setting_reaches_the_session_options(small_onnx, monkeypatch):
    seen = []
    real = ort.InferenceSession

    def recording(path, options, providers):
        seen.append((options.enable_cpu_mem_arena, options.enable_mem_pattern, options.intra_op_num_threads))
        return real(path, options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    x = torch.randn(3, 1, *SIZE)
    with OnnxRuntimeRunner(small_onnx, threads=1) as lean:  # the CPU default
        a = lean.infer(x)
        assert "lean memory" in lean.describe()
    outputs = [a]
    for memory in ("no-arena", "ort-defaults"):
        with OnnxRuntimeRunner(small_onnx, threads=1, memory=memory) as runner:  # type: ignore[arg-type]
            outputs.append(runner.infer(x))
    assert seen == [(True, False, 1), (False, False, 1), (True, True, 1)]
    assert all(torch.equal(a, b) for b in outputs)  # memory handling does not change the arithmetic


def test_session_options_values_and_bad_setting():
    lean = session_options(ort, memory="lean", threads=None)
    assert (lean.enable_cpu_mem_arena, lean.enable_mem_pattern) == (True, False)
    assert lean.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    bare = session_options(ort, memory="no-arena", threads=None)
    assert (bare.enable_cpu_mem_arena, bare.enable_mem_pattern) == (False, False)
    default = session_options(ort, memory="ort-defaults", threads=2)
    assert (default.enable_cpu_mem_arena, default.enable_mem_pattern, default.intra_op_num_threads) == (True, True, 2)
    with pytest.raises(FlareSegError, match="must be one of lean, no-arena, ort-defaults, got 'tiny'"):
        OnnxRuntimeRunner("m.onnx", memory="tiny")  # type: ignore[arg-type]


# --- TensorRT provider options ------------------------------------------------------


def test_tensorrt_provider_options_pin_the_profile_and_cache_engines(tmp_path):
    cache = tmp_path / "m.onnx.ort-tensorrt-cache"
    opts = tensorrt_provider_options(
        input_name="image",
        input_shape=(1, 512, 512),
        batch_profile=(1, 8, 32),
        precision="fp16",
        device_id=1,
        cache_dir=cache,
    )
    assert opts == {
        "device_id": "1",
        "trt_fp16_enable": "True",
        "trt_profile_min_shapes": "image:1x1x512x512",
        "trt_profile_opt_shapes": "image:8x1x512x512",
        "trt_profile_max_shapes": "image:32x1x512x512",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
    }
    fp32 = tensorrt_provider_options(
        input_name="x", input_shape=(3, 64, 96), batch_profile=(2, 2, 4), precision="fp32", device_id=0, cache_dir=None
    )
    assert fp32["trt_fp16_enable"] == "False" and fp32["trt_profile_max_shapes"] == "x:4x3x64x96"
    assert not any(k.startswith(("trt_engine_cache", "trt_timing_cache")) for k in fp32)
    with pytest.raises(FlareSegError, match="1 <= min <= opt <= max"):
        tensorrt_provider_options(
            input_name="x",
            input_shape=(1, 8, 8),
            batch_profile=(4, 2, 8),
            precision="fp32",
            device_id=0,
            cache_dir=None,
        )


def test_tensorrt_provider_gets_its_options_from_the_model(tmp_path, monkeypatch):
    model = _metadata_only_onnx(tmp_path / "m.onnx")
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    RecordingSession.made.clear()
    with OnnxRuntimeRunner(model, provider="tensorrt", device_id=1):
        pass
    (made,) = RecordingSession.made
    trt, cuda = made["providers"]
    assert trt[0] == "TensorrtExecutionProvider" and cuda == ("CUDAExecutionProvider", {"device_id": "1"})
    assert trt[1]["trt_profile_min_shapes"] == "image:1x1x512x512"
    assert trt[1]["trt_profile_max_shapes"] == "image:32x1x512x512"
    assert trt[1]["trt_fp16_enable"] == "True" and trt[1]["device_id"] == "1"
    cache = Path(trt[1]["trt_engine_cache_path"])
    assert cache.parent == tensorrt_cache_dir(model) and cache.is_dir()
    assert trt[1]["trt_timing_cache_path"] == str(cache)
    assert (made["options"].enable_cpu_mem_arena, made["options"].enable_mem_pattern) == (True, True)  # defaults


def test_a_model_replaced_under_its_name_never_meets_the_old_models_engines(tmp_path):
    # ONNX Runtime keys its cached engines by file name, tensor names and versions, not the
    # weights: a re-export with new weights must not find the old engine.
    model = _metadata_only_onnx(tmp_path / "m.onnx")
    tensorrt_cache_dir(model).mkdir()
    (tensorrt_cache_dir(model) / "TensorrtExecutionProvider_old.engine").write_bytes(b"of the one-folder layout")
    first = tensorrt_engine_cache(model)
    assert [p.name for p in tensorrt_cache_dir(model).iterdir()] == [first.name]  # the unkeyed engine removed
    (first / "engine.trt").write_bytes(b"built for the old weights")
    assert tensorrt_engine_cache(model) == first and (first / "engine.trt").exists()  # same content: kept
    model.write_bytes(model.read_bytes() + b"\0")  # new content, same name
    second = tensorrt_engine_cache(model)
    assert second != first and second.parent == first.parent
    assert sorted(p.name for p in tensorrt_cache_dir(model).iterdir()) == [second.name]  # the old engines removed


def test_unwritable_cache_folder_runs_without_engine_cache(tmp_path, monkeypatch, caplog):
    model = _metadata_only_onnx(tmp_path / "m.onnx", precision="fp32")
    tensorrt_cache_dir(model).write_text("a file where the folder would go")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    RecordingSession.made.clear()
    with OnnxRuntimeRunner(model, provider="tensorrt"):
        pass
    (trt,) = RecordingSession.made[0]["providers"]
    assert "trt_engine_cache_enable" not in trt[1] and trt[1]["trt_fp16_enable"] == "False"
    assert "engine is rebuilt for every session" in caplog.text


# --- which ONNX Runtime is installed ------------------------------------------------


@pytest.mark.parametrize(
    ("installed", "advice"),
    [
        (
            {"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"},
            "both onnxruntime 1.22.0 (CPU) and onnxruntime-gpu 1.22.0 are installed and the CPU one shadows the "
            "GPU one; run `pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'flareseg[gpu]'`",
        ),
        (
            {"onnxruntime": "1.22.0"},
            "onnxruntime 1.22.0 is the CPU build; for GPU providers run "
            "`pip uninstall -y onnxruntime && pip install 'flareseg[gpu]'`",
        ),
        (
            {"onnxruntime-gpu": "1.22.0"},
            "onnxruntime-gpu 1.22.0 does not offer it; reinstall with "
            "`pip install --force-reinstall onnxruntime-gpu` on a machine with an NVIDIA driver",
        ),
        ({}, "no onnxruntime or onnxruntime-gpu distribution is installed by pip; run `pip install 'flareseg[gpu]'`"),
    ],
)
def test_missing_gpu_provider_says_which_package_and_what_to_do(installed, advice, tmp_path, monkeypatch):
    versions = dict(installed)

    def version(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert onnxrt.installed_onnxruntime() == installed
    text = missing_provider_message("CUDAExecutionProvider", ["CPUExecutionProvider"], installed)
    assert text == (
        "ONNX Runtime provider CUDAExecutionProvider is not available here (available: CPUExecutionProvider): " + advice
    )
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    model = _metadata_only_onnx(tmp_path / "m.onnx")
    for provider, name in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        with pytest.raises(FlareSegError) as err:
            OnnxRuntimeRunner(model, provider=provider).activate()  # type: ignore[arg-type]
        assert str(err.value) == missing_provider_message(name, ["CPUExecutionProvider"], installed)


def test_provider_that_fails_to_load_is_refused(tmp_path, monkeypatch):
    model = _metadata_only_onnx(tmp_path / "m.onnx")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    class FellBack(RecordingSession):
        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    with pytest.raises(FlareSegError, match=r"runs \['CPUExecutionProvider'\] instead of the requested CUDA"):
        OnnxRuntimeRunner(model, provider="cuda").activate()


def test_an_unknown_provider_or_thread_count_is_refused_by_the_library(tmp_path):
    model = _metadata_only_onnx(tmp_path / "m.onnx")
    with pytest.raises(FlareSegError, match=r"^ONNX Runtime provider must be one of \['cpu', .*\], got 'rocm'$"):
        OnnxRuntimeRunner(model, provider="rocm")  # type: ignore[arg-type]
    with pytest.raises(FlareSegError, match=r"^threads must be positive, got 0$"):
        OnnxRuntimeRunner(model, threads=0)


def test_gpu_providers_and_cuda_graphs_are_refused_where_they_cannot_run(tmp_path, monkeypatch):
    model = _metadata_only_onnx(tmp_path / "m.onnx")
    from flareseg.runtime.runners import open_runner

    # A CPU build of torch (or no GPU): the GPU providers bind torch CUDA tensors, so say so before any work.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(FlareSegError, match=f"ONNX Runtime's {provider} provider needs a CUDA build of torch"):
            open_runner(model, device="cuda", ort_provider=provider)
    with pytest.raises(FlareSegError, match="needs a CUDA build of torch"):
        open_runner(model, device="cuda")
    assert isinstance(open_runner(model, device="cpu"), OnnxRuntimeRunner)
    with pytest.raises(FlareSegError, match="CUDA graphs are captured for the torch backend only, not onnxruntime"):
        open_runner(model, device="cpu", cuda_graph_batch=8)


def test_a_session_on_the_wrong_provider_is_released_with_the_error(small_onnx, monkeypatch):
    """A test double stands in for a session that fell back to another provider (onnxruntime-gpu without CUDA)."""
    released: list[str] = []

    class FellBack:
        def get_providers(self) -> list[str]:
            return ["AzureExecutionProvider"]

        def __del__(self) -> None:
            released.append("session")

    monkeypatch.setattr(ort, "InferenceSession", lambda *args, **kwargs: FellBack())
    runner = OnnxRuntimeRunner(small_onnx, threads=1)
    with pytest.raises(FlareSegError, match=r"runs \['AzureExecutionProvider'\] instead of the requested CPU"):
        runner.activate()
    assert released == ["session"] and runner.session is None and not runner.is_active


def _copy_with_sidecar(model: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(model, folder / model.name)
    shutil.copy(sidecar_path(model), sidecar_path(folder / model.name))
    return folder / model.name


def test_a_model_damaged_in_place_is_refused_before_it_loads(small_onnx, tmp_path):
    # ONNX files carry no checksum: a byte flipped in a weight ran, and gave wrong labels with exit 0 (exportF review).
    copy = _copy_with_sidecar(small_onnx, tmp_path / "copy")
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length: within the weights, which make up most of the file
    copy.write_bytes(bytes(data))
    pattern = r"copy/flareseg_fp32.onnx: its SHA-256 is [0-9a-f]{16}\.\.\., where its sidecar flareseg_fp32.onnx.json"
    with pytest.raises(FlareSegError, match=pattern):
        OnnxRuntimeRunner(copy).activate()
    with pytest.raises(FlareSegError, match="sidecar is another export's"):  # a sound model beside another's sidecar
        shutil.copy(small_onnx, copy)
        sidecar = sidecar_path(copy)
        sidecar.write_text(sidecar.read_text().replace('"file_sha256": "', '"file_sha256": "0'))
        OnnxRuntimeRunner(copy).activate()


@pytest.mark.parametrize("stamped_first", [False, True])
def test_a_sound_model_is_hashed_once_its_hash_is_the_outputs_stamp(small_onnx, tmp_path, monkeypatch, stamped_first):
    # A run asks the writer's thread for the stamp before it activates the runner: the check at activation then
    # hashed the file a second time (diff review).
    from flareseg.provenance import ModelStamp

    copy = _copy_with_sidecar(small_onnx, tmp_path / "copy")
    reads: list[object] = []
    real = ModelStamp.read.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(ModelStamp, "read", classmethod(lambda cls, *a, **k: reads.append(a) or real(cls, *a, **k)))
    runner = OnnxRuntimeRunner(copy)
    if stamped_first:
        runner.stamp()
    with runner:
        assert len(reads) == 1  # hashed once, before loading, and checked against the sidecar
        stamp = runner.stamp()
    assert len(reads) == 1 and stamp is not None  # not hashed again for the outputs
    assert stamp.sha256 == hashlib.sha256(copy.read_bytes()).hexdigest()


@pytest.mark.parametrize("sidecar", ["missing", "older export", "unreadable"])
def test_a_model_whose_sidecar_records_no_hash_runs_unchecked(small_onnx, tmp_path, caplog, sidecar):
    copy = _copy_with_sidecar(small_onnx, tmp_path / "copy")
    side = sidecar_path(copy)
    if sidecar == "missing":
        side.unlink()
    elif sidecar == "older export":
        side.write_text(side.read_text().replace('"file_sha256"', '"not_a_record"'))
    else:
        side.write_text("{ cut short")
    with caplog.at_level(logging.DEBUG, logger="flareseg"), OnnxRuntimeRunner(copy) as runner:
        out = runner.infer(torch.zeros(1, 1, *SIZE))
    assert tuple(out.shape) == (1, 5, *SIZE)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("flareseg") and r.levelno >= logging.WARNING]
    unchecked = f"{copy}: no sidecar flareseg_fp32.onnx.json beside it: its SHA-256 is not checked"
    assert (unchecked in caplog.messages) == (sidecar == "missing")  # said under -v
    if sidecar == "unreadable":
        why = "Expecting property name enclosed in double quotes: line 1 column 3 (char 2)"
        assert said == [f"{side}: unreadable sidecar ({why}); the model's content is not checked against it"]
    else:
        assert said == []


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_graph_whose_metadata_says_another_input_size_is_refused_at_load(small_onnx, tmp_path, backend):
    # Tools that rewrite a graph may keep metadata_props: the first batch then failed inside the runtime, with a
    # 55-line traceback (exportF review).
    import dataclasses

    from flareseg.export.metadata import read_onnx_metadata
    from flareseg.runtime.runners import open_runner

    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")
    meta = read_onnx_metadata(small_onnx)
    other = dataclasses.replace(meta, model=dataclasses.replace(meta.model, slice_size=(96, 96)))
    model = onnx.load(str(small_onnx))
    embed_in_onnx(model, other)
    path = tmp_path / "edited.onnx"  # no sidecar: its SHA-256 is not there to catch the edit
    onnx.save(model, str(path))
    said = r"edited.onnx: the graph takes N x 1 x 64 x 64 input, where its flareseg metadata says N x 1 x 96 x 96"
    with pytest.raises(FlareSegError, match=said):
        open_runner(path, backend=backend).activate()
