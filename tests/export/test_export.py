"""flare-export: ONNX against PyTorch, graph structure, metadata, fp16, TensorRT logic."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TRAINED_SIZE

from flareseg.checkpoint import ModelInfo, load_model, read_checkpoint, save_checkpoint
from flareseg.errors import FlareSegError
from flareseg.export import ExportOptions, export_onnx, onnx_export, read_onnx_metadata, read_sidecar
from flareseg.export.cli import main as export_main
from flareseg.export.metadata import ExportMetadata
from flareseg.export.tensorrt import (
    DeviceIdentity,
    check_engine_compatibility,
    check_tensorrt_version,
    engine_sidecar,
    profile_shapes,
)
from flareseg.network import NetworkConfig, build_training_network
from flareseg.preprocess import NormalizationStats, network_batch
from flareseg.volume import check_not_label_map

STATS = NormalizationStats(mean=-350.0, std=480.0, num_voxels=1, num_cases=1)


def _run(path: Path, slices: np.ndarray, channels: int, size) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": network_batch(slices, size, channels).numpy()})[0]


def _reference(checkpoint: Path, slices: np.ndarray, size) -> np.ndarray:
    net, info, _ = load_model(checkpoint)
    with torch.inference_mode():
        return net(network_batch(slices, size, info.network.in_channels)).numpy()


def _slices(n=3, size=TRAINED_SIZE, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *size)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return export_onnx(trained_checkpoint, out, ExportOptions(fp16=True, batch_profile=(1, 2, 8)))


def test_fp32_onnx_matches_pytorch_and_records_its_verification(exported, trained_checkpoint):
    fp32 = exported[0]
    assert fp32.path.name == "flareseg_fp32.onnx" and fp32.metadata.precision == "fp32"
    x = _slices(5)  # a batch size not used at export: the batch axis is dynamic
    ref = _reference(trained_checkpoint, x, TRAINED_SIZE)
    got = _run(fp32.path, x, 1, TRAINED_SIZE)
    assert got.shape == ref.shape == (5, 5, *TRAINED_SIZE)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-4
    real = fp32.metadata.verification["real"]
    assert real["max_rel_logit_diff"] <= 1e-4 and real["argmax_agreement"] >= 0.999
    assert "phantom" in fp32.metadata.verification["real_source"]
    # Each organ the model finds on the real slices has its Dice against PyTorch; random slices have none.
    organs = {k: v for k, v in real.items() if k.startswith("dice_")}
    assert len(organs) >= 2 and min(organs.values()) >= 0.99
    assert not any(k.startswith("dice_") for k in fp32.metadata.verification["random"])
    line = onnx_export.verification_report([fp32])
    assert line.count("organ Dice") == 1 and line.endswith(", ".join(f"{k[5:]} {v:.3f}" for k, v in organs.items()))


def test_organ_dice_is_each_organs_overlap_and_leaves_out_organs_neither_holds():
    reference = np.zeros((2, 4, 5), np.int64)
    labels = np.zeros_like(reference)
    reference[0, :2, :2] = 1  # liver: 4 voxels, 2 of them labelled so, and 1 more
    labels[0, :1, :2] = 1
    labels[1, 3, 4] = 1
    reference[1, 0, :] = 4  # pancreas: 5 voxels, all found
    labels[1, 0, :] = 4
    labels[0, 3, 0] = 3  # spleen where there is none
    assert onnx_export.organ_dice(reference, labels) == {
        "dice_liver": 2 * 2 / (4 + 3),
        "dice_spleen": 0.0,
        "dice_pancreas": 1.0,
    }  # kidneys: in neither, so no figure


def test_fp16_onnx_keeps_float32_io_and_agrees_on_labels(exported, trained_checkpoint, sample_ct):
    fp16 = exported[1]
    model = onnx.load(str(fp16.path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) >= 28  # every convolution's weights are fp16
    # Agreement on real CT slices, measured here independently of the export's own check.
    _, real, _ = onnx_export.verification_slices(load_model(trained_checkpoint)[1], sample_ct, 16)
    ref = _reference(trained_checkpoint, real, TRAINED_SIZE).argmax(1)
    got = _run(fp16.path, real, 1, TRAINED_SIZE).argmax(1)
    assert len(np.unique(ref)) >= 3  # the model predicts organs, so agreement means something
    assert np.mean(ref == got) >= 0.995
    assert fp16.metadata.verification["real"]["argmax_agreement"] >= 0.995


class _RecordingBar:
    """Stands in for tqdm in the exporter: records the bar's total, steps and labels (our control flow)."""

    made: ClassVar[list[_RecordingBar]] = []

    def __init__(self, total, disable, **_):
        self.total, self.disable, self.done, self.labels = total, disable, 0, []
        _RecordingBar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.done += n

    def set_postfix_str(self, text):
        self.labels.append(text)


@pytest.mark.parametrize(("fp16", "progress"), [(True, True), (False, False)])
def test_the_export_shows_its_steps_on_a_bar(trained_checkpoint, tmp_path, monkeypatch, fp16, progress):
    monkeypatch.setattr(onnx_export, "tqdm", _RecordingBar)
    _RecordingBar.made.clear()
    export_onnx(trained_checkpoint, tmp_path, ExportOptions(fp16=fp16, verify_slices=1), progress=progress)
    (bar,) = _RecordingBar.made
    expected = ["export", "verify fp32", *(["verify fp16"] if fp16 else []), "write"]
    assert bar.labels == expected and bar.total == bar.done == len(expected)
    assert bar.disable is (None if progress else True)  # None: shown on a terminal only


def test_graph_has_one_input_one_output_and_no_auxiliary_heads(exported):
    model = onnx.load(str(exported[0].path))
    assert [i.name for i in model.graph.input] == ["image"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, *TRAINED_SIZE]
    assert [o.name for o in model.graph.output] == ["logits"]
    ops = [n.op_type for n in model.graph.node]
    # encoder 10 + decoder 8 + supervision maps 4 + final 2: the 4 training-only heads are gone
    assert ops.count("Conv") == 24 and ops.count("ConvTranspose") == 4
    assert "BatchNormalization" not in ops  # folded into the convolutions


def test_an_exported_model_names_none_of_the_exporting_machine_s_files(exported, int8_export):
    """The exporter noted on each node the Python stack that made it: this install's paths and line numbers, so
    that two installs' exports of one checkpoint differed (a review). No runtime reads the notes; none is kept."""
    import flareseg

    install = str(Path(flareseg.__file__).resolve().parent.parent).encode()
    for item in [*exported, *int8_export]:
        model = onnx.load(str(item.path))
        assert not [n.name for n in model.graph.node if n.metadata_props], item.path.name
        assert install not in item.path.read_bytes() and b"stack_trace" not in item.path.read_bytes(), item.path.name


def test_the_exporter_s_notes_go_from_branches_and_functions_too():
    """The deploy graph has neither, so the test above cannot see them: a graph made for it has both."""
    from onnx import TensorProto, helper

    def noted(node):
        helper.set_metadata_props(node, {"pkg.torch.onnx.stack_trace": 'File "/home/someone/flareseg/x.py"'})
        return node

    def branch(name):
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1])
        return helper.make_graph([noted(helper.make_node("Identity", ["x"], [f"{name}_y"]))], name, [], [out])

    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    choose = noted(helper.make_node("If", ["cond"], ["y"], then_branch=branch("a"), else_branch=branch("b")))
    function = helper.make_function("local", "f", ["x"], ["y"], [noted(helper.make_node("Identity", ["x"], ["y"]))], [])
    # A GRAPHS attribute (a list of bodies, as a custom op may hold): no default-domain op has one, but a walk
    # must not depend on that.
    bodies = helper.make_node("Bodies", ["x"], ["z"], domain="custom")
    bodies.attribute.append(helper.make_attribute("bodies", [branch("c"), branch("d")]))
    model = helper.make_model(helper.make_graph([choose, bodies], "g", [cond, x], [y]), functions=[function])
    assert model.SerializeToString().count(b"stack_trace") == 6
    onnx_export._drop_exporter_notes(model)
    assert b"stack_trace" not in model.SerializeToString()


