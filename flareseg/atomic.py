"""Atomic file output: write a temporary sibling, flush it to disk, then rename over the target.

A reader (or a crash) never sees a half-written output, and a failed write leaves
nothing behind. A process killed outright (``kill -9``, the OOM killer, a power cut) leaves its
temporary file; the next write of the same target removes it (see :func:`_remove_stale`).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from flareseg.errors import FlareSegError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no leftover can be told from a live write; none is removed
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class OutputExistsError(FlareSegError):
    """A file that must not be replaced appeared at a target while its content was being made (another run
    wrote it meanwhile): the target is kept, this write is dropped."""


class NoMoreWritesError(FlareSegError):
    """The file system under an output takes no more writes: it is full, over quota, or read-only. Later writes
    there would fail alike, so a folder run stops writing there (see :func:`~flareseg.runtime.pipeline.run_cases`)."""


#: The errors that say a whole file system refuses writes, not this one file.
_NO_MORE_WRITES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, keep_suffix: str = "", replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    ``keep_suffix`` ends the temporary name (nibabel picks gzip from ``.nii.gz``).
    ``replace=False``: a file that appeared at ``path`` meanwhile is kept (:class:`OutputExistsError`).
    An operating-system error (no space left, no permission, a folder in the way) becomes
    a :class:`FlareSegError` naming ``path``.
    """
    with atomic_outputs() as outputs, outputs.writing(path, keep_suffix=keep_suffix, replace=replace) as tmp:
        yield tmp


_NAME_MAX = 255  # bytes in a file name on Linux, macOS and Windows file systems alike


def _cut(name: str, room: int) -> str:
    """``name`` within ``room`` bytes as the file system stores it; a UTF-8 name is never cut inside a character
    (a name that is not UTF-8, kept by Python as surrogate escapes, is cut by bytes)."""
    encoded = os.fsencode(name)
    if len(encoded) <= room:
        return name
    try:
        encoded.decode("utf-8")
    except UnicodeDecodeError:
        return os.fsdecode(encoded[:room])
    return encoded[:room].decode("utf-8", errors="ignore")


class AtomicOutputs:
    """Files that belong together (models and their sidecars), each written to a temporary sibling with
    :meth:`writing` and flushed to disk at once; all are renamed into place only when the set is complete, so a
    failure (no space left) leaves the earlier set whole, never new files beside old ones."""

    def __init__(self) -> None:
        self._written: list[tuple[Path, Path, bool]] = []  # (temporary, target, replace), each on disk already
        self._temps: list[Path] = []
        self._removed: list[Path] = []
        self._locks: list[int] = []  # descriptors holding each temporary file's lock until the set is renamed

    @contextmanager
    def writing(self, path: str | os.PathLike[str], *, keep_suffix: str = "", replace: bool = True) -> Iterator[Path]:
        """Yield the temporary path to write ``path``'s content to; errors name ``path``.

        ``replace=False``: a file at ``path`` when the set is renamed into place (one that appeared meanwhile)
        is kept, and the set fails with :class:`OutputExistsError`, none of it renamed into place.
        """
        target = _replaceable(Path(path))
        with _naming(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            suffix = f".part{keep_suffix}"
            # The temporary name holds the target's, cut where needed so that a legal name (255 bytes) stays legal.
            room = _NAME_MAX - len(os.fsencode(f"..{'x' * 8}{suffix}"))
            prefix = f".{_cut(target.name, room)}."
            _remove_stale(target.parent, prefix, suffix)
            # realpath: mkstemp takes "link/.." as text (abspath), where the kernel goes through the link.
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.realpath(target.parent))
            if _lock(fd):
                self._locks.append(fd)
            else:  # nothing to hold it by: closed now, as before (Windows cannot rename a file held open)
                os.close(fd)
            tmp = Path(name)
            self._temps.append(tmp)
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get ordinary permissions
        self._written.append((tmp, target, replace))

    def remove(self, path: str | os.PathLike[str]) -> None:
        """Remove ``path`` when the set is renamed into place, right after the renames: a member of an earlier
        set that this one does not replace (its fp16 model, say), which must not outlive the set it belonged to."""
        self._removed.append(Path(path))

    def _commit(self) -> None:
        from flareseg.workers import stop_signals_blocked

        # Ctrl-C or SIGTERM between two renames would leave the set half new, half old (a checkpoint beside an
        # older one, a model beside another's sidecar): they are held back until the last rename and removal.
        with stop_signals_blocked() if len(self._written) + len(self._removed) > 1 else nullcontext():
            kept = [target for _, target, replace in self._written if not replace and os.path.lexists(target)]
            if kept:  # before any rename: the set is all or nothing
                raise written_meanwhile(kept[0])
            for tmp, target, replace in self._written:
                with _naming(target):
                    if replace:
                        os.replace(tmp, target)
                    else:
                        _rename_no_replace(tmp, target)
            for gone in self._removed:
                with _naming(gone):
                    gone.unlink(missing_ok=True)

    def _discard(self) -> None:
        try:
            for tmp in self._temps:
                tmp.unlink(missing_ok=True)  # those renamed into place are no longer there
        finally:  # after the unlinks: a temporary file still there is never seen unlocked while its set is live
            for fd in self._locks:
                os.close(fd)
            self._locks.clear()


