"""flare-bench --check: every available CPU backend against PyTorch fp32, at small width.

The checked model is the small trained checkpoint (tests/conftest.py): its labels contain
organs, so label agreement between backends means something (random weights label every
voxel alike).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flareseg.bench.backends import _machine_backends, available_backends
from flareseg.bench.check import (
    INT8_MIN_AGREEMENT,
    Tolerance,
    compare,
    slice_indices,
    tolerance_for,
    verdict,
)
from flareseg.bench.cli import main as bench_main
from flareseg.export.onnx_export import FP16_MIN_AGREEMENT, FP32_MIN_AGREEMENT, FP32_RELATIVE_TOLERANCE
from flareseg.volume import read_labels

pytestmark = pytest.mark.usefixtures("smaller_matmul_peak")  # see tests/conftest.py

CPU_FP32 = "torch-cpu-fp32,onnxruntime-cpu-fp32"


def _check(argv: list[str]) -> tuple[int, dict]:
    code = bench_main(["--check", *argv, "-q"])
    path = Path(argv[argv.index("-o") + 1]) / "check.json"
    assert path.exists(), f"flare-bench --check exited {code} before writing its table (see its stderr above)"
    return code, json.loads(path.read_text())


@pytest.fixture(scope="module")
def cpu_check(trained_checkpoint, tmp_path_factory):
    """Every backend this machine has (the default), on a 6-slice 64 x 64 phantom."""
    out = tmp_path_factory.mktemp("check")
    code, report = _check(["--model", str(trained_checkpoint), "--size", "64", "--slices", "6", "-o", str(out)])
    return out, code, report


def _row(report: dict, name: str) -> dict:
    rows = [r for r in report["rows"] if r["backend"] == name]
    assert len(rows) == 1, [r["backend"] for r in report["rows"]]
    return rows[0]


def test_fp32_onnx_runtime_matches_pytorch(cpu_check):
    out, _, report = cpu_check
    assert report["reference"] == "torch-cpu-fp32" and report["note"] is None
    assert report["slice_indices"] == [0, 1, 2, 3, 4, 5] and report["slice_size"] == [64, 64]
    ref, ort = _row(report, "torch-cpu-fp32"), _row(report, "onnxruntime-cpu-fp32")
    assert ref["status"] == "reference"
    assert ort["status"] == "PASS" and ort["math"] == "fp32" and ort["output_kind"] == "logits"
    assert ort["slice_agreement"] == 1.0 and ort["volume_agreement"] == 1.0
    assert 0 <= ort["max_rel_logit_diff"] <= FP32_RELATIVE_TOLERANCE
    assert ort["max_abs_logit_diff"] >= 0 and ort["slice_s"] > 0
    # The agreement is meaningful: the reference labels organs, and both label maps are the same voxel for voxel.
    ref_labels, _ = read_labels(ref["output"])
    assert len(np.unique(ref_labels)) >= 3
    assert np.array_equal(read_labels(ort["output"])[0], ref_labels)
    md = (out / "check.md").read_text()
    assert "| onnxruntime-cpu-fp32 | fp32 | fp32 | 100.000 | 100.000 |" in md and "| PASS |" in md


def test_every_available_cpu_backend_is_checked(cpu_check):
    """Every backend this machine has gets a row, and the exit status follows the rows."""
    out, code, report = cpu_check
    names = [r["backend"] for r in report["rows"]]
    assert sorted(names) == sorted(available_backends())
    statuses = {r["backend"]: r["status"] for r in report["rows"]}
    failing = sorted(n for n, s in statuses.items() if s in ("FAIL", "ERROR"))
    assert sorted(report["failed"]) == failing and report["passed"] == (not failing)
    assert code == (1 if failing else 0), statuses
    md = (out / "check.md").read_text()
    assert ("Result: every backend passed." in md) == (not failing)
    for r in report["rows"]:
        if r["status"] in ("PASS", "FAIL"):
            tol = tolerance_for(r["math"], r["output_kind"])
            assert r["tolerance"] == tol.describe()
            agreement = min(r["slice_agreement"], r["volume_agreement"])
            logits_ok = tol.max_relative_logit_diff is None or r["max_rel_logit_diff"] <= tol.max_relative_logit_diff
            assert (r["status"] == "PASS") == (agreement >= tol.min_agreement and logits_ok)


def test_a_broken_backend_fails(cpu_check, trained_checkpoint, tmp_path, monkeypatch, capsys):
    """A runner whose logits are off by 0.05 in one class: labels may still agree, the fp32 logit tolerance fails."""
    from flareseg.bench import backends
    from flareseg.runtime.runners.onnxrt import OnnxRuntimeRunner

    out, _, _ = cpu_check
    exported = {"checkpoint": trained_checkpoint, "onnx-fp32": out / "models" / "bench_fp32.onnx"}
    monkeypatch.setattr(backends, "prepare_models", lambda cfg, work: exported)  # the export is tested above
    real = OnnxRuntimeRunner._infer

    def perturbed(self: OnnxRuntimeRunner, batch: torch.Tensor) -> torch.Tensor:
        result = real(self, batch).clone()
        result[:, 0] += 0.05
        return result

    monkeypatch.setattr(OnnxRuntimeRunner, "_infer", perturbed)
    argv = ["--model", str(trained_checkpoint), "--backends", CPU_FP32, "--size", "64", "--slices", "4"]
    code, report = _check([*argv, "-o", str(tmp_path)])
    assert code == 1 and not report["passed"] and report["failed"] == ["onnxruntime-cpu-fp32"]
    ort = _row(report, "onnxruntime-cpu-fp32")
    assert ort["status"] == "FAIL"
    assert ort["max_abs_logit_diff"] == pytest.approx(0.05, rel=1e-3)
    assert ort["max_rel_logit_diff"] > FP32_RELATIVE_TOLERANCE
    assert _row(report, "torch-cpu-fp32")["status"] == "reference"
    printed = capsys.readouterr().out
    assert "| FAIL |" in printed and "FAILED: onnxruntime-cpu-fp32." in printed


def test_onnx_model_is_checked_against_onnx_runtime_fp32(cpu_check, tmp_path):
    out, _, _ = cpu_check
    onnx_model = out / "models" / "bench_fp32.onnx"
    argv = ["--model", str(onnx_model), "--backends", "onnxruntime-cpu-fp32", "--size", "64", "--slices", "2"]
    code, report = _check([*argv, "-o", str(tmp_path)])
    assert code == 0 and report["reference"] == "onnxruntime-cpu-fp32"
    assert "PyTorch reference missing" in report["note"]
    assert [r["backend"] for r in report["rows"]] == ["onnxruntime-cpu-fp32"]


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert bench_main(["--check", "--input", str(tmp_path / "absent.nii.gz"), "-o", str(tmp_path), "-q"]) == 2
    assert "absent.nii.gz: input volume not found" in capsys.readouterr().err
    assert bench_main(["--check", "--batch", "1,2", "-o", str(tmp_path), "-q"]) == 2
    assert "--check runs one batch size" in capsys.readouterr().err
    assert bench_main(["--check", "--backends", "nope", "-o", str(tmp_path), "-q"]) == 2
    assert "unknown backends ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "check.json").exists()


def test_tolerances_come_from_the_export_module():
    assert tolerance_for("fp32", "logits") == Tolerance(FP32_MIN_AGREEMENT, FP32_RELATIVE_TOLERANCE)
    assert tolerance_for("fp32", "labels") == Tolerance(FP32_MIN_AGREEMENT, None)
    for math in ("tf32", "fp16", "bf16"):
        assert tolerance_for(math, "logits") == Tolerance(FP16_MIN_AGREEMENT)
    assert tolerance_for("int8", "logits") == Tolerance(INT8_MIN_AGREEMENT) and INT8_MIN_AGREEMENT == 0.99


def test_compare_and_verdict_on_hand_made_outputs():
    ref = np.zeros((1, 3, 2, 2), np.float32)
    ref[0, 1] = 4.0  # every voxel class 1; max |logit| 4
    got = ref.copy()
    got[0, 2, 0, 0] = 5.0  # one voxel of four flips to class 2, difference 5
    f = compare(ref, got)
    assert f == {"slice_agreement": 0.75, "max_abs_logit_diff": 5.0, "max_rel_logit_diff": 1.25, "finite": True}
    labels = np.array([[[1, 1], [1, 0]]])  # a labels-output backend: agreement only
    assert compare(ref, labels) == {
        "slice_agreement": 0.75,
        "max_abs_logit_diff": None,
        "max_rel_logit_diff": None,
        "finite": True,
    }
    fp32 = tolerance_for("fp32", "logits")
    assert verdict({"slice_agreement": 1.0, "volume_agreement": 1.0, "max_rel_logit_diff": 1e-5}, fp32) == "PASS"
    assert verdict({"slice_agreement": 1.0, "volume_agreement": 1.0, "max_rel_logit_diff": 2e-4}, fp32) == "FAIL"
    assert verdict({"slice_agreement": 1.0, "volume_agreement": 0.998, "max_rel_logit_diff": 0.0}, fp32) == "FAIL"
    int8 = tolerance_for("int8", "logits")
    assert verdict({"slice_agreement": 0.991, "volume_agreement": 0.995, "max_rel_logit_diff": 0.3}, int8) == "PASS"
    assert verdict({"slice_agreement": 0.989, "volume_agreement": 0.995}, int8) == "FAIL"
    assert verdict({"slice_agreement": 0.99, "volume_agreement": 0.99}, int8) == "PASS"  # at the threshold: met
    # A NaN in the winning class: numpy's argmax takes the NaN, so the labels still agree everywhere.
    nan = ref.copy()
    nan[0, 1, 0, 0] = np.nan
    f = compare(ref, nan)
    assert f["slice_agreement"] == 1.0 and f["finite"] is False
    assert verdict({**f, "volume_agreement": 1.0}, fp32) == "FAIL"


def test_slice_indices_are_spread_over_the_volume():
    assert slice_indices(1) == [0]
    assert slice_indices(5) == [0, 1, 2, 3, 4]
    assert slice_indices(100) == [0, 14, 28, 42, 57, 71, 85, 99]


def test_an_int8_export_below_its_agreement_is_a_failed_row_not_a_stopped_check(
    trained_checkpoint, tmp_path, monkeypatch, caplog
):
    """A test double for the quantiser's verdict: every float-layer set misses the threshold."""
    from flareseg.export import Int8AgreementError, onnx_export

    int8 = [b for b in available_backends() if b.endswith("-int8")]
    if not int8:
        pytest.skip("no INT8 backend on this machine (needs ONNX Runtime or OpenVINO)")

    def below(*args, **kwargs):
        raise Int8AgreementError("INT8 model agrees with fp32 PyTorch on 97.500% of held-out voxels", 0.975)

    monkeypatch.setattr(onnx_export, "_quantize_verified", below)
    argv = ["--model", str(trained_checkpoint), "--backends", ",".join([CPU_FP32, *int8]), "--size", "64"]
    code, report = _check([*argv, "--slices", "2", "-o", str(tmp_path)])
    assert code == 1 and sorted(report["failed"]) == sorted(int8)
    for name in int8:
        row = _row(report, name)
        assert row["status"] == "FAIL" and row["held_out_agreement"] == 0.975 and "97.500%" in row["error"]
    assert _row(report, "onnxruntime-cpu-fp32")["status"] == "PASS"  # the other backends were still checked
    md = (tmp_path / "check.md").read_text()
    row_md = (
        f"| {int8[0]} | int8 | int8 | 97.500 (export's held-out slices) | | | agreement >= 99% | FAIL: INT8 export:"
    )
    assert row_md in md
    assert "INT8 export: INT8 model agrees" in caplog.text


