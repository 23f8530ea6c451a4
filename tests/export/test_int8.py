"""flare-export --int8: static QDQ quantisation, verified on held-out slices, and its refusals."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TRAINED_SIZE

from flareseg.checkpoint import ModelInfo, load_model
from flareseg.errors import FlareSegError
from flareseg.export import ExportOptions, export_onnx, read_onnx_metadata, read_sidecar
from flareseg.export import int8 as int8_module
from flareseg.export import options as export_options
from flareseg.export.cli import main as export_main
from flareseg.export.fp16 import convert_to_fp16
from flareseg.network import NetworkConfig
from flareseg.phantom import make_phantom
from flareseg.preprocess import NormalizationStats, network_batch, normalize_volume

#: Labels of the INT8 model against fp32 PyTorch on phantom slices it was neither
#: calibrated nor verified on (the export itself requires 99 % on its held-out slices).
INDEPENDENT_MIN_AGREEMENT = 0.98


def _phantom_slices(seed: int, stats) -> np.ndarray:
    """Normalised axial slices with organs in them, from a phantom case the export never saw."""
    image = np.transpose(make_phantom((64, 64, 32), (6.0, 6.0, 8.0), seed=seed).image, (2, 1, 0)).astype(np.float32)
    return normalize_volume(image, stats)[8:24]


def _ort_labels(path: Path, slices: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": network_batch(slices, TRAINED_SIZE, 1).numpy()})[0].argmax(1)


def _torch_labels(checkpoint: Path, slices: np.ndarray) -> np.ndarray:
    net, info, _ = load_model(checkpoint)
    with torch.inference_mode():
        return net(network_batch(slices, TRAINED_SIZE, info.network.in_channels)).argmax(1).numpy()


@pytest.fixture(scope="module")
def exported(int8_export):
    return int8_export


def test_int8_export_is_written_beside_fp32_and_readable(exported):
    assert [e.path.name for e in exported] == ["flareseg_fp32.onnx", "flareseg_int8.onnx"]
    int8 = exported[1]
    embedded = read_onnx_metadata(int8.path)
    assert embedded.precision == "int8"
    sidecar = read_sidecar(int8.path)
    assert sidecar.pop("file_sha256") == hashlib.sha256(int8.path.read_bytes()).hexdigest()  # the file as written
    assert sidecar == json.loads(embedded.to_json()) == int8.metadata.to_dict()
    # fp32 metadata keeps its old shape: no quantization key.
    assert "quantization" not in read_sidecar(exported[0].path)


def test_int8_graph_is_qdq_with_per_channel_symmetric_weights(exported):
    model = onnx.load(str(exported[1].path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= 20
    weight_dq = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and inits.get(n.input[0]) is not None
        and inits[n.input[0]].dtype == np.int8
        and inits[n.input[0]].ndim == 4
    ]
    assert len(weight_dq) >= 20  # the convolutions' weights
    for node in weight_dq:
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        zero = inits[node.input[2]] if len(node.input) > 2 else np.zeros(1)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        assert scale.shape == (weight.shape[axis],)  # one scale per output channel
        assert not np.any(zero)  # symmetric: zero point 0
    # The layers reported as float consume float weights (no DequantizeLinear in front of them).
    quant = exported[1].metadata.quantization
    float_nodes = {name for names in quant["float_layers"].values() for name in names}
    produced_by_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in model.graph.node:
        if node.name in float_nodes and node.op_type == "Conv":
            assert node.input[1] in inits and inits[node.input[1]].dtype == np.float32
            assert node.input[1] not in produced_by_dq


def test_int8_metadata_records_quantiser_calibration_and_agreement(exported):
    meta = exported[1].metadata
    quant = meta.quantization
    assert quant["quantizer"].split()[0] == export_options.DEFAULT_QUANTIZER
    assert quant["settings"]["weights"] == "int8 per-channel symmetric"
    assert set(quant["float_layers"]) == set(export_options.DEFAULT_FLOAT_LADDER[0])
    assert quant["calibration"] == {
        "source": "synthetic phantoms (2 x 192x192x48 at 2x2x5 mm)",
        "slices": export_options.DEFAULT_CALIBRATION_SLICES,
        "held_out_slices": export_options.DEFAULT_HELD_OUT_SLICES,
    }
    held = meta.verification["held_out"]
    assert held["slices"] == export_options.DEFAULT_HELD_OUT_SLICES
    assert held["argmax_agreement"] >= export_options.DEFAULT_MIN_AGREEMENT
    assert quant["attempts"][-1]["held_out_agreement"] == held["argmax_agreement"]


def test_int8_labels_agree_with_fp32_pytorch_on_unseen_phantom_slices(exported, trained_checkpoint):
    info = load_model(trained_checkpoint)[1]
    slices = _phantom_slices(seed=7, stats=info.normalization)
    ref = _torch_labels(trained_checkpoint, slices)
    got = _ort_labels(exported[1].path, slices)
    assert len(np.unique(ref)) >= 4  # organs are predicted, so agreement means something
    assert np.mean(got == ref) >= INDEPENDENT_MIN_AGREEMENT


def test_calibration_and_held_out_slices_are_disjoint_and_come_from_the_folder(trained_checkpoint, tmp_path):
    info = load_model(trained_checkpoint)[1]
    folder = tmp_path / "TrainingImg"
    folder.mkdir()
    for k in range(2):
        img, _ = make_phantom((64, 64, 20), (6.0, 6.0, 8.0), seed=10 + k).to_nifti()
        nib.save(img, folder / f"train_{k:03d}_0000.nii.gz")
    (folder / "notes.txt").write_text("not an image")
    sets = int8_module.calibration_slices(info, folder, count=10, held_out=4)
    assert sets.source == f"2 case(s) of {folder}"
    assert len(sets.calibration) == 10 and len(sets.held_out) == 4
    flat_c = {s.tobytes() for s in sets.calibration}
    assert not flat_c & {s.tobytes() for s in sets.held_out}


def test_dicom_series_calibrate_and_verify_as_their_nifti_does(trained_checkpoint, tmp_path, caplog):
    # A DICOM-only site could neither calibrate nor verify an export on its own scans (e2eR review).
    from dicom_series import phantom, write_series

    from flareseg.export.inputs import read_ct_normalized

    info = load_model(trained_checkpoint)[1]
    ph = phantom("LPS")
    write_series(tmp_path / "series" / "s1", ph)
    write_series(tmp_path / "series" / "s2", ph, seed=1)
    nifti = tmp_path / "ct.nii.gz"
    nib.save(ph.to_nifti()[0], nifti)
    from_series = read_ct_normalized(tmp_path / "series" / "s1", info.normalization, "--verify-volume")
    from_nifti = read_ct_normalized(nifti, info.normalization, "--verify-volume")
    np.testing.assert_allclose(from_series, from_nifti, rtol=0, atol=1e-5)
    one = int8_module.calibration_slices(info, tmp_path / "series" / "s1", count=6, held_out=2)
    assert one.source == f"1 DICOM series of {tmp_path / 'series' / 's1'}" and len(one.calibration) == 6
    both = int8_module.calibration_slices(info, tmp_path / "series", count=6, held_out=2)
    assert both.source == f"2 DICOM series of {tmp_path / 'series'}" and len(both.held_out) == 2
    # A folder of series is no series: flare-infer's reader says which folder to give.
    with pytest.raises(FlareSegError, match=r"series: no files in it, only folders: give the folder that holds one"):
        read_ct_normalized(tmp_path / "series", info.normalization, "--verify-volume")
    # NIfTI files beside DICOM SEG results: nothing is left out, nothing said (flare-infer passes SEGs over too).
    from flareseg.dicom import read_series, write_seg

    (tmp_path / "results").mkdir()
    shutil.copy(nifti, tmp_path / "results" / "ct_0000.nii.gz")
    series = read_series(tmp_path / "series" / "s1")
    write_seg(np.zeros(series.array.shape, np.uint8), series, tmp_path / "results" / "seg" / "s1.dcm")
    with caplog.at_level(logging.WARNING, logger="flareseg.export.int8"):
        int8_module.calibration_slices(info, tmp_path / "results", count=6, held_out=2)
    assert not [r for r in caplog.records if r.name == "flareseg.export.int8"]
    # NIfTI files beside series: they calibrate, and the series left out are said.
    shutil.copy(nifti, tmp_path / "series" / "ct_0000.nii.gz")
    with caplog.at_level(logging.WARNING, logger="flareseg.export.int8"):
        mixed = int8_module.calibration_slices(info, tmp_path / "series", count=6, held_out=2)
    assert mixed.source == f"1 case(s) of {tmp_path / 'series'}"
    assert [r.getMessage() for r in caplog.records if r.name == "flareseg.export.int8"] == [
        f"{tmp_path / 'series'}: calibrating on its NIfTI files; the DICOM series beside them are left out"
    ]
    # The series' slices in the folder itself, beside a NIfTI file: left out, and said alike.
    caplog.clear()
    shutil.copy(nifti, tmp_path / "series" / "s1" / "ct_0000.nii.gz")
    with caplog.at_level(logging.WARNING, logger="flareseg.export.int8"):
        inside = int8_module.calibration_slices(info, tmp_path / "series" / "s1", count=6, held_out=2)
    assert inside.source == f"1 case(s) of {tmp_path / 'series' / 's1'}"
    assert [r.getMessage() for r in caplog.records if r.name == "flareseg.export.int8"] == [
        f"{tmp_path / 'series' / 's1'}: calibrating on its NIfTI files; the DICOM series beside them are left out"
    ]
    (tmp_path / "series" / "s1" / "ct_0000.nii.gz").unlink()
    # What flare-infer's reader says of a folder that is no series, and of one file of a series.
    (tmp_path / "none").mkdir()
    with pytest.raises(FlareSegError, match=r"none: empty folder: no files"):
        read_ct_normalized(tmp_path / "none", info.normalization, "--verify-volume")
    one_file = next(p for p in (tmp_path / "series" / "s1").iterdir())
    with pytest.raises(
        FlareSegError, match=r": one DICOM file; --verify-volume takes the folder that holds the series"
    ):
        read_ct_normalized(one_file, info.normalization, "--verify-volume")
    with pytest.raises(FlareSegError, match=r"none: no NIfTI files \(.nii or .nii.gz\) nor DICOM series"):
        int8_module.calibration_slices(info, tmp_path / "none")


def test_calibration_folder_with_mixed_in_plane_sizes_and_a_flat_case(tmp_path):
    # Cases of different sizes (also width only) and one with no usable slice pool together.
    info = ModelInfo(
        network=NetworkConfig(base_width=8), normalization=NormalizationStats(0.0, 100.0), slice_size=(32, 32)
    )
    folder = tmp_path / "cases"
    folder.mkdir()
    for k, shape in enumerate([(64, 64, 12), (80, 80, 12), (64, 80, 12)]):
        img, _ = make_phantom(shape, (6.0, 6.0, 8.0), seed=20 + k).to_nifti()
        nib.save(img, folder / f"case_{k}_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.full((48, 48, 6), -1000, np.int16), np.eye(4)), folder / "case_3_0000.nii.gz")
    sets = int8_module.calibration_slices(info, folder, count=6, held_out=3)
    assert len(sets.calibration) == 6 and len(sets.held_out) == 3
    sizes = {s.shape for s in [*sets.calibration, *sets.held_out]}
    assert sizes == {(64, 64), (80, 80), (80, 64)}  # (Y, X) of each NIfTI case; the flat one gave none
    inputs = int8_module.network_inputs(sets.calibration, info, 3)
    assert inputs.shape == (6, 3, 32, 32) and inputs.dtype == np.float32


def test_export_calibrated_on_a_folder_records_it(trained_checkpoint, tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    img, _ = make_phantom((64, 64, 24), (6.0, 6.0, 8.0), seed=3).to_nifti()
    nib.save(img, folder / "case_0000.nii.gz")
    out = export_onnx(
        trained_checkpoint,
        tmp_path / "out",
        ExportOptions(int8=True, calibration_slices=8, held_out_slices=4),
        calibration=folder,
    )
    quant = out[-1].metadata.quantization
    assert quant["calibration"] == {"source": f"1 case(s) of {folder}", "slices": 8, "held_out_slices": 4}
    assert out[-1].metadata.verification["held_out_source"] == f"1 case(s) of {folder}"


# --- refusals: one line, exit code 2, nothing written ----------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_calibration_folder_without_nifti_is_refused_before_export(trained_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    out = tmp_path / "out"
    assert export_main([str(trained_checkpoint), "-o", str(out), "--int8", "--calibration", str(empty)]) == 2
    assert "no NIfTI files" in _one_line_error(capsys)
    assert not out.exists()
    assert export_main([str(trained_checkpoint), "-o", str(out), "--int8", "--calibration", str(tmp_path / "no")]) == 2
    assert "calibration folder not found" in _one_line_error(capsys)
    (tmp_path / "one.nii.gz").write_bytes(b"a file, where a folder was asked for")
    assert (
        export_main([str(trained_checkpoint), "-o", str(out), "--int8", "--calibration", str(tmp_path / "one.nii.gz")])
        == 2
    )
    assert _one_line_error(capsys).endswith(
        "one.nii.gz: is a file; --calibration takes a folder of CT NIfTI files or DICOM series"
    )
    assert export_main([str(trained_checkpoint), "-o", str(out), "--calibration", str(empty)]) == 2
    assert "only used by the INT8 export" in _one_line_error(capsys)
    assert not out.exists()


def test_calibration_volumes_without_usable_slices_are_refused(trained_checkpoint, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    nib.save(nib.Nifti1Image(np.full((32, 32, 6), -1000, np.int16), np.eye(4)), flat / "air_0000.nii.gz")
    out = tmp_path / "out"
    assert export_main([str(trained_checkpoint), "-o", str(out), "--int8", "--calibration", str(flat)]) == 2
    assert "0 usable slice(s) to calibrate on" in _one_line_error(capsys)
    assert not out.exists()


def test_a_folder_of_label_maps_is_refused_for_calibration(trained_checkpoint, tmp_path, capsys):
    masks = tmp_path / "TrainingMask"
    masks.mkdir()
    _, labels = make_phantom((32, 32, 6), (6.0, 6.0, 8.0), seed=0).to_nifti()
    nib.save(labels, masks / "train_000.nii.gz")
    out = tmp_path / "out"
    assert export_main([str(trained_checkpoint), "-o", str(out), "--int8", "--calibration", str(masks)]) == 2
    assert "train_000.nii.gz: looks like a label map, not a CT" in _one_line_error(capsys)
    assert not out.exists()


def test_agreement_below_the_threshold_writes_nothing(trained_checkpoint, tmp_path, capsys):
    # Everything quantised (no float layers) cannot reach 100 % agreement on this model.
    options = ExportOptions(int8=True, int8_min_agreement=1.0, int8_float_ladder=((),))
    with pytest.raises(FlareSegError, match=r"INT8 model agrees with fp32 PyTorch on 9\d\.\d+% of held-out voxels"):
        export_onnx(trained_checkpoint, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()  # not even the fp32 model: every model is verified before writing
    out = tmp_path / "cli"
    assert export_main([str(trained_checkpoint), "-o", str(out), "--int8", "--int8-min-agreement", "1.0"]) in (0, 2)
    if out.exists():  # the ladder reached 100 % with every sensitive layer in float: a valid outcome
        assert read_onnx_metadata(out / "flareseg_int8.onnx").verification["held_out"]["argmax_agreement"] == 1.0
    else:
        assert "expected >= 100.00%" in _one_line_error(capsys)


def test_models_that_cannot_be_quantised_are_refused(exported):
    fp32 = onnx.load(str(exported[0].path))
    inputs = np.zeros((1, 1, *TRAINED_SIZE), np.float32)
    with pytest.raises(FlareSegError, match="weights are not float32"):
        int8_module.quantize(convert_to_fp16(fp32), inputs, [], "onnxruntime")
    odd = onnx.ModelProto.FromString(fp32.SerializeToString())
    odd.graph.node[1].op_type = "Sigmoid"  # an operator outside the deploy graph's set
    with pytest.raises(FlareSegError, match="unsupported operators Sigmoid"):
        int8_module.quantize(odd, inputs, [], "onnxruntime")
    with pytest.raises(FlareSegError, match="unknown float layer"):
        int8_module.float_layer_nodes(fp32, ["middle-conv"])  # type: ignore[list-item]


def test_a_quantisation_whose_temporary_folder_is_full_says_where(exported, tmp_path, monkeypatch):
    # ONNX Runtime's shape inference cut its copy short on a full TMPDIR without a word, and the load after it
    # said "DecodeError: ... Wire format was corrupt": the user was told the model is corrupt.
    import collections

    import onnxruntime.quantization

    fp32 = onnx.load(str(exported[0].path))
    inputs = np.zeros((1, 1, *TRAINED_SIZE), np.float32)

    def cut_short(model_input, model_output, *args, **kwargs):
        Path(model_output).write_bytes(Path(model_input).read_bytes()[:100])  # what the full disk left

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", cut_short)
    monkeypatch.setattr(int8_module.tempfile, "gettempdir", lambda: str(tmp_path))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(int8_module.shutil, "disk_usage", lambda folder: usage(10**9, 10**9, 300 * 1024))
    with pytest.raises(FlareSegError) as info:
        int8_module.quantize(fp32, inputs, [], "onnxruntime")
    needed = 3 * fp32.ByteSize() / 2**20
    assert str(info.value).startswith("cannot quantise this model to INT8 with onnxruntime: DecodeError")
    assert str(info.value).endswith(
        f" (the temporary folder {tmp_path} has 0.3 MB free, and the quantiser writes about {needed:.1f} MB there: "
        "free space, or set TMPDIR)"
    )
    monkeypatch.setattr(int8_module.shutil, "disk_usage", lambda folder: usage(10**12, 0, 10**12))
    with pytest.raises(FlareSegError, match=r"DecodeError: [^(]*$"):  # room enough: nothing said of the folder
        int8_module.quantize(fp32, inputs, [], "onnxruntime")


def test_bad_int8_options_are_refused(trained_checkpoint, tmp_path, capsys):
    with pytest.raises(FlareSegError, match=r"minimum agreement must lie in \[0, 1\]"):
        ExportOptions(int8=True, int8_min_agreement=1.5)
    with pytest.raises(FlareSegError, match="quantizer must be onnxruntime or nncf"):
        ExportOptions(int8=True, quantizer="tflite")  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        export_main([str(trained_checkpoint), "-o", str(tmp_path), "--int8", "--int8-min-agreement", "99"])
    assert "argument --int8-min-agreement: expected a number in [0, 1], got '99'" in capsys.readouterr().err


def test_quantiser_preprocessing_advice_is_filtered_during_the_call_only(caplog):
    import logging

    from flareseg.export.int8 import _without_preprocessing_advice

    with caplog.at_level(logging.WARNING), _without_preprocessing_advice():
        logging.warning("Please consider pre-processing before quantization. See the example")
        logging.warning("an unrelated warning")
    assert [r.getMessage() for r in caplog.records] == ["an unrelated warning"]
    logging.warning("Please consider pre-processing before quantization. See the example")
    assert len(caplog.records) == 2 and not logging.getLogger().filters


#: What the NNCF test holds its export to. NNCF's int8 activations (per-tensor symmetric) suit the tests' barely
#: trained network less well than the default's uint8, and that network is trained anew on each machine, to other
#: weights by each CPU's float rounding: 99 % or more on an AMD EPYC, 96.2 % on an Intel Xeon (the default: 99.7 %).
NNCF_TEST_MIN_AGREEMENT = 0.93


def test_nncf_quantiser_writes_a_verified_qdq_model_held_to_the_agreement_asked(trained_checkpoint, tmp_path, capfd):
    nncf = pytest.importorskip("nncf", reason="NNCF (the [dev] extra) is not installed")
    options = ExportOptions(
        int8=True, batch_profile=(1, 2, 8), quantizer="nncf", int8_min_agreement=NNCF_TEST_MIN_AGREEMENT
    )
    fp32, int8 = export_onnx(trained_checkpoint, tmp_path, options)
    # NNCF's log lines and progress bars went to stdout, among the command's result lines that scripts read.
    assert capfd.readouterr().out == ""
    assert (fp32.path.name, int8.path.name) == ("flareseg_fp32.onnx", "flareseg_int8.onnx")
    quant = int8.metadata.quantization
    assert quant["quantizer"] == f"nncf {nncf.__version__}" and quant["min_agreement"] == NNCF_TEST_MIN_AGREEMENT
    held_out = int8.metadata.verification["held_out"]["argmax_agreement"]
    assert held_out >= NNCF_TEST_MIN_AGREEMENT and quant["attempts"][-1]["held_out_agreement"] == held_out
    ops = [n.op_type for n in onnx.load(str(int8.path)).graph.node]
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= 20
    info = load_model(trained_checkpoint)[1]
    slices = _phantom_slices(seed=7, stats=info.normalization)
    ref = _torch_labels(trained_checkpoint, slices)
    assert np.mean(_ort_labels(int8.path, slices) == ref) >= NNCF_TEST_MIN_AGREEMENT - 0.02  # slices it never saw


def test_nncf_calls_in_threads_leave_the_process_s_stdout_and_settings_as_they_were(exported, capfd):
    """A service may quantise in threads while others write: NNCF is quieted without touching sys.stdout (swapped
    for /dev/null, it swallowed every thread's lines, and two overlapping calls left it a closed file)."""
    pytest.importorskip("nncf", reason="NNCF (the [dev] extra) is not installed")
    import threading

    import rich

    fp32 = exported[0]
    model = onnx.load(str(fp32.path))
    info = fp32.metadata.model
    inputs = int8_module.network_inputs(_phantom_slices(3, info.normalization)[:3], info, fp32.metadata.input_channels)
    level, errors = logging.getLogger("nncf").level, []

    def quantise() -> None:
        try:
            int8_module.quantize(model, inputs, [], "nncf")
        except BaseException as exc:  # reported below: a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=quantise) for _ in range(2)]
    for thread in threads:
        thread.start()
    lines = 0
    while any(thread.is_alive() for thread in threads):
        print(f"service line {lines}", flush=True)
        lines += 1
        threads[0].join(0.02)
    for thread in threads:
        thread.join()
    print("after", flush=True)
    assert errors == []
    out = capfd.readouterr().out
    assert out == "".join(f"service line {i}\n" for i in range(lines)) + "after\n"
    assert rich.get_console().quiet is False and logging.getLogger("nncf").level == level


def test_the_defaults_stay_importable_where_they_were_before_they_moved_to_options():
    from flareseg.export import onnx_export

    for name in ("DEFAULT_QUANTIZER", "DEFAULT_MIN_AGREEMENT", "DEFAULT_FLOAT_LADDER", "DEFAULT_CALIBRATION_SLICES"):
        assert getattr(int8_module, name) is getattr(export_options, name)
    for name in ("DEFAULT_OPSET", "MIN_OPSET", "max_opset", "ExportOptions"):
        assert getattr(onnx_export, name) is getattr(export_options, name)


def _ladder_run(monkeypatch, agreements: list[float], min_agreement: float):
    """_quantize_verified with the quantiser and the verification replaced by doubles that drive its ladder: the
    n-th attempt "agrees" on agreements[n]. What is tested is our control flow, not quantisation."""
    from flareseg.export import onnx_export

    tried: list[tuple[str, ...]] = []
    monkeypatch.setattr(
        int8_module, "float_layer_nodes", lambda model, keep: {layer: [f"{layer}/Conv"] for layer in keep}
    )
    monkeypatch.setattr(int8_module, "quantize", lambda model, inputs, exclude, q: (("int8", tuple(exclude)), {}))
    monkeypatch.setattr(int8_module, "quantizer_version", lambda q: "double 1")

    def verify(model, *args):
        tried.append(model[1])
        return {"held_out": {"argmax_agreement": agreements[len(tried) - 1]}}

    monkeypatch.setattr(onnx_export, "_verify", verify)
    ladder = ((), ("first-conv",), ("first-conv", "last-conv"))
    options = ExportOptions(int8=True, int8_min_agreement=min_agreement, int8_float_ladder=ladder)
    info = ModelInfo(NetworkConfig(base_width=8), NormalizationStats(0.0, 100.0), (32, 32))
    calib = int8_module.CalibrationSlices(np.zeros((2, 32, 32), np.float32), np.zeros((1, 32, 32), np.float32), "x")
    reference = onnx_export._Reference(None, info, 1)  # the verification double never asks it for logits
    return tried, lambda: onnx_export._quantize_verified(object(), reference, 1, options, calib)


def test_the_float_layer_ladder_goes_on_until_an_attempt_agrees_enough_and_records_each(monkeypatch):
    tried, run = _ladder_run(monkeypatch, [0.97, 0.95, 0.99], 0.99)
    model, _, quantization = run()  # 0.99 meets ">= 99 %": the third attempt is taken
    assert tried == [(), ("first-conv/Conv",), ("first-conv/Conv", "last-conv/Conv")]
    assert model == ("int8", ("first-conv/Conv", "last-conv/Conv"))
    assert quantization["float_layers"] == {"first-conv": ["first-conv/Conv"], "last-conv": ["last-conv/Conv"]}
    assert [a["held_out_agreement"] for a in quantization["attempts"]] == [0.97, 0.95, 0.99]
    assert quantization["min_agreement"] == 0.99


def test_an_int8_export_that_never_agrees_enough_names_its_best_attempt(monkeypatch):
    tried, run = _ladder_run(monkeypatch, [0.95, 0.97, 0.96], 0.99)  # the best is neither the first nor the last
    with pytest.raises(
        FlareSegError,
        match=r"agrees with fp32 PyTorch on 97\.000% of held-out .* expected >= 99\.00% "
        r"\(tried float layers: none; first-conv; first-conv, last-conv\)",
    ):
        run()
    assert len(tried) == 3


def test_int8_min_agreement_zero_is_taken_not_replaced_by_the_default(tmp_path, monkeypatch):
    from flareseg.export import onnx_export

    checkpoint = tmp_path / "m.pt"
    checkpoint.write_bytes(b"never read: the export is a double")

    given = []

    def stop(checkpoint, out, options, *args, **kwargs):  # a double: the options the command built, no export
        given.append(options)
        raise FlareSegError("stopped by the test")

    monkeypatch.setattr(onnx_export, "export_onnx", stop)
    assert export_main([str(checkpoint), "-o", str(tmp_path / "o"), "--int8", "--int8-min-agreement", "0"]) == 2
    assert given[0].int8_min_agreement == 0.0


@pytest.mark.parametrize(("slices", "calibrated", "held"), [(1, None, None), (2, 1, 1), (3, 2, 1)])
def test_a_calibration_folder_with_few_usable_slices_keeps_some_to_calibrate(
    tmp_path, caplog, slices, calibrated, held
):
    """At least one slice calibrates and one is held out; one usable slice cannot give both, and is refused."""
    info = ModelInfo(NetworkConfig(base_width=8), NormalizationStats(0.0, 100.0), (32, 32))
    folder = tmp_path / "cases"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(-1000, 1000, (32, 32, slices)).astype(np.int16)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), folder / "case_0000.nii.gz")
    if calibrated is None:
        with pytest.raises(FlareSegError, match=r"1 usable slice\(s\) to calibrate on .* INT8 needs at least 2"):
            int8_module.calibration_slices(info, folder, count=16, held_out=8)
        return
    with caplog.at_level(logging.WARNING, logger="flareseg.export.int8"):
        sets = int8_module.calibration_slices(info, folder, count=16, held_out=8)
    assert (len(sets.calibration), len(sets.held_out)) == (calibrated, held)
    # Said, not only recorded in the metadata: the agreement printed rests on these few slices.
    [record] = [r for r in caplog.records if r.name == "flareseg.export.int8"]
    assert record.getMessage() == (
        f"INT8: {calibrated} calibration and {held} held-out slice(s) from 1 case(s) of {folder}, fewer than the 16 "
        f"and 8 asked (constant slices are skipped): the agreement is measured on those {held}"
    )


