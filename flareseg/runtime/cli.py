"""``flare-infer``: CT volumes in, label maps out, on PyTorch, ONNX Runtime, TensorRT or OpenVINO."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypedDict

import numpy as np

from flareseg.cli import (
    add_common_arguments,
    default_device,
    device_name,
    end_command,
    non_negative_int,
    path_arg,
    positive_float,
    positive_int,
    run_command,
    say,
    torch_threads,
    warn_threads_beyond_cores,
)
from flareseg.errors import FlareSegError
from flareseg.runtime.defaults import CPU_BATCH, GPU_BATCH, device_batch

if TYPE_CHECKING:
    from flareseg.runtime.jobs import OutputType, PlannedCase
    from flareseg.runtime.pipeline import CaseTiming, FolderSummary, RunOptions
    from flareseg.runtime.reading import Reader
    from flareseg.runtime.runners import Backend, Runner, TorchPrecision
    from flareseg.runtime.startup import Timeline
    from flareseg.volume import IgnoredInput

log = logging.getLogger("flareseg.runtime.cli")

#: A folder's cases as listed ahead of the run, or why they could not be; None if not listed.
Listing = list[Path] | FlareSegError | None
#: The slice size --gpu-memory plans for, at least (CT slices are 512 x 512 on nearly every scanner).
PLAN_SLICE = 512


def output_arg(text: str) -> Path:
    """argparse type of -o: a path; one that ends in a separator (a folder) but is named like a result file is
    refused unless that folder exists, since the separator is gone once it is a Path and the name alone would
    make it a file."""
    path = path_arg(text)
    named_like_a_file = path.name.lower().endswith((".nii", ".nii.gz", ".dcm"))
    if text.endswith(("/", os.sep)) and named_like_a_file and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text}: ends in {text[-1]} (a folder) but is named like a result file, and no such folder exists; "
            f"give the folder another name (or, for one input, drop the {text[-1]} to name the file)"
        )
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flare-infer",
        description="Segment liver, kidneys, spleen and pancreas in CT volumes "
        "(NIfTI files or DICOM series in; uint8 NIfTI or DICOM SEG out).",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--engine", type=path_arg, help="a TensorRT engine built by flare-export --engine")
    model.add_argument("--model", type=path_arg, help="an ONNX model (flare-export) or a checkpoint (.pt)")
    p.add_argument(
        "-i",
        "--input",
        type=path_arg,
        required=True,
        help="a CT .nii/.nii.gz file, a folder holding one DICOM series, or a folder of those",
    )
    p.add_argument(
        "-o",
        "--output",
        type=output_arg,
        required=True,
        help="output folder (results get FLARE21 names), or for one input an output file name",
    )
    p.add_argument(
        "--output-type",
        choices=("nifti", "dicom-seg"),
        default="nifti",
        help="uint8 NIfTI on the input's grid (default), or DICOM SEG referencing the input series",
    )
    p.add_argument(
        "--backend", choices=("torch", "onnxruntime", "tensorrt", "openvino"), help="default: from the model's suffix"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"slices per batch (default {CPU_BATCH} on the CPU, where larger batches only cost memory; "
        f"{GPU_BATCH} on CUDA; a TensorRT engine's optimum batch, its profile's opt)",
    )
    p.add_argument("--device", type=device_name, help="cpu or cuda[:i] (default: cuda when a GPU is present, else cpu)")
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        help="PyTorch precision (default fp16 on CUDA, fp32 on the CPU); OpenVINO: fp32 or bf16",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="PyTorch channels_last memory format (default: on with fp16/bf16 on CUDA)",
    )
    p.add_argument("--cuda-graph", action="store_true", help="PyTorch on CUDA: replay a CUDA graph at --batch-size")
    p.add_argument(
        "--device-preprocess",
        action="store_true",
        help="upload the stored integer slices and clip, z-score and resize them on the device "
        "(opt-in: ran once on an H200 with the host path's labels, not yet a default; same labels on the CPU, tested)",
    )
    p.add_argument(
        "--gpu-memory",
        type=positive_float,
        metavar="MB",
        help="choose the CUDA batch that fits this whole-device budget above the idle reading, measured "
        "(opt-in: ran once on an H200, not yet a default)",
    )
    p.add_argument(
        "--warm-up",
        action="store_true",
        help="run one batch of zeros while the first volume is read, so that cuDNN's or TensorRT's "
        "first-batch set-up overlaps the read (opt-in: not yet measured on a GPU)",
    )
    p.add_argument(
        "--overlap-postprocess",
        action="store_true",
        help="label connected components slab by slab while later slices are inferred (same labels, tested; "
        "opt-in: not yet measured on a GPU)",
    )
    p.add_argument(
        "--read-threads",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="cores that inflate each .nii.gz at once, through rapidgzip (0: all; default 1: ISA-L on one core, "
        "the fastest on a few cores; opt-in: not yet measured on a many-core machine). DICOM series are "
        "decoded as before",
    )
    p.add_argument(
        "--threads", type=positive_int, help="CPU threads of the network (default: all cores; torch: on the CPU only)"
    )
    p.add_argument(
        "--openvino-hint",
        choices=("latency", "throughput"),
        help="OpenVINO performance hint (default latency)",
    )
    p.add_argument("--ort-provider", choices=("cpu", "cuda", "tensorrt"), help="ONNX Runtime execution provider")
    p.add_argument(
        "--ort-memory",
        choices=("lean", "no-arena", "ort-defaults"),
        help="ONNX Runtime CPU memory: lean (default; arena without memory pattern), no-arena, or ONNX Runtime's own",
    )
    p.add_argument("--no-postprocess", action="store_true", help="skip the largest-component filtering")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists")
    p.add_argument(
        "--num-parts", type=positive_int, help="split a folder into this many parts (give --part-id with it)"
    )
    p.add_argument("--part-id", type=non_negative_int, help="which part this process runs (0-based; with --num-parts)")
    p.add_argument("--timings", type=path_arg, help="where to write the timings JSON (default: beside the output)")
    add_common_arguments(p)
    return p


def _check_backend_options(args: argparse.Namespace, backend: str) -> None:
    """Refuse an option the chosen backend would ignore, or one that contradicts --device."""
    if args.engine is not None and args.backend not in (None, "tensorrt"):  # first: the options below follow it
        raise FlareSegError(f"--backend {args.backend} contradicts --engine (a TensorRT engine): drop one")
    belongs = {
        "--no-channels-last" if args.channels_last is False else "--channels-last": (
            args.channels_last is not None,
            ("torch",),
        ),
        "--threads": (args.threads is not None, ("onnxruntime", "openvino", "torch")),
        "--openvino-hint": (args.openvino_hint is not None, ("openvino",)),
        "--ort-provider": (args.ort_provider is not None, ("onnxruntime",)),
        "--ort-memory": (args.ort_memory is not None, ("onnxruntime",)),
    }
    for option, (given, backends) in belongs.items():
        if given and backend not in backends:
            names = " and ".join([", ".join(backends[:-1]), backends[-1]] if len(backends) > 1 else backends)
            plural = "s" if len(backends) > 1 else ""
            raise FlareSegError(f"{option} is for the {names} backend{plural}, not {backend}: drop it")
    if args.precision is not None and backend == "tensorrt":
        raise FlareSegError("--precision is fixed when the engine is built (flare-export --engine): drop it")
    if args.precision is not None and backend == "onnxruntime":  # fp32 too: an fp16 or INT8 model ran as it is
        raise FlareSegError("ONNX precision is fixed at export (flare-export --fp16, --int8): drop --precision")
    if args.precision is not None:
        from flareseg.runtime.runners import check_precision

        # Said before any work, even where every output exists already (the runner would say it only on loading).
        check_precision(backend, args.precision)
    if args.ort_provider not in (None, "cpu") and args.device == "cpu":
        raise FlareSegError(f"--ort-provider {args.ort_provider} runs on the GPU, --device cpu on the CPU: choose one")
    if args.ort_provider == "cpu" and args.device is not None and args.device != "cpu":
        raise FlareSegError(f"--ort-provider cpu runs on the CPU, --device {args.device} on the GPU: choose one")


def _torch_threads(args: argparse.Namespace, backend: str, device: str) -> contextlib.AbstractContextManager[None]:
    """--threads for the torch backend (:func:`flareseg.cli.torch_threads`); ONNX Runtime and OpenVINO take it per
    session. Refused for torch on a GPU, where it would change nothing."""
    warn_threads_beyond_cores(args.threads)
    if backend != "torch" or args.threads is None:
        return torch_threads(None)
    if device != "cpu":
        raise FlareSegError(f"--threads sets the CPU's threads; the torch backend runs on {device} here: drop it")
    return torch_threads(args.threads)


def _default_device_for(backend: str, ort_provider: str | None) -> str:
    """The device when --device is not given: the GPU where one is present and the backend can use it."""
    if backend == "openvino" or ort_provider == "cpu":
        return "cpu"
    device = default_device()
    if device == "cuda" and backend == "onnxruntime" and ort_provider is None:
        from flareseg.runtime.runners.onnxrt import import_onnxruntime

        providers = import_onnxruntime().get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            # The CPU build of ONNX Runtime beside a GPU: run, on the CPU, rather than refuse by default.
            log.warning(
                "a GPU is present, but this ONNX Runtime has no CUDA provider (%s): running on the CPU; "
                "--device cuda says what to install",
                ", ".join(providers),
            )
            return "cpu"
    return device


def _describe_device(device: str) -> str:
    if not device.startswith("cuda"):
        return f"{device} ({os.cpu_count()} cores)"
    import torch

    index = torch.device(device).index
    if not torch.cuda.is_available():
        return device  # the runner refuses it with a clear message
    return f"{device} ({torch.cuda.get_device_name(index or 0)})"


def _check_memory_budget(args: argparse.Namespace, backend: str, cuda: bool, device: str) -> float | None:
    """Refuse --gpu-memory where it cannot apply; the device's idle reading before this process uses it."""
    if args.gpu_memory is None:
        return None
    if not cuda or backend != "torch":
        raise FlareSegError("--gpu-memory chooses the batch of the PyTorch backend on a CUDA device")
    if args.batch_size is not None or args.cuda_graph:
        raise FlareSegError("--gpu-memory chooses the batch size itself: drop --batch-size and --cuda-graph")
    import torch

    from flareseg.runtime.memory import nvml_used_mb

    return nvml_used_mb(torch.device(device))  # before our CUDA context exists


