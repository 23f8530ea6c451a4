"""FLARE21 evaluation of a folder of predictions against a folder of ground truth: ``flare-eval``.

Cases are matched by FLARE21 case name (``train_000_0000.nii.gz`` and ``train_000.nii.gz``
are the same case). A missing prediction is reported and scored 0 for every organ, as the
challenge did; an extra prediction (no ground truth) is reported and not scored.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flareseg.atomic import check_writable, write_text_atomic
from flareseg.cli import add_common_arguments, non_negative_float, path_arg, positive_int, run_command
from flareseg.errors import FlareSegError
from flareseg.labels import LABELS, ORGANS
from flareseg.metrics import organ_scores
from flareseg.volume import case_id, find_cases, read_labels

log = logging.getLogger(__name__)

#: Affines of a prediction and its ground truth may differ by this much (mm) from rounding.
AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class CaseResult:
    case: str
    #: organ label -> (DSC, NSD)
    scores: dict[int, tuple[float, float]]
    status: str = "ok"  # "ok" or "missing"


@dataclass
class Evaluation:
    results: list[CaseResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    tolerance_mm: float = 1.0

    def organ_values(self, organ: int, metric: int) -> list[float]:
        return [r.scores[organ][metric] for r in self.results]


def evaluate_case(gt_path: Path, pred_path: Path, tolerance_mm: float = 1.0) -> CaseResult:
    """Score one prediction; spacing comes from the ground truth header."""
    name = case_id(gt_path)
    gt, gt_geom = read_labels(gt_path)
    pred, pred_geom = read_labels(pred_path)
    if gt.shape != pred.shape:
        raise FlareSegError(f"case {name}: prediction shape {pred.shape} differs from ground truth {gt.shape}")
    if not np.allclose(gt_geom.affine, pred_geom.affine, atol=AFFINE_TOLERANCE_MM, rtol=0):
        raise FlareSegError(f"case {name}: prediction affine differs from the ground truth affine ({pred_path})")
    return CaseResult(name, organ_scores(gt, pred, gt_geom.spacing, tolerance_mm=tolerance_mm))


def _evaluate_pair(args: tuple[Path, Path, float]) -> CaseResult:
    return evaluate_case(*args)


def evaluate_folders(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    *,
    tolerance_mm: float = 1.0,
    workers: int = 1,
    progress: bool = True,
) -> Evaluation:
    preds, gts = find_cases(pred_dir), find_cases(gt_dir)
    if not gts:
        raise FlareSegError(f"{gt_dir}: no NIfTI ground truth files")
    if not preds:  # a wrong folder would otherwise score every case 0 and exit 0
        raise FlareSegError(f"{pred_dir}: no NIfTI predictions (.nii or .nii.gz)")
    ev = Evaluation(tolerance_mm=tolerance_mm)
    ev.missing = sorted(set(gts) - set(preds))
    ev.extra = sorted(set(preds) - set(gts))
    jobs = [(gts[c], preds[c], tolerance_mm) for c in sorted(set(gts) & set(preds))]
    # On a terminal only (None: tqdm asks), so that a log or an error line does not follow a carriage return.
    bar = tqdm(total=len(jobs), desc="evaluating", unit="case", disable=None if progress else True)
    results: dict[str, CaseResult] = {}
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for res in pool.map(_evaluate_pair, jobs):
                results[res.case] = res
                bar.update()
    else:
        for job in jobs:
            res = _evaluate_pair(job)
            results[res.case] = res
            bar.update()
    bar.close()
    for c in ev.missing:
        results[c] = CaseResult(c, {o: (0.0, 0.0) for o in ORGANS}, status="missing")
    ev.results = [results[c] for c in sorted(results)]
    return ev


def csv_text(ev: Evaluation) -> str:
    """One row per case: status, DSC and NSD for each organ, and the NSD's tolerance."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    organs = [f"{LABELS[o]}_{m}" for o in ORGANS for m in ("dsc", "nsd")]
    writer.writerow(["case", "status", *organs, "nsd_tolerance_mm"])
    for r in ev.results:
        scores = [f"{r.scores[o][i]:.6f}" for o in ORGANS for i in (0, 1)]
        writer.writerow([r.case, r.status, *scores, f"{ev.tolerance_mm:g}"])
    return buf.getvalue()


def summary_table(ev: Evaluation) -> str:
    """Mean ± std per organ in percent, like the paper's Table 4."""

    def cell(values: list[float]) -> str:
        if not values:
            return "n/a"
        sd = statistics.pstdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.fmean(values):6.2f} ± {100 * sd:5.2f}"

    nsd_head = f"NSD (%) @ {ev.tolerance_mm:g} mm"
    lines = [f"| organ    | {'DSC (%)':15s} | {nsd_head:15s} |", f"|----------|{'-' * 17}|{'-' * 17}|"]
    for organ in ORGANS:
        dsc, nsd = cell(ev.organ_values(organ, 0)), cell(ev.organ_values(organ, 1))
        lines.append(f"| {LABELS[organ]:8s} | {dsc:15s} | {nsd:15s} |")
    n_ok = sum(r.status == "ok" for r in ev.results)
    lines.append(f"\n{n_ok} cases scored, {len(ev.missing)} missing (scored 0), {len(ev.extra)} extra (not scored)")
    if ev.missing:
        lines.append("missing predictions: " + ", ".join(ev.missing))
    if ev.extra:
        lines.append("extra predictions without ground truth: " + ", ".join(ev.extra))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flare-eval", description="Score predictions against ground truth with FLARE21's DSC and NSD."
    )
    parser.add_argument("--pred", required=True, type=path_arg, help="folder of predicted label maps")
    parser.add_argument("--gt", required=True, type=path_arg, help="folder of ground truth label maps")
    parser.add_argument("-o", "--output", type=path_arg, help="per-case CSV to write (.csv)")
    parser.add_argument("--tolerance", type=non_negative_float, default=1.0, help="NSD tolerance in mm (default 1)")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=min(4, os.cpu_count() or 1),
        help="parallel processes (default: up to 4, one per core)",
    )
    add_common_arguments(parser)
    return parser


def check_csv_output(path: Path) -> None:
    """Refuse, before any scoring, a CSV path that would replace a label map or could not be written."""
    if path.suffix.lower() != ".csv":  # so that it can never replace a NIfTI input, nor be taken for a case
        raise FlareSegError(f"{path}: the per-case results file must end in .csv")
    if path.is_dir():
        raise FlareSegError(f"{path}: is a folder, not a file")
    check_writable(path)


def _main(args: argparse.Namespace) -> int:
    if args.output:
        check_csv_output(args.output)
    ev = evaluate_folders(
        args.pred, args.gt, tolerance_mm=args.tolerance, workers=args.workers, progress=not args.quiet
    )
    if args.output:
        write_text_atomic(csv_text(ev), args.output)
        log.info("wrote %s", args.output)
    print(summary_table(ev))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
