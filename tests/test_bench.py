"""flare-bench: report schema, exact figures, every batch size, the fresh-process path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flareseg.bench.backends import ALL_BACKENDS, Backend, fresh_process_args, model_file
from flareseg.bench.cli import main as bench_main
from flareseg.bench.measure import (
    MIB,
    _Outputs,
    convolution_math,
    count_flops,
    cuda_matmul_tf32,
    flare21_max_memory,
    matmul_peak_flops,
    memory_time_area,
    parse_cpuinfo,
    voxel_agreement,
)
from flareseg.bench.run import (
    ONE_FULL_RES_CONV_FLOPS,
    PAPER_FLOPS,
    STAGES,
    BenchConfig,
    _allocator_figure,
    _end_to_end_backend,
)
from flareseg.errors import FlareSegError
from flareseg.network import NetworkConfig, build_deploy_network, build_training_network, count_parameters
from flareseg.runtime.cli import build_parser
from flareseg.volume import read_labels


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
    assert (out / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![time per stage](stages.png)" in md and "## Backends side by side" in md


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
    out, data = report
    volumes = data["volumes"]
    assert volumes["stages"] == list(STAGES)
    for v in volumes["results"].values():
        assert v["slices"] == 5 and v["status"] == "ok" and v["total_s"] >= v["infer_s"] > 0
        stages = [v[f"{s}_s"] for s in STAGES]
        assert min(stages) >= 0 and sum(stages) == pytest.approx(v["total_s"], rel=1e-6, abs=1e-6)
        assert v["wall_s"] >= v["read_s"] + v["infer_s"]  # these two never overlap within a case
    fresh = data["fresh_process"]
    assert fresh["backend"] == "onnxruntime-cpu-fp32" and fresh["wall_s"] > 0
    assert "flareseg.runtime.cli" in fresh["command"] and "--device cpu" in fresh["command"]
    assert fresh["peak_rss_mb"] > 0
    bare = fresh["bare_start"]
    assert bare["command"].endswith("-c 'import torch'") and len(bare["wall_s"]) == 2
    assert bare["median_s"] == pytest.approx(sum(bare["wall_s"]) / 2)
    assert fresh["minus_bare_start_s"] == pytest.approx(fresh["wall_s"] - bare["median_s"])
    md = (out / "report.md").read_text()
    assert f"the case took {fresh['minus_bare_start_s']:.2f} s more" in md


def test_volume_agreement_with_the_fp32_reference(report):
    out, data = report
    volumes = data["volumes"]
    assert volumes["reference"] == "torch-cpu-fp32" and "reference_run" not in volumes
    results = volumes["results"]
    assert "agreement_with_fp32" not in results["torch-cpu-fp32"]
    ref, _ = read_labels(results["torch-cpu-fp32"]["output"])
    got, _ = read_labels(results["onnxruntime-cpu-fp32"]["output"])
    assert results["onnxruntime-cpu-fp32"]["agreement_with_fp32"] == float(np.mean(ref == got))
    md = (out / "report.md").read_text()
    best = data["backends"]["onnxruntime-cpu-fp32"]["best"]
    assert f"| onnxruntime-cpu-fp32 | fp32 | {best['batch']} | {best['slices_per_s']:.2f} | 1.00 |" in md
    assert "| reference |" in md


def test_reduced_precision_gets_agreement_from_a_reference_run(trained_checkpoint, tmp_path, monkeypatch):
    """A bf16 backend alone: the section runs the fp32 reference itself and compares voxel labels."""
    from flareseg.bench import run as bench_run

    monkeypatch.setitem(ALL_BACKENDS, "torch-cpu-bf16", Backend("torch-cpu-bf16", "torch", "cpu", "bf16"))
    cfg = BenchConfig(out=tmp_path, backends=("torch-cpu-bf16",))
    volume = bench_run._volume(BenchConfig(out=tmp_path, slices=6, size=(64, 64)).resolved(), tmp_path)
    latency = {"torch-cpu-bf16": {"best": {"batch": 2, "slice_median_s": 0.01}}}
    section = bench_run.volume_section(cfg, {"checkpoint": trained_checkpoint}, latency, volume)
    assert section["reference"] == "torch-cpu-fp32" and section["reference_run"]["precision"] == "fp32"
    row = section["results"]["torch-cpu-bf16"]
    ref, _ = read_labels(section["reference_run"]["output"])
    got, _ = read_labels(row["output"])
    assert row["agreement_with_fp32"] == float(np.mean(ref == got)) and row["precision"] == "bf16"
    assert row["agreement_with_fp32"] >= 0.99


def test_machine_section_names_the_cpu_and_its_instruction_sets(report):
    _, data = report
    m = data["machine"]
    assert m["cpu_model"] and isinstance(m["cpu_features"], list)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert ("avx512_vnni" in m["cpu_features"]) == ("avx512_vnni" in flags)
    assert ("avx512_bf16" in m["cpu_features"]) == ("avx512_bf16" in flags)


def test_parse_cpuinfo():
    text = (
        "processor\t: 0\nmodel name\t: Example Xeon\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni amx_tile "
        "amx_int8 amx_bf16\n\nprocessor\t: 1\nmodel name\t: Other\nflags\t: fpu\n"
    )
    assert parse_cpuinfo(text) == {
        "cpu_model": "Example Xeon",
        "cpu_features": ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"],
    }
    assert parse_cpuinfo("") == {"cpu_model": None, "cpu_features": []}


def test_flare21_memory_rule():
    mb = 2**20
    samples = [100 * mb] * 97 + [900 * mb] * 2 + [2000 * mb]  # a 1 % spike is ignored, 2 % counts
    assert flare21_max_memory(samples) == 900
    assert flare21_max_memory(samples, idle=60 * mb) == 840
    assert flare21_max_memory([5 * mb]) == 5
    assert flare21_max_memory([5 * mb], idle=9 * mb) == 0  # below idle counts as zero
    assert flare21_max_memory([]) is None


def test_memory_time_area_by_the_trapezoid_rule():
    mb = MIB
    # 100 MB idle; 300 MB held for 0.1 s between a 0.1 s ramp up and a 0.2 s ramp down:
    # 0.1 * (0 + 200) / 2 + 0.1 * (200 + 200) / 2 + 0.2 * (200 + 0) / 2 = 10 + 20 + 20 = 50 MB s.
    times = [0.0, 0.1, 0.2, 0.4]
    samples = [100 * mb, 300 * mb, 300 * mb, 100 * mb]
    assert memory_time_area(times, samples, idle=100 * mb) == pytest.approx(50.0)
    assert memory_time_area(times, samples) == pytest.approx(50.0 + 100 * 0.4)  # whole device
    assert memory_time_area([1.0], [500 * mb]) == 0.0
    assert memory_time_area([], []) is None
    assert memory_time_area([0.0, 1.0], [50 * mb, 150 * mb], idle=100 * mb) == pytest.approx(25.0)  # (0 + 50) / 2


def test_voxel_agreement():
    a = np.array([[0, 1], [2, 3]], np.uint8)
    assert voxel_agreement(a, a) == 1.0 and voxel_agreement(a, np.zeros_like(a)) == 0.25


def test_tensorrt_and_onnx_runtime_memory_is_not_read_from_torch():
    trt = ALL_BACKENDS["tensorrt-fp16"]
    assert _allocator_figure(trt, 123.0)["peak_allocated_mb"] is None
    assert "not applicable" in _allocator_figure(trt, 123.0)["peak_allocated_note"]
    assert _allocator_figure(ALL_BACKENDS["onnxruntime-cuda-fp16"], 5.0)["peak_allocated_mb"] is None
    assert _allocator_figure(ALL_BACKENDS["torch-cuda-fp16"], 123.0) == {"peak_allocated_mb": 123.0}
    assert _allocator_figure(ALL_BACKENDS["torch-cpu-fp32"], None) == {}


def test_tf32_switch_restores_the_global_setting():
    before = torch.backends.cuda.matmul.allow_tf32
    with cuda_matmul_tf32(not before):
        assert torch.backends.cuda.matmul.allow_tf32 is (not before)
    assert torch.backends.cuda.matmul.allow_tf32 is before
    with pytest.raises(RuntimeError), cuda_matmul_tf32(not before):
        raise RuntimeError("inside")
    assert torch.backends.cuda.matmul.allow_tf32 is before
    assert convolution_math(torch.device("cpu"), "fp32") == "fp32"
    assert convolution_math(torch.device("cpu"), "int8", "openvino") == "int8"
    assert matmul_peak_flops(torch.device("cpu"), torch.float32, n=64, repeats=1) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_peak_uses_the_convolutions_math():
    dev = torch.device("cuda")
    math = convolution_math(dev, "fp32")
    tf32 = torch.cuda.get_device_capability(dev)[0] >= 8 and torch.backends.cudnn.allow_tf32
    assert math == ("tf32" if tf32 else "fp32")
    before = torch.backends.cuda.matmul.allow_tf32
    matmul_peak_flops(dev, torch.float32, tf32=True, n=1024, repeats=1)
    assert torch.backends.cuda.matmul.allow_tf32 is before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and nvidia-ml-py")
def test_nvml_sampler_sees_an_allocation_above_idle():
    import time

    from flareseg.bench.measure import NvmlSampler

    with NvmlSampler(interval=0.02) as sampler:
        x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MB
        torch.cuda.synchronize()
        time.sleep(0.3)
        del x
    s = sampler.summary()
    torch.cuda.empty_cache()
    assert s["nvml_peak_mb"] >= 256 and s["nvml_area_mb_s"] >= 256 * 0.2 and s["nvml_samples"] >= 3


def test_each_backend_runs_its_own_model_in_a_fresh_process(tmp_path):
    # Every model a run with TensorRT prepares: the engine was built from the fp16 ONNX model, and
    # the fresh process of tensorrt-fp16 once ran that ONNX model under TensorRT's name.
    models = {
        k: tmp_path / f
        for k, f in {
            "checkpoint": "m.pt",
            "onnx-fp32": "a.onnx",
            "onnx-fp16": "b.onnx",
            "onnx-int8": "c.onnx",
            "engine": "e.engine",
        }.items()
    }
    parser = build_parser()
    expected = {
        "torch-cpu-fp32": ("m.pt", "torch"),
        "torch-cuda-fp16-graph": ("m.pt", "torch"),
        "onnxruntime-cpu-int8": ("c.onnx", "onnxruntime"),
        "onnxruntime-cuda-fp16": ("b.onnx", "onnxruntime"),
        "openvino-cpu-int8": ("c.onnx", "openvino"),
        "openvino-cpu-fp32": ("a.onnx", "openvino"),
        "tensorrt-fp16": ("e.engine", None),
    }
    for name, (file, backend) in expected.items():
        b = ALL_BACKENDS[name]
        assert model_file(b, models).name == file, name
        args = parser.parse_args(
            [*fresh_process_args(b, models), "-i", "ct.nii.gz", "-o", "out"]
        )  # flare-infer accepts them
        assert (args.engine or args.model).name == file and args.backend == backend, name
        if b.kind == "torch":
            assert (args.precision, args.channels_last, args.cuda_graph) == (b.precision, b.channels_last, b.cuda_graph)
    with pytest.raises(FlareSegError, match="no OpenVINO bf16 option"):
        fresh_process_args(ALL_BACKENDS["openvino-cpu-bf16"], models)
    with pytest.raises(FlareSegError, match="needs the engine model"):
        model_file(ALL_BACKENDS["tensorrt-fp16"], {"onnx-fp16": tmp_path / "b.onnx"})
    assert _end_to_end_backend(["openvino-cpu-bf16", "openvino-cpu-int8"]) == "openvino-cpu-int8"
    assert _end_to_end_backend(["openvino-cpu-bf16"]) is None
    assert _end_to_end_backend(["onnxruntime-cuda-fp16", "tensorrt-fp16"]) == "tensorrt-fp16"


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