def _plan_inputs(
    args: argparse.Namespace, listed: Listing = None, ignored: list[IgnoredInput] | None = None
) -> tuple[bool, list[Path], Path | None]:
    """(folder mode, inputs, a single input's output file; None for a folder).

    ``listed``: the folder's cases, or why they could not be listed, when :func:`_look_ahead` has listed them
    already (listing again would say its warnings twice). ``ignored``: gets what a listing here leaves out.
    """
    from flareseg.runtime.jobs import OUTPUT_SUFFIXES, check_output_folder, is_series_input, list_cases
    from flareseg.volume import NIFTI_SUFFIXES, is_nifti

    inp: Path = args.input
    if inp.is_dir() and not is_series_input(inp):
        check_output_folder(args.output, inp)
        if listed is None:
            listed = list_cases(inp, **_part(args), exclude=args.output, ignored=ignored)
        elif isinstance(listed, FlareSegError):
            raise listed
        if args.output_type == "dicom-seg" and not _has_series(inp, listed, args):
            raise FlareSegError(
                f"{inp}: DICOM SEG output needs DICOM series as input, and this folder's cases are NIfTI files; "
                "use --output-type nifti"
            )
        return True, listed, None
    if args.num_parts is not None or args.part_id is not None:
        raise FlareSegError("--num-parts and --part-id split a folder of cases; the input is one case")
    if not inp.exists():
        raise FlareSegError(f"{inp}: file not found")
    if not inp.is_dir() and not is_nifti(inp):
        raise FlareSegError(f"{inp}: not a .nii or .nii.gz file, nor a folder holding a DICOM series")
    out: Path = args.output
    suffixes = (*NIFTI_SUFFIXES, *OUTPUT_SUFFIXES.values())
    if not out.is_dir() and not out.name.endswith(suffixes) and out.name.lower().endswith(suffixes):
        raise FlareSegError(f"{out}: an output file name ends in lower-case {', '.join(dict.fromkeys(suffixes))}")
    target = _single_output(args, inp)
    if inp.is_file() and target != out and target.parent.resolve() == inp.parent.resolve():
        raise FlareSegError(
            f"{out}: the output folder is the input's own folder, where a later folder run would take the result for "
            "a case; choose another folder (or name the output file)"
        )
    return False, [inp], target


