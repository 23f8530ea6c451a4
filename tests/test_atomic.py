"""Atomic outputs: all or nothing, through links, never over folders, pipes or devices."""

from __future__ import annotations

import os
import re
import signal
import stat
from pathlib import Path

import pytest
from conftest import ctrl_c_after_the_first_rename

from flareseg.atomic import (
    _umask,
    atomic_output,
    atomic_outputs,
    check_writable,
    check_writable_folder,
    write_text_atomic,
)
from flareseg.errors import FlareSegError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("stopped mid-write")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


def test_ctrl_c_between_the_renames_of_a_set_waits_for_the_last_one(tmp_path, monkeypatch):
    for name in ("model.onnx", "model.onnx.json"):
        (tmp_path / name).write_text("old")
    renamed = ctrl_c_after_the_first_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt), atomic_outputs() as outputs:
        for name in ("model.onnx", "model.onnx.json"):
            with outputs.writing(tmp_path / name) as tmp:
                tmp.write_text("new")
    assert renamed == ["model.onnx", "model.onnx.json"]  # the interrupt came after the set was whole
    assert [(tmp_path / n).read_text() for n in ("model.onnx", "model.onnx.json")] == ["new", "new"]


def test_a_removal_goes_with_the_renames_and_a_failed_set_removes_nothing(tmp_path, monkeypatch):
    (tmp_path / "old_fp16.onnx").write_text("old")
    with pytest.raises(RuntimeError), atomic_outputs() as outputs:
        outputs.remove(tmp_path / "old_fp16.onnx")
        with outputs.writing(tmp_path / "model.onnx") as tmp:
            tmp.write_text("new")
        raise RuntimeError("no space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old_fp16.onnx"]  # the earlier set stays whole
    real_replace = os.replace

    def replace(src, dst):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C at the rename: held back until the removal is done too
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), atomic_outputs() as outputs:
        outputs.remove(tmp_path / "old_fp16.onnx")
        outputs.remove(tmp_path / "never_there.onnx")  # gone already: nothing to do
        with outputs.writing(tmp_path / "model.onnx") as tmp:
            tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_link_is_written_through_and_stays_a_link(tmp_path):
    target = tmp_path / "data" / "results.csv"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "results.csv"
    link.symlink_to(target)
    write_text_atomic("new", link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.csv"]


def test_a_path_whose_dot_dot_follows_a_link_is_written_where_the_kernel_puts_it(tmp_path, monkeypatch):
    # "link/.." is the link target's parent, where tempfile took it as text for the temporary file (abspath).
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "other" / "out").mkdir()  # there, and not beside the link
    (tmp_path / "link").symlink_to(tmp_path / "other" / "sub")
    monkeypatch.chdir(tmp_path)
    out = Path("link") / ".." / "out" / "r.csv"
    check_writable_folder(out.parent)
    write_text_atomic("new", out)
    assert (tmp_path / "other" / "out" / "r.csv").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "other" / "out").iterdir()) == ["r.csv"]


def test_a_link_to_a_file_of_another_kind_is_refused_before_any_work_and_at_the_write(tmp_path):
    label_map = tmp_path / "case.nii.gz"
    label_map.write_bytes(b"an input")
    link = tmp_path / "results.csv"
    link.symlink_to(label_map)
    for write in (check_writable, lambda p: write_text_atomic("case,dsc", p)):
        with pytest.raises(FlareSegError, match=r"results.csv: a link to .*case.nii.gz, a file of another kind"):
            write(link)
    assert label_map.read_bytes() == b"an input"


