"""The OpenVINO runner: fp32 against ONNX Runtime, INT8 and bf16 against fp32, and its refusals."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TRAINED_SIZE

from flareseg.bench import backends as bench_backends
from flareseg.checkpoint import load_model
from flareseg.errors import FlareSegError
from flareseg.phantom import make_phantom
from flareseg.preprocess import network_batch, normalize_volume
from flareseg.runtime.runners import OnnxRuntimeRunner, OpenVINORunner, open_runner
from flareseg.runtime.runners import openvino as ov_module

#: OpenVINO fp32 against ONNX Runtime fp32 on the same ONNX: max |difference| over max |logit|.
FP32_RELATIVE_TOLERANCE = 1e-4
#: Labels of an fp32 runtime against another (ties can flip at float rounding).
FP32_MIN_AGREEMENT = 0.999
#: Labels of INT8 (either runtime) and bf16 against fp32 PyTorch, on phantom slices unseen at export.
REDUCED_MIN_AGREEMENT = 0.98


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


needs_openvino = pytest.mark.skipif(not _has_openvino(), reason="OpenVINO is not installed (pip install openvino)")


def _bf16_supported() -> bool:
    if not _has_openvino():
        return False
    import openvino as ov

    return "BF16" in ov_module.cpu_capabilities(ov.Core())


@pytest.fixture(scope="module")
def models(int8_export):
    return {e.metadata.precision: e.path for e in int8_export}


@pytest.fixture(scope="module")
def slices(trained_checkpoint):
    info = load_model(trained_checkpoint)[1]
    image = np.transpose(make_phantom((64, 64, 32), (6.0, 6.0, 8.0), seed=9).image, (2, 1, 0)).astype(np.float32)
    return network_batch(normalize_volume(image, info.normalization)[6:26], TRAINED_SIZE, 1)


@pytest.fixture(scope="module")
def reference_labels(trained_checkpoint, slices):
    net, _, _ = load_model(trained_checkpoint)
    with torch.inference_mode():
        labels = net(slices.expand(-1, 3, -1, -1)).argmax(1)
    assert len(torch.unique(labels)) >= 4  # organs are predicted, so agreement means something
    return labels


def _run(runner, slices: torch.Tensor, batch: int = 4) -> torch.Tensor:
    with runner:
        return torch.cat([runner.infer(slices[i : i + batch]) for i in range(0, len(slices), batch)])


@needs_openvino
def test_openvino_fp32_matches_onnxruntime_fp32(models, slices):
    runner = OpenVINORunner(models["fp32"])
    compiled: list[int] = []
    real_compile = runner._compile

    def compile_batch(batch: int):
        compiled.append(batch)
        return real_compile(batch)

    runner._compile = compile_batch  # type: ignore[method-assign]
    ov_out = _run(runner, slices, batch=3)  # 20 slices: batches of 3 and a last one of 2
    # Compiled for the sizes it ran, nothing for the export's batch profile (1, 2, 8).
    assert sorted(set(compiled)) == [2, 3]
    ort_out = _run(OnnxRuntimeRunner(models["fp32"]), slices)
    assert ov_out.shape == ort_out.shape == (len(slices), 5, *TRAINED_SIZE)
    rel = float((ov_out - ort_out).abs().max() / ort_out.abs().max())
    assert rel <= FP32_RELATIVE_TOLERANCE
    assert float((ov_out.argmax(1) == ort_out.argmax(1)).float().mean()) >= FP32_MIN_AGREEMENT


@needs_openvino
def test_int8_through_openvino_and_onnxruntime_agrees_with_fp32(models, slices, reference_labels):
    ov_labels = _run(OpenVINORunner(models["int8"]), slices).argmax(1)
    ort_labels = _run(OnnxRuntimeRunner(models["int8"]), slices).argmax(1)
    assert float((ov_labels == reference_labels).float().mean()) >= REDUCED_MIN_AGREEMENT
    assert float((ort_labels == reference_labels).float().mean()) >= REDUCED_MIN_AGREEMENT


@needs_openvino
@pytest.mark.skipif(not _bf16_supported(), reason="this CPU has no bf16 instructions (OpenVINO reports no BF16)")
def test_bf16_runs_in_bf16_and_agrees_with_fp32(models, slices, reference_labels):
    runner = open_runner(models["fp32"], backend="openvino", precision="bf16", threads=1)
    labels = _run(runner, slices).argmax(1)
    assert runner.inference_precision == "bf16"
    assert float((labels == reference_labels).float().mean()) >= REDUCED_MIN_AGREEMENT
    with runner:
        assert "bf16 inference precision, 1 thread" in runner.describe()


@needs_openvino
def test_fp32_is_stated_as_f32_and_batches_of_any_size_run(models, slices):
    runner = open_runner(models["int8"], backend="openvino", openvino_hint="throughput")
    with runner:
        assert runner.infer(slices[:1]).shape == (1, 5, *TRAINED_SIZE)
        assert runner.infer(slices[:5]).shape == (5, 5, *TRAINED_SIZE)
        text = runner.describe()
    assert "int8 model, f32 inference precision" in text and "THROUGHPUT" in text


@needs_openvino
def test_a_folder_s_last_batches_keep_two_compiled_models_at_most(models, slices):
    """Each case of a folder may end in another short batch: kept all, the compiled models (each with its own
    buffers) grew 2.5x over a run. The full batch's stays compiled; a short size compiled again runs the same."""
    runner = OpenVINORunner(models["fp32"])
    with runner:
        first = runner.infer(slices[:3])
        full = runner._compile(4)
        outputs = {}
        for size in (4, 3, 4, 1, 2, 4, 3, 1):  # a full batch, then one case's short last batch, in turn
            out = runner.infer(slices[:size])
            assert len(runner._compiled) <= 2 and runner._compiled[4] is full
            assert sorted(runner._requests) == sorted(runner._compiled)
            outputs.setdefault(size, out)
            torch.testing.assert_close(out, outputs[size], rtol=0, atol=0)
        torch.testing.assert_close(first, outputs[3], rtol=0, atol=0)