def _has_series(folder: Path, listed: list[Path], args: argparse.Namespace) -> bool:
    """Whether a folder of cases holds a DICOM series: in the whole listing, since a part may have none."""
    from flareseg.runtime.jobs import list_cases

    whole = listed if _part(args)["num_parts"] == 1 else list_cases(folder, exclude=args.output)
    return any(case.is_dir() for case in whole)


class _Part(TypedDict):
    num_parts: int
    part_id: int


def _part(args: argparse.Namespace) -> _Part:
    """A folder run's share: ``--num-parts`` and ``--part-id`` come together (a forgotten ``--part-id`` would
    run part 0 on every machine, and leave the other parts undone)."""
    if (args.num_parts is None) != (args.part_id is None):
        given, missing = ("--num-parts", "--part-id") if args.part_id is None else ("--part-id", "--num-parts")
        raise FlareSegError(f"{given} needs {missing}: give both, e.g. --num-parts 2 --part-id 0 on one machine")
    if args.num_parts is None:
        return {"num_parts": 1, "part_id": 0}
    return {"num_parts": args.num_parts, "part_id": args.part_id}


def _single_output(args: argparse.Namespace, inp: Path) -> Path:
    """A single input's output: ``-o`` where it names a file, else the input's FLARE21 name inside ``-o``."""
    from flareseg.runtime.jobs import OUTPUT_SUFFIXES, output_name
    from flareseg.volume import NIFTI_SUFFIXES

    out: Path = args.output
    names_a_file = out.name.endswith((*NIFTI_SUFFIXES, *OUTPUT_SUFFIXES.values())) and not out.is_dir()
    return out if names_a_file else out / output_name(inp, args.output_type)


