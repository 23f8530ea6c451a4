"""Every CPU inference path side by side: speed at full width, labels and DSC with a trained model.

    python benchmarks/cpu_paths.py --checkpoint runs/demo/best.pt \\
        --sample ../shared/data/flare21-sample -o benchmarks/results/cpu-2core/cpu_paths

Speed: the paper's full-width network (random weights: speed does not depend on them)
at 512 x 512, exported to fp32 and INT8 ONNX, run by ONNX Runtime (fp32, INT8), OpenVINO
(fp32, bf16 where the CPU has it, INT8) and PyTorch fp32, at batch 1 and 2. The paths
take turns run by run (the machine is shared), and the median per-slice time is kept.

Accuracy: the trained checkpoint's fp32 and INT8 exports segment the real sample through
flare-infer's inferer and post-processing; each path's labels are compared voxel by
voxel with ONNX Runtime fp32's, and scored against the ground truth with flare-eval's
DSC. Writes ``cpu_paths.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flareseg.atomic import write_text_atomic
from flareseg.checkpoint import ModelInfo, save_checkpoint
from flareseg.export import ExportOptions, export_onnx
from flareseg.network import NetworkConfig, build_training_network
from flareseg.preprocess import NormalizationStats
from flareseg.runtime.runners import OnnxRuntimeRunner, OpenVINORunner, Runner, TorchRunner

log = logging.getLogger("cpu_paths")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_description() -> dict[str, Any]:
    """CPU model, the instruction sets that matter for int8/bf16, core count, and OpenVINO's view of them."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import onnxruntime
    import openvino as ov

    return {
        "cpu": model,
        "logical_cpus": torch.get_num_threads(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "openvino_capabilities": list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "openvino": str(ov.get_version()).split("-")[0],
        },
    }


def _runners(models: dict[str, Path], bf16: bool, torch_checkpoint: Path | None) -> dict[str, Callable[[], Runner]]:
    made: dict[str, Callable[[], Runner]] = {
        "onnxruntime-fp32": lambda: OnnxRuntimeRunner(models["fp32"]),
        "onnxruntime-int8": lambda: OnnxRuntimeRunner(models["int8"]),
        "openvino-fp32": lambda: OpenVINORunner(models["fp32"]),
    }
    if bf16:
        made["openvino-bf16"] = lambda: OpenVINORunner(models["fp32"], precision="bf16")
    made["openvino-int8"] = lambda: OpenVINORunner(models["int8"])
    if bf16:
        made["openvino-int8-bf16"] = lambda: OpenVINORunner(models["int8"], precision="bf16")
    if torch_checkpoint is not None:
        made["torch-fp32"] = lambda: TorchRunner(torch_checkpoint)
    return made


def measure_speed(work: Path, batches: tuple[int, ...], rounds: int, bf16: bool) -> dict[str, Any]:
    """Median seconds per slice of each path at each batch, paths alternating run by run."""
    ckpt = work / "full-width-random.pt"
    if not ckpt.is_file():
        torch.manual_seed(0)
        net = build_training_network(NetworkConfig()).eval()
        info = ModelInfo(network=net.config, normalization=NormalizationStats(mean=-300.0, std=450.0))
        save_checkpoint(ckpt, net, info)
    if not (work / "flareseg_int8.onnx").is_file():
        t0 = time.perf_counter()
        # Random weights have no labels worth agreeing on: calibrate briefly, keep whatever agreement.
        options = ExportOptions(
            int8=True,
            batch_profile=(1, 2, 8),
            verify_slices=2,
            calibration_slices=4,
            held_out_slices=2,
            int8_min_agreement=0.0,
        )
        export_onnx(ckpt, work, options, overwrite=True)
        log.info("full-width export (fp32 + INT8) took %.0f s", time.perf_counter() - t0)
    models = {"fp32": work / "flareseg_fp32.onnx", "int8": work / "flareseg_int8.onnx"}
    factories = _runners(models, bf16, ckpt)
    runners = {name: make().activate() for name, make in factories.items()}
    rng = np.random.default_rng(0)
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in runners}
    try:
        for batch in batches:  # one warm-up run each (OpenVINO compiles per batch size)
            for runner in runners.values():
                runner.infer(torch.from_numpy(rng.standard_normal((batch, 1, 512, 512), dtype=np.float32)))
        for r in range(rounds):
            for batch in batches:
                for name, runner in runners.items():
                    if name == "torch-fp32" and (r > 0 or batch != max(batches)):
                        continue  # PyTorch once, for reference: it is the slowest path by far
                    x = torch.from_numpy(rng.standard_normal((batch, 1, 512, 512), dtype=np.float32))
                    t0 = time.perf_counter()
                    runner.infer(x)
                    times[name][batch].append((time.perf_counter() - t0) / batch)
            log.info("round %d/%d done", r + 1, rounds)
        described = {name: runner.describe() for name, runner in runners.items()}
    finally:
        for runner in runners.values():
            runner.deactivate()
    rows = []
    for name, per_batch in times.items():
        for batch, ts in per_batch.items():
            if ts:
                med = statistics.median(ts)
                rows.append({"path": name, "batch": batch, "s_per_slice": med, "slices_per_s": 1 / med, "runs": ts})
    base = max(r["slices_per_s"] for r in rows if r["path"] == "onnxruntime-fp32")
    for row in rows:
        row["vs_onnxruntime_fp32_best"] = row["slices_per_s"] / base
    return {"rows": rows, "described": described}


