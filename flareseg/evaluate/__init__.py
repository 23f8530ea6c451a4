"""FLARE21 evaluation: predictions scored against ground truth with the challenge's DSC and NSD.

:mod:`~flareseg.evaluate.scoring` matches and scores the cases, :mod:`~flareseg.evaluate.tables` turns an
evaluation into the per-case CSV and the summary, :mod:`~flareseg.evaluate.cli` is ``flare-eval``.
"""

from collections.abc import Sequence

from flareseg.evaluate.scoring import AFFINE_TOLERANCE_MM, CaseResult, Evaluation, evaluate_case, evaluate_folders
from flareseg.evaluate.tables import csv_text, summary_table


def main(argv: Sequence[str] | None = None) -> int:
    """The flare-eval command, also here: installs made when this was one module run ``flareseg.evaluate:main``."""
    from flareseg.evaluate.cli import main as command

    return command(argv)


__all__ = [
    "AFFINE_TOLERANCE_MM",
    "CaseResult",
    "Evaluation",
    "csv_text",
    "evaluate_case",
    "evaluate_folders",
    "main",
    "summary_table",
]