def test_metadata_round_trips_between_onnx_sidecar_and_export(exported, trained_checkpoint):
    for item in exported:
        embedded = read_onnx_metadata(item.path)
        assert embedded == item.metadata
        sidecar = read_sidecar(item.path)
        # and what the embedded copy cannot hold, being part of the file: the file's own SHA-256, checked at load
        assert sidecar.pop("file_sha256") == hashlib.sha256(item.path.read_bytes()).hexdigest()
        assert sidecar == json.loads(json.dumps(item.metadata.to_dict()))
        assert embedded.model.normalization == load_model(trained_checkpoint)[1].normalization
        assert embedded.model.slice_size == TRAINED_SIZE and embedded.input_channels == 1
        assert dict(embedded.model.labels) == {0: "background", 1: "liver", 2: "kidneys", 3: "spleen", 4: "pancreas"}
        assert embedded.versions["torch"] == str(torch.__version__) and "onnx" in embedded.versions
        assert len(embedded.source_checkpoint_sha256) == 64


def test_three_channel_export_and_in_graph_argmax(trained_checkpoint, tmp_path):
    three = export_onnx(trained_checkpoint, tmp_path / "a", ExportOptions(fold_input=False))[0]
    labels = export_onnx(trained_checkpoint, tmp_path / "b", ExportOptions(output_kind="labels", label_dtype="int32"))
    x = _slices(4)
    ref = _reference(trained_checkpoint, x, TRAINED_SIZE)
    got3 = _run(three.path, x, 3, TRAINED_SIZE)
    assert three.metadata.input_channels == 3
    assert np.max(np.abs(got3 - ref)) / np.max(np.abs(ref)) <= 1e-4
    lab = _run(labels[0].path, x, 1, TRAINED_SIZE)
    assert lab.dtype == np.int32 and lab.shape == (4, *TRAINED_SIZE)
    assert np.mean(lab == ref.argmax(1)) >= 0.999
    assert labels[0].metadata.output_kind == "labels" and labels[0].metadata.label_dtype == "int32"
    # Read back from the model and its sidecar: a runner binds its output buffer by it (int32, not uint8).
    assert read_onnx_metadata(labels[0].path).label_dtype == "int32"
    assert read_sidecar(labels[0].path)["label_dtype"] == "int32"


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_full_width_network_exports_and_verifies(tmp_path, fp16):
    torch.manual_seed(0)
    net = build_training_network(NetworkConfig())
    ckpt = save_checkpoint(tmp_path / "full.pt", net.eval(), ModelInfo(net.config, STATS, slice_size=(32, 32)))
    out = export_onnx(ckpt, tmp_path / "out", ExportOptions(fp16=fp16, verify_slices=2, batch_profile=(1, 1, 2)))
    x = _slices(2, (32, 32))
    ref = _reference(ckpt, x, (32, 32))
    got = _run(out[-1].path, x, 1, (32, 32))
    if fp16:
        assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.995
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-2
    else:
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-4


def test_failed_verification_writes_nothing(trained_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "FP16_MIN_AGREEMENT", 1.01)  # unreachable: verification must fail
    with pytest.raises(FlareSegError, match=r"fp16 ONNX agrees with fp32 PyTorch on .*; nothing written$"):
        export_onnx(trained_checkpoint, tmp_path / "out", ExportOptions(fp16=True))
    # Every requested model is verified before the first is written: a failed fp16 check leaves no fp32 either.
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_each_precision_is_held_to_its_own_tolerance_on_its_own_slices():
    def figures(rel: float, random: float, real: float) -> dict[str, dict[str, float]]:
        common = {"max_abs_logit_diff": rel, "max_rel_logit_diff": rel}
        return {"random": {**common, "argmax_agreement": random}, "real": {**common, "argmax_agreement": real}}

    onnx_export._check(figures(0.9e-4, 1.0, 1.0), "fp32", "logits")
    with pytest.raises(FlareSegError, match=r"on random slices: .* 2\.00e-04 > 1e-04; nothing written$"):
        onnx_export._check(figures(2e-4, 1.0, 1.0), "fp32", "logits")
    # fp16 is held to its agreement on the real slices (CT), not the random ones (noise, where classes tie).
    onnx_export._check(figures(1e-2, 0.5, 0.996), "fp16", "logits")
    with pytest.raises(FlareSegError, match=r"99\.400% of real-slice voxels, expected >= 99\.5%"):
        onnx_export._check(figures(1e-2, 1.0, 0.994), "fp16", "logits")
    phantom = "synthetic phantom (192x192x48 at 2x2x5 mm)"  # no CT given: the messages say what was used
    with pytest.raises(FlareSegError, match=r"99\.400% of phantom-slice voxels, expected >= 99\.5%"):
        onnx_export._check(figures(1e-2, 1.0, 0.994), "fp16", "logits", phantom)


