"""Scoring a folder of predictions against a folder of ground truth with FLARE21's DSC and NSD.

Cases are matched by FLARE21 case name (``train_000_0000.nii.gz`` and ``train_000.nii.gz``
are the same case). A missing prediction is reported and scored 0 for every organ, as the
challenge did; an extra prediction (no ground truth) is reported and not scored.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from flareseg.errors import FlareSegError, first_few
from flareseg.labels import ORGANS
from flareseg.metrics import organ_scores
from flareseg.volume import (
    GRID_TOLERANCE_MM,
    VolumeGeometry,
    case_id,
    find_cases,
    from_canonical,
    grid_offset_mm,
    read_labels,
    to_canonical,
)
from flareseg.workers import cancelled_futures_quiet, pool_worker_signals, stop_signals_blocked

log = logging.getLogger(__name__)

#: How far (mm) a prediction's voxel centres may lie from its ground truth's (float32 header rounding); public
#: since the first release, now the volume module's grid tolerance.
AFFINE_TOLERANCE_MM = GRID_TOLERANCE_MM


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
    """Score one prediction; spacing comes from the ground truth header.

    A prediction on the ground truth's grid stored in another voxel order (LPS where the ground truth is RAS,
    permuted axes: what SimpleITK or a RAS-canonical pipeline writes) is brought onto the ground truth's voxels
    first; any other grid is refused, saying how far its voxels lie.
    """
    name = case_id(gt_path)
    gt, gt_geom = read_labels(gt_path)
    pred, pred_geom = read_labels(pred_path)
    apart = grid_offset_mm(gt_geom.shape, gt_geom.affine, pred_geom.shape, pred_geom.affine)
    if apart is None and sorted(pred.shape) == sorted(gt.shape):  # the same size, but rotated onto other axes
        raise FlareSegError(
            f"{pred_path}: prediction of shape {pred.shape} with voxel axes {''.join(pred_geom.axcodes)}, its ground "
            f"truth {gt.shape} with {''.join(gt_geom.axcodes)} ({gt_path}): another grid, not the same grid stored "
            "in another voxel order; predict on the ground truth's own grid"
        )
    if apart is None:
        raise FlareSegError(
            f"{pred_path}: prediction of shape {pred.shape}, its ground truth {gt.shape} ({gt_path}), in any voxel "
            "order; predict on the ground truth's own grid"
        )
    if not apart <= GRID_TOLERANCE_MM:  # NaN too
        raise FlareSegError(
            f"{pred_path}: prediction voxels lie up to {apart:.3g} mm from its ground truth's ({gt_path}): another "
            "grid (shift, spacing or rotation), not the same grid stored in another voxel order"
        )
    if not np.array_equal(pred_geom.to_canonical, gt_geom.to_canonical):
        pred = np.ascontiguousarray(from_canonical(to_canonical(pred, pred_geom), gt_geom))
    _say_spacing_disagreement(gt_path, gt_geom)
    return CaseResult(name, organ_scores(gt, pred, gt_geom.spacing, tolerance_mm=tolerance_mm))


def _say_spacing_disagreement(path: Path, geometry: VolumeGeometry) -> None:
    """Warn where the header's pixdim (the spacing NSD is measured with) and its affine's voxel sizes differ: an
    sform written without pixdim (1, 1, 1) would measure surfaces in the wrong millimetres without a word."""
    pixdim = np.asarray(geometry.spacing, dtype=np.float64)
    sizes = nib.affines.voxel_sizes(np.asarray(geometry.affine, dtype=np.float64))
    if not np.allclose(pixdim, sizes, rtol=1e-4, atol=1e-5):
        log.warning(
            "%s: pixdim gives voxels of %s mm, its affine %s mm; NSD is measured with pixdim's, as the header's "
            "spacing",
            path, " x ".join(f"{v:.4g}" for v in pixdim), " x ".join(f"{v:.4g}" for v in sizes),
        )  # fmt: skip


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
    if not set(preds) & set(gts):  # files named for other cases: every case would score 0, and exit 0
        raise FlareSegError(
            f"{pred_dir}: no prediction is named for a ground truth case in {gt_dir} "
            f"(predictions: {first_few(sorted(preds))}; ground truth: {first_few(sorted(gts))})"
        )
    ev = Evaluation(tolerance_mm=tolerance_mm)
    ev.missing = sorted(set(gts) - set(preds))
    ev.extra = sorted(set(preds) - set(gts))
    jobs = [(gts[c], preds[c], tolerance_mm) for c in sorted(set(gts) & set(preds))]
    # On a terminal only (None: tqdm asks), and closed on an error too, so that a log or an error line does not
    # follow a carriage return.
    with tqdm(total=len(jobs), desc="evaluating", unit="case", disable=None if progress else True) as bar:
        results: dict[str, CaseResult] = {}
        if workers > 1 and len(jobs) > 1:
            level = (logging.getLogger("flareseg").getEffectiveLevel(),)  # for workers started without our logging
            with ProcessPoolExecutor(max_workers=workers, initializer=pool_worker_signals, initargs=level) as pool:
                try:
                    with stop_signals_blocked():  # the workers are forked at the first submission
                        scored = pool.map(_evaluate_pair, jobs)
                    for res in scored:
                        results[res.case] = res
                        bar.update()
                except BrokenProcessPool:  # a worker killed from outside (the out-of-memory killer, say)
                    raise FlareSegError(
                        "a scoring process ended abruptly (out of memory?); --workers 1 scores one case at a time"
                    ) from None
                except BaseException:  # Ctrl-C, SIGTERM or a case's error: the cases not started are not started
                    # A second Ctrl-C must not break off the wait for the running cases (the pool then hangs): it is
                    # held back, and raised once the workers are done.
                    with stop_signals_blocked(), cancelled_futures_quiet():
                        pool.shutdown(wait=True, cancel_futures=True)
                    raise
        else:
            for job in jobs:
                res = _evaluate_pair(job)
                results[res.case] = res
                bar.update()
    for c in ev.missing:
        results[c] = CaseResult(c, {o: (0.0, 0.0) for o in ORGANS}, status="missing")
    ev.results = [results[c] for c in sorted(results)]
    return ev