def _main(args: argparse.Namespace) -> int:
    from flareseg.runtime.startup import Timeline

    timeline = Timeline()
    timeline.mark("main")  # the interpreter and this module's light imports are behind us
    from flareseg.runtime.reading import Reader

    # The first case's read starts now, so that it overlaps torch's import, the device's
    # start-up and the model's loading.
    # Reader says a missing rapidgzip before any work; `restore` undoes the run's process-wide settings.
    warn_threads_beyond_cores(args.read_threads, "--read-threads")
    ignored: list[IgnoredInput] = []  # what the folder's listing leaves out, with a warning: counted at the end
    with Reader(args.read_threads) as reader, contextlib.ExitStack() as restore:
        first, listed, plan = _look_ahead(args, ignored)
        if first is not None:
            reader.prefetch(first, args.output_type)
        return _run(args, timeline, reader, restore, listed, ignored, plan)


def _look_ahead(
    args: argparse.Namespace, ignored: list[IgnoredInput] | None = None
) -> tuple[Path | None, Listing, Iterator[PlannedCase] | None]:
    """The input the run will read first, found without torch; a folder's cases (or why not) if it listed them;
    and the folder's plan if it made one.

    The input: a NIfTI file, or a folder's first case to run. None when there is no NIfTI
    file to read ahead (a DICOM series, whose parsing would hold the GIL against torch's
    import; every case done) or the inputs are in error: the run then says why, in its
    usual order. The listing is handed on, so that a folder of many series is not read twice
    (nor its warnings said twice), and so is the plan, the cases it looked at first put back:
    a resumed run checks each done case's result once, not once here and again to run.
    """
    from flareseg.runtime.jobs import check_output_folder, is_series_input, list_cases, plan_folder
    from flareseg.volume import is_nifti

    inp: Path = args.input
    if inp.is_file():
        if not is_nifti(inp) or (not args.overwrite and _kept_output(args, inp)):
            return None, None, None  # not NIfTI, or a result already there that the run keeps: nothing to read
        return inp, None, None
    cases: Listing = None
    try:
        if not inp.is_dir() or is_series_input(inp):
            return None, None, None
        check_output_folder(args.output, inp, probe=False)  # the run refuses it again, in its usual order
        try:
            cases = list_cases(inp, **_part(args), exclude=args.output, ignored=ignored)
        except FlareSegError as exc:
            return None, exc, None  # the run raises it after its own checks of the output
        plan = plan_folder(cases, args.output, args.output_type, overwrite=args.overwrite)
        seen: list[PlannedCase] = []
        for planned in plan:  # up to the first case to run: the run plans the rest before it starts
            seen.append(planned)
            if planned.status == "run":
                break
        first = seen[-1].input if seen and seen[-1].status == "run" else None
    except (FlareSegError, OSError):
        return None, cases, None  # the run plans again, and says what went wrong in its usual order
    return (first if first is not None and first.is_file() else None), cases, itertools.chain(seen, plan)


