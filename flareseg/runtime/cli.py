"""``flare-infer``: CT volumes in, uint8 label maps out, on PyTorch, ONNX Runtime or TensorRT."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from flareseg.cli import add_common_arguments, run_command
from flareseg.errors import FlareSegError
from flareseg.runtime.pipeline import (
    CaseTiming,
    list_cases,
    segment_file,
    segment_folder,
    write_timings,
)
from flareseg.runtime.runners import Backend, open_runner
from flareseg.volume import is_nifti

#: Default batch sizes. On a 2-core CPU the full-width network is fastest at batch 2
#: (benchmarks/results/cpu-2core), and each extra slice costs 0.4-1 GB of working memory.
CPU_BATCH = 2
GPU_BATCH = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flare-infer",
        description="Segment liver, kidneys, spleen and pancreas in CT volumes (NIfTI in, uint8 NIfTI out).",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--engine", type=Path, help="a TensorRT engine built by flare-export --engine")
    model.add_argument("--model", type=Path, help="an ONNX model (flare-export) or a checkpoint (.pt)")
    p.add_argument("-i", "--input", type=Path, required=True, help="a CT .nii/.nii.gz file or a folder of them")
    p.add_argument("-o", "--output", type=Path, required=True, help="output file (for a file input) or folder")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), help="default: from the model's suffix")
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"slices per batch (default {CPU_BATCH} on the CPU, where larger batches only cost memory; "
        f"{GPU_BATCH} on CUDA)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="PyTorch backend precision")
    p.add_argument("--channels-last", action="store_true", help="PyTorch backend: channels_last memory format")
    p.add_argument("--cuda-graph", action="store_true", help="PyTorch on CUDA: replay a CUDA graph at --batch-size")
    p.add_argument("--threads", type=int, help="ONNX Runtime CPU threads (default: all cores)")
    p.add_argument("--ort-provider", choices=("cpu", "cuda", "tensorrt"), help="ONNX Runtime execution provider")
    p.add_argument("--no-postprocess", action="store_true", help="skip the largest-component filtering")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists")
    p.add_argument("--num-parts", type=int, default=1, help="split a folder into this many parts")
    p.add_argument("--part-id", type=int, default=0, help="which part this process runs (0-based)")
    p.add_argument("--timings", type=Path, help="where to write the timings JSON (default: beside the output)")
    add_common_arguments(p)
    return p


def _main(args: argparse.Namespace) -> int:
    if args.batch_size is None:
        args.batch_size = GPU_BATCH if args.engine or args.device.startswith("cuda") else CPU_BATCH
    if args.batch_size < 1:
        raise FlareSegError(f"--batch-size must be positive, got {args.batch_size}")
    model_path = args.engine or args.model
    backend: Backend | None = "tensorrt" if args.engine else args.backend
    runner = open_runner(
        model_path,
        backend=backend,
        device=args.device,
        precision=args.precision,
        channels_last=args.channels_last,
        cuda_graph_batch=args.batch_size if args.cuda_graph else None,
        threads=args.threads,
        ort_provider=args.ort_provider,
    )
    folder = args.input.is_dir()
    if folder:
        inputs = list_cases(args.input, num_parts=args.num_parts, part_id=args.part_id)
        if args.output.exists() and not args.output.is_dir():
            raise FlareSegError(f"{args.output}: the input is a folder, so the output must be a folder")
    else:
        if not args.input.exists():
            raise FlareSegError(f"{args.input}: file not found")
        if not is_nifti(args.input):
            raise FlareSegError(f"{args.input}: not a .nii or .nii.gz file")
        if args.output.is_dir():
            raise FlareSegError(f"{args.output}: is a folder; give the output file name for a single input")
        inputs = [args.input]
    with runner:
        context = {
            "model": str(model_path),
            "runner": runner.describe(),
            "batch_size": args.batch_size,
            "postprocess": not args.no_postprocess,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        }
        with tqdm(desc="slices", unit="slice", disable=args.quiet, leave=False) as bar:

            def report(t: CaseTiming) -> None:
                tqdm.write(t.line(), file=sys.stdout)

            if folder:
                results = segment_folder(
                    runner,
                    inputs,
                    args.output,
                    batch_size=args.batch_size,
                    postprocess=not args.no_postprocess,
                    overwrite=args.overwrite,
                    on_case=report,
                    progress=bar.update,
                )
            else:
                results = [
                    segment_file(
                        runner,
                        args.input,
                        args.output,
                        batch_size=args.batch_size,
                        postprocess=not args.no_postprocess,
                        progress=bar.update,
                    )
                ]
                report(results[0])
    if args.timings:
        timings_path = args.timings
    elif folder:
        suffix = f"-part{args.part_id}of{args.num_parts}" if args.num_parts > 1 else ""
        timings_path = args.output / f"timings{suffix}.json"
    else:
        timings_path = args.output.with_name(args.output.name.split(".nii")[0] + ".timings.json")
    write_timings(results, timings_path, context)
    failed = [r for r in results if r.status == "failed"]
    done = sum(r.status == "ok" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    summary = f"{done} segmented, {skipped} skipped (already done), {len(failed)} failed of {len(results)}"
    print(f"{summary}; timings: {timings_path}")
    if failed:
        print("failed: " + ", ".join(r.case for r in failed), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
