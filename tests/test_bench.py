"""flare-bench: report schema, exact figures, every batch size, the fresh-process path."""

from __future__ import annotations

import json

import pytest
import torch

from flareseg.bench.cli import main as bench_main
from flareseg.bench.measure import _Outputs, count_flops, flare21_max_memory
from flareseg.bench.run import ONE_FULL_RES_CONV_FLOPS, PAPER_FLOPS
from flareseg.network import NetworkConfig, build_deploy_network, build_training_network, count_parameters


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--width", "4", "--size", "64", "--backends", "torch-cpu-fp32,onnxruntime-cpu-fp32", "--batch", "1,3"]
    argv += ["--repeats", "2", "--warmup", "1", "--slices", "5", "-o", str(out), "-q"]
    assert bench_main(argv) == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_schema_and_files(report):
    out, data = report
    assert {"machine", "settings", "model", "matmul_peak_flops", "backends", "volumes", "fresh_process"} <= set(data)
    assert data["command"].startswith("flare-bench --width 4")
    md = (out / "report.md").read_text()
    assert "| torch-cpu-fp32 | 3 |" in md and "FLARE21 winner" in md and "Fresh-process command" in md
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_requested_batch_size_is_measured(report):
    _, data = report
    for name in ("torch-cpu-fp32", "onnxruntime-cpu-fp32"):
        rows = data["backends"][name]["batches"]
        assert [r["batch"] for r in rows] == [1, 3]
        for r in rows:
            assert r["repeats"] == 2 and r["slice_p10_s"] <= r["slice_median_s"] <= r["slice_p90_s"]
            assert r["slices_per_s"] == pytest.approx(r["batch"] / r["batch_median_s"])
            assert 0 < r["fraction_of_matmul_peak"]
    bare = [r["bare_session_run"] for r in data["backends"]["onnxruntime-cpu-fp32"]["batches"]]
    assert [b["batch"] for b in bare] == [1, 3]


def test_parameters_and_flops_are_exact(report):
    _, data = report
    net = build_training_network(NetworkConfig(base_width=4))
    deploy = build_deploy_network(net, fold_input=True)
    model = data["model"]
    assert model["parameters_training"] == count_parameters(net)
    assert model["parameters_deploy"] == count_parameters(deploy)
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad():
        train_ref = FlopCountAnalysis(_Outputs(net.train()), (torch.zeros(1, 3, 64, 64),)).total()
        deploy_ref = FlopCountAnalysis(_Outputs(deploy), (torch.zeros(1, 1, 64, 64),)).total()
    assert model["flops_training_fvcore"] == train_ref
    assert model["flops_deploy_fvcore"] == deploy_ref
    assert model["flops_paper"] == 208_095_739_904 and model["flops_nnunet_paper"] == 590_861_472_000


def test_volume_and_fresh_process_timings(report):
    _, data = report
    for v in data["volumes"]["results"].values():
        assert v["slices"] == 5 and v["status"] == "ok" and v["total_s"] >= v["infer_s"] > 0
    fresh = data["fresh_process"]
    assert fresh["backend"] == "onnxruntime-cpu-fp32" and fresh["wall_s"] > 0
    assert "flareseg.runtime.cli" in fresh["command"]


def test_flare21_memory_rule():
    mb = 2**20
    samples = [100 * mb] * 97 + [900 * mb] * 2 + [2000 * mb]  # a 1 % spike is ignored, 2 % counts
    assert flare21_max_memory(samples) == 900
    assert flare21_max_memory([5 * mb]) == 5
    assert flare21_max_memory([]) is None


def test_unavailable_backend_is_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert bench_main(["--backends", "torch-cuda-fp16", "-o", str(tmp_path)]) == 2
    assert "not available on this machine: torch-cuda-fp16" in capsys.readouterr().err


@pytest.mark.slow
def test_full_width_flops_against_the_paper():
    net = build_training_network()
    gap = PAPER_FLOPS - count_flops(net.train(), 3, (512, 512))
    assert gap == ONE_FULL_RES_CONV_FLOPS + 16 * 512 * 512 * 4