def _kept_output(args: argparse.Namespace, inp: Path) -> bool:
    """Whether a single input's output exists already (the run then keeps it and reads nothing)."""
    try:
        return _single_output(args, inp).is_file()
    except FlareSegError:  # no case name: the run says so, in its usual order
        return False


@dataclass(frozen=True)
class _Choices:
    """What a run's options come to once defaults are filled in for the backend and the machine."""

    model: Path
    backend: Backend
    device: str
    cuda: bool  # the device is a GPU (TensorRT's always is)
    precision: TorchPrecision
    channels_last: bool
    #: The device's default batch, or --batch-size; a TensorRT engine's profile or --gpu-memory may yet replace it.
    batch_size: int
    postprocess: bool


def _choose(args: argparse.Namespace) -> _Choices:
    """Fill in what the options leave out, and refuse those that contradict each other or the backend."""
    from flareseg.runtime.runners import backend_for

    model: Path = args.engine or args.model
    backend: Backend = "tensorrt" if args.engine else (args.backend or backend_for(model))
    _check_backend_options(args, backend)
    if args.overlap_postprocess and args.no_postprocess:
        raise FlareSegError("--overlap-postprocess and --no-postprocess contradict each other: choose one")
    device: str = args.device or ("cuda" if backend == "tensorrt" else _default_device_for(backend, args.ort_provider))
    cuda = device.startswith("cuda") or backend == "tensorrt"
    # PyTorch on CUDA defaults to fp16 + channels_last (the path measured on the H200); exported
    # models carry their precision, so --precision is PyTorch's alone.
    precision: TorchPrecision = args.precision or ("fp16" if cuda and backend == "torch" else "fp32")
    return _Choices(
        model=model,
        backend=backend,
        device=device,
        cuda=cuda,
        precision=precision,
        channels_last=args.channels_last if args.channels_last is not None else (cuda and precision != "fp32"),
        batch_size=args.batch_size if args.batch_size is not None else device_batch("cuda" if cuda else "cpu"),
        postprocess=not args.no_postprocess,
    )


