"""The FLARE21 label map."""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

#: Label value -> organ name (FLARE21 convention; both kidneys share label 2).
LABELS: Final[Mapping[int, str]] = MappingProxyType(
    {0: "background", 1: "liver", 2: "kidneys", 3: "spleen", 4: "pancreas"}
)
NUM_CLASSES: Final[int] = len(LABELS)
#: The organs scored by the challenge, in label order.
ORGANS: Final[tuple[int, ...]] = (1, 2, 3, 4)
#: How many 3D connected components post-processing keeps per organ.
COMPONENTS_KEPT: Final[Mapping[int, int]] = MappingProxyType({1: 1, 2: 2, 3: 1, 4: 1})