def test_non_finite_logits_fail():
    """NaN differs from nothing (nan > tolerance is False): a NaN reference or backend must FAIL, never PASS."""
    ref = np.zeros((1, 3, 2, 2), np.float32)
    ref[0, 1] = 4.0
    for bad_ref in (True, False):  # the reference's logits, then the backend's
        r, g = ref.copy(), ref.copy()
        (r if bad_ref else g)[0, 0, 0, 0] = np.nan
        f = compare(r, g)
        assert f["finite"] is False and f["max_abs_logit_diff"] is None and f["max_rel_logit_diff"] is None
        row = {**f, "volume_agreement": 1.0}
        assert verdict(row, tolerance_for("fp32", "logits")) == "FAIL"
        assert verdict(row, tolerance_for("int8", "logits")) == "FAIL"
    inf_ref = ref.copy()
    inf_ref[0, 2, 1, 1] = np.inf
    assert compare(inf_ref, np.ones((1, 2, 2), np.int64))["finite"] is False  # against a labels-output backend too


def _onnx_variant(source: Path, dest: Path, precision: str, weights=None) -> Path:
    """A copy of an exported fp32 model as another precision says it is (fp16 converted; or NaN weights)."""
    import dataclasses

    import onnx
    from onnx import numpy_helper

    from flareseg.export.fp16 import convert_to_fp16
    from flareseg.export.metadata import embed_in_onnx, read_onnx_metadata

    model = onnx.load(str(source))
    if precision == "fp16":
        model = convert_to_fp16(model)
    if weights is not None:
        first = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 4)
        first.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(first), weights), first.name))
    embed_in_onnx(model, dataclasses.replace(read_onnx_metadata(source), precision=precision))
    onnx.save(model, str(dest))
    return dest