def _run(
    args: argparse.Namespace,
    timeline: Timeline,
    reader: Reader,
    restore: contextlib.ExitStack,
    listed: Listing = None,
    ignored: list[IgnoredInput] | None = None,
    plan: Iterator[PlannedCase] | None = None,
) -> int:
    """The run; what it changes in the process (torch's thread count) is undone by ``restore`` when it ends."""
    from flareseg.runtime.jobs import check_timings, file_job
    from flareseg.runtime.pipeline import summarize
    from flareseg.runtime.runners import open_runner

    timeline.mark("imports")  # the pipeline's and the runners' imports (torch among them)
    t_start = time.perf_counter()
    chosen = _choose(args)
    restore.enter_context(_torch_threads(args, chosen.backend, chosen.device))
    ignored = ignored if ignored is not None else []
    folder, inputs, target = _plan_inputs(args, listed, ignored)
    if target is not None:  # the output first, then the timings beside it
        file_job(inputs[0], target, args.output_type)
    timings_path = _timings_path(args, target)
    check_timings(timings_path, inputs)
    idle_mb = _check_memory_budget(args, chosen.backend, chosen.cuda, chosen.device)
    runner = open_runner(
        chosen.model,
        backend=chosen.backend,
        device=chosen.device,
        precision=chosen.precision,
        channels_last=chosen.channels_last,
        cuda_graph_batch=chosen.batch_size if args.cuda_graph else None,
        threads=args.threads,
        ort_provider=args.ort_provider,
        openvino_hint=args.openvino_hint or "latency",
        ort_memory=args.ort_memory or "lean",
    )
    timeline.mark("runner_opened")  # on CUDA this checked the device, which initialises the driver
    # After the runner is made (not loaded): a device or precision this machine cannot run is refused even where
    # the result is there already, as in a folder; a job that runs from cron would otherwise pass until a new case.
    if target is not None and target.is_file() and not args.overwrite:
        _keep_result(runner, inputs[0], target, args.output_type, timings_path, chosen.postprocess)
        return 0
    batch_size = chosen.batch_size
    if chosen.backend == "tensorrt" and args.batch_size is None:
        batch_size = engine_batch(chosen.model)
    memory_plan: dict[str, object] | None = None
    if args.gpu_memory is not None:
        try:
            batch_size, memory_plan = _plan_gpu_batch(runner, args, idle_mb)
        except BaseException:
            runner.deactivate()  # a budget too small: the loaded model goes before the error is said
            raise
    log.info("device: %s; batch %d", _describe_device(str(runner.device)), batch_size)
    if args.overlap_postprocess and runner.device.type != "cuda":
        log.info("--overlap-postprocess on the CPU: the same labels and less memory, but no time saved")
    options: RunOptions = {
        "batch_size": batch_size,
        "postprocess": chosen.postprocess,
        "infer_options": {"device_preprocess": args.device_preprocess},
        "warm_up": args.warm_up,
        "timeline": timeline,
        "overlap_postprocess": args.overlap_postprocess,
        "reader": reader,  # it reads with --read-threads
    }
    context = _run_context(args, chosen.model, batch_size, chosen.postprocess, ignored, memory_plan)
    reported: list[CaseTiming] = []
    try:
        planned = plan if listed is not None else None  # made of the very listing the run takes
        results = _segment(args, runner, inputs, target, planned, options, reported)
        if target is None:
            from flareseg.runtime.pipeline import warn_kept_of_other_postprocessing

            done = [r for r in results if r.status == "skipped"]
            warn_kept_of_other_postprocessing(
                done, _timings_beside(timings_path, Path(args.output)), chosen.postprocess
            )
        context["runner"] = runner.describe()  # its name alone where it never loaded: nothing ran
        context["model_file"] = _stamp(runner)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what is done is on disk; say so, and keep its timings
        context["model_file"] = _stamp(runner, hashed_only=True)  # a stop does not wait for a hash
        _keep_interrupted(reported, len(inputs), timings_path, {**context, "interrupted": True}, t_start, len(ignored))
        raise
    finally:
        runner.deactivate()
    timeline.mark("released")
    summary = summarize(results, time.perf_counter() - t_start)
    timeline.end()
    startup = {
        **timeline.to_dict(),
        "activate_s": runner.activate_s,
        "activation_steps_s": runner.activation_steps,
    }
    timings_written, written = _save_timings(results, timings_path, context, summary, startup)
    failed = [r for r in results if r.status == "failed"]
    rate = f", {summary.cases_per_minute:.1f} cases/min" if folder and summary.cases_per_minute else ""
    say(f"{_tally(summary, summary.cases, len(ignored))} in {summary.wall_s:.1f}s{rate}; {written}")
    if failed:
        print("failed: " + ", ".join(r.case for r in failed), file=sys.stderr)
    return 1 if failed or not timings_written else 0


def _keep_result(
    runner: Runner, inp: Path, target: Path, output_type: OutputType, timings_path: Path, postprocess: bool
) -> None:
    """A single input whose result is there already: kept, as in a folder, never replaced unasked (it may be
    another file); refused where it is no result (or another scan's)."""
    from flareseg.runtime.jobs import why_not_kept
    from flareseg.runtime.pipeline import (
        CaseTiming,
        FolderSummary,
        warn_kept_of_other_models,
        warn_kept_of_other_postprocessing,
    )

    damage = why_not_kept(target, inp, output_type)
    if damage is not None:
        raise FlareSegError(f"{target}: exists but {damage}; remove it to redo the case, or --overwrite")
    warn_kept_of_other_models(runner, [(target.name, target, output_type)])
    kept_file = CaseTiming(target.name, str(inp), str(target), "skipped")
    warn_kept_of_other_postprocessing([kept_file], _timings_beside(timings_path, target.parent), postprocess)
    kept = FolderSummary(cases=1, segmented=0, skipped=1, failed=0, wall_s=0.0)
    say(f"{_tally(kept, 1)}; {target} exists, kept (--overwrite to redo it)")


def _run_context(
    args: argparse.Namespace,
    model: Path,
    batch_size: int,
    postprocess: bool,
    ignored: Sequence[IgnoredInput],
    memory_plan: dict[str, object] | None,
) -> dict[str, Any]:
    """How the run was made, for its timings (the runner and the model file's stamp are added once it ran)."""
    return {
        "model": str(model),
        "batch_size": batch_size,
        "postprocess": postprocess,
        "cwd": os.getcwd(),  # what the inputs' and outputs' relative paths below are relative to
        "started_unix_s": round(time.time(), 3),  # kept with each case carried into later timings: which is newest
        "output_type": args.output_type,
        "device_preprocess": args.device_preprocess,
        "warm_up": args.warm_up,
        "overlap_postprocess": args.overlap_postprocess,
        "read_threads": args.read_threads,
        # Entries that look like inputs but were left out (each said in a warning): a case that would go missing.
        "ignored_inputs": [{"path": str(entry.path), "why": entry.why} for entry in ignored],
        "memory_plan": memory_plan,  # --gpu-memory: the batches measured, and the one chosen
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
    }