@needs_openvino
def test_the_threads_described_are_those_the_compiled_model_runs_with(models, slices):
    """OpenVINO caps a thread count beyond the cores it may use: the description says so, not only what was asked."""
    import os

    asked = 4 * (os.cpu_count() or 1)
    runner = OpenVINORunner(models["fp32"], threads=asked)
    with runner:
        runner.infer(slices[:1])
        used = runner.threads_used
        text = runner.describe()
    assert used is not None and 1 <= used < asked
    assert f", {used} threads ({asked} asked), LATENCY hint" in text
    with OpenVINORunner(models["fp32"], threads=1) as runner:
        runner.infer(slices[:1])
        assert ", 1 thread, LATENCY hint" in runner.describe()


@needs_openvino
def test_bf16_on_a_cpu_without_it_is_one_line_error(models, monkeypatch):
    # Simulates a CPU without bf16: OpenVINO's capability list is the only thing the check reads.
    monkeypatch.setattr(ov_module, "cpu_capabilities", lambda core: ("FP32", "INT8", "BIN", "EXPORT_IMPORT"))
    runner = OpenVINORunner(models["fp32"], precision="bf16")
    with pytest.raises(FlareSegError) as info:
        runner.activate()
    message = str(info.value)
    assert "\n" not in message and "bf16 inference needs a CPU with bf16 instructions" in message
    assert "FP32, INT8" in message and not runner.is_active
    assert message.endswith("; use --precision fp32 or the INT8 model")
    # An INT8 model asked for bf16 float layers: it is the INT8 model already.
    with pytest.raises(FlareSegError, match=r"; use --precision fp32$"):
        OpenVINORunner(models["int8"], precision="bf16").activate()


def test_missing_openvino_is_one_line_error_naming_the_extra(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"unused: activation fails on the import first")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    runner = open_runner(model, backend="openvino")
    with pytest.raises(FlareSegError, match=r"^OpenVINO is not installed: `pip install 'flareseg\[openvino\]'`$"):
        runner.activate()
    assert bench_backends.openvino_cpu_capabilities() is None
    assert not any(n.startswith("openvino") for n in bench_backends.available_backends())


def test_open_runner_refuses_what_openvino_cannot_do(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(FlareSegError, match="OpenVINO on the CPU runs fp32 or bf16, got 'fp16'"):
        open_runner(model, backend="openvino", precision="fp16")
    with pytest.raises(FlareSegError, match="the OpenVINO backend runs on the CPU"):
        open_runner(model, backend="openvino", device="cuda")
    with pytest.raises(FlareSegError, match="threads must be positive"):
        OpenVINORunner(model, threads=0)
    # What the command line's choices keep out, the library says in words too.
    with pytest.raises(FlareSegError, match=r"^OpenVINO inference precision must be fp32 or bf16, got 'int8'$"):
        OpenVINORunner(model, precision="int8")  # type: ignore[arg-type]
    with pytest.raises(FlareSegError, match=r"^performance hint must be latency or throughput, got 'fast'$"):
        OpenVINORunner(model, hint="fast")  # type: ignore[arg-type]


@needs_openvino
def test_bench_table_lists_and_builds_the_cpu_paths(trained_checkpoint, tmp_path, slices, reference_labels):
    names = bench_backends.available_backends()
    assert {"onnxruntime-cpu-int8", "openvino-cpu-fp32", "openvino-cpu-int8"} <= set(names)
    assert ("openvino-cpu-bf16" in names) == _bf16_supported()
    wanted = ("onnxruntime-cpu-int8", "openvino-cpu-int8")
    cfg = SimpleNamespace(backends=wanted, batches=(1, 2), model=trained_checkpoint, base_width=8, size=None)
    built = bench_backends.prepare_models(cfg, tmp_path)
    assert {"checkpoint", "onnx-fp32", "onnx-int8"} <= set(built)
    for name in wanted:
        runner = bench_backends.make_runner(bench_backends.ALL_BACKENDS[name], built, 2)
        labels = _run(runner, slices).argmax(1)
        assert float((labels == reference_labels).float().mean()) >= REDUCED_MIN_AGREEMENT
    assert isinstance(runner, OpenVINORunner)


@needs_openvino
def test_a_model_damaged_in_place_is_refused_before_openvino_reads_it(models, tmp_path):
    import shutil

    from flareseg.export.metadata import sidecar_path

    copy = tmp_path / models["fp32"].name
    shutil.copy(models["fp32"], copy)
    shutil.copy(sidecar_path(models["fp32"]), sidecar_path(copy))
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, within the weights: it would run, with other labels
    copy.write_bytes(bytes(data))
    with pytest.raises(FlareSegError, match=r"its SHA-256 is [0-9a-f]{16}\.\.\., where its sidecar"):
        OpenVINORunner(copy).activate()