@contextmanager
def atomic_outputs() -> Iterator[AtomicOutputs]:
    """A set of :class:`AtomicOutputs`: renamed into place together when the block ends without an error."""
    outputs = AtomicOutputs()
    try:
        yield outputs
        outputs._commit()
    finally:
        outputs._discard()


def written_meanwhile(target: Path) -> OutputExistsError:
    """The error of a set dropped because another run wrote ``target`` meanwhile (kept)."""
    return OutputExistsError(f"{target}: written meanwhile by another run; kept, this one's dropped")


def _rename_no_replace(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target`` unless a file is there, in one step, where a check before ``os.replace`` would
    leave a moment for another run's file to appear and be replaced: an exclusive rename (Linux), else a hard link
    (which fails on an existing name; a folder's watcher then sees a file created, not moved in). A file system
    with neither gets that check, and that moment."""
    for exclusive in (_rename_exclusive, _link_exclusive):
        try:
            if exclusive(tmp, target):
                return
        except FileExistsError:
            raise written_meanwhile(target) from None
    if os.path.lexists(target):
        raise written_meanwhile(target)
    os.replace(tmp, target)


def _rename_exclusive(tmp: Path, target: Path) -> bool:
    """``renameat2(RENAME_NOREPLACE)``: a rename that fails on an existing name (FileExistsError), seen by a
    folder's watcher as every other output's rename; False where the kernel, C library or file system has none."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    import ctypes

    at_cwd, no_replace = -100, 1  # AT_FDCWD, RENAME_NOREPLACE (linux/fcntl.h, linux/fs.h)
    if renameat2(at_cwd, os.fsencode(tmp), at_cwd, os.fsencode(target), no_replace) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(target))
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # not on this file system
        return False
    raise OSError(err, os.strerror(err), str(target))


@functools.cache
def _renameat2() -> Any:
    """The C library's ``renameat2`` (glibc 2.28, musl 1.2.4), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _link_exclusive(tmp: Path, target: Path) -> bool:
    """A hard link to ``tmp`` at ``target`` (FileExistsError if a file is there), then ``tmp`` unlinked; False
    where the file system has no hard links (some network and FUSE file systems)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:  # EPERM, ENOTSUP, EMLINK: no hard link to be had here
        return False
    os.unlink(tmp)
    return True


# A temporary file younger than this is left alone even when unlocked: its writer may be between creating it and
# locking it (microseconds apart, unless that process was stopped there).
_STALE_AFTER_S = 5.0
#: The characters tempfile.mkstemp puts between prefix and suffix, and how many.
_MKSTEMP_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_MKSTEMP_LENGTH = 8


def _lock(fd: int) -> bool:
    """Hold an exclusive advisory lock on a temporary file for as long as its writer lives (say if it is held):
    the kernel drops it when the process ends, however it ends, which tells a leftover from a write in progress."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks (some network mounts): its temporary files are never swept
        return False
    return True


def _remove_stale(folder: Path, prefix: str, suffix: str) -> None:
    """Remove temporary files of the same target that no live process holds: what a process killed outright
    (``kill -9``, the OOM killer, a power cut) left while writing it. Anything in doubt is left in place."""
    if fcntl is None:
        return
    # Compared as strings, not by a pattern compiled per target: a service writing many names would fill re's cache.
    length = len(prefix) + _MKSTEMP_LENGTH + len(suffix)

    def ours(name: str) -> bool:
        return (
            len(name) == length
            and name.startswith(prefix)
            and name.endswith(suffix)
            and _MKSTEMP_CHARACTERS.issuperset(name[len(prefix) : len(prefix) + _MKSTEMP_LENGTH])
        )

    try:
        names = [e.name for e in os.scandir(folder) if ours(e.name)]
    except OSError:
        return  # not there yet, or not listable: the write itself will say what is wrong
    for name in names:
        path = folder / name
        if _unheld(path):
            log.info("removed %s, a partial file left by an interrupted write", path)


def _unheld(path: Path) -> bool:
    """Remove ``path`` if it is a regular file, not modified for a while, whose lock nobody holds; say if it was."""
    try:
        # O_NOFOLLOW: a link named like ours is not ours; O_NONBLOCK: nor is a pipe, which must not hang the open.
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime < _STALE_AFTER_S:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live writer: BlockingIOError
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An operating-system error becomes a FlareSegError naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise _cannot_write(path, exc) from exc


def check_writable(path: Path) -> None:
    """Refuse, before any work, a path whose folder could not be made or written: a file or a broken link
    on the way, no access, a read-only file system."""
    if path.is_symlink() and path.exists():  # the write replaces the link's target: check that one
        path = _replaceable(path)
    # The nearest thing on the way that is there at all: a broken link is there, but leads nowhere.
    there = next(p for p in (path.absolute(), *path.absolute().parents) if os.path.lexists(p))
    if there.is_symlink() and not there.exists():
        where = "" if there == path.absolute() else f" ({there})"  # the path itself: not said twice
        raise FlareSegError(f"{path}: a broken symbolic link is in the way{where}")
    folder = there if there != path.absolute() else next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir():
        raise FlareSegError(f"{path}: cannot create its folder, {folder} is a file")
    _probe(folder, path)


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first: what a write into it would make."""
    return list(itertools.takewhile(lambda p: not p.exists(), [folder, *folder.parents]))


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove ``folders`` in turn (deepest first) while each is empty: the first that holds anything (another
    run's files, say), or is gone, ends it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def check_writable_folder(folder: Path) -> None:
    """Refuse, before any work, an output folder that could not be made (see :func:`check_writable`), or that is
    there but cannot be written in."""
    if not folder.exists():
        check_writable(folder)
    else:
        _probe(folder, folder)


def _probe(folder: Path, path: Path) -> None:
    """Create and remove a file in ``folder``: permission bits do not tell everything (root passes ``os.access``
    on /proc, NFS squashes root, a quota or a full disk refuses new files)."""
    if not os.access(folder, os.W_OK | os.X_OK):  # also false on a read-only file system
        raise FlareSegError(f"{path}: cannot write in {folder} (permission denied or read-only)")
    try:
        fd, name = tempfile.mkstemp(prefix=".flareseg-probe.", dir=os.path.realpath(folder))  # as in writing()
    except OSError as exc:
        raise FlareSegError(f"{path}: cannot create files in {folder} ({exc.strerror or exc})") from exc
    os.close(fd)
    try:
        os.unlink(name)
    except OSError as exc:  # files can be made there but not removed (append-only, some network shares)
        raise FlareSegError(
            f"{path}: {folder} lets files be created but not removed ({exc.strerror or exc}); a probe file, "
            f"{name}, was left there"
        ) from exc


def _kind(path: Path) -> str:
    """A file's kind by its name: its suffix, with the one before where the last is a compression's
    (``.nii.gz`` and ``.tar.gz`` are different kinds)."""
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst")
    return "".join(suffixes[-2:] if compressed else suffixes[-1:])


def _replaceable(path: Path) -> Path:
    """The file the rename will replace: a link's target (the link stays), never a folder, pipe or device.

    Renaming over a link would cut it from its target, and over a pipe, a device or a
    terminal (``-o /dev/stdout``) would put a file in its place, which no reader sees.
    """
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.exists():
            raise FlareSegError(f"{path}: a link to {target}, which does not exist")
        if _kind(target) != _kind(path):  # `results.csv` -> a label map, say: never replaced
            raise FlareSegError(f"{path}: a link to {target}, a file of another kind; refusing to write through it")
        path = target
    if path.is_dir():
        raise FlareSegError(f"{path}: is a folder, not a file")
    if path.exists() and not path.is_file():
        raise FlareSegError(f"{path}: not a regular file (a pipe, device or socket); give a file path")
    return path


def _cannot_write(path: Path, exc: OSError) -> FlareSegError:
    why = exc.strerror or str(exc)
    full = exc.errno in _NO_MORE_WRITES
    if exc.errno is None and _disk_full(path.parent):
        # numpy's tofile says only "N requested and M written", with no errno: the full disk is the likely cause
        why, full = f"{os.strerror(errno.ENOSPC)}: {why}", True
    if exc.filename is not None and Path(exc.filename) != path and not Path(exc.filename).name.startswith("."):
        why += f": {exc.filename}"  # the folder in the way, say; our own temporary name would only confuse
    return (NoMoreWritesError if full else FlareSegError)(f"{path}: cannot write ({why})")


def _disk_full(folder: Path) -> bool:
    """Whether ``folder``'s file system has (next to) no room left: under 1 MiB free, or nothing to a user."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # gone, or Windows: nothing to add
        return False
    return st.f_bavail * st.f_frsize < 2**20


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, briefly, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
