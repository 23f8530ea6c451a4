"""``flare-train``: train the FLARE21 network on the FLARE21 layout (single process or torchrun)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flareseg.atomic import check_writable_folder
from flareseg.cli import (
    add_common_arguments,
    default_device,
    device_name,
    non_negative_float,
    non_negative_int,
    path_arg,
    positive_float,
    positive_int,
    run_command,
    say,
    slice_size,
)
from flareseg.errors import FlareSegError
from flareseg.train.config import (
    RUN_OUTPUTS,
    AugmentConfig,
    TrainConfig,
    absolute,
    check_loss_weights,
    locate_data,
)

log = logging.getLogger("flareseg.train.cli")  # not __main__ under python -m or torchrun -m

#: Options a resumed run may change: how it runs, not what it learns. --accumulate too, where it keeps the run's
#: global batch on another number of processes (the training loop checks that against last.pt).
RESUME_MAY_CHANGE = ("--epochs", "--device", "--workers", "--cudnn-benchmark")
_MAY_CHANGE = f"only {', '.join(RESUME_MAY_CHANGE)} may change, and --accumulate to keep the global batch"


def _floats(n: int, kind: Callable[[str], float], what: str) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        parts = text.split(",")
        if len(parts) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated {what}, got {text!r}")
        try:
            return tuple(kind(v) for v in parts)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated {what}, got {text!r}") from None

    return parse


def _loss_weights(text: str) -> tuple[float, ...]:
    values = _floats(5, non_negative_float, "finite numbers >= 0")(text)
    try:
        check_loss_weights(values)
    except FlareSegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return values


def _scale(text: str) -> tuple[float, ...]:
    low, high = _floats(2, positive_float, "positive numbers")(text)
    if low > high:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with LOW <= HIGH, got {text!r}")
    return low, high


#: (option, config field, value as the config holds it): the settings --resume compares with the run's.
_SETTINGS: tuple[tuple[str, str, Callable[[TrainConfig], Any]], ...] = (
    ("--width", "width", lambda c: c.base_width),
    ("--size", "size", lambda c: c.slice_size),
    ("--batch-size", "batch_size", lambda c: c.batch_size),
    ("--lr", "lr", lambda c: c.lr),
    ("--loss-weights", "loss_weights", lambda c: c.loss_weights),
    ("--rotation", "rotation", lambda c: c.augment.rotation_deg),
    ("--translation", "translation", lambda c: c.augment.translation),
    ("--scale", "scale", lambda c: c.augment.scale),
    ("--shear", "shear", lambda c: c.augment.shear_deg),
    ("--augment-prob", "augment_prob", lambda c: c.augment.probability),
    ("--val-cases", "val_cases", lambda c: c.val_cases),
    ("--val-list", "val_list", lambda c: c.val_list),
    ("--steps-per-epoch", "steps_per_epoch", lambda c: c.steps_per_epoch),
    ("--seed", "seed", lambda c: c.seed),
    ("--amp", "amp", lambda c: c.amp),
    ("--channels-last", "channels_last", lambda c: c.channels_last),
)


def _val_list(text: str) -> tuple[str, ...]:
    """argparse type: case names, comma-separated; none at all (``,``) would silently mean --val-cases."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected case names separated by commas, got {text!r}")
    return names


def _numbers(values: Sequence[float]) -> str:
    """A default as it is typed: "0.8,1.2"."""
    return ",".join(f"{v:g}" for v in values)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data="", out="")
    a = d.augment
    p = argparse.ArgumentParser(
        prog="flare-train",
        description="Train the FLARE21 VGG-13 U-Net with deep supervision (defaults: the paper's protocol). "
        "For several GPUs or nodes, launch it with torchrun. Every setting left out takes its default, "
        "or with --resume the run's own.",
    )
    # Defaults are None here and filled in by _new_config: --resume must tell a setting given from one left out.
    p.add_argument("--data", type=path_arg, help="FLARE21 folder holding TrainingImg/ and TrainingMask/")
    p.add_argument("--out", type=path_arg, help="run directory (config, statistics, cache, checkpoints, log)")
    p.add_argument(
        "--resume",
        type=path_arg,
        metavar="RUN_DIR",
        help=f"continue a run where it stopped, in RUN_DIR ({_MAY_CHANGE} on another number of processes)",
    )
    p.add_argument("--epochs", type=positive_int, help=f"epochs (default {d.epochs}); with --resume, the new total")
    p.add_argument(
        "--batch-size", type=positive_int, help=f"slices per process per micro-batch (default {d.batch_size})"
    )
    p.add_argument("--accumulate", type=positive_int, help=f"micro-batches per optimiser step (default {d.accumulate})")
    p.add_argument("--lr", type=positive_float, help=f"Adam learning rate (default {d.lr:g})")
    p.add_argument("--width", type=positive_int, help=f"base width (default {d.base_width})")
    h, w = d.slice_size
    size = f"{h}" if h == w else f"{h},{w}"
    p.add_argument("--size", type=slice_size, help=f"slice size H[,W], multiples of 16 (default {size})")
    p.add_argument(
        "--loss-weights",
        type=_loss_weights,
        help=f"final,aux1..aux4, each >= 0, the final one > 0 (default {_numbers(d.loss_weights)})",
    )
    p.add_argument("--rotation", type=non_negative_float, help=f"max rotation in degrees (default {a.rotation_deg:g})")
    p.add_argument(
        "--translation", type=non_negative_float, help=f"max shift, fraction of size, < 1 (default {a.translation:g})"
    )
    p.add_argument("--scale", type=_scale, help=f"scale range LOW,HIGH (default {_numbers(a.scale)})")
    p.add_argument("--shear", type=non_negative_float, help=f"max shear in degrees (default {a.shear_deg:g})")
    p.add_argument(
        "--augment-prob", type=non_negative_float, help=f"share of augmented samples, 0..1 (default {a.probability:g})"
    )
    p.add_argument(
        "--val-cases",
        type=non_negative_int,
        help=f"validation cases drawn with the seed (default {d.val_cases}; 0: validate on training cases)",
    )
    p.add_argument("--val-list", type=_val_list, help="comma-separated validation case names (overrides --val-cases)")
    p.add_argument(
        "--steps-per-epoch", type=positive_int, help="optimiser steps per epoch (default: one pass over all slices)"
    )
    p.add_argument(
        "--workers", type=non_negative_int, help=f"data-loading processes (default {d.workers}; 0: in this process)"
    )
    p.add_argument("--seed", type=non_negative_int, help=f"random seed (default {d.seed})")
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda where a GPU is, else cpu)")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision (CUDA)")
    p.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    p.add_argument("--cudnn-benchmark", action="store_true", default=None, help="cuDNN autotuning for this run")
    add_common_arguments(p)
    return p