def _segment(
    args: argparse.Namespace,
    runner: Runner,
    inputs: list[Path],
    target: Path | None,
    planned: Iterator[PlannedCase] | None,
    options: RunOptions,
    reported: list[CaseTiming],
) -> list[CaseTiming]:
    """Segment the folder's cases (``target`` None) or the one input into ``target``, with a progress bar on a
    terminal and a line per case; each case goes into ``reported`` just before its line is said (a stop during the
    line still counts it as done)."""
    from tqdm import tqdm

    from flareseg.atomic import OutputExistsError
    from flareseg.runtime.pipeline import CaseTiming, reset_peak_rss, segment_file, segment_folder

    # The bar only on a terminal (None: tqdm asks): a log file or a pipe gets the per-case lines alone.
    with tqdm(desc="slices", unit="slice", disable=True if args.quiet else None, leave=False) as bar:
        # Slices are counted as inferred, cases read one by one: no total; a folder's case count stands beside it.
        if target is None:
            bar.set_postfix_str(f"0/{len(inputs)} cases")

        def report(t: CaseTiming) -> None:
            reported.append(t)
            say(t.line(), lambda line: tqdm.write(line, file=sys.stdout))
            if target is None:
                bar.set_postfix_str(f"{len(reported)}/{len(inputs)} cases")

        options = {**options, "progress": bar.update}
        if target is None:  # a folder of cases
            return segment_folder(
                runner,
                inputs,
                args.output,
                output_type=args.output_type,
                overwrite=args.overwrite,
                on_case=report,
                planned=planned,
                **options,
            )
        # Said when written: an interrupt during the teardown after it still counts the case as done.
        reset_peak_rss()  # the case's peak in timings: this process's own counter, the command's to reset
        try:
            timing = segment_file(
                runner,
                inputs[0],
                target,
                output_type=args.output_type,
                overwrite=args.overwrite,  # a result already there was kept above, unless --overwrite
                on_case=report,
                **options,
            )
        except OutputExistsError as exc:  # another run's result, written since the check above: kept
            log.warning("%s", exc)
            timing = CaseTiming(str(inputs[0].name), str(inputs[0]), str(target), "skipped", str(exc))
        return [timing]


def _stamp(runner: Runner, *, hashed_only: bool = False) -> dict[str, Any] | None:
    """The model file's name, size and SHA-256 for the timings, as the outputs name it; None if unreadable, or
    if the model never loaded (nothing ran: no timings are written, and the file need not be read).
    ``hashed_only``: None rather than a hash made now (a stop)."""
    from flareseg.provenance import HashStopped

    if not runner.is_active:
        return None
    stop = threading.Event()
    if hashed_only:
        stop.set()
    try:
        stamp = runner.stamp(stop)
    except (FlareSegError, HashStopped) as exc:  # FlareSegError: each case written since failed with it, and said it
        log.debug("%s", exc)
        return None
    return stamp.to_dict() if stamp is not None else None


def _keep_interrupted(
    reported: list[CaseTiming],
    cases: int,
    timings_path: Path,
    context: dict[str, Any],
    t_start: float,
    ignored: int = 0,
) -> None:
    """The summary line and timings of the cases an interrupted run finished (they are on disk)."""
    from flareseg.runtime.pipeline import summarize

    summary = summarize(reported, time.perf_counter() - t_start)
    _, written = _save_timings(reported, timings_path, context, summary, label="timings so far")
    say(f"interrupted: {_tally(summary, cases, ignored)}; {written}")


def _tally(summary: FolderSummary, cases: int, ignored: int = 0) -> str:
    """The counts of a run's last line; entries of the folder left out are said there too (a case may be missing)."""
    done = f"{summary.segmented} segmented, {summary.skipped} skipped (already done)"
    tally = f"{done}, {summary.failed} failed of {cases}"
    if ignored:
        tally += f" ({ignored} more {'entry' if ignored == 1 else 'entries'} of the folder ignored: see the warnings)"
    return tally


