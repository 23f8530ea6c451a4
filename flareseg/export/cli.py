"""``flare-export``: a checkpoint to verified ONNX (fp32, optionally fp16 and INT8) and TensorRT engines."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from flareseg.atomic import check_writable
from flareseg.cli import (
    add_common_arguments,
    batch_profile,
    end_command,
    fraction,
    path_arg,
    positive_int,
    run_command,
    say,
    slice_size,
)
from flareseg.errors import FlareSegError
from flareseg.export.options import (
    DEFAULT_CALIBRATION_SLICES,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_OPSET,
    DEFAULT_QUANTIZER,
    DEFAULT_WORKSPACE_MIB,
    MIN_OPSET,
    ExportOptions,
)


def build_parser() -> argparse.ArgumentParser:
    d = ExportOptions()  # its defaults, which the options below show and pass on (one source for both)
    p = argparse.ArgumentParser(
        prog="flare-export",
        description="Export a flareseg checkpoint to ONNX (verified in ONNX Runtime against PyTorch) "
        "and optionally a TensorRT engine.",
    )
    p.add_argument(
        "checkpoint",
        type=path_arg,
        help="a flare-train checkpoint (.pt); or an exported ONNX model, to build only its TensorRT engine (--engine)",
    )
    p.add_argument("-o", "--out", type=path_arg, help="output folder (for an ONNX model: default its own folder)")
    p.add_argument("--fp16", action="store_true", help="also write an fp16 ONNX (float32 inputs/outputs kept)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write a statically quantised INT8 ONNX (QDQ), verified on held-out slices before it is written",
    )
    p.add_argument(
        "--calibration",
        type=path_arg,
        help="INT8: folder of CT NIfTI files (e.g. TrainingImg) or DICOM series to calibrate on (default: synthetic "
        "phantoms)",
    )
    p.add_argument(
        "--calibration-slices",
        type=positive_int,
        help=f"INT8: slices to calibrate on (default {DEFAULT_CALIBRATION_SLICES})",
    )
    p.add_argument(
        "--int8-min-agreement",
        type=fraction,
        help=f"INT8: least fraction of held-out voxels labelled as fp32 PyTorch labels them "
        f"(default {DEFAULT_MIN_AGREEMENT})",
    )
    p.add_argument(
        "--quantizer",
        choices=("onnxruntime", "nncf"),
        help=f"INT8: the quantiser that writes the QDQ graph (default {DEFAULT_QUANTIZER}, chosen by measurement)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export of the same --name in the output folder (its other members are removed)",
    )
    p.add_argument("--engine", action="store_true", help="build a TensorRT engine from the (fp16 if --fp16) ONNX")
    profile = d.batch_profile
    p.add_argument(
        "--batch",
        type=batch_profile,
        help=f"MIN,OPT,MAX batch sizes (default {','.join(map(str, profile))})",
    )
    p.add_argument("--size", type=slice_size, help="slice size H[,W] (default: the checkpoint's)")
    p.add_argument("--three-channel", action="store_true", help="keep the 3-channel input (default: folded to 1)")
    p.add_argument(
        "--argmax",
        choices=("uint8", "int32"),
        help="put the argmax in the graph and output labels of this type instead of logits",
    )
    p.add_argument(
        "--verify-volume",
        type=path_arg,
        help="CT volume (NIfTI file or DICOM series folder) whose slices verify the export (default: a phantom)",
    )
    p.add_argument(
        "--verify-slices",
        type=positive_int,
        help=f"real slices used for verification (default {d.verify_slices})",
    )
    p.add_argument(
        "--opset",
        type=int,
        help=f"ONNX opset ({MIN_OPSET} to the newest the onnx package knows; default {DEFAULT_OPSET})",
    )
    p.add_argument(
        "--name",
        help=f"file name stem, without path separators (default {d.name})",
    )
    p.add_argument(
        "--workspace-mib", type=positive_int, help=f"TensorRT workspace limit (default {DEFAULT_WORKSPACE_MIB})"
    )
    p.add_argument(
        "--timing-cache",
        type=path_arg,
        help="TensorRT timing cache: a file, or a folder to keep it in (default: beside the ONNX model)",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="let fp32 TensorRT engines compute in TF32 (default off: fp32 means fp32; recorded in the sidecar)",
    )
    add_common_arguments(p)
    return p


#: Options that only a TensorRT engine build, or only the INT8 export, uses: refused without it.
_FOR = {
    "--engine": ("workspace_mib", "timing_cache", "tf32"),
    "--int8": ("calibration_slices", "int8_min_agreement", "quantizer"),
}


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The options of ``names`` given on the command line (an unset one is None or False; 0 is given)."""
    return [name for name in names if getattr(args, name) is not None and getattr(args, name) is not False]


def _check_options_used(args: argparse.Namespace) -> None:
    """An option that would change nothing is refused (as flare-infer and flare-bench do), not silently ignored."""
    for needed, names in _FOR.items():
        given = _given(args, names)
        if given and not getattr(args, needed.removeprefix("--")):
            flag = "--" + given[0].replace("_", "-")
            raise FlareSegError(f"{flag} is used only with {needed}: add {needed}, or drop {flag}")


