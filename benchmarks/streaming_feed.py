"""Feeding ``StreamingPostprocessor`` as ``flare-infer --overlap-postprocess`` does: batch by batch, then finish()."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from flareseg.postprocess import StreamingPostprocessor


def stream_postprocess(
    labels: np.ndarray, *, batch: int = 8, in_place: bool = False, clock: Callable[[], float] = time.perf_counter
) -> tuple[np.ndarray, float]:
    """The post-processed map, and the ``clock`` seconds of ``finish()`` alone: what is left after inference.

    ``batch`` 8 is flare-infer's default CUDA batch.
    """
    streaming = StreamingPostprocessor(labels.shape)
    for stop in range(batch, labels.shape[0] + batch, batch):
        streaming.add(labels, min(stop, labels.shape[0]))
    t = clock()
    out = streaming.finish(labels, in_place=in_place)
    return out, clock() - t