@pytest.mark.parametrize(
    ("target", "link", "refused"),
    [
        ("archive.tar.gz", "t.nii.gz", True),  # both end in .gz: a different kind all the same
        ("old.nii", "t.nii.gz", True),
        ("scan.v2.nii.gz", "t.nii.gz", False),  # a dot in the name is not part of the kind
        ("OLD.NII.GZ", "t.nii.gz", False),
    ],
)
def test_a_files_kind_is_its_whole_compressed_suffix(tmp_path, target, link, refused):
    (tmp_path / target).write_bytes(b"kept")
    (tmp_path / link).symlink_to(tmp_path / target)
    if refused:
        with pytest.raises(FlareSegError, match="a file of another kind"):
            write_text_atomic("new", tmp_path / link)
        assert (tmp_path / target).read_bytes() == b"kept"
    else:
        write_text_atomic("new", tmp_path / link)
        assert (tmp_path / target).read_text() == "new"


def test_a_link_to_nothing_is_refused(tmp_path):
    link = tmp_path / "r.csv"
    link.symlink_to(tmp_path / "gone" / "r.csv")
    with pytest.raises(FlareSegError, match=r"r.csv: a link to .*gone/r.csv, which does not exist"):
        write_text_atomic("new", link)
    assert not (tmp_path / "gone").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_pipes_and_folders_are_not_replaced(tmp_path):
    fifo = tmp_path / "f.csv"
    os.mkfifo(fifo)
    with pytest.raises(FlareSegError, match=r"f\.csv: not a regular file"):
        write_text_atomic("x", fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    folder = tmp_path / "d.csv"
    folder.mkdir()
    with pytest.raises(FlareSegError, match=r"d\.csv: is a folder, not a file"):
        write_text_atomic("x", folder)
    assert folder.is_dir() and not any(folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "f.csv"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder no file can be made in")
def test_a_folder_that_refuses_new_files_is_found_before_any_work(tmp_path):
    # As root, os.access says /proc is writable; only trying to create a file tells the truth.
    with pytest.raises(FlareSegError, match=r"^/proc/t\.json: cannot (write|create files) in /proc"):
        check_writable(Path("/proc/t.json"))
    with pytest.raises(FlareSegError, match=r"^/proc: cannot (write|create files) in /proc"):
        check_writable_folder(Path("/proc"))
    check_writable(tmp_path / "new" / "t.json")
    check_writable_folder(tmp_path)
    assert not any(tmp_path.iterdir())  # the probes leave nothing behind


def test_a_folder_where_files_can_be_made_but_not_removed_is_one_line(tmp_path, monkeypatch):
    import errno

    def refuse(path):  # a test double for an append-only folder (chattr +a, some network shares)
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(FlareSegError, match=r"t\.json: .* lets files be created but not removed \(Operation not"):
        check_writable(tmp_path / "t.json")


def test_a_set_is_renamed_into_place_only_when_every_member_is_written(tmp_path):
    a, b = tmp_path / "m.onnx", tmp_path / "m.onnx.json"
    a.write_text("old model")
    b.write_text("old sidecar")
    with pytest.raises(FlareSegError, match=rf"^{re.escape(str(b))}: cannot write \(No space left on device\)$"):
        with atomic_outputs() as outputs:
            with outputs.writing(a) as tmp:
                tmp.write_text("new model")
            with outputs.writing(b):
                raise OSError(28, "No space left on device")
    assert (a.read_text(), b.read_text()) == ("old model", "old sidecar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]

    with atomic_outputs() as outputs:
        for path, text in ((a, "new model"), (b, "new sidecar")):
            with outputs.writing(path) as tmp:
                tmp.write_text(text)
            assert path.read_text().startswith("old")  # nothing replaced before the set is complete
    assert (a.read_text(), b.read_text()) == ("new model", "new sidecar")
    assert oct(a.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


@pytest.mark.parametrize("length", [234, 255])
def test_a_name_as_long_as_the_file_system_allows_is_written(tmp_path, length):
    # The temporary name once added 22 characters to the target's: names of 234 and more failed.
    target = tmp_path / ("é" * 10 + "c" * (length - 20 - 7) + ".nii.gz")
    assert len(target.name.encode()) == length
    with atomic_output(target, keep_suffix=".nii.gz") as tmp:  # as label maps are written: nibabel reads the suffix
        assert tmp.name.endswith(".nii.gz") and len(tmp.name.encode()) <= 255
        tmp.write_text("labels")
    assert target.read_text() == "labels" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_name_that_is_not_utf8_is_written_short_or_long(tmp_path):
    # Linux names are bytes: Python keeps the undecodable ones as surrogate escapes.
    for raw in (b"caf\xe9.nii.gz", b"caf\xe9" * 60 + b".nii.gz"):
        target = tmp_path / os.fsdecode(raw)
        with atomic_output(target, keep_suffix=".nii.gz") as tmp:
            tmp.write_text("labels")
        assert target.read_text() == "labels"
    assert sorted(os.fsencode(p.name) for p in tmp_path.iterdir()) == sorted(
        [b"caf\xe9.nii.gz", b"caf\xe9" * 60 + b".nii.gz"]
    )


def test_a_file_is_synced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    # Renamed before its data reach the disk, an output can read back empty after a power loss.
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text_atomic("labels", tmp_path / "out.txt")
    (synced,) = [path for kind, path in events if kind == "fsync"]
    assert events == [("fsync", synced), ("replace", synced)] and (tmp_path / "out.txt").read_text() == "labels"


def _aged(path: Path, seconds: float = 60.0) -> Path:
    """Set ``path``'s modification time ``seconds`` back, as a file a writer stopped touching a while ago."""
    then = os.stat(path, follow_symlinks=False).st_mtime - seconds
    os.utime(path, (then, then), follow_symlinks=False)
    return path


_WRITE_AND_HANG = """
import sys, time
from flareseg.atomic import atomic_output
with atomic_output(sys.argv[1], keep_suffix=".nii.gz") as tmp:
    tmp.write_bytes(b"half a label map")
    print(tmp, flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals and advisory locks")
def test_a_write_killed_outright_leaves_a_part_file_that_the_next_write_of_its_target_removes(tmp_path, caplog):
    import subprocess
    import sys

    target = tmp_path / "case_0001.nii.gz"
    writer = subprocess.Popen([sys.executable, "-c", _WRITE_AND_HANG, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        part = Path(writer.stdout.readline().strip())
        assert part.parent == tmp_path and part.name.endswith(".part.nii.gz")
        _aged(part)
        # Alive, the writer holds its file however old it looks: another write of the target leaves it alone.
        with atomic_output(target, keep_suffix=".nii.gz") as tmp:
            tmp.write_bytes(b"first")
        assert part.read_bytes() == b"half a label map"
        writer.kill()  # kill -9: nothing in the writer runs, its file stays behind
        writer.wait(timeout=30)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert part.exists()
    caplog.set_level("INFO", logger="flareseg.atomic")
    with atomic_output(target, keep_suffix=".nii.gz") as tmp:
        tmp.write_bytes(b"second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_0001.nii.gz"]
    assert target.read_bytes() == b"second"
    assert [r.getMessage() for r in caplog.records] == [f"removed {part}, a partial file left by an interrupted write"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes and advisory locks")
def test_only_an_old_unheld_file_named_as_the_targets_temporary_is_removed(tmp_path):
    import fcntl

    target = tmp_path / "case_0001.nii.gz"
    ours = ".case_0001.nii.gz.{}.part.nii.gz"
    stale = tmp_path / ours.format("k3x_9q0a")
    stale.write_bytes(b"left by a killed run")
    _aged(stale)
    kept = {
        # Too young: its writer may be between creating and locking it.
        "fresh": tmp_path / ours.format("fresh000"),
        # Held: a live writer's, in this process as much as in another.
        "held": tmp_path / ours.format("held0000"),
        # Another target's, another kind's, not mkstemp's name: not this write's business.
        "other target": tmp_path / ".case_0002.nii.gz.abcdefgh.part.nii.gz",
        "other kind": tmp_path / ".case_0001.nii.gz.abcdefgh.part",
        "short random": tmp_path / ours.format("abc"),
        "not hidden": tmp_path / ours.format("abcdefgh")[1:],
    }
    for path in kept.values():
        path.write_bytes(b"x")
        if path != kept["fresh"]:
            _aged(path)
    holder = os.open(kept["held"], os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    # Named like ours but not a file: a link (to an old unheld file, which must not be followed), a folder, a pipe.
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"someone's file")
    _aged(victim)
    kept["link"] = tmp_path / ours.format("link0000")
    kept["link"].symlink_to(victim)
    kept["folder"] = tmp_path / ours.format("folder00")
    kept["folder"].mkdir()
    kept["pipe"] = tmp_path / ours.format("pipe0000")
    os.mkfifo(kept["pipe"])
    for path in (kept["link"], kept["folder"], kept["pipe"]):
        _aged(path)
    try:
        with atomic_output(target, keep_suffix=".nii.gz") as tmp:
            tmp.write_bytes(b"labels")
    finally:
        os.close(holder)
    assert not stale.exists()
    assert {name for name, path in kept.items() if not os.path.lexists(path)} == set()
    assert victim.read_bytes() == b"someone's file" and target.read_bytes() == b"labels"


def test_a_temporary_file_is_locked_until_its_set_is_renamed_into_place(tmp_path):
    import fcntl

    def held(path: Path) -> bool:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    with atomic_outputs() as outputs:
        with outputs.writing(tmp_path / "model.onnx") as first:
            first.write_bytes(b"model")
        with outputs.writing(tmp_path / "model.json") as second:
            second.write_text("{}")
            assert held(first) and held(second)  # the first, written already, waits for the second
    assert not held(tmp_path / "model.onnx")  # renamed into place: the lock went with the set


def test_a_target_there_when_the_set_is_renamed_is_kept_and_the_set_dropped_whole(tmp_path):
    from flareseg.atomic import OutputExistsError

    target, sidecar = tmp_path / "case.nii.gz", tmp_path / "case.json"
    with pytest.raises(OutputExistsError, match=r"case.nii.gz: written meanwhile by another run; kept"):
        with atomic_outputs() as outputs:
            with outputs.writing(sidecar) as tmp:
                tmp.write_text("ours")
            with outputs.writing(target, keep_suffix=".nii.gz", replace=False) as tmp:
                tmp.write_bytes(b"ours")
                target.write_bytes(b"theirs")  # another run's result lands while ours is written
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]  # all or nothing: no sidecar either
    with atomic_output(tmp_path / "new.nii.gz", keep_suffix=".nii.gz", replace=False) as tmp:
        tmp.write_bytes(b"ours")  # nothing there: written as ever
    assert (tmp_path / "new.nii.gz").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz", "new.nii.gz"]


@pytest.mark.parametrize("step", ["exclusive rename", "hard link"])
def test_a_target_that_appears_at_the_last_moment_is_kept_by_the_step_that_renames(tmp_path, monkeypatch, step):
    # The file lands after every check, right before the step that puts ours in place: only a step that fails on
    # an existing name keeps it (a check followed by os.replace would replace it).
    from flareseg import atomic
    from flareseg.atomic import OutputExistsError

    target = tmp_path / "case.nii.gz"
    real = atomic._rename_exclusive if step == "exclusive rename" else os.link

    def landing_first(src, dst):
        Path(dst).write_bytes(b"theirs")
        return real(src, dst)

    if step == "exclusive rename":
        if atomic._renameat2() is None:
            pytest.skip("no renameat2 in this C library")
        monkeypatch.setattr(atomic, "_rename_exclusive", landing_first)
    else:
        monkeypatch.setattr(atomic, "_rename_exclusive", lambda src, dst: False)  # as without renameat2
        monkeypatch.setattr(atomic.os, "link", landing_first)
    with pytest.raises(OutputExistsError), atomic_output(target, replace=False) as tmp:
        tmp.write_bytes(b"ours")
    assert target.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]


def test_the_result_is_renamed_into_place_not_linked_where_the_kernel_can(tmp_path, monkeypatch):
    # A folder's watcher (inotify MOVED_TO, as for every other output) must see the result moved in, not created.
    from flareseg import atomic

    renameat2 = atomic._renameat2()
    if renameat2 is None or renameat2(-100, bytes(_touch(tmp_path / "a")), -100, bytes(tmp_path / "b"), 1) != 0:
        pytest.skip("no exclusive rename here (C library or file system)")

    def no_link(src, dst):
        raise AssertionError("linked, not renamed")

    monkeypatch.setattr(atomic.os, "link", no_link)
    with atomic_output(tmp_path / "case.nii.gz", replace=False) as tmp:
        tmp.write_bytes(b"ours")
        inode = tmp.stat().st_ino
    assert (tmp_path / "case.nii.gz").stat().st_ino == inode and (tmp_path / "case.nii.gz").read_bytes() == b"ours"


def test_without_exclusive_rename_or_hard_links_a_check_keeps_what_is_there(tmp_path, monkeypatch):
    from flareseg import atomic
    from flareseg.atomic import OutputExistsError

    monkeypatch.setattr(atomic, "_rename_exclusive", lambda src, dst: False)
    monkeypatch.setattr(atomic, "_link_exclusive", lambda src, dst: False)
    target = tmp_path / "case.nii.gz"
    with atomic_output(target, replace=False) as tmp:
        tmp.write_bytes(b"ours")
    assert target.read_bytes() == b"ours"  # nothing there: renamed in by the fallback
    real_lexists = os.path.lexists
    looks: list[str] = []

    def lexists(path):  # the set's own check passes; the file lands before the fallback's check
        looks.append(str(path))
        if len(looks) == 2:
            Path(path).write_bytes(b"theirs")
        return real_lexists(path)

    target.unlink()
    monkeypatch.setattr(atomic.os.path, "lexists", lexists)
    with pytest.raises(OutputExistsError), atomic_output(target, replace=False) as tmp:
        tmp.write_bytes(b"ours")
    assert target.read_bytes() == b"theirs" and looks == [str(target)] * 2


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def test_a_short_write_on_a_full_disk_says_so(tmp_path, monkeypatch):
    # numpy's tofile (the training cache's np.save) raises a bare "N requested and M written", with no errno: the
    # line named the file but not the full disk.
    import types

    import numpy as np

    from flareseg import atomic

    def short_write(path: Path) -> None:
        with atomic.atomic_output(path, keep_suffix=".npy") as tmp:  # as the cache writes (np.save adds .npy)
            np.save(tmp, np.zeros(4))
            raise OSError("36864 requested and 16256 written")  # what tofile raised on the full disk

    with pytest.raises(FlareSegError, match=r"x\.npy: cannot write \(36864 requested and 16256 written\)$") as room:
        short_write(tmp_path / "x.npy")  # room left: not blamed on the disk
    assert not isinstance(room.value, atomic.NoMoreWritesError)
    monkeypatch.setattr(atomic.os, "statvfs", lambda folder: types.SimpleNamespace(f_bavail=3, f_frsize=4096))
    with pytest.raises(
        atomic.NoMoreWritesError, match=r"x\.npy: cannot write \(No space left on device: 36864 requested"
    ):
        short_write(tmp_path / "x.npy")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "whole_file_system"),
    [("ENOSPC", True), ("EDQUOT", True), ("EROFS", True), ("EACCES", False), ("EIO", False)],
)
def test_a_file_system_that_takes_no_more_writes_is_told_from_a_failed_write(tmp_path, code, whole_file_system):
    # A folder run stops writing to a file system that is full, over quota or read-only (each case left would
    # fail alike); a write refused for its own reasons (a permission, a disk fault) fails its case alone.
    import errno

    from flareseg import atomic

    with pytest.raises(FlareSegError, match=rf"^{re.escape(str(tmp_path / 'x.nii'))}: cannot write \(") as failed:
        with atomic.atomic_output(tmp_path / "x.nii"):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
    assert isinstance(failed.value, atomic.NoMoreWritesError) == whole_file_system
    assert list(tmp_path.iterdir()) == []