def test_an_onnx_model_with_nan_weights_fails_the_check(cpu_check, tmp_path):
    out, _, _ = cpu_check
    model = _onnx_variant(out / "models" / "bench_fp32.onnx", tmp_path / "nan.onnx", "fp32", weights=np.nan)
    argv = ["--model", str(model), "--backends", "onnxruntime-cpu-fp32", "--size", "64", "--slices", "2"]
    code, report = _check([*argv, "-o", str(tmp_path / "out")])
    assert code == 1 and report["failed"] == ["onnxruntime-cpu-fp32"] and not report["passed"]
    ref = _row(report, "onnxruntime-cpu-fp32")
    assert ref["status"] == "FAIL" and ref["finite"] is False and "not finite" in ref["error"]
    json.loads((tmp_path / "out" / "check.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN


def test_an_onnx_model_alone_leaves_out_what_it_cannot_run(cpu_check, tmp_path):
    """By default, backends needing a model an ONNX file cannot give (INT8, PyTorch) are left out, and said."""
    out, _, _ = cpu_check
    argv = ["--model", str(out / "models" / "bench_fp32.onnx"), "--size", "64", "--slices", "2"]
    code, report = _check([*argv, "-o", str(tmp_path)])
    assert code == 0 and report["passed"], report["rows"]
    names = {r["backend"] for r in report["rows"]}
    assert not any(n.endswith("-int8") or n.startswith("torch") for n in names)
    expected_out = {n for n in available_backends() if n.endswith("-int8") or n.startswith("torch")}
    expected_out |= set(_machine_backends()[1])  # openvino-cpu-bf16 on a CPU without bf16
    assert set(report["left_out"]) == expected_out
    assert all(r["status"] in ("PASS", "reference") for r in report["rows"])
    assert "Left out: torch-cpu-fp32 (needs the checkpoint, a .pt file)" in (tmp_path / "check.md").read_text()


def test_an_fp16_onnx_model_is_checked_as_fp16(cpu_check, tmp_path):
    """The precision comes from the model's metadata, and so does the tolerance (not fp32's 1e-4)."""
    out, _, _ = cpu_check
    model = _onnx_variant(out / "models" / "bench_fp32.onnx", tmp_path / "m_fp16.onnx", "fp16")
    backends = [b for b in ("onnxruntime-cpu-fp32", "openvino-cpu-fp32") if b in available_backends()]
    argv = ["--model", str(model), "--backends", ",".join(backends), "--size", "64", "--slices", "2"]
    code, report = _check([*argv, "-o", str(tmp_path / "out")])
    assert report["reference"] == "onnxruntime-cpu-fp32" and report["reference_precision"] == "fp16"
    assert "an ONNX model was given (fp16, by its own metadata)" in report["note"]
    for row in report["rows"]:
        assert row["precision"] == "fp16" and row["math"] == "fp16"
        if row["status"] != "reference":
            assert row["tolerance"] == tolerance_for("fp16", "logits").describe()
    assert code == 0, report["rows"]
    assert "Reference: onnxruntime-cpu-fp32 (fp16)." in (tmp_path / "out" / "check.md").read_text()


def test_flare_bench_reports_an_int8_model_as_int8(cpu_check, tmp_path):
    out, _, _ = cpu_check
    argv = ["--model", str(out / "models" / "bench_int8.onnx"), "--backends", "onnxruntime-cpu-fp32"]
    argv += ["--batch", "1", "--repeats", "1", "--warmup", "0", "--slices", "2", "--size", "64"]
    assert bench_main([*argv, "--no-fresh-process", "-o", str(tmp_path), "-q"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["onnx_model_precision"] == "int8"
    assert report["backends"]["onnxruntime-cpu-fp32"]["precision"] == "int8"
    assert report["volumes"]["results"]["onnxruntime-cpu-fp32"]["precision"] == "int8"
    assert report["volumes"]["reference"] is None  # no fp32 run exists to agree with
    assert "| onnxruntime-cpu-fp32 | int8 |" in (tmp_path / "report.md").read_text()


def test_what_the_input_s_intensities_look_like_is_said_once_however_many_backends_read_it(
    trained_checkpoint, tmp_path, caplog
):
    """A CT without its intercept (HU + 1024) is read by the check's slices and by each backend's whole-volume
    run: one warning, not one per read, and the filter is gone after the run."""
    import logging

    import nibabel as nib

    from flareseg.phantom import make_phantom
    from flareseg.volume import check_ct_intensities, read_ct

    ct, _ = make_phantom((64, 64, 4), (6.0, 6.0, 8.0), seed=1).to_nifti()
    raw = nib.Nifti1Image((np.asanyarray(ct.dataobj).astype(np.int32) + 1024).astype(np.uint16), ct.affine)
    raw.header.set_slope_inter(1.0, 0.0)
    nib.save(raw, tmp_path / "raw.nii.gz")
    argv = ["--model", str(trained_checkpoint), "--backends", CPU_FP32, "--input", str(tmp_path / "raw.nii.gz")]
    with caplog.at_level(logging.WARNING, logger="flareseg.volume"):
        _check([*argv, "-o", str(tmp_path / "out")])
        said = [r.getMessage() for r in caplog.records if "not Hounsfield units" in r.getMessage()]
        assert len(said) == 1 and "raw.nii.gz: its clipping percentiles are " in said[0], said
        check_ct_intensities(read_ct(tmp_path / "raw.nii.gz"), tmp_path / "raw.nii.gz", "x")  # after the run
        assert len([r for r in caplog.records if "not Hounsfield units" in r.getMessage()]) == 2


@pytest.mark.parametrize(("slices", "shapes"), [(6, [4, 2, 4, 2]), (8, [4, 4, 4])])
def test_the_timed_pass_follows_an_untimed_one_of_each_batch_shape(slices, shapes):
    # A short last batch is a new shape, set up on its first call (oneDNN's primitives, cuDNN's algorithms): that
    # set-up was timed as inference.
    from flareseg.bench.check import run_slices
    from flareseg.checkpoint import ModelInfo
    from flareseg.network import NetworkConfig
    from flareseg.preprocess import NormalizationStats
    from flareseg.runtime.runners import FunctionRunner

    seen: list[int] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return torch.zeros((x.shape[0], 5, *x.shape[2:]))

    info = ModelInfo(NetworkConfig(base_width=4), NormalizationStats(mean=0.0, std=1.0), (16, 16))
    with FunctionRunner(model, info) as runner:
        outputs, per_slice = run_slices(runner, np.zeros((slices, 16, 16), np.float32), 4)
    assert seen == shapes and outputs.shape == (slices, 5, 16, 16) and per_slice > 0