def test_cli_exports_and_engine_without_tensorrt_fails_at_once(trained_checkpoint, tmp_path, capsys):
    assert export_main([str(trained_checkpoint), "-o", str(tmp_path / "ok"), "--batch", "1,2,4", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "flareseg_fp32.onnx (fp32): random slices: argmax agreement" in printed
    assert "; phantom slices: argmax agreement" in printed and "real slices" not in printed  # no CT was given
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here: the refusal path cannot be exercised")
    assert export_main([str(trained_checkpoint), "-o", str(tmp_path / "engine"), "--engine"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TensorRT is not installed" in err[0] and "flareseg[gpu]" in err[0]
    assert not (tmp_path / "engine").exists()


def test_cli_rejects_bad_arguments(trained_checkpoint, tmp_path, capsys):
    assert export_main([str(tmp_path / "missing.pt"), "-o", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    # Refused while the options are read, so that the message names the option.
    for option, value, words in [
        ("--size", "100", "argument --size: slice size 100x100 must be positive multiples of 16"),
        ("--batch", "4,2,8", "argument --batch: batch profile must satisfy 1 <= min <= opt <= max, got 4,2,8"),
        ("--batch", "4,2", "argument --batch: expected MIN,OPT,MAX, got '4,2'"),
        ("--batch", "1,x,3", "argument --batch: expected comma-separated integers, got '1,x,3'"),
        ("--batch", "0,2,3", "argument --batch: expected positive integers, got '0,2,3'"),
        ("--size", "64,64,64", "argument --size: expected H or H,W, got '64,64,64'"),
    ]:
        with pytest.raises(SystemExit) as exited:
            export_main([str(trained_checkpoint), "-o", str(tmp_path), option, value])
        assert exited.value.code == 2 and words in capsys.readouterr().err


# --- TensorRT logic that does not need TensorRT ----------------------------------------


def test_profile_shapes():
    assert profile_shapes((1, 8, 32), 1, (512, 512)) == {
        "min": (1, 1, 512, 512),
        "opt": (8, 1, 512, 512),
        "max": (32, 1, 512, 512),
    }
    with pytest.raises(FlareSegError, match="1 <= min <= opt <= max"):
        profile_shapes((4, 2, 8), 1, (512, 512))


def test_an_engine_or_timing_cache_that_would_replace_the_onnx_input_is_refused_before_any_work(exported, tmp_path):
    from flareseg.export.tensorrt import build_engine

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(exported[0].path.read_bytes())
    sidecar = tmp_path / "m.onnx.json"
    sidecar.write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for kwargs, words in [
        ({"engine_path": onnx_path}, "m.onnx: the engine would replace the input"),
        ({"engine_path": sidecar}, "m.onnx.json: the engine would replace the input"),
        ({"timing_cache": onnx_path}, "m.onnx: the timing cache would replace the input"),
        ({"timing_cache": sidecar}, "m.onnx.json: the timing cache would replace the input"),
    ]:
        with pytest.raises(FlareSegError, match=words):  # refused before TensorRT is even imported
            build_engine(onnx_path, **kwargs)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_engine_sidecar_and_compatibility_checks(exported, tmp_path):
    h100 = DeviceIdentity("NVIDIA H100 80GB HBM3", "9.0")
    sidecar = engine_sidecar(
        exported[1].metadata, tensorrt_version="10.13.0.35", device=h100, workspace_mib=2048, source_onnx_sha256="ab"
    )
    engine = sidecar["engine"]
    assert engine["profile"]["max"] == [8, 1, *TRAINED_SIZE] and engine["compute_capability"] == "9.0"
    assert (
        sidecar["precision"] == "fp16"
        and sidecar["model"]["normalization"]["mean"] == exported[1].metadata.model.normalization.mean
    )
    path = tmp_path / "m.engine"
    check_engine_compatibility(sidecar, path, tensorrt_version="10.13.0.35", device=h100)  # same: accepted
    with pytest.raises(FlareSegError, match=r"built with TensorRT 10.13.0.35, this machine has TensorRT 11.0.0"):
        check_engine_compatibility(sidecar, path, tensorrt_version="11.0.0", device=h100)
    with pytest.raises(FlareSegError, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9.0\), this GPU is"):
        check_engine_compatibility(
            sidecar, path, tensorrt_version="10.13.0.35", device=DeviceIdentity("NVIDIA L4", "8.9")
        )
    with pytest.raises(FlareSegError, match="does not describe a TensorRT engine"):
        check_engine_compatibility(exported[1].metadata.to_dict(), path, tensorrt_version="10.13.0.35", device=h100)


def test_tensorrt_version_support():
    check_tensorrt_version("10.3.0")
    check_tensorrt_version("11.1.0")
    with pytest.raises(FlareSegError, match=r"TensorRT 8\.6\.1 is not supported"):
        check_tensorrt_version("8.6.1")


def _tensorrt_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none on this machine)"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "needs TensorRT (pip install 'flareseg[gpu]'; not installable on our machines)"
    return None


@pytest.mark.skipif(_tensorrt_reason() is not None, reason=_tensorrt_reason() or "")
def test_tensorrt_engine_agrees_with_onnx(exported, trained_checkpoint, sample_ct):
    from flareseg.export.tensorrt import build_engine
    from flareseg.runtime.runners import OnnxRuntimeRunner, TensorRTRunner

    engine = build_engine(exported[1].path)
    _, real, _ = onnx_export.verification_slices(load_model(trained_checkpoint)[1], sample_ct, 8)
    x = network_batch(real, TRAINED_SIZE, 1)
    with OnnxRuntimeRunner(exported[0].path) as ort_runner, TensorRTRunner(engine) as trt_runner:
        ref = ort_runner.infer(x).argmax(1)
        got = trt_runner.infer(x.cuda()).float().argmax(1).cpu()
    assert float((ref == got).float().mean()) >= 0.995


def test_engine_refuses_uint8_labels_before_any_export(trained_checkpoint, tmp_path, capsys):
    argv = [str(trained_checkpoint), "-o", str(tmp_path / "out"), "--engine", "--argmax", "uint8", "-q"]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--argmax int32" in err[0]
    assert not (tmp_path / "out").exists()


def test_engine_is_built_from_the_gpu_model_not_the_int8_one(trained_checkpoint, tmp_path, monkeypatch):
    """TensorRT cannot be installed here: a recording double stands in for build_engine (our control flow only)."""
    from flareseg.export import tensorrt as trt_module

    built: list[tuple[str, bool]] = []
    monkeypatch.setattr(trt_module, "import_tensorrt", lambda: None)
    monkeypatch.setattr(trt_module.DeviceIdentity, "current", classmethod(lambda cls, index=0: None))

    def build_engine(onnx_path, **kw):
        built.append((Path(onnx_path).name, kw["tf32"]))
        return tmp_path / "out" / "flareseg.engine"

    monkeypatch.setattr(trt_module, "build_engine", build_engine)
    argv = [str(trained_checkpoint), "-o", str(tmp_path / "out"), "--fp16", "--int8", "--engine", "--tf32", "-q"]
    assert export_main(argv) == 0
    assert built == [("flareseg_fp16.onnx", True)]
    assert (tmp_path / "out" / "flareseg_int8.onnx").is_file()


# --- refusals before any export: one line, exit code 2, nothing written ----------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A width-4 network on 32 x 32 slices with random weights: enough to be refused or verified."""
    torch.manual_seed(0)
    net = build_training_network(NetworkConfig(base_width=4)).eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    return save_checkpoint(path, net, ModelInfo(net.config, STATS, slice_size=(32, 32)))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _damaged_checkpoints(tiny: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    blob = tiny.read_bytes()
    (folder / "run").mkdir()
    (folder / "run" / "best.pt").write_bytes(blob)
    (folder / "cut.pt").write_bytes(blob[: len(blob) // 2])
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF  # inside the weights: torch.load alone would read it without noticing
    (folder / "flipped.pt").write_bytes(bytes(flipped))
    (folder / "empty.pt").write_bytes(b"")
    (folder / "notes.pt").write_text("hello")
    torch.save(torch.nn.Linear(2, 2), folder / "module.pt")  # a whole model, pickled: torch's reply is a page
    return {
        "folder": (folder / "run", "is a folder, not a checkpoint file; give the .pt file (it holds best.pt)"),
        "truncated": (folder / "cut.pt", "truncated or damaged checkpoint (its zip archive is incomplete)"),
        "flipped-byte": (folder / "flipped.pt", "damaged checkpoint (its member data/"),
        "empty": (folder / "empty.pt", "the checkpoint file is empty"),
        "not-a-zip": (folder / "notes.pt", "not a flareseg checkpoint (not a torch.save zip archive)"),
        "pickled-module": (
            folder / "module.pt",
            "holds pickled Python objects (a whole model saved with torch.save?), not a flareseg checkpoint's weights",
        ),
    }


CHECKPOINT_FAULTS = ["folder", "truncated", "flipped-byte", "empty", "not-a-zip", "pickled-module"]


@pytest.mark.parametrize("engine", [[], ["--engine"]], ids=["onnx", "engine"])
@pytest.mark.parametrize("kind", CHECKPOINT_FAULTS)
def test_unreadable_checkpoints_are_refused_in_one_line(tiny_checkpoint, tmp_path, capsys, kind, engine):
    # With --engine too: the checkpoint is said before TensorRT is asked for (no GPU machine would mend it).
    path, words = _damaged_checkpoints(tiny_checkpoint, tmp_path)[kind]
    out = tmp_path / "out"
    assert export_main([str(path), "-o", str(out), "-q", *engine]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"flare-export: error: {path}: {words}")
    assert len(line) - len(str(path)) < 140 and not out.exists()  # short and whole, not a cut-off torch message


def test_an_onnx_model_an_engine_cannot_be_built_from_is_said_before_tensorrt_is_asked_for(exported, tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    assert export_main([str(junk), "--engine", "-q"]) == 2
    assert _one_line(capsys).startswith(f"flare-export: error: {junk}: ")
    assert "TensorRT" not in capsys.readouterr().err
    assert export_main([str(tmp_path / "absent.onnx"), "--engine", "-q"]) == 2
    line = _one_line(capsys)
    assert "absent.onnx" in line and "TensorRT is not installed" not in line


def test_an_fp16_export_whose_activations_overflow_float16_is_refused(tmp_path, capsys):
    """ONNX Runtime's CPU provider computes an fp16 model in float32: its check alone let logits of 1e5 through,
    which fp16 arithmetic on a GPU makes infinite. The weights themselves stay within float16's range here."""
    torch.manual_seed(0)
    net = build_training_network(NetworkConfig(base_width=4)).eval()
    last = net.head[3]
    with torch.no_grad():
        last.weight.mul_(1.5e6)
        last.bias.mul_(1.5e6)
    assert max(last.weight.abs().max(), last.bias.abs().max()) < np.finfo(np.float16).max
    huge = save_checkpoint(tmp_path / "huge.pt", net, ModelInfo(net.config, STATS, slice_size=(32, 32)))
    out = tmp_path / "out"
    assert export_main([str(huge), "-o", str(out), "--fp16", "--verify-slices", "2", "-q"]) == 2
    line = _one_line(capsys)
    assert line.startswith("flare-export: error: fp16: the network's net.head.3 output reaches ")
    assert "beyond float16's largest value (65504)" in line and not out.exists()
    assert export_main([str(huge), "-o", str(out), "--verify-slices", "2", "-q"]) == 0  # fp32 holds it


def test_the_command_ends_without_teardown_and_loses_nothing(tiny_checkpoint, tmp_path):
    """flare-export ends with os._exit once its files are written (torch's exit handlers took a second, in which a
    Ctrl-C printed a traceback): its lines on stdout and its files must all be there."""
    import subprocess
    import sys

    out = tmp_path / "deploy"
    cmd = [sys.executable, "-m", "flareseg.export.cli", str(tiny_checkpoint), "-o", str(out), "--fp16"]
    done = subprocess.run([*cmd, "--verify-slices", "1", "-q"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-2:] == [
        f"wrote {out / 'flareseg_fp32.onnx'} (+ flareseg_fp32.onnx.json)",
        f"wrote {out / 'flareseg_fp16.onnx'} (+ flareseg_fp16.onnx.json)",
    ]
    for precision in ("fp32", "fp16"):
        assert read_onnx_metadata(out / f"flareseg_{precision}.onnx").precision == precision


def test_an_export_written_meanwhile_into_the_same_folder_is_kept_whole(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A job submitted twice: the second export into the folder found it empty, then the first (here a double run
    from inside the second's verification: our control flow only) wrote its set. The second must not replace part
    of it: the folder held one export's fp32 model beside the other's fp16."""
    import hashlib

    from flareseg.export import onnx_export

    out = tmp_path / "deploy"
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    net = build_training_network(NetworkConfig(base_width=4)).eval()
    save_checkpoint(other, net, ModelInfo(net.config, STATS, slice_size=(32, 32)))
    real_check, calls = onnx_export._check, []

    def first_job_lands(*args, **kwargs):
        if not calls:
            calls.append(1)
            assert export_main([str(other), "-o", str(out), "--fp16", "--verify-slices", "1", "-q"]) == 0
        return real_check(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "_check", first_job_lands)
    assert export_main([str(tiny_checkpoint), "-o", str(out), "--verify-slices", "1", "-q"]) == 2
    line = _one_line(capsys)
    assert line.startswith("flare-export: error: ") and "written meanwhile by another run; kept, this one's" in line
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == [
        "flareseg_fp16.onnx",
        "flareseg_fp16.onnx.json",
        "flareseg_fp32.onnx",
        "flareseg_fp32.onnx.json",
    ]
    for precision in ("fp32", "fp16"):
        assert read_onnx_metadata(out / f"flareseg_{precision}.onnx").source_checkpoint_sha256 == digest
    # With --overwrite the later export replaces the set whole, the fp16 it does not make included.
    argv = [str(tiny_checkpoint), "-o", str(out), "--verify-slices", "1", "--overwrite", "-q"]
    assert export_main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["flareseg_fp32.onnx", "flareseg_fp32.onnx.json"]
    mine = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert read_onnx_metadata(out / "flareseg_fp32.onnx").source_checkpoint_sha256 == mine


@pytest.mark.parametrize("kind", CHECKPOINT_FAULTS)
def test_every_reader_of_a_checkpoint_refuses_a_damaged_one(tiny_checkpoint, tmp_path, kind):
    """load_model and read_checkpoint serve flare-infer, flare-bench and flare-train --resume: the same words there."""
    path, words = _damaged_checkpoints(tiny_checkpoint, tmp_path)[kind]
    for read in (load_model, read_checkpoint):
        with pytest.raises(FlareSegError) as raised:
            read(path)
        assert str(raised.value).startswith(f"{path}: {words}")


def test_an_interrupt_the_exporter_wraps_in_its_own_error_still_stops_the_command(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    """A double of torch.onnx.export: what it does when Ctrl-C lands in one of its lazy imports."""

    def export(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            try:
                raise AttributeError("module 'torch._dynamo' has no attribute 'exc'")
            except AttributeError as inner:
                raise RuntimeError("Failed to export the model with torch.export") from inner

    monkeypatch.setattr(torch.onnx, "export", export)
    out = tmp_path / "out"
    assert export_main([str(tiny_checkpoint), "-o", str(out), "-q"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["flare-export: interrupted"]
    assert not out.exists()


def test_options_for_an_engine_or_int8_are_refused_without_it_and_results_are_said_once(
    tiny_checkpoint, tmp_path, capsys, caplog
):
    out = tmp_path / "out"
    for option, needed in (
        (["--workspace-mib", "512"], "--engine"),
        (["--timing-cache", str(tmp_path / "tc")], "--engine"),
        (["--tf32"], "--engine"),
        (["--calibration-slices", "8"], "--int8"),
        (["--int8-min-agreement", "0.9"], "--int8"),
        (["--int8-min-agreement", "0"], "--int8"),  # 0 == False in Python: still given
        (["--quantizer", "nncf"], "--int8"),
    ):
        assert export_main([str(tiny_checkpoint), "-o", str(out), *option]) == 2
        assert (
            _one_line(capsys)
            == f"flare-export: error: {option[0]} is used only with {needed}: add {needed}, or drop {option[0]}"
        )
    assert not out.exists()
    with caplog.at_level("INFO", logger="flareseg"):
        assert export_main([str(tiny_checkpoint), "-o", str(out), "--verify-slices", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("random slices") == 1  # on stdout, and not logged again
    assert not [r for r in caplog.records if "random slices" in r.getMessage()]


def test_non_finite_weights_are_refused_before_export(tiny_checkpoint, tmp_path, capsys):
    net, info, _ = load_model(tiny_checkpoint)
    with torch.no_grad():
        net.head[3].weight[0, 0, 0, 0] = float("nan")
        net.head[3].bias[0] = float("inf")
    bad = save_checkpoint(tmp_path / "nan.pt", net, info)
    out = tmp_path / "out"
    assert export_main([str(bad), "-o", str(out), "-q"]) == 2
    assert "weight(s) of head.3.weight are not finite (NaN or infinity)" in _one_line(capsys)
    assert not out.exists()


class _NaNSession:
    """An ONNX Runtime session double whose logits are NaN: what a model with NaN weights returns."""

    def run(self, names, feeds):
        x = feeds["image"]
        return [np.full((x.shape[0], 5, *x.shape[2:]), np.nan, np.float32)]


def test_non_finite_logits_fail_the_verification(tiny_checkpoint, monkeypatch):
    """NaN differs from nothing (nan > tolerance is False): non-finite logits must fail, not pass."""
    net, info, _ = load_model(tiny_checkpoint)
    monkeypatch.setattr(onnx_export, "_ort_session", lambda model: _NaNSession())
    slices = {"real": _slices(2, (32, 32))}
    figures = onnx_export._verify(None, onnx_export._Reference(net, info, 2), 1, "logits", slices)
    for precision in ("fp32", "fp16"):
        with pytest.raises(FlareSegError, match=f"{precision} ONNX logits on the real slices are not finite"):
            onnx_export._check(figures, precision, "logits")
    with torch.no_grad():
        net.head[3].bias.fill_(float("nan"))  # the reference itself: nothing can be compared with it
    with pytest.raises(FlareSegError, match="PyTorch network's logits on the real slices are not finite"):
        onnx_export._verify(None, onnx_export._Reference(net, info, 2), 1, "logits", slices)


def test_the_pytorch_reference_runs_once_per_slice_set_however_many_models_are_verified(tiny_checkpoint, tmp_path):
    """fp32 and fp16 are both held to the same PyTorch logits: at full width each forward pass costs seconds."""
    net, info, _ = load_model(tiny_checkpoint)
    seen: list[int] = []
    net.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    reference = onnx_export._Reference(net, info, 2)
    slices = {"random": _slices(3, (32, 32)), "real": _slices(2, (32, 32), seed=2)}
    first = {name: reference.logits(name, data).copy() for name, data in slices.items()}
    assert seen == [2, 1, 2]  # three batches of at most 2: random's 3 slices, then real's 2
    for name, data in slices.items():
        np.testing.assert_array_equal(reference.logits(name, data), first[name])
    assert seen == [2, 1, 2]  # asked again: no forward pass
    # The whole export: the training network's forward runs once per batch of each set, fp16 included.
    calls: list[int] = []
    real_forward = onnx_export.FlareUNet.forward

    def counted(self, x):
        calls.append(x.shape[0])
        return real_forward(self, x)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export.FlareUNet, "forward", counted)
        export_onnx(tiny_checkpoint, tmp_path / "out", ExportOptions(fp16=True, verify_slices=3))
    assert sum(calls) == 3 + 3  # random's 3 and the phantom's 3, once each


def test_opsets_the_exporter_does_not_write_are_refused(tiny_checkpoint, tmp_path, capsys):
    top = onnx.defs.onnx_opset_version()
    for opset in (16, top + 1, 99):
        with pytest.raises(FlareSegError, match=f"opset {opset} is not one the exporter writes: choose 17 to {top}"):
            ExportOptions(opset=opset)
    assert export_main([str(tiny_checkpoint), "-o", str(tmp_path / "out"), "--opset", "99", "-q"]) == 2
    assert "opset 99 is not one the exporter writes" in _one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_an_opset_the_exporter_falls_back_from_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    """The exporter writes its own opset when it cannot convert: the file's opset is what counts."""
    real = onnx_export._to_onnx
    monkeypatch.setattr(onnx_export, "_to_onnx", lambda m, c, s, b, opset: real(m, c, s, b, 18))
    options = ExportOptions(opset=19, verify_slices=1, batch_profile=(1, 1, 2))
    with pytest.raises(FlareSegError, match="opset 19 was asked for, the exporter wrote 18; nothing written"):
        export_onnx(tiny_checkpoint, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def test_the_recorded_opset_is_the_files(exported):
    for item in exported:
        in_file = [o.version for o in onnx.load(str(item.path)).opset_import if o.domain in ("", "ai.onnx")]
        assert in_file == [18] and item.metadata.versions["onnx_opset"] == "18"
        assert read_sidecar(item.path)["versions"]["onnx_opset"] == "18"


@pytest.mark.parametrize("name", ["", "../escape", "sub/model", "a\\b"])
def test_names_that_are_not_a_file_stem_are_refused(tiny_checkpoint, tmp_path, capsys, name):
    with pytest.raises(FlareSegError, match="give a file name stem, not empty and without path separators"):
        ExportOptions(name=name)
    out = tmp_path / "out"
    assert export_main([str(tiny_checkpoint), "-o", str(out), f"--name={name}", "-q"]) == 2
    assert f"name {name!r}: give a file name stem" in _one_line(capsys)
    assert not out.exists() and not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize("name", [".", "..", ".hidden"])
def test_names_that_would_give_hidden_files_are_refused(tiny_checkpoint, tmp_path, capsys, name):
    # "." wrote ._fp32.onnx, a hidden file (and an AppleDouble name): the folder looked empty (flags review).
    out = tmp_path / "out"
    assert export_main([str(tiny_checkpoint), "-o", str(out), f"--name={name}", "-q"]) == 2
    assert _one_line(capsys) == (
        f"flare-export: error: name {name!r}: a stem starting with '.' gives hidden files; give a plain name"
    )
    assert not out.exists()


def test_fewer_verification_slices_than_asked_are_said(tiny_checkpoint, tmp_path, caplog):
    # --verify-slices 100000 on a 6-slice volume verified on 6 without a word (flags review).
    from flareseg.phantom import make_phantom

    ct = tmp_path / "ct.nii.gz"
    nib.save(make_phantom((40, 40, 6), (8.0, 8.0, 10.0), seed=3).to_nifti()[0], ct)
    with caplog.at_level(logging.WARNING, logger="flareseg"):
        (fp32,) = export_onnx(tiny_checkpoint, tmp_path / "out", ExportOptions(verify_slices=100), verify_volume=ct)
    assert fp32.metadata.verification["real"]["slices"] == 6
    said = [r.getMessage() for r in caplog.records if r.name == onnx_export.log.name]
    assert said == [f"{ct} holds 6 slices, fewer than the 100 asked (--verify-slices): the export is verified on those"]


def test_a_label_map_is_refused_as_verification_volume(tiny_checkpoint, tmp_path, capsys):
    from flareseg.phantom import make_phantom

    image, labels = make_phantom((48, 48, 6), (8.0, 8.0, 8.0), seed=0).to_nifti()
    nib.save(labels, tmp_path / "mask.nii.gz")
    out = tmp_path / "out"
    assert export_main([str(tiny_checkpoint), "-o", str(out), "--verify-volume", str(tmp_path / "mask.nii.gz")]) == 2
    assert "mask.nii.gz: looks like a label map, not a CT" in _one_line(capsys)
    assert not out.exists()
    nib.save(image, tmp_path / "ct.nii.gz")  # a CT given: its slices are the real ones, as the line says
    argv = [str(tiny_checkpoint), "-o", str(out), "--verify-volume", str(tmp_path / "ct.nii.gz"), "-q"]
    assert export_main([*argv, "--verify-slices", "2"]) == 0
    assert "; real slices: argmax agreement" in capsys.readouterr().out
    # The test itself: integers 0..4 are a label map, however stored; a CT (air at -1000 HU) never is.
    with pytest.raises(FlareSegError, match="looks like a label map"):
        check_not_label_map(np.asarray(labels.dataobj, np.float32), "m.nii.gz", "--verify-volume")
    check_not_label_map(np.asarray(image.dataobj, np.float32), "ct.nii.gz", "--verify-volume")
    check_not_label_map(np.array([0.0, 1.0, 2.5]), "x", "--verify-volume")  # not all classes: not refused
    check_not_label_map(np.array([-1.0, 0.0, 4.0]), "x", "--verify-volume")


def test_verification_and_calibration_slices_are_normalised_as_flare_infer_normalises_them(tmp_path):
    """Independent reference, in flare-infer's float32 order: stored -> HU (scl_slope, scl_inter), clipped to
    numpy's percentiles of the stored values mapped to HU, z-scored. Bit for bit, also where the slope is not 1."""
    from flareseg.export.inputs import read_ct_normalized
    from flareseg.phantom import make_phantom

    image, labels = make_phantom((40, 36, 9), (8.0, 8.0, 8.0), seed=2).to_nifti()
    stored = ((np.asarray(image.dataobj) + 1024) * 2).astype(np.uint16)  # HU = stored * 0.5 - 1024
    ct = nib.Nifti1Image(stored, image.affine)
    ct.header.set_slope_inter(0.5, -1024.0)
    nib.save(ct, tmp_path / "ct.nii.gz")
    got = read_ct_normalized(tmp_path / "ct.nii.gz", STATS, "--verify-volume", lambda n: [0, n // 2, n - 1])
    canonical = np.transpose(stored, (2, 1, 0))[[0, 4, 8]]  # RAS phantom: slices along the third axis
    hu = canonical.astype(np.float32) * np.float32(0.5) + np.float32(-1024.0)
    lo, hi = (float(v) * 0.5 - 1024.0 for v in np.percentile(stored, (1.0, 99.0)))
    expected = (np.clip(hu, np.float32(lo), np.float32(hi)) - np.float32(STATS.mean)) / np.float32(STATS.std)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    nib.save(labels, tmp_path / "mask.nii.gz")
    with pytest.raises(FlareSegError, match=r"mask\.nii\.gz: looks like a label map"):
        read_ct_normalized(tmp_path / "mask.nii.gz", STATS, "--calibration")


def test_the_stand_in_phantom_is_made_once_per_seed_and_is_the_phantom(monkeypatch):
    """Verification (seed 0) and INT8 calibration (seeds 0 and 1) without a CT: 1.3 s a phantom, made again by each
    export of a run (flare-bench's several) before it was kept."""
    from flareseg import phantom
    from flareseg.export import int8
    from flareseg.export.inputs import phantom_ct

    made, real = [], phantom.make_phantom

    def counted(*args, **kwargs):
        made.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom, "make_phantom", counted)
    phantom_ct.cache_clear()
    info = ModelInfo(NetworkConfig(base_width=4), STATS, slice_size=(32, 32))
    for _ in range(2):
        onnx_export.verification_slices(info, None, 2)
        int8.calibration_slices(info, None, count=2, held_out=1)
    assert made == [0, 1]
    volume = phantom_ct(0)
    expected = np.transpose(real((192, 192, 48), (2.0, 2.0, 5.0), seed=0).image, (2, 1, 0)).astype(np.float32)
    assert volume.dtype == np.float32 and np.array_equal(volume, expected)
    with pytest.raises(ValueError, match="read-only"):
        volume[0, 0, 0] = 1.0  # shared by every caller: none may change it


def test_an_output_path_that_is_a_file_is_refused(tiny_checkpoint, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert export_main([str(tiny_checkpoint), "-o", str(afile), "-q"]) == 2
    assert "afile: exists and is not a folder (-o names the output folder)" in _one_line(capsys)
    assert afile.read_text() == "keep me"


def test_a_write_that_fails_midway_leaves_the_earlier_set_whole(tiny_checkpoint, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "deploy"
    rng = torch.get_rng_state()
    export_onnx(tiny_checkpoint, out, ExportOptions(fp16=True, verify_slices=1))
    assert torch.equal(torch.get_rng_state(), rng)  # the export draws from generators of its own
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == [f"flareseg_{p}.onnx{s}" for p in ("fp16", "fp32") for s in ("", ".json")]
    real, calls = onnx_export.sidecar_text, []

    def sidecar_text(data):  # the disk fills up at the second sidecar (fp16's), after fp32's model and sidecar
        calls.append(data["precision"])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(data)

    monkeypatch.setattr(onnx_export, "sidecar_text", sidecar_text)
    with pytest.raises(FlareSegError, match=r"flareseg_fp16\.onnx\.json: cannot write \(No space left on device\)"):
        options = ExportOptions(fp16=True, verify_slices=1, batch_profile=(1, 2, 4))
        export_onnx(tiny_checkpoint, out, options, overwrite=True)
    assert calls == ["fp32", "fp16"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new fp32 beside old fp16, no temporaries
    # Into a folder it had to make (two levels): the full disk leaves neither behind, empty (a disk-full review).
    calls.clear()
    with pytest.raises(FlareSegError, match=r"cannot write \(No space left on device\)"):
        export_onnx(tiny_checkpoint, tmp_path / "new" / "deploy", ExportOptions(fp16=True, verify_slices=1))
    assert calls == ["fp32", "fp16"] and sorted(p.name for p in tmp_path.iterdir()) == ["deploy"]


def test_metadata_is_read_without_the_onnx_package_as_onnx_reads_it(tiny_checkpoint, tmp_path):
    from onnx import TensorProto, helper

    from flareseg.export.metadata import onnx_metadata_props

    exported = export_onnx(tiny_checkpoint, tmp_path / "deploy", ExportOptions(fp16=True, verify_slices=1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    other = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [x]))
    for key, value in (("a", ""), ("", "no key"), ("flareseg", '{"é": "ü"}'), ("long", "x" * 300), ("a", "again")):
        other.metadata_props.add(key=key, value=value)
    onnx.save(other, str(tmp_path / "other.onnx"))
    for path in [e.path for e in exported] + [tmp_path / "other.onnx"]:
        expected: dict[str, str] = {}
        for prop in onnx.load(str(path), load_external_data=False).metadata_props:
            expected.setdefault(prop.key, prop.value)  # the first of a repeated key
        assert onnx_metadata_props(path) == expected, path
    assert read_onnx_metadata(exported[0].path) == exported[0].metadata
    # So an ONNX Runtime run never imports onnx (about 0.7 s of a fresh process's start).
    code = (
        "import sys\nfrom flareseg.runtime.runners import OnnxRuntimeRunner\n"
        f"OnnxRuntimeRunner({str(exported[0].path)!r}).activate()\nprint('onnx' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    blob = exported[0].path.read_bytes()
    damaged = {
        "empty": (b"", "not an ONNX model (the file is empty)"),
        "text": (b"hello", "not an ONNX model (wire type 4 at byte 3)"),
        "cut short": (blob[: len(blob) // 2], "not an ONNX model (a field runs past the end of its message"),
        # The props come last: a copy cut short loses them first, inside an entry's own fields.
        "cut in the props": (blob[:-5], "not an ONNX model (a field runs past the end of its message"),
        "gzip": (b"\x1f\x8b\x08\x00" + bytes(60), "not an ONNX model (wire type 7 at byte 1)"),
    }
    for name, (content, words) in damaged.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(content)
        with pytest.raises(FlareSegError) as err:
            read_onnx_metadata(path)
        assert str(err.value).startswith(f"{path}: {words}"), name


def test_the_library_refuses_options_and_metadata_the_command_line_cannot_give():
    """The parsers refuse these before the library sees them; a program calling the library gets the same lines."""
    with pytest.raises(FlareSegError, match=r"batch profile must satisfy 1 <= min <= opt <= max, got 0,1,2"):
        ExportOptions(batch_profile=(0, 1, 2))
    with pytest.raises(FlareSegError, match="at least one real slice is needed to verify an export"):
        ExportOptions(verify_slices=0)
    assert ExportOptions().batch_profile == (1, 8, 32)  # the README's default profile
    info = ModelInfo(
        network=NetworkConfig(base_width=4), normalization=NormalizationStats(0.0, 1.0), slice_size=(32, 32)
    )
    meta = ExportMetadata(info, 1, "logits", None, "fp32", (1, 2, 4), "0" * 64)
    assert ExportMetadata.from_dict(meta.to_dict()) == meta
    with pytest.raises(FlareSegError, match=r"^m: malformed export metadata \(precision must be one of .*'fp8'\)$"):
        ExportMetadata.from_dict({**meta.to_dict(), "precision": "fp8"}, source="m")


@pytest.mark.parametrize(
    ("embedded", "kind"), [("[1, 2]", "list"), ("3", "int"), ('"flareseg"', "str"), ("null", "NoneType")]
)
def test_embedded_metadata_that_is_not_a_json_object_is_refused_in_one_line(tmp_path, embedded, kind):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [x]))
    model.graph.output[0].name = "y"
    model.metadata_props.add(key="flareseg", value=embedded)
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    with pytest.raises(FlareSegError) as err:
        read_onnx_metadata(path)
    assert str(err.value) == f"{path}: flareseg metadata is not a JSON object (got {kind})"
    with pytest.raises(FlareSegError, match=rf"^{kind}: export metadata is not a JSON object \(got {kind}\)$"):
        ExportMetadata.from_dict(json.loads(embedded), source=kind)


def test_an_earlier_export_is_refused_unless_overwrite_which_replaces_the_whole_set(
    tiny_checkpoint, tmp_path, capsys, caplog
):
    out = tmp_path / "deploy"
    assert export_main([str(tiny_checkpoint), "-o", str(out), "--fp16", "--verify-slices", "1", "-q"]) == 0
    (out / "flareseg_fp16.engine").write_bytes(b"an engine built from the earlier fp16 model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert export_main([str(tiny_checkpoint), "-o", str(out), "--verify-slices", "1", "-q"]) == 2
    assert _one_line(capsys) == (
        f"flare-export: error: {out}: holds an earlier export named flareseg (flareseg_fp32.onnx); --overwrite "
        "replaces that set, or choose another -o or --name"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Another name beside it is another set.
    assert export_main([str(tiny_checkpoint), "-o", str(out), "--name", "other", "--verify-slices", "1", "-q"]) == 0
    # --overwrite: the new set (fp32 only) replaces the old one whole; its fp16 model and engine do not stay behind.
    argv = [str(tiny_checkpoint), "-o", str(out), "--verify-slices", "1", "--batch", "1,2,4", "--overwrite", "-q"]
    with caplog.at_level(logging.WARNING, logger="flareseg.export"):  # -q: files removed are still said
        assert export_main(argv) == 0
    assert {m for m in caplog.messages if m.startswith("removed")} == {
        f"removed {out / name}: of the earlier export, not of this one (--overwrite replaces the whole set)"
        for name in ("flareseg_fp16.engine", "flareseg_fp16.onnx", "flareseg_fp16.onnx.json")
    }
    assert sorted(p.name for p in out.iterdir()) == [
        "flareseg_fp32.onnx",
        "flareseg_fp32.onnx.json",
        "other_fp32.onnx",
        "other_fp32.onnx.json",
    ]
    assert read_onnx_metadata(out / "flareseg_fp32.onnx").batch_profile == (1, 2, 4)


def test_a_ctrl_c_as_the_new_set_replaces_the_old_one_still_removes_the_old_sets_other_members(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    """Ctrl-C right after the first rename of an --overwrite: the old fp16 model was removed only after the renames,
    so a stop there left the new fp32 model beside the old fp16 one, which looked like one set."""
    from conftest import ctrl_c_after_the_first_rename

    out = tmp_path / "deploy"
    assert export_main([str(tiny_checkpoint), "-o", str(out), "--fp16", "--verify-slices", "1", "-q"]) == 0
    renamed = ctrl_c_after_the_first_rename(monkeypatch)
    argv = [str(tiny_checkpoint), "-o", str(out), "--verify-slices", "1", "--batch", "1,2,4", "--overwrite", "-q"]
    assert export_main(argv) == 130
    assert renamed == ["flareseg_fp32.onnx", "flareseg_fp32.onnx.json"]
    assert sorted(p.name for p in out.iterdir()) == ["flareseg_fp32.onnx", "flareseg_fp32.onnx.json"]
    assert read_onnx_metadata(out / "flareseg_fp32.onnx").batch_profile == (1, 2, 4)  # the new one


def test_an_export_at_another_size_than_training_is_warned_of_and_records_the_trained_size(
    tiny_checkpoint, tmp_path, caplog
):
    # The verification runs PyTorch at the export's size too, so it printed 100 % for a model that, on the real
    # sample, gave liver DSC 0.88 and kidneys 0.02 against the checkpoint at its own size (exportF review).
    options = ExportOptions(slice_size=(64, 64), verify_slices=1)
    with caplog.at_level(logging.WARNING, logger="flareseg"):
        (other,) = export_onnx(tiny_checkpoint, tmp_path / "other", options)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("flareseg")]
    assert said == [
        f"{tiny_checkpoint} was trained on 32x32 slices and is exported for 64x64: slices are resized to that, so the "
        "network sees organs at another scale than in training (the verification compares with PyTorch at the same "
        "size and cannot show it); score its labels with flare-eval before deploying it"
    ]
    assert read_onnx_metadata(other.path).trained_slice_size == (32, 32)
    assert read_onnx_metadata(other.path).model.slice_size == (64, 64)
    assert read_sidecar(other.path)["trained_slice_size"] == [32, 32]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flareseg"):
        (same,) = export_onnx(tiny_checkpoint, tmp_path / "same", ExportOptions(slice_size=(32, 32), verify_slices=1))
    assert not [r for r in caplog.records if r.name.startswith("flareseg")]
    assert read_onnx_metadata(same.path).trained_slice_size is None
    assert "trained_slice_size" not in read_sidecar(same.path)


def test_an_argmax_export_is_held_to_the_fp32_tolerance_where_its_labels_are_decisive():
    # Overall label agreement (>= 99.9 %) passed a graph whose liver logit was 0.08 off; the logits check refuses
    # 0.002 (exportF review). Where PyTorch's best class leads by more than two tolerances, no rounding within the
    # tolerance can change the label, so any change there is refused.
    ref = np.zeros((1, 5, 2, 2), np.float32)
    ref[0, 0] = [[10.0, 10.0], [10.0, 1.0]]  # background wins by far, but at the last voxel
    ref[0, 1] = [[0.0, 0.0], [0.0, 1.0 + 1e-5]]  # where liver leads by a hair: a near-tie
    labels = ref.argmax(axis=1)
    tie_flipped = labels.copy()
    tie_flipped[0, 1, 1] = 0
    figures = onnx_export._compare(ref, tie_flipped, "labels")
    assert figures["decisive_voxels"] == 0.75 and figures["decisive_agreement"] == 1.0
    decisive_flipped = labels.copy()
    decisive_flipped[0, 0, 0] = 1
    figures = onnx_export._compare(ref, decisive_flipped, "labels")
    assert figures["decisive_agreement"] == pytest.approx(2 / 3) and figures["argmax_agreement"] == 0.75
    both = {"random": figures, "real": figures}
    with pytest.raises(FlareSegError, match=r"on random slices where no rounding within the fp32 tolerance \(1e-04\) "
                       r"could change them: agreement there 66\.667%, expected 100%; nothing written$"):  # fmt: skip
        onnx_export._check(both, "fp32", "labels")
    # fp16 is held to its agreement on the real slices alone: its rounding is beyond the fp32 tolerance.
    onnx_export._check({"random": figures, "real": {**figures, "argmax_agreement": 0.996}}, "fp16", "labels")


def test_the_decisive_margin_is_two_tolerances_of_the_logits_scale():
    # mutF review: the factor 2, the scaling and the strict "more than" were untested.
    ref = np.zeros((1, 5, 1, 2000), np.float32)
    ref[0, 0] = 1000.0  # background wins by far everywhere; scale 1000: two tolerances are a margin of 0.2
    ref[0, 1, 0, 0] = 1000.15  # but at the first voxel liver leads by 0.15 (over one tolerance, under two): near-tie
    flipped = ref.argmax(axis=1)
    flipped[0, 0, 0] = 0  # the near-tie flipped, as fp32 rounding may
    figures = onnx_export._compare(ref, flipped, "labels")
    assert figures["decisive_voxels"] == 1999 / 2000 and figures["decisive_agreement"] == 1.0
    onnx_export._check({"random": figures, "real": figures}, "fp32", "labels")  # not refused
    # A lead of exactly two tolerances (scale 1e4: 2.0) is not decisive: only more than that is.
    edge = np.zeros((1, 5, 1, 2), np.float32)
    edge[0, 0] = [[10000.0, 9998.0]]
    edge[0, 1] = [[0.0, 10000.0]]
    assert onnx_export._compare(edge, edge.argmax(axis=1), "labels")["decisive_voxels"] == 0.5
    # Slices where every class ties (empty or constant ones) have no decisive voxel, and pass.
    tied = np.zeros((2, 5, 3, 3), np.float32)
    figures = onnx_export._compare(tied, tied.argmax(axis=1), "labels")
    assert figures["decisive_voxels"] == 0.0 and figures["decisive_agreement"] == 1.0
    onnx_export._check({"random": figures, "real": figures}, "fp32", "labels")


def test_an_argmax_export_whose_graph_is_slightly_off_is_refused(trained_checkpoint, tmp_path, monkeypatch):
    real = onnx_export.build_deploy_network

    def liver_biased(*args, **kwargs):
        deploy = real(*args, **kwargs)
        with torch.no_grad():
            deploy.head[-1].bias[1] += 0.02  # overall agreement stays above 99.9 %
        return deploy

    monkeypatch.setattr(onnx_export, "build_deploy_network", liver_biased)
    options = ExportOptions(output_kind="labels", label_dtype="uint8", verify_slices=2)
    with pytest.raises(FlareSegError, match="where no rounding within the fp32 tolerance"):
        export_onnx(trained_checkpoint, tmp_path / "out", options)


def test_the_export_records_the_checkpoint_it_loaded_though_the_path_is_replaced_meanwhile(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """flare-train saves a better best.pt over the old one (a rename) while an export of it runs: the export's
    record of its source is the file its weights came from, not the one the path holds by the end."""
    run = tmp_path / "run"
    run.mkdir()
    best = run / "best.pt"
    best.write_bytes(tiny_checkpoint.read_bytes())
    loaded = hashlib.sha256(best.read_bytes()).hexdigest()
    torch.manual_seed(1)
    net = build_training_network(NetworkConfig(base_width=4)).eval()
    newer = save_checkpoint(tmp_path / "newer.pt", net, ModelInfo(net.config, STATS, slice_size=(32, 32)))
    real_slices = onnx_export.verification_slices

    def training_saves_meanwhile(*args, **kwargs):  # called after the weights are loaded
        os.replace(newer, best)
        return real_slices(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "verification_slices", training_saves_meanwhile)
    written = export_onnx(best, tmp_path / "deploy", ExportOptions(verify_slices=1))
    assert not newer.exists() and hashlib.sha256(best.read_bytes()).hexdigest() != loaded
    assert read_onnx_metadata(written[0].path).source_checkpoint_sha256 == loaded


# --- mutJ: the export's destination and its set ------------------------------------------------------------


def _no_export(monkeypatch) -> None:
    """Any export work at all fails the test: the refusals below come before it."""
    monkeypatch.setattr(onnx_export, "_verified_models", lambda *a, **k: pytest.fail("the export ran"))


def test_a_destination_that_cannot_take_the_export_is_refused_before_any_work(tiny_checkpoint, tmp_path, monkeypatch):
    _no_export(monkeypatch)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FlareSegError, match=r"cannot create its folder, .*afile is a file"):
        export_onnx(tiny_checkpoint, tmp_path / "afile" / "deploy", ExportOptions(verify_slices=1))
    # A dangling link named as a member of the set is an earlier export's member too (its target gone).
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "flareseg_fp32.onnx").symlink_to(tmp_path / "gone.onnx")
    with pytest.raises(FlareSegError, match=r"holds an earlier export named flareseg \(flareseg_fp32\.onnx\)"):
        export_onnx(tiny_checkpoint, tmp_path / "out", ExportOptions(verify_slices=1))


def test_overwrite_removes_an_earlier_member_that_is_a_dangling_link(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "flareseg_fp16.onnx").symlink_to(tmp_path / "gone.onnx")
    export_onnx(tiny_checkpoint, out, ExportOptions(verify_slices=1), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["flareseg_fp32.onnx", "flareseg_fp32.onnx.json"]


def test_a_ctrl_c_in_the_write_leaves_no_folder_the_export_made(tiny_checkpoint, tmp_path, monkeypatch):
    def sidecar_text(data):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "sidecar_text", sidecar_text)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_checkpoint, tmp_path / "new" / "deploy", ExportOptions(verify_slices=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("stray", ["flareseg_fp32.onnx", "flareseg_fp32.onnx.json"])
def test_one_file_of_a_pair_written_meanwhile_is_kept(tiny_checkpoint, tmp_path, monkeypatch, stray):
    # A model without its sidecar, or the reverse, lands while this export verifies: kept, and this set dropped.
    out = tmp_path / "out"
    real = onnx_export._verified_models

    def verified(*args, **kwargs):
        models = real(*args, **kwargs)
        out.mkdir(exist_ok=True)
        (out / stray).write_bytes(b"another run's")
        return models

    monkeypatch.setattr(onnx_export, "_verified_models", verified)
    with pytest.raises(FlareSegError, match=rf"{stray}: written meanwhile by another run; kept"):
        export_onnx(tiny_checkpoint, out, ExportOptions(verify_slices=1))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {stray: b"another run's"}