def _save_timings(
    results: Sequence[CaseTiming],
    path: Path,
    context: dict[str, Any],
    summary: FolderSummary,
    startup: dict[str, Any] | None = None,
    *,
    label: str = "timings",
) -> tuple[bool, str]:
    """Write a run's timings unless nothing ran; whether all went well, and the words for its last line.

    When nothing ran (every case already done), an earlier run's timings stay as they are.
    """
    from flareseg.runtime.pipeline import earlier_cases, write_timings

    if summary.segmented == summary.failed == 0:
        return True, "no timings (no case ran to its end)"
    try:
        # A resumed run keeps the measurements of the cases an earlier run did (they are skipped now).
        write_timings(results, path, context, summary, startup, earlier=earlier_cases(path))
    except FlareSegError as exc:  # the label maps are written: say so, then what went wrong
        log.error("%s", exc)
        return False, "timings not written"
    return True, f"{label}: {path}"


def engine_batch(engine: Path) -> int:
    """A TensorRT engine's default batch: its profile's opt, the batch its kernels were tuned for and one the
    engine always takes (a fixed default may lie outside its profile), read from its sidecar."""
    from flareseg.export.metadata import ExportMetadata, read_sidecar

    return ExportMetadata.from_dict(read_sidecar(engine), str(engine)).batch_profile[1]


def _plan_gpu_batch(runner: Runner, args: argparse.Namespace, idle_mb: float | None) -> tuple[int, dict[str, object]]:
    """--gpu-memory: the batch that fits the budget, measured on the loaded model, and the plan for the timings."""
    from flareseg.runtime.memory import measure_cuda_plan

    runner.activate()  # the plan measures the loaded model: no overlap with the first read here
    # The staging buffers and the scores resized back are at the CT's slice size, not the model's: plan
    # for 512 x 512 (nearly every CT), or the model's size where that is larger.
    h, w = runner.info.slice_size
    plan = measure_cuda_plan(
        runner,
        args.gpu_memory,
        (max(h, PLAN_SLICE), max(w, PLAN_SLICE)),
        np.dtype(np.int16),
        idle_mb=idle_mb,
        device_preprocess=args.device_preprocess,
    )
    log.info("%s", plan.line())
    return plan.batch, plan.to_dict()


def _timings_beside(timings: Path, folder: Path) -> list[dict[str, Any]]:
    """The measured cases of a run's timings file and of the others in its output folder (a folder run's parts',
    single cases' ``NAME.timings.json``), the newest measurement first: where they disagree on a result, the run
    that made it last is right. A case carried into a later file (a resumed run's ``earlier_run``) keeps its own
    run's start; timings written before runs recorded it count from their file's time."""
    from flareseg.runtime.pipeline import earlier_cases

    found = {timings, *folder.glob("timings*.json"), *folder.glob("*.timings.json")}
    dated: list[tuple[float, dict[str, Any]]] = []
    for path in found:
        try:
            written = path.stat().st_mtime
        except OSError:  # gone meanwhile, or not there yet (this run's own, on its first run)
            continue
        for entry in earlier_cases(path).values():
            context = entry.get("context")
            started = context.get("started_unix_s") if isinstance(context, dict) else None
            known = isinstance(started, int | float) and not isinstance(started, bool) and math.isfinite(started)
            dated.append((float(started) if known and started is not None else written, entry))
    return [entry for _, entry in sorted(dated, key=lambda pair: -pair[0])]


def _timings_path(args: argparse.Namespace, target: Path | None) -> Path:
    """--timings, or beside the output: ``timings.json`` in a folder run, ``<case>.timings.json`` for one case."""
    if args.timings:
        return Path(args.timings)
    if target is None:
        suffix = f"-part{args.part_id}of{args.num_parts}" if (args.num_parts or 1) > 1 else ""
        return Path(args.output) / f"timings{suffix}.json"
    return target.with_name(target.name.split(".nii")[0].removesuffix(".dcm") + ".timings.json")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


def entry() -> NoReturn:
    """The ``flare-infer`` command: :func:`main`, then an exit without the interpreter's teardown.

    Not after Ctrl-C (or SIGTERM, SIGHUP): a writer thread may still be finishing, and the usual exit waits for it.
    """
    end_command(main())


if __name__ == "__main__":
    entry()