@pytest.mark.parametrize(
    ("count", "held_out", "calibrated", "held"), [(3, 8, 3, 8), (16, 8, 12, 8), (2, 20, 2, 18), (16, 20, 10, 10)]
)
def test_the_held_out_set_gets_the_slices_calibration_leaves(tmp_path, caplog, count, held_out, calibrated, held):
    """Fewer calibration slices than held-out ones halved the held-out set (5 of 8 on a 112-slice case). A case of
    20 usable slices: what calibration leaves is held out, and at least half of them where both sets fall short."""
    info = ModelInfo(NetworkConfig(base_width=8), NormalizationStats(0.0, 100.0), (32, 32))
    folder = tmp_path / "cases"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(-1000, 1000, (32, 32, 20)).astype(np.int16)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), folder / "case_0000.nii.gz")
    with caplog.at_level(logging.WARNING, logger="flareseg.export.int8"):
        sets = int8_module.calibration_slices(info, folder, count=count, held_out=held_out)
    assert (len(sets.calibration), len(sets.held_out)) == (calibrated, held)
    assert not {s.tobytes() for s in sets.calibration} & {s.tobytes() for s in sets.held_out}
    warned = [r for r in caplog.records if r.name == "flareseg.export.int8"]
    assert len(warned) == (calibrated < count or held < held_out)