def _new_config(args: argparse.Namespace) -> TrainConfig:
    if not args.data or not args.out:
        raise FlareSegError("--data and --out are required (or --resume RUN_DIR)")
    if args.out.exists() and not args.out.is_dir():
        raise FlareSegError(f"--out {args.out.resolve()}: exists and is not a folder")
    # As typed, before resolving (which would create a broken link's target): a broken link on the way, a folder
    # that cannot be written in.
    check_writable_folder(args.out)
    out = args.out.resolve()  # "missing/../run" names an existing run that, as typed, does not exist
    d = TrainConfig(data="", out="")

    def given(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return default if value is None else value

    return TrainConfig(
        data=absolute(args.data),  # absolute: --resume from any folder, after the run folder moved, finds them
        out=str(out),
        base_width=given("width", d.base_width),
        slice_size=given("size", d.slice_size),
        epochs=given("epochs", d.epochs),
        batch_size=given("batch_size", d.batch_size),
        lr=given("lr", d.lr),
        loss_weights=given("loss_weights", d.loss_weights),
        augment=AugmentConfig(
            given("rotation", d.augment.rotation_deg),
            given("translation", d.augment.translation),
            given("scale", d.augment.scale),
            given("shear", d.augment.shear_deg),
            given("augment_prob", d.augment.probability),
        ),
        val_cases=given("val_cases", d.val_cases),
        val_list=given("val_list", d.val_list),
        workers=given("workers", d.workers),
        seed=given("seed", d.seed),
        device=args.device if args.device is not None else _default_device(),
        amp=given("amp", d.amp),
        channels_last=given("channels_last", d.channels_last),
        cudnn_benchmark=given("cudnn_benchmark", d.cudnn_benchmark),
        accumulate=given("accumulate", d.accumulate),
        steps_per_epoch=args.steps_per_epoch,
    )


def _default_device() -> str:
    """The GPU where torch sees one, as flare-infer chooses; said, since training on the CPU by mistake costs days."""
    device = default_device()
    log.info("device: %s (--device chooses)", device)
    return device


def _resumed_config(args: argparse.Namespace) -> TrainConfig:
    """The run's own config, its outputs in RUN_DIR wherever that is now; refuses settings that differ from it."""
    run = args.resume
    if not run.is_dir():
        raise FlareSegError(f"--resume {run}: not a folder")
    config = TrainConfig.load(run)
    if args.out is not None and absolute(args.out) != absolute(run) and not _same_folder(args.out, run):
        raise FlareSegError(f"--out {args.out}: a resumed run writes into its own folder {run}; leave --out out")
    differ = []
    for option, name, recorded in _SETTINGS:
        value = getattr(args, name)
        if value is not None and value != recorded(config):
            differ.append(f"{option} {_show(value)} (the run has {_show(recorded(config))})")
    if differ:
        raise FlareSegError(f"--resume {run}: {'; '.join(differ)}: a resumed run keeps its settings ({_MAY_CHANGE})")
    # The data: the folder given (checked to hold the run's data when training starts), else where the run recorded it.
    data = absolute(args.data) if args.data is not None else locate_data(config, run)
    changes: dict[str, Any] = {"data": data, "out": str(run)}
    for name in ("epochs", "device", "workers", "accumulate"):  # the option's name is the config's field
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.cudnn_benchmark is not None:
        changes["cudnn_benchmark"] = args.cudnn_benchmark
    return config.replace(**changes)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "''"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "default (one pass)" if value is None else str(value)


def _main(args: argparse.Namespace) -> int:
    from flareseg.train.loop import launch_place, train

    if args.resume:
        config = _resumed_config(args)
        resume = (args.resume / "last.pt").exists()
        left = [name for name in RUN_OUTPUTS if (args.resume / name).exists()]
        if not resume and left:
            raise FlareSegError(f"--resume {args.resume}: no last.pt to resume from (but {left[0]} is there)")
    else:
        config, resume = _new_config(args), False
    try:
        result = train(config, resume=resume)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: say how to go on, where an epoch was kept
        run, place = Path(config.out), launch_place()
        if place.main and (run / "last.pt").exists():  # once, not by every torchrun rank
            how = "" if place.world <= 1 else ", started by torchrun as this run was"
            log.warning(
                "%s: stopped; `flare-train --resume %s`%s goes on after its last finished epoch",
                run, shlex.quote(str(run)), how,
            )  # fmt: skip
        raise
    if result.best_epoch > 0:
        best = result.run_dir / "best.pt"
        where = str(best) if best.exists() else f"{best} is missing (moved or removed since that epoch)"
        say(f"best mean validation DSC {result.best_score:.4f} at epoch {result.best_epoch}: {where}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
