"""The paper's deep-supervision loss (Table 3): weighted cross-entropy on every output."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from flareseg.errors import FlareSegError


@dataclass(frozen=True)
class LossWeights:
    """Cross-entropy weights; aux levels run from 1 (full resolution) to 4 (deepest)."""

    final: float = 1.0
    aux: tuple[float, float, float, float] = (0.8, 0.7, 0.6, 0.5)

    def __post_init__(self) -> None:
        if len(self.aux) != 4:
            raise FlareSegError(f"LossWeights.aux needs 4 weights (levels 1-4), got {len(self.aux)}")
        weights = (self.final, *self.aux)
        # not (w >= 0) rather than w < 0: NaN fails it too.
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
            raise FlareSegError(
                f"loss weights must be finite, non-negative and not all 0, got {self.final}, {self.aux}"
            )

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def deep_supervision_loss(
    logits: Tensor, aux: list[Tensor], target: Tensor, weights: LossWeights = LossWeights()
) -> Tensor:
    """``weights.final * CE(logits) + sum_i weights.aux[i] * CE(aux[i])``; target is (N, H, W) int64."""
    if len(aux) != len(weights.aux):
        raise FlareSegError(f"expected {len(weights.aux)} auxiliary outputs, got {len(aux)}")
    loss = weights.final * F.cross_entropy(logits, target)
    for w, a in zip(weights.aux, aux, strict=True):
        loss = loss + w * F.cross_entropy(a, target)
    return loss
