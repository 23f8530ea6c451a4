"""``flare-train``: train the FLARE21 network on the FLARE21 layout (single process or torchrun)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from flareseg.cli import add_common_arguments, run_command, slice_size
from flareseg.errors import FlareSegError
from flareseg.train.config import AugmentConfig, TrainConfig


def _floats(n: int) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}") from None
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data="", out="")
    a = d.augment
    p = argparse.ArgumentParser(
        prog="flare-train",
        description="Train the FLARE21 VGG-13 U-Net with deep supervision (defaults: the paper's protocol). "
        "For several GPUs or nodes, launch it with torchrun.",
    )
    p.add_argument("--data", type=Path, help="FLARE21 folder holding TrainingImg/ and TrainingMask/")
    p.add_argument("--out", type=Path, help="run directory (config, statistics, cache, checkpoints, log)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run where it stopped")
    p.add_argument("--epochs", type=int, help=f"epochs (default {d.epochs}); with --resume, the new total")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"slices per process per micro-batch (default {d.batch_size})",
    )
    p.add_argument("--accumulate", type=int, default=d.accumulate, help="micro-batches per optimiser step (default 1)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    p.add_argument("--width", type=int, default=d.base_width, help=f"base width (default {d.base_width})")
    p.add_argument("--size", type=slice_size, default=d.slice_size, help="slice size H[,W] (default 512)")
    p.add_argument(
        "--loss-weights", type=_floats(5), default=d.loss_weights, help="final,aux1..aux4 (default 1,0.8,0.7,0.6,0.5)"
    )
    p.add_argument(
        "--rotation", type=float, default=a.rotation_deg, help=f"max rotation in degrees (default {a.rotation_deg:g})"
    )
    p.add_argument(
        "--translation",
        type=float,
        default=a.translation,
        help=f"max shift, fraction of size (default {a.translation:g})",
    )
    p.add_argument("--scale", type=_floats(2), default=a.scale, help="scale range LOW,HIGH (default 0.8,1.2)")
    p.add_argument("--shear", type=float, default=a.shear_deg, help=f"max shear in degrees (default {a.shear_deg:g})")
    p.add_argument("--augment-prob", type=float, default=a.probability, help="share of augmented samples (default 1)")
    p.add_argument(
        "--val-cases",
        type=int,
        default=d.val_cases,
        help="validation cases drawn with the seed (default 10; 0: validate on training cases)",
    )
    p.add_argument("--val-list", help="comma-separated validation case names (overrides --val-cases)")
    p.add_argument(
        "--steps-per-epoch", type=int, default=0, help="optimiser steps per epoch (default: one pass over all slices)"
    )
    p.add_argument("--workers", type=int, default=d.workers, help=f"data-loading processes (default {d.workers})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN autotuning for this run")
    add_common_arguments(p)
    return p


def _main(args: argparse.Namespace) -> int:
    from flareseg.train.loop import train

    if args.resume:
        config = TrainConfig.load(args.resume)
        if args.epochs:
            config = TrainConfig.from_dict({**config.to_dict(), "epochs": args.epochs})
        result = train(config, resume=True)
    else:
        if not args.data or not args.out:
            raise FlareSegError("--data and --out are required (or --resume RUN_DIR)")
        if (args.out / "last.pt").exists():
            raise FlareSegError(f"{args.out}: a run already exists there; use --resume {args.out} or another --out")
        config = TrainConfig(
            data=str(args.data),
            out=str(args.out),
            base_width=args.width,
            slice_size=args.size,
            epochs=args.epochs or TrainConfig(data="", out="").epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            loss_weights=args.loss_weights,
            augment=AugmentConfig(args.rotation, args.translation, args.scale, args.shear, args.augment_prob),
            val_cases=args.val_cases,
            val_list=tuple(v for v in (args.val_list or "").split(",") if v),
            workers=args.workers,
            seed=args.seed,
            device=args.device,
            amp=args.amp,
            channels_last=args.channels_last,
            cudnn_benchmark=args.cudnn_benchmark,
            accumulate=args.accumulate,
            steps_per_epoch=args.steps_per_epoch,
        )
        result = train(config)
    if result.best_epoch > 0:
        best = result.run_dir / "best.pt"
        print(f"best mean validation DSC {result.best_score:.4f} at epoch {result.best_epoch}: {best}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