#: What only an export from a checkpoint uses: refused with an ONNX model, which is exported already.
_EXPORT_ONLY = (
    "fp16",
    "int8",
    "calibration",
    "batch",
    "size",
    "three_channel",
    "argmax",
    "verify_volume",
    "verify_slices",
    "opset",
    "name",
    "calibration_slices",
    "int8_min_agreement",
    "quantizer",
)


def _engine_from_onnx(args: argparse.Namespace) -> int:
    """``flare-export MODEL.onnx --engine``: the engine of an exported model, e.g. on a GPU it was not built on."""
    from flareseg.export.metadata import sidecar_path
    from flareseg.export.tensorrt import build_engine, engine_path_for

    given = _given(args, _EXPORT_ONLY)
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise FlareSegError(
            f"{flag} exports a checkpoint; {args.checkpoint} is exported already (give its checkpoint to change it)"
        )
    if not args.engine:
        raise FlareSegError(
            f"{args.checkpoint}: an ONNX model is exported already; add --engine to build its TensorRT engine"
        )
    out = args.out if args.out is not None else args.checkpoint.parent
    engine = out / engine_path_for(args.checkpoint).name
    if any(p.exists() or p.is_symlink() for p in (engine, sidecar_path(engine))) and not args.overwrite:
        raise FlareSegError(f"{engine}: exists; --overwrite replaces it and its sidecar")
    for path in (engine, sidecar_path(engine)):  # before minutes of building, not after
        check_writable(path)
    engine = build_engine(
        args.checkpoint,
        engine,
        workspace_mib=args.workspace_mib or DEFAULT_WORKSPACE_MIB,
        timing_cache=args.timing_cache,
        tf32=args.tf32,
    )
    say(f"wrote {engine} (+ {engine.name}.json)")
    return 0


def _main(args: argparse.Namespace) -> int:
    if args.checkpoint.suffix.lower() == ".onnx":  # its own checks first: the export's options do not apply
        return _engine_from_onnx(args)
    _check_options_used(args)
    if args.out is None:
        from flareseg.checkpoint import check_checkpoint_path

        check_checkpoint_path(args.checkpoint)  # a wrong input is said first: mending -o alone would not do
        raise FlareSegError("-o/--out is required: the folder the models are written to")
    # Here, not at the top: the exporter brings torch and onnx, seconds that --help and a bad option need not wait.
    from flareseg.export.onnx_export import export_onnx, verification_report

    if args.engine and args.argmax == "uint8":
        raise FlareSegError(
            "--engine cannot take --argmax uint8 (TensorRT converts to uint8 only from float types): "
            "use --argmax int32, or no --argmax for logits"
        )
    d = ExportOptions()
    options = ExportOptions(
        fp16=args.fp16,
        fold_input=not args.three_channel,
        output_kind="labels" if args.argmax else "logits",
        label_dtype=args.argmax or "uint8",
        batch_profile=args.batch or d.batch_profile,
        slice_size=args.size,
        opset=args.opset if args.opset is not None else d.opset,
        verify_slices=args.verify_slices or d.verify_slices,
        name=args.name if args.name is not None else d.name,
        int8=args.int8,
        int8_min_agreement=DEFAULT_MIN_AGREEMENT if args.int8_min_agreement is None else args.int8_min_agreement,
        calibration_slices=args.calibration_slices or DEFAULT_CALIBRATION_SLICES,
        quantizer=args.quantizer or DEFAULT_QUANTIZER,
    )
    if args.engine:
        # Fail at once, before minutes of export, when TensorRT or a GPU is missing (a checkpoint that is not
        # there, or not one, is said first: no GPU machine mends it).
        from flareseg.export.inputs import load_checked_model
        from flareseg.export.tensorrt import DeviceIdentity, check_timing_cache, import_tensorrt

        load_checked_model(args.checkpoint)  # loaded again by the export: a second or so, at full width
        check_timing_cache(args.timing_cache)
        import_tensorrt()
        DeviceIdentity.current()
    exported = export_onnx(
        args.checkpoint,
        args.out,
        options,
        verify_volume=args.verify_volume,
        calibration=args.calibration,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    say(verification_report(exported))
    for item in exported:
        say(f"wrote {item.path} (+ {item.path.name}.json)")
    if args.engine:
        from flareseg.export.tensorrt import build_engine

        # The engine comes from the fp16 ONNX with --fp16, else the fp32 one (never the CPU INT8 model).
        source = next(e for e in exported if e.metadata.precision == ("fp16" if args.fp16 else "fp32"))
        engine = build_engine(
            source.path,
            workspace_mib=args.workspace_mib or DEFAULT_WORKSPACE_MIB,
            timing_cache=args.timing_cache,
            tf32=args.tf32,
        )
        say(f"wrote {engine} (+ {engine.name}.json)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


def entry() -> NoReturn:
    """The ``flare-export`` command: :func:`main`, then an exit without the interpreter's teardown (its files are
    written and synced by then; torch's exit handlers took a second, in which a Ctrl-C printed a traceback)."""
    end_command(main())


if __name__ == "__main__":
    entry()
