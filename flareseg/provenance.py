"""Which model made a label map: the model file's SHA-256, carried by every output and a run's timings.

A model is often replaced under the same file name (``best.pt`` retrained, an engine
rebuilt), so a path says little a month later. The NIfTI header's 80-byte ``descrip``
holds flareseg's version, the digest's first 16 hex digits and the file's name; a DICOM
SEG's algorithm identification holds the whole digest; ``timings.json`` holds the digest
and the file's size.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flareseg import __version__

#: What the NIfTI header says of a label map made without a model file (any callable as a runner).
PLAIN_DESCRIPTION = "flareseg label map"
#: The NIfTI-1/2 ``descrip`` field: 80 bytes, the last one the terminating zero.
DESCRIP_BYTES = 79


@dataclass(frozen=True)
class ModelStamp:
    """A model file's identity: its name, size and SHA-256 (hex)."""

    name: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> ModelStamp:
        """Hash the file (about 2 GB/s on one core; hashlib releases the GIL, so other threads run meanwhile)."""
        from flareseg.checkpoint import file_sha256

        path = Path(path)
        return cls(name=path.name, bytes=path.stat().st_size, sha256=file_sha256(path))

    def nifti_description(self) -> str:
        """The ``descrip`` text, at most 79 ASCII bytes: the name is shortened to fit, never the digest."""
        head = f"flareseg {__version__} sha256:{self.sha256[:16]} "
        name = self.name.encode("ascii", "replace").decode("ascii")
        room = DESCRIP_BYTES - len(head)
        return head + (name if len(name) <= room else name[: room - 3] + "...")

    def dicom_parameters(self) -> dict[str, str]:
        """The algorithm parameters of a DICOM SEG's segments (stored as ``name=value,...``: the file name loses
        any ``,`` and ``=``, which readers would split it at)."""
        return {"model": self.name.replace(",", "_").replace("=", "_"), "model_sha256": self.sha256}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["DESCRIP_BYTES", "PLAIN_DESCRIPTION", "ModelStamp"]