def test_calibration_cases_are_spread_over_a_large_folder_not_its_first_ones(tmp_path, monkeypatch):
    """Of 20 cases, 8 calibrate, the first and last among them, evenly apart: a folder sorted by scanner or site
    would otherwise calibrate on one of them. The reader is a double that records what it is asked for."""
    from flareseg.export import inputs as export_inputs

    info = ModelInfo(NetworkConfig(base_width=8), NormalizationStats(0.0, 100.0), (32, 32))
    folder = tmp_path / "cases"
    folder.mkdir()
    for k in range(20):
        (folder / f"case_{k:02d}_0000.nii.gz").write_bytes(b"never read: the reader is a double")
    read: list[str] = []
    noise = np.random.default_rng(0).normal(size=(4, 32, 32)).astype(np.float32)

    def reader(path, stats, role, indices=None):
        read.append(Path(path).name.removesuffix("_0000.nii.gz"))
        return noise

    monkeypatch.setattr(export_inputs, "read_ct_normalized", reader)
    int8_module.calibration_slices(info, folder, count=8, held_out=4)
    assert read == [f"case_{k:02d}" for k in (0, 3, 5, 8, 11, 14, 16, 19)]


def test_a_quantiser_that_quantised_nothing_is_refused_not_shipped_as_int8(monkeypatch):
    # An fp32 graph handed back unchanged would otherwise be written, named and described as INT8.
    import shutil

    import onnxruntime.quantization as ortq
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "conv.weight")
    conv = helper.make_node("Conv", ["image", "conv.weight"], ["out"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [conv],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 8, 8])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    monkeypatch.setattr(ortq, "quantize_static", lambda src, dst, *a, **k: shutil.copy(src, dst))
    slices = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    with pytest.raises(FlareSegError, match="onnxruntime quantised no layer"):
        int8_module.quantize(model, slices, [], "onnxruntime")
