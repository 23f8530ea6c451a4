"""Which model made a label map: the model file's SHA-256, carried by every output and a run's timings.

A model is often replaced under the same file name (``best.pt`` retrained, an engine
rebuilt), so a path says little a month later. The NIfTI header's 80-byte ``descrip``
holds flareseg's version, the digest's first 16 hex digits and the file's name; a DICOM
SEG's algorithm identification holds the whole digest; ``timings.json`` holds the digest
and the file's size.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flareseg import __version__

#: What the NIfTI header says of a label map made without a model file (any callable as a runner).
PLAIN_DESCRIPTION = "flareseg label map"
#: The NIfTI-1/2 ``descrip`` field: 80 bytes, the last one the terminating zero.
DESCRIP_BYTES = 79

#: What tells one content of a file from another without reading it: device, inode, size, modification time
#: and change time (which a rewrite in place moves even where the modification time is put back).
FileIdentity = tuple[int, int, int, int, int]


def file_identity(path: str | os.PathLike[str]) -> FileIdentity:
    """The identity of the file at ``path`` now (a file replaced, or rewritten in place, has another one)."""
    return _identity(os.stat(path))


def _identity(st: os.stat_result) -> FileIdentity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class HashStopped(Exception):
    """A model's hash given up on request: the run is stopping, and must not wait for it."""


@dataclass(frozen=True)
class ModelStamp:
    """A model file's identity: its name, size and SHA-256 (hex)."""

    name: str
    bytes: int
    sha256: str

    @classmethod
    def read(cls, path: str | os.PathLike[str], stop: threading.Event | None = None) -> tuple[ModelStamp, FileIdentity]:
        """Hash the file, and say which file was hashed (the identity of the very descriptor read). About 2 GB/s
        on one core; hashlib releases the GIL, so other threads run meanwhile.

        ``stop``: once set, the hash is given up at the next MiB (:class:`HashStopped`).
        """
        path = Path(path)
        for _ in range(3):  # a file written while it is read is read again, once it holds still
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    if stop is not None and stop.is_set():
                        raise HashStopped(str(path))
                    digest.update(chunk)
                if _identity(os.fstat(f.fileno())) == _identity(st):
                    return cls(name=path.name, bytes=st.st_size, sha256=digest.hexdigest()), _identity(st)
        raise OSError(errno.EBUSY, "it kept changing while it was read")

    def nifti_description(self) -> str:
        """The ``descrip`` text, at most 79 ASCII bytes: the name is shortened to fit, never the digest."""
        head = f"flareseg {__version__} sha256:{self.sha256[:16]} "
        name = self._ascii_name
        room = DESCRIP_BYTES - len(head)
        return head + (name if len(name) <= room else name[: room - 3] + "...")

    def dicom_parameters(self) -> dict[str, str]:
        """The algorithm parameters of a DICOM SEG's segments (stored as ``name=value,...``: the file name loses
        any ``,`` and ``=``, which readers would split it at, and is ASCII, as in the NIfTI header)."""
        name = self._ascii_name  # the series may declare no character set
        return {"model": name.replace(",", "_").replace("=", "_"), "model_sha256": self.sha256}

    @property
    def _ascii_name(self) -> str:
        return self.name.encode("ascii", "replace").decode("ascii")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["DESCRIP_BYTES", "PLAIN_DESCRIPTION", "FileIdentity", "HashStopped", "ModelStamp", "file_identity"]