def measure_accuracy(checkpoint: Path, sample: Path, work: Path, bf16: bool) -> dict[str, Any]:
    """Each path's labels on the real sample: voxel agreement with ONNX Runtime fp32, DSC per organ against the
    ground truth and against ONNX Runtime fp32's labels (what a lower precision, or labels made in the graph and
    resized by nearest neighbour, changes where the voxel count hides it)."""
    from flareseg.evaluate import evaluate_case
    from flareseg.metrics import dice
    from flareseg.postprocess import keep_largest_components
    from flareseg.preprocess import volume_normalizer
    from flareseg.runtime.inferer import infer_volume
    from flareseg.volume import read_ct, write_labels

    exported = export_onnx(checkpoint, work, ExportOptions(int8=True, batch_profile=(1, 2, 8)), overwrite=True)
    models = {e.metadata.precision: e.path for e in exported}
    int8_meta = exported[-1].metadata
    in_graph = ExportOptions(output_kind="labels", batch_profile=(1, 2, 8))
    models["argmax"] = export_onnx(checkpoint, work / "argmax", in_graph, overwrite=True)[0].path
    ct = next((sample / "TrainingImg").glob("*_0000.nii.gz"))
    gt = sample / "TrainingMask" / ct.name.replace("_0000", "")
    volume = read_ct(ct)
    results: dict[str, Any] = {}
    reference: np.ndarray | None = None
    runners = _runners(models, bf16, checkpoint)
    runners["onnxruntime-fp32-argmax"] = lambda: OnnxRuntimeRunner(models["argmax"])
    for name, make in runners.items():
        with make() as runner:
            normalizer = volume_normalizer(volume.array, runner.info.normalization, volume.slope, volume.inter)
            labels = keep_largest_components(infer_volume(volume.array, normalizer, runner, 2))
        if reference is None:
            reference = labels  # onnxruntime-fp32 comes first
        pred = write_labels(labels, volume.geometry, work / "pred" / name / gt.name)
        scores = evaluate_case(gt, pred).scores
        results[name] = {
            "voxel_agreement_with_fp32": float(np.mean(labels == reference)),
            "dsc": {organ: dsc for organ, (dsc, _) in scores.items()},
            "dsc_vs_fp32": {organ: dice(reference == organ, labels == organ) for organ in scores},
        }
    return {
        "checkpoint": str(checkpoint),
        "case": str(ct),
        "int8_export": {"verification": dict(int8_meta.verification), "quantization": dict(int8_meta.quantization)},
        "paths": results,
    }


def markdown(report: dict[str, Any]) -> str:
    cpu = report["machine"]
    lines = [
        f"CPU: {cpu['cpu']}, {cpu['logical_cpus']} threads; ISA: {', '.join(cpu['isa'])}; "
        f"OpenVINO capabilities: {', '.join(cpu['openvino_capabilities'])}",
        "",
        "| path | batch | s/slice (median) | slices/s | vs ONNX Runtime fp32 (best batch) |",
        "|---|---|---|---|---|",
    ]
    for row in report.get("speed", {}).get("rows", []):
        lines.append(
            f"| {row['path']} | {row['batch']} | {row['s_per_slice']:.3f} | {row['slices_per_s']:.2f} "
            f"| {row['vs_onnxruntime_fp32_best']:.2f}x |"
        )
    acc = report.get("accuracy")
    if acc:
        organs = {1: "liver", 2: "kidneys", 3: "spleen", 4: "pancreas"}
        lines += [
            "",
            "| path | voxels agreeing with ORT fp32 | " + " | ".join(f"{o} DSC" for o in organs.values()) + " |",
            "|---|---|" + "---|" * len(organs),
        ]
        for name, r in acc["paths"].items():
            dsc = " | ".join(f"{100 * r['dsc'][k]:.2f}" for k in organs)
            lines.append(f"| {name} | {100 * r['voxel_agreement_with_fp32']:.3f}% | {dsc} |")
        lines += [
            "",
            "DSC against ONNX Runtime fp32's labels (not the ground truth):",
            "",
            "| path | " + " | ".join(f"{o} DSC" for o in organs.values()) + " |",
            "|---|" + "---|" * len(organs),
        ]
        for name, r in acc["paths"].items():
            if "dsc_vs_fp32" in r:  # reports made before it was measured lack it
                lines.append(f"| {name} | " + " | ".join(f"{100 * r['dsc_vs_fp32'][k]:.2f}" for k in organs) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a trained checkpoint for the accuracy part (e.g. runs/demo)")
    p.add_argument("--sample", type=Path, help="a FLARE21-layout folder with TrainingImg/ and TrainingMask/")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--work", type=Path, help="where models are exported (reused when present; default OUT/models)")
    p.add_argument("--batches", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = args.work or args.out / "models"
    work.mkdir(parents=True, exist_ok=True)
    machine = cpu_description()
    bf16 = "BF16" in machine["openvino_capabilities"]
    report: dict[str, Any] = {"machine": machine, "command": "python benchmarks/cpu_paths.py ..."}
    t0 = time.perf_counter()
    if not args.skip_speed:
        batches = tuple(int(b) for b in args.batches.split(","))
        report["speed"] = measure_speed(work / "full-width", batches, args.rounds, bf16)
    if args.checkpoint and args.sample:
        report["accuracy"] = measure_accuracy(args.checkpoint, args.sample, work / "trained", bf16)
    report["wall_s"] = time.perf_counter() - t0
    write_text_atomic(json.dumps(report, indent=2, default=str) + "\n", args.out / "cpu_paths.json")
    print(markdown(report))


if __name__ == "__main__":
    main()
