"""The slice sizes the network takes; without torch, so that the commands check ``--size`` as they read it."""

from __future__ import annotations

import operator

from flareseg.errors import FlareSegError

#: Total down-sampling of the encoder: slice sizes must be multiples of this.
SIZE_MULTIPLE = 16


def check_slice_size(size: tuple[int, int]) -> tuple[int, int]:
    """``size`` as (height, width), positive multiples of :data:`SIZE_MULTIPLE`, or a one-line FlareSegError."""
    try:  # operator.index: integers only (numpy's too), never a float or a string
        h, w = (operator.index(v) for v in size)
    except (TypeError, ValueError):
        raise FlareSegError(f"slice size {size!r}: expected two integers, height and width") from None
    if h < SIZE_MULTIPLE or w < SIZE_MULTIPLE or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise FlareSegError(f"slice size {h}x{w} must be positive multiples of {SIZE_MULTIPLE}")
    return h, w
