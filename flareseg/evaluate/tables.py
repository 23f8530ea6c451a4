"""An evaluation as tables: the per-case CSV and the per-organ summary (mean ± std, like the paper's Table 4)."""

from __future__ import annotations

import csv
import io
import statistics

from flareseg.evaluate.scoring import Evaluation
from flareseg.labels import LABELS, ORGANS


def tolerance_text(mm: float) -> str:
    """The tolerance as scored: the shortest text that reads back as the same float (``1`` for 1.0, never -0)."""
    text = repr(float(mm) + 0.0)  # + 0.0 turns -0.0 into 0.0
    return text.removesuffix(".0")


def csv_text(ev: Evaluation) -> str:
    """One row per case: status, DSC and NSD for each organ, and the NSD's tolerance."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    organs = [f"{LABELS[o]}_{m}" for o in ORGANS for m in ("dsc", "nsd")]
    writer.writerow(["case", "status", *organs, "nsd_tolerance_mm"])
    for r in ev.results:
        scores = [f"{r.scores[o][i]:.6f}" for o in ORGANS for i in (0, 1)]
        writer.writerow([r.case, r.status, *scores, tolerance_text(ev.tolerance_mm)])
    return buf.getvalue()


def summary_table(ev: Evaluation) -> str:
    """Mean ± std per organ in percent, like the paper's Table 4."""

    def cell(values: list[float]) -> str:
        if not values:
            return "n/a"
        sd = statistics.pstdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.fmean(values):6.2f} ± {100 * sd:5.2f}"

    nsd_head = f"NSD (%) @ {tolerance_text(ev.tolerance_mm)} mm"
    w = max(15, len(nsd_head))  # a long tolerance widens its column rather than pushing the table out of line
    lines = [f"| organ    | {'DSC (%)':15s} | {nsd_head:{w}s} |", f"|----------|{'-' * 17}|{'-' * (w + 2)}|"]
    for organ in ORGANS:
        dsc, nsd = cell(ev.organ_values(organ, 0)), cell(ev.organ_values(organ, 1))
        lines.append(f"| {LABELS[organ]:8s} | {dsc:15s} | {nsd:{w}s} |")
    n_ok = sum(r.status == "ok" for r in ev.results)
    scored = f"{n_ok} case{'' if n_ok == 1 else 's'} scored"
    lines.append(f"\n{scored}, {len(ev.missing)} missing (scored 0), {len(ev.extra)} extra (not scored)")
    if ev.missing:
        lines.append("missing predictions: " + ", ".join(ev.missing))
    if ev.extra:
        lines.append("extra predictions without ground truth: " + ", ".join(ev.extra))
    return "\n".join(lines)
