"""The case pipeline: reading ahead, writing behind, activation overlapping the first read, -o DIR.

The overlap tests use test doubles that drive our own control flow: the model blocks
until the pipeline has started the next read (or the previous write), so a pipeline
that does not overlap its stages times out and fails, instead of merely running slower.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import save

from flareseg.atomic import NoMoreWritesError, OutputExistsError
from flareseg.checkpoint import ModelInfo, load_model
from flareseg.errors import FlareSegError
from flareseg.network import NetworkConfig
from flareseg.phantom import make_phantom
from flareseg.preprocess import NormalizationStats
from flareseg.provenance import PLAIN_DESCRIPTION, ModelStamp
from flareseg.runtime import pipeline, reading
from flareseg.runtime.cli import main as infer_main
from flareseg.runtime.pipeline import CaseJob, run_cases, segment_file, segment_folder
from flareseg.runtime.runners import FunctionRunner, open_runner
from flareseg.runtime.startup import Timeline
from flareseg.volume import read_ct, write_labels

WAIT_S = 20.0  # generous: the machine may be busy; a pipeline without overlap never sets the event at all


def _folder(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        save(make_phantom((48, 48, 6), (8.0, 8.0, 10.0), seed=20 + i).to_nifti()[0], folder / f"c{i}_0000.nii.gz")
        for i in range(n)
    ]


class _Recorder:
    """Events of the pipeline's threads, and a way to wait for one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.flags: dict[tuple[str, str], threading.Event] = {}

    def flag(self, kind: str, case: str) -> threading.Event:
        with self.lock:
            return self.flags.setdefault((kind, case), threading.Event())

    def record(self, kind: str, case: str) -> None:
        with self.lock:
            self.events.append((kind, case))
        self.flag(kind, case).set()


def test_reads_ahead_and_writes_behind_the_device(trained_checkpoint, tmp_path, monkeypatch):
    paths = _folder(tmp_path / "in", 3)
    rec = _Recorder()
    real_read, real_write = reading.read_case, pipeline.write_case
    current: list[str] = []

    def read_case(path, **kwargs):
        rec.record("read", Path(path).name.split("_")[0])
        return real_read(path, **kwargs)

    def write_case(labels, geometry, source, path, output_type="nifti", **kwargs):
        rec.record("write", Path(path).name.split(".")[0])
        return real_write(labels, geometry, source, path, output_type, **kwargs)

    monkeypatch.setattr(reading, "read_case", read_case)
    monkeypatch.setattr(pipeline, "write_case", write_case)
    _, info, _ = load_model(trained_checkpoint)
    seen: dict[str, tuple[bool, bool]] = {}

    def model(x: torch.Tensor) -> torch.Tensor:
        case = current[-1]
        i = int(case[1:])
        if case not in seen:  # first batch of this case: the neighbours' stages must run meanwhile
            ahead = rec.flag("read", f"c{i + 1}").wait(WAIT_S) if i + 1 < len(paths) else True
            behind = rec.flag("write", f"c{i - 1}").wait(WAIT_S) if i > 0 else True
            seen[case] = (ahead, behind)
        return torch.zeros((x.shape[0], 5, *x.shape[2:]))

    runner = FunctionRunner(model, info, input_channels=3)
    real_infer = pipeline.infer_volume

    def infer_volume(stored, *args, **kwargs):
        current.append(f"c{len(current)}")
        return real_infer(stored, *args, **kwargs)

    monkeypatch.setattr(pipeline, "infer_volume", infer_volume)
    results = segment_folder(runner, paths, tmp_path / "out", batch_size=8)
    assert [r.status for r in results] == ["ok"] * 3
    assert seen == {"c0": (True, True), "c1": (True, True), "c2": (True, True)}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"]


def test_activation_overlaps_the_first_read(trained_checkpoint, tmp_path, monkeypatch):
    (ct,) = _folder(tmp_path / "in", 1)
    started = threading.Event()
    real_read = reading.read_case

    def read_case(path, **kwargs):
        started.set()
        return real_read(path, **kwargs)

    monkeypatch.setattr(reading, "read_case", read_case)
    runner = open_runner(trained_checkpoint)
    real_activate = runner._activate
    overlapped: list[bool] = []

    def activate() -> None:
        overlapped.append(started.wait(WAIT_S))  # the read is already under way while the model loads
        real_activate()

    monkeypatch.setattr(runner, "_activate", activate)
    try:
        timing = segment_file(runner, ct, tmp_path / "o.nii.gz", batch_size=4)
    finally:
        runner.deactivate()
    assert overlapped == [True] and timing.status == "ok" and timing.slices == 6


def test_a_folder_with_nothing_to_run_never_loads_the_model(trained_checkpoint, tmp_path, monkeypatch):
    inputs = _folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    for ct, name in zip(inputs, ("c0.nii.gz", "c1.nii.gz"), strict=True):  # finished results, on their CTs' grids
        vol = read_ct(ct)
        write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, out / name)
    runner = open_runner(trained_checkpoint)
    monkeypatch.setattr(runner, "_activate", lambda: pytest.fail("the model was loaded for no case"))
    results = segment_folder(runner, inputs, out, batch_size=4)
    assert [r.status for r in results] == ["skipped", "skipped"] and not runner.is_active


def test_a_case_read_ahead_counts_its_read_not_its_wait_for_the_runner(trained_checkpoint, tmp_path, monkeypatch):
    # The read ends long before a slow activation does: the case's wall time is its own
    # in-process time (read, then inference to write), not the activation it waited for.
    (ct,) = _folder(tmp_path / "in", 1)
    runner = open_runner(trained_checkpoint)
    real_activate = runner._activate
    slow_s = 1.5

    def activate() -> None:
        time.sleep(slow_s)  # a model that takes long to load, as a CUDA context can
        real_activate()

    monkeypatch.setattr(runner, "_activate", activate)
    t0 = time.perf_counter()
    try:
        timing = segment_file(runner, ct, tmp_path / "o.nii.gz", batch_size=4)
    finally:
        runner.deactivate()
    elapsed = time.perf_counter() - t0
    assert elapsed > slow_s and timing.status == "ok"
    assert timing.read_s <= timing.wall_s < elapsed - slow_s + 0.2
    after_read = timing.preprocess_s + timing.infer_s + timing.postprocess_s + timing.write_s
    assert timing.wall_s >= timing.read_s + 0.5 * after_read


def test_pipelined_folder_gives_the_labels_of_one_case_at_a_time(trained_checkpoint, tmp_path):
    paths = _folder(tmp_path / "in", 3)
    with open_runner(trained_checkpoint) as runner:
        folder = segment_folder(runner, paths, tmp_path / "folder", batch_size=4)
        for p in paths:
            segment_file(runner, p, tmp_path / "single" / p.name.replace("_0000", ""), batch_size=4)
    assert [r.status for r in folder] == ["ok"] * 3
    for p in paths:
        name = p.name.replace("_0000", "")
        a = np.asarray(nib.load(tmp_path / "folder" / name).dataobj)
        b = np.asarray(nib.load(tmp_path / "single" / name).dataobj)
        assert a.dtype == np.uint8 and np.array_equal(a, b)
    assert any(np.any(np.asarray(nib.load(tmp_path / "folder" / p.name.replace("_0000", "")).dataobj)) for p in paths)


def test_a_failed_write_fails_its_case_only(trained_checkpoint, tmp_path, monkeypatch):
    paths = _folder(tmp_path / "in", 3)
    real_write = pipeline.write_case

    def write_case(labels, geometry, source, path, output_type="nifti", **kwargs):
        if Path(path).name.startswith("c1"):
            raise FlareSegError(f"{path}: disk full (simulated)")
        return real_write(labels, geometry, source, path, output_type, **kwargs)

    monkeypatch.setattr(pipeline, "write_case", write_case)
    with open_runner(trained_checkpoint) as runner:
        results = segment_folder(runner, paths, tmp_path / "out", batch_size=4)
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "disk full" in (results[1].error or "")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c0.nii.gz", "c2.nii.gz"]
    with open_runner(trained_checkpoint) as runner, pytest.raises(FlareSegError, match="disk full"):
        run_cases(runner, [CaseJob("c1", paths[1], tmp_path / "x" / "c1.nii.gz")], raise_errors=True)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_another_run_writes_meanwhile_is_kept_unless_overwrite(tmp_path, overwrite):
    # Two runs on one folder (a cron job overlapping the last one): each plans c1 as to do, and the other's
    # result lands while this one infers it. It used to be replaced, its provenance then wrong in the timings.
    paths = _folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    theirs = save(make_phantom((48, 48, 6), (8.0, 8.0, 10.0), seed=99).to_nifti()[1], tmp_path / "theirs.nii.gz")
    info = ModelInfo(
        network=NetworkConfig(base_width=4, in_channels=3),
        normalization=NormalizationStats(mean=-120.0, std=420.0),
        slice_size=(32, 32),
    )
    calls: list[int] = []
    landing = {"call": 1, "at": out / "c1.nii.gz"}  # the other run's result lands while this call infers

    def model(x: torch.Tensor) -> torch.Tensor:
        if len(calls) - 1 == landing["call"] and not landing["at"].exists():
            out.mkdir(exist_ok=True)
            landing["at"].write_bytes(theirs.read_bytes())
        return torch.zeros((x.shape[0], 5, *x.shape[2:]))

    real_infer = pipeline.infer_volume

    def infer_volume(stored, *args, **kwargs):
        calls.append(len(calls))
        return real_infer(stored, *args, **kwargs)

    def kept_theirs(path: Path) -> bool:
        return np.array_equal(nib.load(path).get_fdata(), nib.load(theirs).get_fdata())

    runner = FunctionRunner(model, info, input_channels=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "infer_volume", infer_volume)
        results = segment_folder(runner, paths, out, batch_size=8, overwrite=overwrite)
        assert [r.status for r in results] == ["ok", "ok" if overwrite else "skipped", "ok"]
        assert sorted(p.name for p in out.iterdir()) == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"]  # no .part file
        assert kept_theirs(out / "c1.nii.gz") != overwrite  # else this run's labels: all background
        kept = f"{out / 'c1.nii.gz'}: written meanwhile by another run; kept, this one's dropped"
        assert results[1].error == (None if overwrite else kept)
        # One file, its output named: the same.
        landing.update(call=len(calls), at=out / "single.nii.gz")
        single = segment_file(runner, paths[0], out / "single.nii.gz", batch_size=8, overwrite=overwrite)
        assert single.status == ("ok" if overwrite else "skipped") and kept_theirs(out / "single.nii.gz") != overwrite


def test_any_error_fails_its_case_only_and_keeps_its_traceback(trained_checkpoint, tmp_path, monkeypatch, caplog):
    # An error nobody foresaw (here a RuntimeError on the device) must not end a folder run.
    paths = _folder(tmp_path / "in", 3)
    real_infer = pipeline._infer_stage

    def infer_stage(runner, read, timing, *args):
        if timing.case == "c1":
            raise RuntimeError("device fault (simulated)")
        return real_infer(runner, read, timing, *args)

    monkeypatch.setattr(pipeline, "_infer_stage", infer_stage)
    with open_runner(trained_checkpoint) as runner:
        results = segment_folder(runner, paths, tmp_path / "out", batch_size=4)
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert results[1].error == "RuntimeError: device fault (simulated)"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c0.nii.gz", "c2.nii.gz"]
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert str(paths[1]) in record.getMessage() and record.exc_info is not None  # its traceback is logged
    with open_runner(trained_checkpoint) as runner, pytest.raises(RuntimeError, match="device fault"):
        run_cases(runner, [CaseJob("c1", paths[1], tmp_path / "x" / "c1.nii.gz")], raise_errors=True)


def test_a_full_disk_stops_the_cases_left_for_it_untried(trained_checkpoint, tmp_path, monkeypatch, caplog):
    # Once the output's disk is full, each case left would be read and inferred (minutes on a CPU) only for its
    # write to fail alike; they are now failed untried, said once, and a later run (room made) does them.
    from flareseg import volume

    paths = _folder(tmp_path / "in", 5)
    out = tmp_path / "out"
    full = {"now": False}
    real_save, real_isal, real_read = volume.nib.save, volume._save_gzip_isal, reading.read_stage
    read: list[str] = []

    def failing(real):
        def save(img, path, *args):
            if Path(path).name.startswith(".c1.nii.gz."):
                full["now"] = True
            if full["now"]:
                Path(path).write_bytes(b"half a file")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(img, path, *args)

        return save

    def read_stage(path, *args):
        read.append(Path(path).name)
        return real_read(path, *args)

    monkeypatch.setattr(volume.nib, "save", failing(real_save))
    monkeypatch.setattr(volume, "_save_gzip_isal", failing(real_isal))
    monkeypatch.setattr(reading, "read_stage", read_stage)
    with open_runner(trained_checkpoint) as runner:
        results = segment_folder(runner, paths, out, batch_size=4)
    assert [r.status for r in results] == ["ok"] + ["failed"] * 4
    assert results[1].error == f"{out / 'c1.nii.gz'}: cannot write (No space left on device)"
    # c2 was on the device, or about to be, when c1's write failed: it is tried or not, as the threads ran.
    assert results[2].error in (
        f"{out / 'c2.nii.gz'}: cannot write (No space left on device)",
        f"not tried: {out} takes no more writes",
    )
    assert [r.error for r in results[3:]] == [f"not tried: {out} takes no more writes"] * 2
    assert [r.slices for r in results[3:]] == [0, 0] and read[:3] == [
        "c0_0000.nii.gz",
        "c1_0000.nii.gz",
        "c2_0000.nii.gz",
    ]
    assert len(read) <= 4  # c3's read may have begun before c1's write failed; c4's never does
    said = [r.getMessage() for r in caplog.records if r.name == pipeline.log.name and "not tried" in r.getMessage()]
    left = 2 if results[2].slices else 3
    assert said == [
        (
            f"{out}: no more writes there since case c1's failed; {left} cases left for it not tried "
            "(free room and run again: finished cases are kept)"
        )
    ]
    assert sorted(p.name for p in out.iterdir()) == ["c0.nii.gz"]  # no temporary file left
    # Room made: the run again does exactly the cases left.
    full["now"] = False
    monkeypatch.setattr(volume.nib, "save", real_save)
    monkeypatch.setattr(volume, "_save_gzip_isal", real_isal)
    with open_runner(trained_checkpoint) as runner:
        again = segment_folder(runner, paths, out, batch_size=4)
    assert [r.status for r in again] == ["skipped"] + ["ok"] * 4


def test_a_write_that_goes_through_after_a_full_disk_lets_the_cases_left_run(trained_checkpoint, tmp_path, monkeypatch):
    # Room made meanwhile (another job cleaned up): the case written after the failure lifts the stop, and the
    # cases left are judged only once that write is known (diff review: they were failed untried before it).
    from flareseg import volume

    paths = _folder(tmp_path / "in", 5)
    real_save, real_isal = volume.nib.save, volume._save_gzip_isal

    def failing(real):
        def save(img, path, *args):
            if Path(path).name.startswith(".c1.nii.gz."):
                time.sleep(0.3)  # still in flight when c2 is taken: c2 is tried
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(img, path, *args)

        return save

    monkeypatch.setattr(volume.nib, "save", failing(real_save))
    monkeypatch.setattr(volume, "_save_gzip_isal", failing(real_isal))
    with open_runner(trained_checkpoint) as runner:
        results = segment_folder(runner, paths, tmp_path / "out", batch_size=4)
    assert [r.status for r in results] == ["ok", "failed", "ok", "ok", "ok"]


def test_the_file_system_of_an_output_is_the_one_its_write_lands_on(tmp_path):
    # A link at an output is followed by the write (--overwrite): its target's file system is the one that fills.
    import tempfile

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the temporary folder's")
    (tmp_path / "out").mkdir()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as there:
        (tmp_path / "out" / "c0.nii.gz").symlink_to(Path(there) / "c0.nii.gz")
        assert pipeline._file_system(tmp_path / "out" / "c0.nii.gz")[0] == os.stat(there).st_dev
    assert pipeline._file_system(tmp_path / "out" / "not" / "made" / "yet.nii.gz")[0] == os.stat(tmp_path).st_dev
    assert pipeline._file_system(tmp_path / "out" / "c1.nii.gz")[1] is False  # a writable mount


def test_a_full_disk_stops_only_the_cases_written_there(trained_checkpoint, tmp_path, monkeypatch):
    # run_cases takes outputs anywhere (the API): a full file system stops the cases bound for it, not the others.
    paths = _folder(tmp_path / "in", 4)
    real_write = pipeline.write_case
    devices = {str(tmp_path / "a"): 1, str(tmp_path / "b"): 2}

    def write_case(labels, geometry, source, path, output_type="nifti", **kwargs):
        if Path(path).parent.name == "a":
            raise NoMoreWritesError(f"{path}: cannot write (No space left on device)")
        return real_write(labels, geometry, source, path, output_type, **kwargs)

    monkeypatch.setattr(pipeline, "write_case", write_case)
    monkeypatch.setattr(pipeline, "_file_system", lambda path: devices[str(Path(path).parent)])
    jobs = [CaseJob(f"c{i}", p, tmp_path / "ab"[i % 2] / f"c{i}.nii.gz") for i, p in enumerate(paths)]
    with open_runner(trained_checkpoint) as runner:
        results = run_cases(runner, jobs, batch_size=4)
    assert [r.status for r in results] == ["failed", "ok", "failed", "ok"]
    assert results[2].error in (
        f"{tmp_path / 'a' / 'c2.nii.gz'}: cannot write (No space left on device)",
        f"not tried: {tmp_path / 'a'} takes no more writes",
    )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["c1.nii.gz", "c3.nii.gz"]


def test_a_read_begun_for_a_case_left_untried_is_not_handed_to_the_next(trained_checkpoint, tmp_path, monkeypatch):
    # c2's read is begun while c0's write is still failing; c2 is then left untried (its disk is full), and c3 must
    # get its own voxels, not the read begun for c2 (mutJ: that hand-over was untested).
    paths = _folder(tmp_path / "in", 3)
    paths.append(
        save(make_phantom((48, 48, 9), (8.0, 8.0, 10.0), seed=40).to_nifti()[0], tmp_path / "in" / "c3.nii.gz")
    )
    real_write = pipeline.write_case
    devices = {str(tmp_path / "a"): 1, str(tmp_path / "b"): 2}

    def write_case(labels, geometry, source, path, output_type="nifti", **kwargs):
        if Path(path).parent.name == "a":
            time.sleep(0.5)  # still failing when c2's read is begun
            raise NoMoreWritesError(f"{path}: cannot write (No space left on device)")
        return real_write(labels, geometry, source, path, output_type, **kwargs)

    monkeypatch.setattr(pipeline, "write_case", write_case)
    monkeypatch.setattr(pipeline, "_file_system", lambda path: devices[str(Path(path).parent)])
    jobs = [CaseJob(f"c{i}", p, tmp_path / "ab"[i % 2] / f"c{i}.nii.gz") for i, p in enumerate(paths)]
    read: list[str] = []
    real_read = reading.read_stage
    monkeypatch.setattr(reading, "read_stage", lambda path, *a: read.append(Path(path).name) or real_read(path, *a))
    with open_runner(trained_checkpoint) as runner:
        results = run_cases(runner, jobs, batch_size=4)
        alone = run_cases(runner, [CaseJob("c3", paths[3], tmp_path / "alone" / "c3.nii.gz")], batch_size=4)
    assert [r.status for r in results] == ["failed", "ok", "failed", "ok"] and alone[0].status == "ok"
    assert results[2].error == f"not tried: {tmp_path / 'a'} takes no more writes" and "c2_0000.nii.gz" in read
    got, expected = nib.load(tmp_path / "b" / "c3.nii.gz"), nib.load(tmp_path / "alone" / "c3.nii.gz")
    assert got.shape == (48, 48, 9) and results[3].slices == 9
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(expected.dataobj))


def test_outputs_that_could_never_be_written_are_refused_before_any_work(trained_checkpoint, tmp_path, capsys):
    paths = _folder(tmp_path / "in", 2)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" / "pred.nii.gz"
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(paths[0]), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flare-infer: error: {out}: cannot create its folder, {tmp_path / 'afile'} is a file"]
    # In a folder run, a folder where a case's output goes fails that case alone, before its inference.
    (tmp_path / "out" / "c1.nii.gz").mkdir(parents=True)
    with open_runner(trained_checkpoint) as runner:
        results = segment_folder(runner, paths, tmp_path / "out", overwrite=True)
    assert [r.status for r in results] == ["ok", "failed"]
    assert results[1].error == f"{tmp_path / 'out' / 'c1.nii.gz'}: a folder is in the way of the output"
    assert results[1].slices == 0  # refused before any work


def test_file_input_with_an_output_folder_gets_the_flare21_name(trained_checkpoint, tmp_path, capsys, caplog):
    (ct,) = _folder(tmp_path / "in", 1)
    out = tmp_path / "pred"
    out.mkdir()
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["c0.nii.gz", "c0.timings.json"]
    assert "device: cpu" in caplog.text  # the chosen device is said (no GPU here: cpu)
    captured = capsys.readouterr()
    assert "1 segmented, 0 skipped (already done), 0 failed of 1" in captured.out
    # A folder name that does not exist yet works too: no NIfTI suffix means a folder.
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(tmp_path / "new"), "-q"]) == 0
    assert (tmp_path / "new" / "c0.nii.gz").is_file()


def test_folder_run_reports_cases_per_minute(trained_checkpoint, tmp_path, capsys):
    _folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-o", str(out), "-q"]) == 0
    summary = json.loads((out / "timings.json").read_text())["summary"]
    assert summary["segmented"] == 2 and summary["failed"] == 0 and summary["wall_s"] > 0
    assert summary["cases_per_minute"] == pytest.approx(60 * 2 / summary["wall_s"])
    assert f"{summary['cases_per_minute']:.1f} cases/min" in capsys.readouterr().out


def test_dicom_seg_output_needs_a_series(trained_checkpoint, tmp_path, capsys):
    (ct,) = _folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    argv = ["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(out), "--output-type", "dicom-seg", "-q"]
    assert infer_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a DICOM series as input" in err[0] and str(ct) in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_device_preprocessing_gives_the_same_labels(trained_checkpoint, tmp_path):
    (ct,) = _folder(tmp_path / "in", 1)
    base = ["--model", str(trained_checkpoint), "-i", str(ct), "-q"]
    assert infer_main([*base, "-o", str(tmp_path / "host.nii.gz")]) == 0
    assert infer_main([*base, "-o", str(tmp_path / "dev.nii.gz"), "--device-preprocess"]) == 0
    host = np.asarray(nib.load(tmp_path / "host.nii.gz").dataobj)
    dev = np.asarray(nib.load(tmp_path / "dev.nii.gz").dataobj)
    assert np.array_equal(host, dev)


def test_gpu_memory_budget_is_refused_where_it_cannot_apply(trained_checkpoint, tmp_path, capsys):
    (ct,) = _folder(tmp_path / "in", 1)
    base = ["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(tmp_path / "o.nii.gz"), "-q"]
    assert infer_main([*base, "--device", "cpu", "--gpu-memory", "1000"]) == 2
    assert "--gpu-memory chooses the batch of the PyTorch backend on a CUDA device" in capsys.readouterr().err
    for budget in ("nan", "inf", "0", "-5"):
        with pytest.raises(SystemExit) as stopped:
            infer_main([*base, "--gpu-memory", budget])
        assert stopped.value.code == 2 and "argument --gpu-memory" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_warm_up_runs_one_batch_of_zeros_before_the_first_case(trained_checkpoint, tmp_path):
    (ct,) = _folder(tmp_path / "in", 1)
    _, info, _ = load_model(trained_checkpoint)
    calls: list[tuple[int, float]] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], float(x.abs().max())))
        return torch.zeros((x.shape[0], 5, *x.shape[2:]))

    for warm_up, expected_first in ((False, (4, None)), (True, (4, 0.0))):
        calls.clear()
        runner = FunctionRunner(model, info, input_channels=3)
        timeline = Timeline()
        with runner:
            segment_file(runner, ct, tmp_path / f"o{warm_up}.nii.gz", batch_size=4, warm_up=warm_up, timeline=timeline)
        # 6 slices at batch 4: two batches of the case, after one batch of zeros when warming up.
        assert [n for n, _ in calls] == ([4] if warm_up else []) + [4, 2]
        if warm_up:
            assert calls[0] == expected_first
        marks = timeline.marks
        if marks:  # Linux
            expected = ["activated", "warmed_up"] if warm_up else ["activated"]
            assert list(marks) == [*expected, "first_read", "first_inferred", "all_written"]


def test_running_out_of_gpu_memory_is_a_one_line_error_naming_the_case(trained_checkpoint, tmp_path, caplog):
    cts = _folder(tmp_path / "in", 2)
    _, info, _ = load_model(trained_checkpoint)

    def model(x: torch.Tensor) -> torch.Tensor:  # what a CUDA allocation failure raises, without a GPU
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    with FunctionRunner(model, info, input_channels=3) as runner:
        with pytest.raises(
            FlareSegError,
            match=r"c0_0000.nii.gz: the GPU ran out of memory at batch size 4 \(CUDA out of "
            r"memory. Tried to allocate 2.00 GiB\); lower --batch-size",
        ):
            segment_file(runner, cts[0], tmp_path / "one.nii.gz", batch_size=4)
        caplog.clear()
        results = segment_folder(runner, cts, tmp_path / "out", batch_size=4)
    assert [r.status for r in results] == ["failed", "failed"]
    assert "Traceback" not in caplog.text and caplog.text.count("the GPU ran out of memory at batch size 4") == 2
    assert not (tmp_path / "one.nii.gz").exists() and not list((tmp_path / "out").glob("*.nii.gz"))


def test_warm_up_respects_the_runners_batch_range(trained_checkpoint):
    _, info, _ = load_model(trained_checkpoint)
    sizes: list[int] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return torch.zeros((x.shape[0], 5, *x.shape[2:]))

    with FunctionRunner(model, info, input_channels=3) as runner:
        runner.min_batch, runner.max_batch = 2, 3
        assert runner.warm_up(1) >= 0 and runner.warm_up(8) >= 0
    assert sizes == [2, 3]


def test_timings_hold_the_start_up_timeline(trained_checkpoint, tmp_path):
    (ct,) = _folder(tmp_path / "in", 1)
    out = tmp_path / "o.nii.gz"
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(out), "-q", "--warm-up"]) == 0
    data = json.loads((tmp_path / "o.timings.json").read_text())
    s = data["startup"]
    assert s["activate_s"] > 0 and set(s["activation_steps_s"]) == {"load_s", "to_device_s"}
    assert sum(s["activation_steps_s"].values()) <= s["activate_s"]
    case = data["cases"][0]
    assert 0 < case["first_labels_s"] <= case["infer_s"] + case["preprocess_s"]
    # The loop holds the network's stage and the normalisation (part of preprocess), not the percentiles before it.
    assert case["infer_s"] < case["slice_loop_s"] < case["infer_s"] + case["preprocess_s"] <= case["wall_s"]
    assert data["context"]["warm_up"] is True
    marks = s["since_process_start_s"]
    if marks:  # Linux: in-process here, so "main" is this test process's age, and the order is what counts
        order = ["main", "imports", "runner_opened", "activated", "warmed_up", "first_read", "first_inferred"]
        order.append("all_written")
        assert [m for m in marks if m in order] == order
        assert marks["all_written"] <= marks["released"] <= marks["end"]
        assert s["end_epoch_s"] <= time.time()


def test_the_command_exits_without_teardown_and_loses_nothing(trained_checkpoint, tmp_path):
    # flare-infer ends with os._exit after flushing: its output, timings, stdout and stderr must all be complete.
    (ct,) = _folder(tmp_path / "in", 1)
    out = tmp_path / "o.nii.gz"
    cmd = [sys.executable, "-m", "flareseg.runtime.cli", "--model", str(trained_checkpoint), "-i", str(ct)]
    done = subprocess.run([*cmd, "-o", str(out), "-v"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("o.timings.json") and "1 segmented" in done.stdout
    assert "device: cpu" in done.stderr  # a log record written just before the end reached stderr
    assert np.asarray(nib.load(out).dataobj).shape == nib.load(ct).shape
    assert json.loads((tmp_path / "o.timings.json").read_text())["cases"][0]["status"] == "ok"
    bad = subprocess.run(
        [*cmd[:-1], str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "x.nii.gz")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"flare-infer: error: {tmp_path / 'missing.nii.gz'}: file not found"
    ]
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("flare-infer") == "flareseg.commands:flare_infer"  # which runs flareseg.runtime.cli's entry


def test_an_input_file_of_another_format_is_one_line_and_nothing_is_written(trained_checkpoint, tmp_path, capsys):
    scan = tmp_path / "scan.mha"  # MetaImage: read by ITK, not here
    scan.write_bytes(b"ObjectType = Image\nNDims = 3\n")
    argv = ["--model", str(trained_checkpoint), "-i", str(scan), "-o", str(tmp_path / "out.nii.gz"), "-q"]
    assert infer_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"flare-infer: error: {scan}: not a .nii or .nii.gz file, nor a folder holding a DICOM series"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.mha"]


def test_a_folder_run_on_a_terminal_shows_its_case_count_beside_the_slices(trained_checkpoint, tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):  # a test double for stderr on a terminal, where the bar is drawn
        def isatty(self) -> bool:
            return True

    _folder(tmp_path / "in", 2)
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o")]) == 0
    drawn = screen.getvalue()
    assert "0/2 cases" in drawn and "2/2 cases" in drawn and "slices" in drawn
    assert drawn.index("0/2 cases") < drawn.index("2/2 cases")


def test_postprocessing_during_inference_writes_the_same_labels(trained_checkpoint, tmp_path, monkeypatch, capsys):
    paths = _folder(tmp_path / "in", 2)

    # Small slabs, so that components are linked across several cuts of these 6-slice cases.
    class SmallSlabs(pipeline.StreamingPostprocessor):
        def __init__(self, shape: tuple[int, int, int]) -> None:
            super().__init__(shape, slab_slices=2)

    monkeypatch.setattr(pipeline, "StreamingPostprocessor", SmallSlabs)
    with open_runner(trained_checkpoint) as runner:
        after = segment_folder(runner, paths, tmp_path / "after", batch_size=4)
        during = segment_folder(runner, paths, tmp_path / "during", batch_size=4, overlap_postprocess=True)
        raw = segment_folder(runner, paths, tmp_path / "raw", batch_size=4, postprocess=False)
    assert [r.status for r in after + during + raw] == ["ok"] * 6
    assert all(r.postprocess_s > 0 for r in during)
    removed = 0
    for p in paths:
        name = p.name.replace("_0000", "")
        a, d, r = (np.asarray(nib.load(tmp_path / k / name).dataobj) for k in ("after", "during", "raw"))
        np.testing.assert_array_equal(d, a)
        removed += int(np.count_nonzero(r) - np.count_nonzero(a))
    assert removed > 0  # the post-processing did remove something, in both ways alike
    argv = ["--model", str(trained_checkpoint), "-i", str(paths[0]), "-o", str(tmp_path / "x.nii.gz")]
    assert infer_main([*argv, "--overlap-postprocess", "--no-postprocess"]) == 2
    assert "contradict" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["flareseg.runtime.cli", "flareseg.export.cli"])
def test_an_interrupted_command_exits_the_usual_way(monkeypatch, module):
    # After Ctrl-C a writer may still be finishing an atomic write: only a normal exit waits for it.
    import importlib

    from flareseg import cli as common

    cli = importlib.import_module(module)
    exits: list[tuple[str, int]] = []

    def fast_exit(code: int) -> None:
        exits.append(("os._exit", code))
        raise SystemExit(code)

    monkeypatch.setattr(common.os, "_exit", fast_exit)
    for code in (0, 1, 2, 130):
        monkeypatch.setattr(cli, "main", lambda code=code: code)
        with pytest.raises(SystemExit) as stop:
            cli.entry()
        assert stop.value.code == code
    assert exits == [("os._exit", 0), ("os._exit", 1), ("os._exit", 2)]


def test_an_interrupted_folder_says_and_keeps_what_it_finished(trained_checkpoint, tmp_path, monkeypatch, capsys):
    """Ctrl-C stands in as a KeyboardInterrupt raised when the third case reaches the model."""
    _folder(tmp_path / "in", 3)
    real = pipeline._infer_stage
    seen: list[str] = []

    def infer_stage(runner, read, timing, *args, **kwargs):
        seen.append(timing.case)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(runner, read, timing, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_infer_stage", infer_stage)
    out = tmp_path / "out"
    argv = ["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-o", str(out), "-q"]
    assert infer_main(argv) == 130
    printed = capsys.readouterr().out
    assert "c0: 6 slices" in printed and "c1: 6 slices" in printed  # c1, inferred, is written during the interrupt
    assert f"interrupted: 2 segmented, 0 skipped (already done), 0 failed of 3; timings so far: {out}" in printed
    timings = json.loads((out / "timings.json").read_text())
    assert [c["case"] for c in timings["cases"]] == ["c0", "c1"] and timings["context"]["interrupted"] is True
    assert sorted(p.name for p in out.iterdir()) == ["c0.nii.gz", "c1.nii.gz", "timings.json"]
    monkeypatch.setattr(pipeline, "_infer_stage", real)
    assert infer_main(argv) == 0  # the resume runs the rest
    assert "1 segmented, 2 skipped (already done), 0 failed of 3" in capsys.readouterr().out


def test_components_labelled_during_inference_are_counted_once(trained_checkpoint, tmp_path, monkeypatch):
    (ct,) = _folder(tmp_path / "in", 1)
    calls: list[int] = []

    class SlowSlabs(pipeline.StreamingPostprocessor):
        def add(self, labels: np.ndarray, stop: int) -> None:
            calls.append(stop)
            time.sleep(0.2)  # stands for cc3d on a slab: time between batches, on the host
            self.seconds += 0.2  # post-processing time, as the real add() counts its own
            super().add(labels, stop)

    monkeypatch.setattr(pipeline, "StreamingPostprocessor", SlowSlabs)
    with open_runner(trained_checkpoint) as runner:
        timing = segment_file(runner, ct, tmp_path / "o.nii.gz", batch_size=2, overlap_postprocess=True)
    slept = 0.2 * len(calls)
    assert len(calls) == 3 and timing.postprocess_s >= slept
    # Counted in post-processing, not also in inference: the stages add up to (at most) the case's wall time.
    assert timing.total_s <= timing.wall_s + 0.5 * slept


def test_read_threads_give_the_same_output_and_are_checked_before_any_work(
    trained_checkpoint, tmp_path, capsys, caplog
):
    pytest.importorskip("rapidgzip", reason="rapidgzip (the [dev] and [gpu] extras) is not installed")
    paths = _folder(tmp_path / "in", 2)
    base = ["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-q"]
    assert infer_main([*base, "-o", str(tmp_path / "one")]) == 0
    assert infer_main([*base, "-o", str(tmp_path / "all"), "--read-threads", "0"]) == 0
    for p in paths:
        name = p.name.replace("_0000", "")
        one, every = (np.asarray(nib.load(tmp_path / k / name).dataobj) for k in ("one", "all"))
        np.testing.assert_array_equal(every, one)
    assert json.loads((tmp_path / "all" / "timings.json").read_text())["context"]["read_threads"] == 0
    cores = os.cpu_count() or 1
    caplog.clear()
    assert infer_main([*base, "-o", str(tmp_path / "many"), "--read-threads", str(cores + 1)]) == 0
    said = f"--read-threads {cores + 1} on {cores} CPU cores: threads beyond the cores only wait for each other"
    assert said in caplog.messages
    with pytest.raises(SystemExit) as stopped:  # refused while parsing
        infer_main([*base, "-o", str(tmp_path / "bad"), "--read-threads", "-2"])
    assert stopped.value.code == 2 and "argument --read-threads: expected an integer >= 0" in capsys.readouterr().err
    assert infer_main([*base, "-o", str(tmp_path / "bad"), "--read-threads", "1025"]) == 2
    assert "read threads must be 0 (all cores) to 1024, got 1025" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_refusals_before_any_work_leave_inputs_and_folders_as_they_were(trained_checkpoint, tmp_path, capsys):
    paths = _folder(tmp_path / "in", 2)
    before = paths[0].read_bytes()
    model = ["--model", str(trained_checkpoint), "-q"]
    refusals = [
        (["-i", str(tmp_path / "in"), "-o", str(tmp_path / "o1"), "--timings", str(paths[0])], "must end in .json"),
        (["-i", str(paths[0]), "-o", str(tmp_path / "o2.nii.gz"), "--timings", str(tmp_path / "o2.nii.gz")], ".json"),
        (["-i", str(tmp_path / "in"), "-o", str(tmp_path / "in")], "the output folder is the input folder"),
        (["-i", str(paths[0]), "-o", str(tmp_path / "o4"), "--num-parts", "2"], "split a folder of cases"),
    ]
    for argv, message in refusals:
        assert infer_main([*model, *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert paths[0].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output folder was made
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert (
        infer_main(["--model", str(tmp_path / "junk.pt"), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o5"), "-q"])
        == 2
    )
    assert not (tmp_path / "o5").exists()  # a model that fails to load leaves no empty output folder


@pytest.mark.parametrize("how", ["its reader gone", "closed from the start"])
def test_a_closed_stdout_does_not_stop_the_run(trained_checkpoint, tmp_path, how):
    import os

    _folder(tmp_path / "in", 2)
    cmd = [sys.executable, "-m", "flareseg.runtime.cli", "--model", str(trained_checkpoint), "--batch-size", "4"]
    cmd += ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    if how == "its reader gone":  # as `| head -0`: every line flare-infer prints meets a broken pipe
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(120)
    else:  # as `>&-` in a shell: Python starts with sys.stdout None
        done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1), timeout=120)
        code, err = done.returncode, done.stderr
    assert code == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c0.nii.gz", "c1.nii.gz", "timings.json"]


def test_a_timings_file_that_cannot_be_written_still_leaves_the_summary(
    trained_checkpoint, tmp_path, monkeypatch, capsys
):
    _folder(tmp_path / "in", 1)

    def cannot(*args, **kwargs):
        raise FlareSegError(f"{tmp_path / 'out' / 'timings.json'}: cannot write (No space left on device)")

    monkeypatch.setattr(pipeline, "write_timings", cannot)  # a double: the disk fills at the very end
    argv = ["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q"]
    assert infer_main(argv) == 1
    out = capsys.readouterr().out
    assert "1 segmented, 0 skipped (already done), 0 failed of 1" in out and "timings not written" in out
    assert (tmp_path / "out" / "c0.nii.gz").is_file()


def test_a_broken_pipe_that_is_not_stdout_is_an_error_not_silence(capsys):
    import argparse

    from flareseg.cli import run_command

    parser = argparse.ArgumentParser(prog="flare-x")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("-v", "--verbose", action="count", default=0)

    def body(args):
        raise BrokenPipeError(32, "Broken pipe to a worker")

    assert run_command(parser, body, []) == 2
    assert capsys.readouterr().err.strip() == "flare-x: error: [Errno 32] Broken pipe to a worker"


def test_an_explicit_output_needs_no_case_name(trained_checkpoint, tmp_path):
    ct = _folder(tmp_path / "in", 1)[0].rename(tmp_path / "in" / "_0000.nii.gz")
    argv = ["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(tmp_path / "result.nii.gz"), "-q"]
    assert infer_main(argv) == 0 and (tmp_path / "result.nii.gz").is_file()


def test_a_damaged_checkpoint_is_one_short_line_naming_the_problem(tmp_path, capsys):
    from flareseg.checkpoint import ModelInfo, save_checkpoint
    from flareseg.network import NetworkConfig, build_training_network
    from flareseg.preprocess import NormalizationStats

    net = build_training_network(NetworkConfig(base_width=4))
    good = save_checkpoint(tmp_path / "good.pt", net, ModelInfo(net.config, NormalizationStats(0.0, 1.0), (32, 32)))
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "run").mkdir()
    (ct,) = _folder(tmp_path / "in", 1)
    expected = {
        "cut.pt": "truncated or damaged checkpoint (its zip archive is incomplete)",
        "empty.pt": "the checkpoint file is empty",
        "notes.pt": "not a flareseg checkpoint (not a torch.save zip archive)",
        "run": "is a folder, not a model file; give the model file",
    }
    for name, problem in expected.items():
        argv = ["--model", str(tmp_path / name), "--backend", "torch", "-i", str(ct), "-o", str(tmp_path / "o.nii.gz")]
        assert infer_main([*argv, "-q"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == f"flare-infer: error: {tmp_path / name}: {problem}"
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_single_case_keeps_an_existing_output_unless_told_to_overwrite(trained_checkpoint, tmp_path, capsys):
    (ct,) = _folder(tmp_path / "in", 1)
    other = tmp_path / "other_0000.nii.gz"
    save(make_phantom((40, 40, 5), (8.0, 8.0, 10.0), seed=9).to_nifti()[0], other)  # another patient's CT
    theirs = other.read_bytes()
    argv = ["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(other), "-q"]
    assert infer_main(argv) == 2  # on another grid: no result of this CT, and not replaced unasked
    assert other.read_bytes() == theirs
    assert capsys.readouterr().err == (
        f"flare-infer: error: {other}: exists but is a 40 x 40 x 5 grid, where its input {ct} now is 48 x 48 x 6; "
        "remove it to redo the case, or --overwrite\n"
    )
    done = tmp_path / "done.nii.gz"  # a result of this CT, on its grid: kept
    vol = read_ct(ct)
    write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, done)
    ours = done.read_bytes()
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(done), "-q"]) == 0
    assert done.read_bytes() == ours
    assert f"0 segmented, 1 skipped (already done), 0 failed of 1; {done} exists, kept" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.nii.gz", "in", "other_0000.nii.gz"]  # no timings
    if not torch.cuda.is_available():  # what this machine cannot run is refused even with the result there
        for extra, said in ((["--device", "cuda"], "sees no CUDA GPU"), (["--precision", "fp16"], "fp16 needs a CUDA")):
            assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(done), *extra]) == 2
            assert said in capsys.readouterr().err
    from flareseg.runtime import cli

    parse = cli.build_parser().parse_args
    assert cli._look_ahead(parse(argv)) == (None, None, None)  # nothing is read for a result that is kept
    assert cli._look_ahead(parse([*argv, "--overwrite"])) == (ct, None, None)
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "c0.nii.gz").write_bytes(b"done")
    folder_out = ["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(tmp_path / "pred")]
    assert cli._look_ahead(parse(folder_out)) == (None, None, None)
    assert infer_main([*argv, "--overwrite"]) == 0
    assert nib.load(other).get_data_dtype() == np.uint8 and nib.load(other).shape == (48, 48, 6)


def test_a_resumed_run_keeps_the_timings_of_the_cases_an_earlier_run_did(trained_checkpoint, tmp_path, capsys):
    cts = _folder(tmp_path / "in", 3)
    cts[2].rename(tmp_path / "later_0000.nii.gz")  # the third case arrives after the first run
    out = tmp_path / "out"
    argv = ["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-o", str(out), "-q"]
    assert infer_main(argv) == 0
    first_file = json.loads((out / "timings.json").read_text())
    first = {c["case"]: {**c, "context": first_file["context"]} for c in first_file["cases"]}
    (tmp_path / "later_0000.nii.gz").rename(cts[2])
    assert infer_main(argv) == 0
    cases = {c["case"]: c for c in json.loads((out / "timings.json").read_text())["cases"]}
    assert [cases[c]["status"] for c in ("c0", "c1", "c2")] == ["skipped", "skipped", "ok"]
    for c in ("c0", "c1"):  # measured by the first run, kept with the context they were measured in
        assert cases[c]["earlier_run"] == first[c] and cases[c]["earlier_run"]["infer_s"] > 0
        assert cases[c]["earlier_run"]["context"]["model"] == str(trained_checkpoint)
    assert "earlier_run" not in cases["c2"] and cases["c2"]["infer_s"] > 0
    # A third run that redoes c2 only keeps c0 and c1 from the first run still.
    (out / "c2.nii.gz").unlink()
    assert infer_main(argv) == 0
    again = {c["case"]: c for c in json.loads((out / "timings.json").read_text())["cases"]}
    assert again["c0"]["earlier_run"] == first["c0"] and again["c2"]["status"] == "ok"
    # Another input under a case's name (the folder changed): its earlier measurement is not this case's.
    (tmp_path / "in2").mkdir()
    for ct in cts:
        ct.rename(tmp_path / "in2" / ct.name)
    (out / "c1.nii.gz").unlink()
    argv2 = ["--model", str(trained_checkpoint), "-i", str(tmp_path / "in2"), "-o", str(out), "-q"]
    assert infer_main(argv2) == 0
    last = {c["case"]: c for c in json.loads((out / "timings.json").read_text())["cases"]}
    assert last["c0"]["status"] == "skipped" and "earlier_run" not in last["c0"]


def test_a_rerun_with_nothing_to_do_keeps_the_timings_of_the_run_that_did_it(trained_checkpoint, tmp_path, capsys):
    _folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    argv = ["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-o", str(out), "-q"]
    assert infer_main(argv) == 0
    before = (out / "timings.json").read_text()
    assert infer_main(argv) == 0
    assert (out / "timings.json").read_text() == before
    assert "0 segmented, 2 skipped (already done), 0 failed of 2" in capsys.readouterr().out


def test_options_the_backend_would_ignore_or_that_contradict_the_device_are_refused(
    trained_checkpoint, tmp_path, capsys
):
    (ct,) = _folder(tmp_path / "in", 1)
    onnx, engine = tmp_path / "m.onnx", tmp_path / "m.engine"
    for path in (onnx, engine):
        path.write_bytes(b"never loaded: the options are refused first")
    refused = {
        ("--model", str(onnx), "--channels-last"): "--channels-last is for the torch backend, not onnxruntime",
        ("--model", str(onnx), "--no-channels-last"): "--no-channels-last is for the torch backend, not onnxruntime",
        ("--engine", str(engine), "--threads", "2"): "--threads is for the onnxruntime, openvino and torch "
        "backends, not tensorrt",
        ("--model", str(onnx), "--openvino-hint", "throughput"): "--openvino-hint is for the openvino backend",
        ("--model", str(trained_checkpoint), "--ort-provider", "cpu"): "--ort-provider is for the onnxruntime backend",
        ("--model", str(onnx), "--ort-memory", "no-arena", "--backend", "openvino"): "--ort-memory is for the "
        "onnxruntime backend, not openvino",
        ("--model", str(onnx), "--device", "cpu", "--ort-provider", "cuda"): "--ort-provider cuda runs on the GPU, "
        "--device cpu on the CPU: choose one",
        ("--model", str(onnx), "--device", "cuda", "--ort-provider", "cpu"): "--ort-provider cpu runs on the CPU, "
        "--device cuda on the GPU: choose one",
        ("--engine", str(engine), "--device", "cpu"): "a TensorRT engine runs on a CUDA GPU, not on the CPU",
        ("--engine", str(engine), "--precision", "fp16"): "--precision is fixed when the engine is built",
        ("--engine", str(onnx)): "the tensorrt backend runs .engine or .plan models, not a .onnx file",
    }
    for argv, message in refused.items():
        assert infer_main([*argv, "-i", str(ct), "-o", str(tmp_path / "out"), "-q"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("flare-infer: error: ") and message in err and "\n" not in err, err
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(tmp_path / "o.NII.GZ")]) == 2
    assert "an output file name ends in lower-case .nii.gz" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "m.engine", "m.onnx"]


def test_a_label_map_given_as_input_is_refused_naming_it(trained_checkpoint, tmp_path, capsys):
    ct_img, mask_img = make_phantom((48, 48, 6), (8.0, 8.0, 10.0), seed=3).to_nifti()
    folder = tmp_path / "in"
    folder.mkdir()
    save(ct_img, folder / "a_0000.nii.gz")
    mask = save(mask_img, folder / "b_0000.nii.gz")  # TrainingMask/ taken for TrainingImg/, say
    out = tmp_path / "out"
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(mask), "-o", str(out / "b.nii.gz"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"flare-infer: error: {mask}: looks like a label map, not a CT (every voxel is a class 0..4, none is air); "
        "segmentation takes CT images"  # the Python API says it too: not a command's name
    ]
    assert not (out / "b.nii.gz").exists()
    # In a folder, that case fails and the CT beside it is segmented.
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(folder), "-o", str(out), "-q"]) == 1
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz"]


def test_a_ct_without_its_intercept_is_segmented_with_a_warning_naming_it(trained_checkpoint, tmp_path, caplog):
    """HU + 1024 stored as unsigned integers: with scl_inter = -1024 it is the CT itself (the same labels, no
    warning); without it, no voxel is below 0 HU, and the run says so, naming the file."""
    ct_img, _ = make_phantom((48, 48, 6), (8.0, 8.0, 10.0), seed=3).to_nifti()
    hu = np.asanyarray(ct_img.dataobj).astype(np.int32)
    assert hu.min() <= -1000  # the phantom holds air
    folder = tmp_path / "in"
    folder.mkdir()
    save(ct_img, folder / "hu_0000.nii.gz")
    raw = nib.Nifti1Image((hu + 1024).astype(np.uint16), ct_img.affine)
    raw.header.set_slope_inter(1.0, -1024.0)
    save(raw, folder / "scaled_0000.nii.gz")
    raw.header.set_slope_inter(1.0, 0.0)  # the intercept lost, as a careless conversion loses it
    lost = save(raw, folder / "lost_0000.nii.gz")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="flareseg.volume"):
        assert infer_main(["--model", str(trained_checkpoint), "-i", str(folder), "-o", str(out), "-q"]) == 0
    warned = [r.getMessage() for r in caplog.records if "Hounsfield" in r.getMessage()]
    assert len(warned) == 1 and str(lost) in warned[0], warned
    assert ": its clipping percentiles are " in warned[0]
    assert "HU, with no air (-1000 HU) or fat (-100 HU) below: not Hounsfield units" in warned[0]
    labels = {name: np.asanyarray(nib.load(out / f"{name}.nii.gz").dataobj) for name in ("hu", "scaled")}
    assert labels["hu"].any() and np.array_equal(labels["hu"], labels["scaled"])


def test_run_options_that_would_lose_or_spoil_work_are_refused_before_any(trained_checkpoint, tmp_path, capsys):
    cases = _folder(tmp_path / "in", 2)
    model = ["--model", str(trained_checkpoint), "-q"]
    refused = {
        # A forgotten --part-id would run part 0 on every machine.
        ("-i", str(tmp_path / "in"), "-o", str(tmp_path / "p"), "--num-parts", "2"): (
            "--num-parts needs --part-id: give both"
        ),
        ("-i", str(tmp_path / "in"), "-o", str(tmp_path / "p"), "--part-id", "1"): "--part-id needs --num-parts",
        # NIfTI cases only: no case could be written as DICOM SEG.
        ("-i", str(tmp_path / "in"), "-o", str(tmp_path / "p"), "--output-type", "dicom-seg"): (
            f"{tmp_path / 'in'}: DICOM SEG output needs DICOM series as input, and this folder's cases are NIfTI"
        ),
        # The result beside its input would be taken for a case by the next folder run.
        ("-i", str(cases[0]), "-o", str(tmp_path / "in")): "the output folder is the input's own folder",
        ("-i", str(tmp_path / "in"), "-o", str(tmp_path / "pred.nii.gz")): "the output must be a folder, not a name",
    }
    for argv, words in refused.items():
        assert infer_main([*model, *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["c0_0000.nii.gz", "c1_0000.nii.gz"]
    # Both parts given: each machine runs its share.
    for part in ("0", "1"):
        argv = [*model, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "p"), "--num-parts", "2", "--part-id", part]
        assert infer_main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "p").glob("*.nii.gz")) == ["c0.nii.gz", "c1.nii.gz"]


def test_a_single_case_interrupted_after_its_write_is_counted_done(trained_checkpoint, tmp_path, monkeypatch, capsys):
    """Ctrl-C stands in as a KeyboardInterrupt raised as the run marks all cases written (its teardown)."""
    from flareseg.runtime.startup import Timeline

    (ct,) = _folder(tmp_path / "in", 1)
    real = Timeline.mark

    def mark(self, name):
        if name == "all_written":
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(Timeline, "mark", mark)
    out = tmp_path / "out"
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(out), "-q"]) == 130
    printed = capsys.readouterr().out
    assert "c0: 6 slices" in printed
    assert "interrupted: 1 segmented, 0 skipped (already done), 0 failed of 1; timings so far" in printed
    assert [c["case"] for c in json.loads((out / "c0.timings.json").read_text())["cases"]] == ["c0"]


def test_threads_set_the_torch_cpu_thread_count_and_give_the_same_labels(
    trained_checkpoint, tmp_path, capsys, caplog, monkeypatch
):
    (ct,) = _folder(tmp_path / "in", 1)
    base = ["--model", str(trained_checkpoint), "-i", str(ct), "-q"]
    assert infer_main([*base, "-o", str(tmp_path / "a.nii.gz")]) == 0
    before = torch.get_num_threads()
    seen: list[int] = []  # the count each segmented case ran with
    real_infer = pipeline.infer_volume

    def infer_volume(*a, **kw):
        seen.append(torch.get_num_threads())
        return real_infer(*a, **kw)

    monkeypatch.setattr(pipeline, "infer_volume", infer_volume)
    try:
        assert infer_main([*base, "-o", str(tmp_path / "b.nii.gz"), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    # Set at the command's edge for its network, and undone after it for a program that called main().
    assert seen == [1] and torch.get_num_threads() == before
    a, b = (np.asanyarray(nib.load(tmp_path / f"{x}.nii.gz").dataobj) for x in "ab")
    assert a.any() and np.array_equal(a, b)
    capsys.readouterr()
    assert infer_main([*base, "-o", str(tmp_path / "c.nii.gz"), "--threads", "2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flare-infer: error: --threads sets the CPU's threads; the torch backend runs on cuda here: drop it"]
    assert torch.get_num_threads() == before


def test_a_part_without_a_series_of_its_own_is_not_refused_for_dicom_seg(trained_checkpoint, tmp_path, capsys):
    from dicom_series import phantom, write_series

    from flareseg.runtime.jobs import part_of

    write_series(tmp_path / "in" / "s1", phantom(), patient_id="P", series_number=1)
    other = str(1 - part_of("P_20260101_s1", 2))  # the part the one series is not in
    argv = ["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q"]
    assert infer_main([*argv, "--output-type", "dicom-seg", "--num-parts", "2", "--part-id", other]) == 0
    assert "0 segmented, 0 skipped (already done), 0 failed of 0" in capsys.readouterr().out


def test_the_api_keeps_an_existing_file_unless_told_and_takes_paths_as_text(trained_checkpoint, tmp_path):
    from flareseg.runtime import open_runner, segment_file, segment_folder

    (ct,) = _folder(tmp_path / "in", 1)
    other = tmp_path / "other.nii.gz"
    other.write_bytes(b"another patient's result")
    with open_runner(trained_checkpoint) as runner:
        kept = r"other\.nii\.gz: exists, kept \(overwrite=True replaces it; flare-infer: --overwrite\)"
        with pytest.raises(OutputExistsError, match=kept):
            segment_file(runner, ct, other, batch_size=4)
        assert other.read_bytes() == b"another patient's result"
        assert segment_file(runner, str(ct), str(other), overwrite=True, batch_size=4).status == "ok"
        (done,) = segment_folder(runner, [str(ct)], str(tmp_path / "out"), batch_size=4)  # text, not Path
    assert nib.load(other).get_data_dtype() == np.uint8
    assert done.status == "ok" and (tmp_path / "out" / "c0.nii.gz").is_file()


def test_a_single_cases_damaged_result_is_not_kept_as_done(trained_checkpoint, tmp_path, capsys):
    (ct,) = _folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "c0.nii.gz").write_bytes(b"")  # a placeholder, not a result
    argv = ["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(out), "-q"]
    assert infer_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"flare-infer: error: {out / 'c0.nii.gz'}: exists but is empty; remove it to redo the case, or --overwrite"
    )
    assert infer_main([*argv, "--overwrite"]) == 0 and nib.load(out / "c0.nii.gz").shape == (48, 48, 6)
    # A folder that exists, named like a result file: -o with a trailing / writes into it.
    named = tmp_path / "res.nii.gz"
    named.mkdir()
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", f"{named}/", "-q"]) == 0
    assert (named / "c0.nii.gz").is_file()


def _sizing_runner(checkpoint: Path) -> tuple[FunctionRunner, list[int]]:
    """The trained network as a runner, and the list of the batch sizes it is given."""
    net, info, _ = load_model(checkpoint)
    sizes: list[int] = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(int(batch.shape[0]))
        with torch.inference_mode():
            return net(batch)

    return FunctionRunner(fn, info), sizes


# (None, None, 2): the CPU default batch, 2, as flare-infer's.
@pytest.mark.parametrize(("preferred", "given", "expected"), [(3, None, 3), (None, None, 2), (3, 2, 2)])
def test_without_a_batch_size_the_runner_chooses_its_preferred_batch(
    trained_checkpoint, tmp_path, preferred, given, expected
):
    # An engine's profile opt (preferred_batch): the API's fixed default (8) lay outside some engines' profiles.
    runner, sizes = _sizing_runner(trained_checkpoint)
    (ct,) = _folder(tmp_path / "in", 1)  # 6 slices
    runner.preferred_batch = preferred  # as a TensorRT runner sets it on activation
    options = {} if given is None else {"batch_size": given}
    with runner:
        segment_file(runner, ct, tmp_path / "o.nii.gz", **options)
    assert max(sizes) == expected and sum(sizes) == 6


def test_a_cases_line_comes_once_it_is_written_not_after_the_next_cases_inference(trained_checkpoint, tmp_path):
    # The case line and the bar's case count once lagged a whole case behind the writes.
    net, info, _ = load_model(trained_checkpoint)
    events: list[str] = []
    cts = _folder(tmp_path / "in", 2)

    def fn(batch: torch.Tensor) -> torch.Tensor:
        time.sleep(0.3)  # a slow device: c0's write ends while c1 is still being inferred
        events.append("batch")
        with torch.inference_mode():
            return net(batch)

    with FunctionRunner(fn, info) as runner:
        done = segment_folder(
            runner, cts, tmp_path / "out", batch_size=1, on_case=lambda t: events.append(f"said {t.case}")
        )
    assert [t.status for t in done] == ["ok", "ok"]
    c0 = events.index("said c0")
    assert "batch" in events[c0 : events.index("said c1")]  # c0 said while c1 was still on the device
    assert events.count("batch") == 12 and events[-1] == "said c1"


def test_the_default_batch_stays_within_the_batches_a_runner_takes(trained_checkpoint, tmp_path):
    from flareseg.runtime.pipeline import default_batch

    runner, sizes = _sizing_runner(trained_checkpoint)
    assert default_batch(runner) == 2  # flare-infer's CPU default: the API gave a CPU service batch 8 (e2eR review)
    runner.max_batch, runner.preferred_batch = 4, 8  # a model that takes at most 4 slices: its 8 would be refused
    assert default_batch(runner) == 4
    (ct,) = _folder(tmp_path / "in", 1)
    with runner:
        assert segment_file(runner, ct, tmp_path / "o.nii.gz").status == "ok"
    assert sizes == [4, 2]
    runner.max_batch, runner.min_batch, runner.preferred_batch = None, 16, 3
    assert default_batch(runner) == 16


def test_ctrl_c_while_waiting_for_the_last_write_still_counts_the_case_written(
    trained_checkpoint, tmp_path, monkeypatch, capsys
):
    """A real SIGINT, sent by the writer as it finishes, reaches the main thread waiting for that write."""
    import os
    import signal

    (ct,) = _folder(tmp_path / "in", 1)
    real = pipeline._finish_stage

    def finish_stage(*args, **kwargs):
        done = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the main thread takes the interrupt while this write is still in flight
        return done

    monkeypatch.setattr(pipeline, "_finish_stage", finish_stage)
    out = tmp_path / "out"
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(out), "-q"]) == 130
    printed = capsys.readouterr().out
    assert (out / "c0.nii.gz").is_file() and "c0: 6 slices" in printed  # it was written, and said "0 segmented"
    assert "interrupted: 1 segmented, 0 skipped (already done), 0 failed of 1" in printed
    assert [c["case"] for c in json.loads((out / "c0.timings.json").read_text())["cases"]] == ["c0"]


def test_a_second_ctrl_c_while_the_last_case_is_written_still_writes_it_whole(
    trained_checkpoint, tmp_path, monkeypatch, capsys
):
    """Two real SIGINTs while the writer has a case in hand: the run waits for that write, so the case is
    on disk whole, said and counted, and no ``.part`` file is left; the stop still ends the run (130)."""
    import os
    import signal

    (ct,) = _folder(tmp_path / "in", 1)
    real = pipeline._finish_stage

    def finish_stage(*args, **kwargs):
        time.sleep(0.3)  # the main thread is waiting for this write
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: it unwinds, and waits for the write in the stop's handling
        deadline = time.monotonic() + WAIT_S
        while signal.getsignal(signal.SIGINT) is signal.default_int_handler and time.monotonic() < deadline:
            time.sleep(0.01)  # until it is inside that handling (the handler only notes a stop there)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again, impatient: this one broke that wait
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_finish_stage", finish_stage)
    out = tmp_path / "out"
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(out), "-q"]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["c0.nii.gz", "c0.timings.json"]  # no .part file beside
    assert nib.load(out / "c0.nii.gz").shape == nib.load(ct).shape
    assert "interrupted: 1 segmented, 0 skipped (already done), 0 failed of 1" in capsys.readouterr().out


def test_a_ctrl_c_as_a_case_is_handed_to_the_writer_still_waits_for_it_and_counts_it(
    trained_checkpoint, tmp_path, monkeypatch, capsys
):
    """A SIGINT inside the hand-over (a test double of the writer's pool sends it as the case is queued): the
    case used to be written unseen, after the run had said "0 segmented" and returned."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    class StoppedAtSubmit(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            fut = super().submit(fn, *args, **kwargs)
            if fn is not pipeline._finish_stage:  # the writer's start, or a read: not the hand-over
                return fut
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)  # the interrupt is taken here, before the future is returned
            return fut

    (ct,) = _folder(tmp_path / "in", 1)
    monkeypatch.setattr(pipeline, "ThreadPoolExecutor", StoppedAtSubmit)
    out = tmp_path / "out"
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(out), "-q"]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["c0.nii.gz", "c0.timings.json"]
    assert "interrupted: 1 segmented, 0 skipped (already done), 0 failed of 1" in capsys.readouterr().out


def test_throughput_counts_the_cases_segmented_not_those_skipped_or_failed():
    from flareseg.runtime.pipeline import CaseTiming, summarize

    done = [
        CaseTiming("a", "a_0000.nii.gz", "a.nii.gz"),
        CaseTiming("b", "b_0000.nii.gz", "b.nii.gz", status="skipped"),
        CaseTiming("c", "c_0000.nii.gz", "c.nii.gz", status="failed", error="c: cut short"),
    ]
    summary = summarize(done, 60.0)
    assert (summary.cases, summary.segmented, summary.skipped, summary.failed) == (3, 1, 1, 1)
    assert summary.cases_per_minute == 1.0  # a resumed run's skipped cases took no time: not "3 cases/min"
    assert summarize(done[1:], 60.0).cases_per_minute is None


def test_a_case_the_plan_refuses_carries_its_reason_and_a_dangling_link_is_not_written_through(tmp_path):
    """Without a model: the plan's refusals and segment_file's check come before any inference."""
    from flareseg.checkpoint import ModelInfo
    from flareseg.network import NetworkConfig
    from flareseg.preprocess import NormalizationStats

    info = ModelInfo(NetworkConfig(base_width=4), NormalizationStats(mean=0.0, std=1.0), slice_size=(64, 64))
    (first,) = _folder(tmp_path / "a", 1)
    (second,) = _folder(tmp_path / "b", 1)  # another c0
    runner = FunctionRunner(lambda batch: pytest.fail("nothing is inferred"), info)
    (tmp_path / "out").mkdir()
    save(make_phantom((48, 48, 6), (8.0, 8.0, 10.0), seed=1).to_nifti()[1], tmp_path / "out" / "c0.nii.gz")
    done = segment_folder(runner, [first, second], tmp_path / "out")
    assert [t.status for t in done] == ["skipped", "failed"]
    assert done[1].error is not None and "case c0 again (first from" in done[1].error
    (tmp_path / "out" / "c0.nii.gz").unlink()
    (tmp_path / "out" / "c0.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    with pytest.raises(FlareSegError, match=r"c0.nii.gz: a broken symbolic link is in the way$"):
        segment_file(runner, first, tmp_path / "out" / "c0.nii.gz")
    assert (tmp_path / "out" / "c0.nii.gz").is_symlink()


def test_at_most_one_case_waits_to_be_written_while_the_device_works(tmp_path, monkeypatch):
    """Memory stays bounded by three volumes (the one read ahead, the one on the device, one written): with a slow
    writer the device waits rather than queueing more labels behind it. The writer's pool is a counting test double.
    """
    from concurrent.futures import ThreadPoolExecutor

    from flareseg.checkpoint import ModelInfo
    from flareseg.network import NetworkConfig
    from flareseg.preprocess import NormalizationStats

    lock, counts, behind = threading.Lock(), {"handed": 0, "written": 0}, []

    class Counting(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            if fn is not pipeline._finish_stage:  # the writer's start, or the reader's pool: not a case's write
                return super().submit(fn, *args, **kwargs)

            def slow(*a, **k):
                time.sleep(0.3)  # a slow disk
                return fn(*a, **k)

            fut = super().submit(slow, *args, **kwargs)
            with lock:
                counts["handed"] += 1
            fut.add_done_callback(lambda _: _written())
            return fut

    def _written():
        with lock:
            counts["written"] += 1

    def fn(batch: torch.Tensor) -> torch.Tensor:
        with lock:
            behind.append(counts["handed"] - counts["written"])
        return torch.zeros(batch.shape[0], 5, *batch.shape[2:])

    info = ModelInfo(NetworkConfig(base_width=4), NormalizationStats(mean=0.0, std=1.0), slice_size=(48, 48))
    monkeypatch.setattr(pipeline, "ThreadPoolExecutor", Counting)
    cts = _folder(tmp_path / "in", 5)
    with FunctionRunner(fn, info) as runner:
        done = segment_folder(runner, cts, tmp_path / "out", batch_size=6)
    assert [t.status for t in done] == ["ok"] * 5 and len(behind) == 5
    assert max(behind) == 1  # one case's write under way while the next is inferred, never two
    for t in done:  # each case's total is its stages' sum; its wall time, from its read to its write, holds them
        stages = (t.read_s, t.preprocess_s, t.infer_s, t.postprocess_s, t.write_s)
        assert t.total_s == pytest.approx(sum(stages)) and t.write_s > 0 and t.wall_s >= t.total_s - 1e-3


def test_peak_rss_is_the_peak_not_the_memory_held_now():
    # In a fresh process: inside the suite's, memory freed by earlier tests may be reused, and a 200 MiB block
    # then adds nothing to the resident size.
    script = """
import json, numpy as np
from flareseg.runtime.pipeline import current_rss_mb, peak_rss_mb, reset_peak_rss
if not reset_peak_rss():
    print(json.dumps(None)); raise SystemExit
block = np.ones(200 * 2**20, np.uint8)  # 200 MiB, touched
held, held_now = peak_rss_mb(), current_rss_mb()
del block  # numpy returns a block this large to the system at once
after = peak_rss_mb()
now = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmRSS:")).split()[1]) / 1024
print(json.dumps([held, after, now, held_now, current_rss_mb()]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    figures = json.loads(done.stdout)
    if figures is None:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    held, after, now, held_now, current = figures
    assert after >= held - 1  # the peak stays where it was
    assert after - now > 150  # and it is not the resident size now
    # current_rss_mb is the resident size now (flare-bench's memory before a runner), not the peak (mutF review).
    assert held_now - current > 150 and abs(current - now) < 20


@pytest.mark.parametrize(("platform", "maxrss", "mib"), [("linux", 3 * 1024, 3.0), ("darwin", 3 * 2**20, 3.0)])
def test_maxrss_is_read_in_each_platforms_unit(monkeypatch, platform, maxrss, mib):
    # getrusage's ru_maxrss is KiB on Linux and bytes on macOS; the same 3 MiB must read as 3 on both.
    from types import SimpleNamespace

    from flareseg.runtime import pipeline

    monkeypatch.setattr(pipeline.sys, "platform", platform)
    assert pipeline.maxrss_mb(SimpleNamespace(ru_maxrss=maxrss)) == mib


@pytest.mark.skipif(not Path("/proc/thread-self/status").exists(), reason="reads a thread's signal mask in /proc")
def test_the_writer_thread_takes_stops_as_any_thread_does(tmp_path, monkeypatch):
    """Started inside the hand-over's held-back window, the writer (and all it started) kept Ctrl-C, SIGTERM and
    SIGHUP blocked for life: a program it ran could not be stopped."""
    import signal

    from flareseg.checkpoint import ModelInfo
    from flareseg.network import NetworkConfig
    from flareseg.preprocess import NormalizationStats

    masks: list[int] = []
    real = pipeline._finish_stage

    def finish_stage(*args, **kwargs):
        status = Path("/proc/thread-self/status").read_text()
        masks.append(int(next(ln for ln in status.splitlines() if ln.startswith("SigBlk:")).split()[1], 16))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_finish_stage", finish_stage)
    info = ModelInfo(NetworkConfig(base_width=4), NormalizationStats(mean=0.0, std=1.0), slice_size=(48, 48))
    fn = lambda batch: torch.zeros(batch.shape[0], 5, *batch.shape[2:])  # noqa: E731
    with FunctionRunner(fn, info) as runner:
        done = segment_folder(runner, _folder(tmp_path / "in", 2), tmp_path / "out")
    assert [t.status for t in done] == ["ok", "ok"] and len(masks) == 2
    stops = sum(1 << (s - 1) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    assert all(mask & stops == 0 for mask in masks)


def test_entries_left_out_of_a_folder_are_counted_in_the_last_line_and_the_timings(
    trained_checkpoint, tmp_path, capsys, caplog
):
    """A case named in upper case, a broken link or a patient/study tree is no case run: the warning scrolls away,
    the last line and timings.json (what a cron job's monitoring reads) keep it; the output folder is not counted."""
    (ct,) = _folder(tmp_path / "in", 1)
    (tmp_path / "in" / "upper_0000.NII.GZ").write_bytes(ct.read_bytes())
    (tmp_path / "in" / "gone_0000.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (tmp_path / "in" / "patient" / "study").mkdir(parents=True)
    (tmp_path / "in" / "notes.txt").write_text("not named as an input: not counted")
    os.mkfifo(tmp_path / "in" / "pipe_0000.nii.gz")  # was skipped without a word (folder review)
    out = tmp_path / "in" / "results"  # inside the input folder: left out silently
    argv = ["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-o", str(out)]
    with caplog.at_level("WARNING", logger="flareseg"):
        assert infer_main(argv) == 0
    warned = sorted(r.getMessage() for r in caplog.records if ": ignored: " in r.getMessage())
    expected = [
        (tmp_path / "in" / "gone_0000.nii.gz", "a link to nothing"),
        (tmp_path / "in" / "patient", "no DICOM files directly in it (folders inside it are not searched)"),
        (tmp_path / "in" / "pipe_0000.nii.gz", "not a regular file (a named pipe, a socket or a device)"),
        (tmp_path / "in" / "upper_0000.NII.GZ", "a NIfTI file must end in .nii or .nii.gz, in lower case"),
    ]
    assert warned == [f"{path}: ignored: {why}" for path, why in expected]  # each said once, though listed ahead
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("1 segmented, 0 skipped (already done), 0 failed of 1 (4 more entries of the folder ")
    context = json.loads((out / "timings.json").read_text())["context"]
    assert sorted((entry["path"], entry["why"]) for entry in context["ignored_inputs"]) == [
        (str(path), why) for path, why in expected
    ]
    (tmp_path / "in" / "gone_0000.nii.gz").unlink()
    (tmp_path / "in" / "upper_0000.NII.GZ").unlink()
    (tmp_path / "in" / "pipe_0000.nii.gz").unlink()
    assert infer_main(argv) == 0  # resumed: nothing runs, one entry still left out
    assert "0 segmented, 1 skipped (already done), 0 failed of 1 (1 more entry of the folder ignored: see the " in (
        capsys.readouterr().out
    )


def test_a_result_written_by_another_run_while_the_model_loads_is_kept_with_exit_0(
    trained_checkpoint, tmp_path, monkeypatch, capsys
):
    """Between the command's check of the output and the case's own (model loading, the memory plan), another
    run writes the result: it is kept, and the command ends as if it had been there (it used to exit 2)."""
    (ct,) = _folder(tmp_path / "in", 1)
    out = tmp_path / "out" / "c0.nii.gz"
    theirs = b"another run's result"
    real = pipeline.file_job

    def file_job(*args, **kwargs):  # a test double: the other run's file lands just before the case's check
        out.parent.mkdir(exist_ok=True)
        out.write_bytes(theirs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "file_job", file_job)
    assert infer_main(["--model", str(trained_checkpoint), "-i", str(ct), "-o", str(out)]) == 0
    assert out.read_bytes() == theirs
    said = capsys.readouterr().out
    assert "0 segmented, 1 skipped (already done), 0 failed of 1" in said
    assert "no timings (no case ran to its end)" in said
    assert sorted(p.name for p in out.parent.iterdir()) == ["c0.nii.gz"]  # no timings, no temporary file


def test_a_resumed_folder_checks_each_done_result_once(trained_checkpoint, tmp_path, monkeypatch):
    """The read ahead plans the folder up to its first case to run; the run takes that plan on, so each done
    case's result is checked against its input once (it was twice: 1.3 ms a case, for every done case)."""
    from flareseg.runtime import jobs

    paths = _folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    argv = ["--model", str(trained_checkpoint), "-i", str(tmp_path / "in"), "-o", str(out), "-q"]
    assert infer_main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.nii.gz")}
    (out / "c1.nii.gz").unlink()  # c0 and c2 done, c1 to run
    checked: list[str] = []
    real = jobs.why_not_kept

    def why_not_kept(output, *args, **kwargs):
        checked.append(Path(output).name)
        return real(output, *args, **kwargs)

    monkeypatch.setattr(jobs, "why_not_kept", why_not_kept)
    assert infer_main(argv) == 0
    assert sorted(checked) == ["c0.nii.gz", "c2.nii.gz"]
    assert {p.name: p.read_bytes() for p in out.glob("*.nii.gz")} == before  # c1 made again, the same
    timings = json.loads((out / "timings.json").read_text())
    assert [c["status"] for c in timings["cases"]] == ["skipped", "ok", "skipped"]
    with open_runner(trained_checkpoint) as runner, pytest.raises(FlareSegError, match="not of these inputs"):
        segment_folder(runner, paths[::-1], out, planned=jobs.plan_folder(paths, out))


def test_a_resume_says_which_kept_results_another_model_or_no_model_made(
    trained_checkpoint, int8_export, tmp_path, caplog, capsys
):
    # A model retrained and run over its folder again kept the old model's results unsaid, and a copy of the ground
    # truth in the output folder was taken for done (found by a README walkthrough).
    paths = _folder(tmp_path / "in", 4)
    out = tmp_path / "out"
    with open_runner(trained_checkpoint) as runner:
        segment_folder(runner, paths, out, batch_size=4)
        digest = runner.stamp().sha256
    # c1 as flareseg wrote it before its outputs named the model (and a callable runner still does); c2 as another
    # tool's file or a copy of the ground truth: the same grid and labels, no description.
    for case, description in (("c1", PLAIN_DESCRIPTION), ("c2", "")):
        written = nib.load(out / f"{case}.nii.gz")
        copied = nib.Nifti1Image(np.asarray(written.dataobj), written.affine)
        copied.header["descrip"] = description.encode()
        nib.save(copied, out / f"{case}.nii.gz")
    other = tmp_path / "retrained.pt"
    other.write_bytes(trained_checkpoint.read_bytes() + b"\0")  # never loaded: every case is kept
    caplog.set_level(logging.WARNING, logger="flareseg")

    def said() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.name == "flareseg.runtime.pipeline"]
        caplog.clear()
        return lines

    kept = f"{trained_checkpoint.name}, sha256:{digest[:16]}"
    copies = [
        "1 result kept from an earlier run, made by flareseg without naming its model (an earlier version, or a "
        "callable runner): c1; --overwrite redoes it",
        "1 result kept from an earlier run, not made by flareseg (another tool's, or copied in?): c2; --overwrite "
        "redoes it",
    ]
    timings = segment_folder(open_runner(other), paths, out)
    assert [t.status for t in timings] == ["skipped"] * 4
    assert said() == [
        f"2 results kept from an earlier run, made by another model file than retrained.pt (sha256:"
        f"{ModelStamp.read(other)[0].sha256[:16]}): c0 ({kept}), c3 ({kept}); --overwrite redoes them",
        *copies,
    ]
    # The model that made them, or an export of it: nothing to say of those, only of the copies. (The other way
    # round, a result names only its own file: the checkpoint it came from is not in it.)
    segment_folder(open_runner(trained_checkpoint), paths, out)
    assert said() == copies
    exported = next(m.path for m in int8_export if m.metadata.precision == "fp32")
    segment_folder(open_runner(exported), paths, out)
    assert said() == copies
    # A single file kept by flare-infer says it too.
    argv = ["--model", str(other), "-i", str(paths[0]), "-o", str(out / "c0.nii.gz")]
    assert infer_main(argv) == 0
    assert said()[0].startswith("1 result kept from an earlier run, made by another model file than retrained.pt")
    assert "c0.nii.gz exists, kept" in capsys.readouterr().out


def test_a_case_with_nan_scores_is_warned_of_and_counted_in_its_timings(tmp_path, caplog):
    (ct,) = _folder(tmp_path / "in", 1)
    info = ModelInfo(
        network=NetworkConfig(base_width=4, in_channels=3),
        normalization=NormalizationStats(mean=-120.0, std=420.0),
        slice_size=(32, 32),
    )

    def model(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], 5, *x.shape[2:]))
        out[:2, 3] = torch.nan  # the first two slices of each batch: all spleen, by argmax
        return out

    with caplog.at_level(logging.WARNING), FunctionRunner(model, info, input_channels=3) as runner:
        timing = segment_file(runner, ct, tmp_path / "out" / "c0.nii.gz", batch_size=4, postprocess=False)
    slices = timing.slices
    expected = 2 * (slices // 4) + min(slices % 4, 2)
    assert timing.status == "ok" and timing.nonfinite_slices == expected > 0
    (said,) = [r.getMessage() for r in caplog.records if r.name == pipeline.log.name and r.levelname == "WARNING"]
    assert said == (
        f"{ct}: the model gave NaN or infinite scores on {expected} of {slices} slices; their labels are not to be "
        "trusted (a model that overflows in fp16, or a damaged one)"
    )
    assert timing.to_dict()["nonfinite_slices"] == expected  # in the timings file, beside the case's figures


def test_a_resume_says_which_kept_results_were_made_with_the_other_post_processing(
    trained_checkpoint, tmp_path, caplog
):
    # A folder begun with --no-postprocess and resumed without it (or the other way round) held both kinds of label
    # map, unsaid (folder review). The setting of a kept result's run is read from that run's timings.
    paths = _folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    base = ["--model", str(trained_checkpoint), "-i", str(paths[0].parent), "-o", str(out), "-q"]
    caplog.set_level(logging.WARNING, logger="flareseg")

    def said() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.name == pipeline.log.name]
        caplog.clear()
        return lines

    assert infer_main([*base, "--no-postprocess"]) == 0
    (out / "c2.nii.gz").unlink()
    assert infer_main(base) == 0  # c2 post-processed now; c0 and c1 kept as they were
    assert said() == [
        "2 results kept from an earlier run, made without post-processing (its run's timings say), where this run "
        "post-processes: c0, c1; --overwrite redoes them"
    ]
    (out / "c1.nii.gz").unlink()
    assert infer_main([*base, "--no-postprocess"]) == 0  # c2 (kept) was post-processed, c0 was not: like this run
    assert said() == [
        "1 result kept from an earlier run, made with post-processing (its run's timings say), where this run does "
        "not (--no-postprocess): c2; --overwrite redoes it"
    ]
    assert infer_main([*base, "--overwrite", "--no-postprocess"]) == 0 and said() == []  # redone: one setting
    assert infer_main([*base, "--no-postprocess"]) == 0 and said() == []
    # One file: its own timings beside it.
    single = ["--model", str(trained_checkpoint), "-i", str(paths[0]), "-o", str(tmp_path / "one.nii.gz"), "-q"]
    assert infer_main(single) == 0 and infer_main(single) == 0 and said() == []
    assert infer_main([*single, "--no-postprocess"]) == 0
    assert said() == [
        "1 result kept from an earlier run, made with post-processing (its run's timings say), where this run does "
        "not (--no-postprocess): one.nii.gz; --overwrite redoes it"
    ]


def test_the_post_processing_of_kept_results_is_read_across_path_spellings_and_parts(
    trained_checkpoint, tmp_path, caplog, monkeypatch
):
    # Relative paths one run, absolute the next, and a folder run in parts before a whole run: the kept results'
    # setting was missed (diff review). Timings record the folder a run started in; the parts' files are read too.
    _folder(tmp_path / "in", 3)
    model = ["--model", str(trained_checkpoint), "-q"]
    caplog.set_level(logging.WARNING, logger="flareseg")

    def said() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.name == pipeline.log.name]
        caplog.clear()
        return lines

    monkeypatch.chdir(tmp_path)
    assert infer_main([*model, "-i", "in", "-o", "rel", "--no-postprocess"]) == 0
    (tmp_path / "rel" / "c2.nii.gz").unlink()
    monkeypatch.chdir(tmp_path / "in")  # elsewhere, absolute paths: the same cases
    assert infer_main([*model, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "rel")]) == 0
    assert said() == [
        "2 results kept from an earlier run, made without post-processing (its run's timings say), where this run "
        "post-processes: c0, c1; --overwrite redoes them"
    ]
    _folder(tmp_path / "in5", 5)  # c0..c3 fall in part 1 of 2, c4 in part 0 (CRC-32 of the names)
    parts = ["-i", str(tmp_path / "in5"), "-o", str(tmp_path / "parts")]
    assert infer_main([*model, *parts, "--num-parts", "2", "--part-id", "0", "--no-postprocess"]) == 0
    assert infer_main([*model, *parts, "--num-parts", "2", "--part-id", "1"]) == 0
    assert said() == []
    part0 = json.loads((tmp_path / "parts" / "timings-part0of2.json").read_text())["cases"]
    assert [c["case"] for c in part0] == ["c4"]
    assert infer_main([*model, *parts]) == 0  # the whole folder: every case kept, part 0's made without
    assert said() == [
        "1 result kept from an earlier run, made without post-processing (its run's timings say), where this run "
        "post-processes: c4; --overwrite redoes it"
    ]


def test_the_newest_timings_beside_a_result_say_how_it_was_made_and_a_damaged_one_is_passed_over(
    trained_checkpoint, tmp_path, caplog
):
    # A single case redone without post-processing into a folder's output: its own NAME.timings.json is newer
    # than the folder's timings.json, and right (second diff review). A damaged timings file (a NUL in a path)
    # crashed the run after its cases were written.
    paths = _folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    model = ["--model", str(trained_checkpoint), "-q"]
    caplog.set_level(logging.WARNING, logger="flareseg")
    assert infer_main([*model, "-i", str(paths[0].parent), "-o", str(out)]) == 0
    one = ["-i", str(paths[1]), "-o", str(out / "c1.nii.gz")]
    assert infer_main([*model, *one, "--overwrite", "--no-postprocess"]) == 0
    damaged = json.loads((out / "timings.json").read_text())
    damaged["cases"][0]["input"] = "in/c0\0_0000.nii.gz"
    (out / "timings-old.json").write_text(json.dumps(damaged))
    os.utime(out / "timings-old.json", (1e9, 1e9))  # an old copy: the newer files are right where they differ
    # Run twice as it was. The second time timings.json, rewritten, carries c1's first measurement (with) as its
    # earlier run and is the newer file; each case's own run start still says which is newest (third diff review).
    for _ in range(2):
        (out / "c2.nii.gz").unlink()
        caplog.clear()
        assert infer_main([*model, "-i", str(paths[0].parent), "-o", str(out)]) == 0
        assert [r.getMessage() for r in caplog.records if r.name == pipeline.log.name] == [
            "1 result kept from an earlier run, made without post-processing (its run's timings say), where this "
            "run post-processes: c1; --overwrite redoes it"
        ]
        cases = json.loads((out / "timings.json").read_text())["cases"]
        assert [c["status"] for c in cases] == ["skipped", "skipped", "ok"]


def test_a_stop_wrapped_in_an_import_error_during_a_case_stops_the_run(trained_checkpoint, tmp_path, monkeypatch):
    # A backend's lazy import on its first batch, interrupted, comes as ImportError("initialization failed"): it
    # failed that case and the run went on (second diff review).
    paths = _folder(tmp_path / "in", 3)
    real_infer = pipeline._infer_stage

    def infer_stage(runner, read, timing, *args):
        if timing.case == "c1":
            raise ImportError("initialization failed") from KeyboardInterrupt()
        return real_infer(runner, read, timing, *args)

    monkeypatch.setattr(pipeline, "_infer_stage", infer_stage)
    seen: list[str] = []
    with open_runner(trained_checkpoint) as runner, pytest.raises(KeyboardInterrupt):
        segment_folder(runner, paths, tmp_path / "out", batch_size=4, on_case=lambda t: seen.append(t.case))
    assert seen == ["c0"] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c0.nii.gz"]


def test_one_part_of_one_is_the_whole_folder_and_its_timings_are_timings_json(tmp_path):
    from flareseg.runtime.cli import _timings_path

    whole = argparse.Namespace(timings=None, output=tmp_path, num_parts=1, part_id=0)
    assert _timings_path(whole, None) == tmp_path / "timings.json"
    part = argparse.Namespace(timings=None, output=tmp_path, num_parts=3, part_id=2)
    assert _timings_path(part, None) == tmp_path / "timings-part2of3.json"


def test_the_cpu_default_batch_is_the_one_help_states(trained_checkpoint, tmp_path):
    from flareseg.runtime.defaults import CPU_BATCH

    _folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    assert infer_main(["--model", str(trained_checkpoint), "--device", "cpu", "-i", str(tmp_path / "in"), "-o",
                       str(out), "-q"]) == 0  # fmt: skip
    assert CPU_BATCH == 2 and json.loads((out / "timings.json").read_text())["context"]["batch_size"] == 2


# --- mutJ: what no test held the pipeline to ----------------------------------------------------------------


def _two_blob_runner() -> FunctionRunner:
    """Labels of liver in two blobs on every slice, one small: post-processing keeps the large one only."""
    info = ModelInfo(NetworkConfig(base_width=4, in_channels=1), NormalizationStats(0.0, 1.0), slice_size=(48, 48))

    def labels(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], 48, 48), dtype=torch.uint8)
        out[:, 2:6, 2:6] = 1
        out[:, 20:40, 20:40] = 1
        return out

    return FunctionRunner(labels, info, output_kind="labels")


def test_no_post_processing_asked_is_none_done_though_overlapping_it_is_asked_too(tmp_path):
    # Only flare-infer refuses the pair; through the API, overlap_postprocess alone must not switch it back on.
    (ct,) = _folder(tmp_path / "in", 1)
    with _two_blob_runner() as runner:
        for name, options in {
            "plain": {"postprocess": False},
            "both": {"postprocess": False, "overlap_postprocess": True},
            "kept": {"postprocess": True},
        }.items():
            segment_file(runner, ct, tmp_path / f"{name}.nii.gz", batch_size=2, **options)
    plain, both, kept = (np.asanyarray(nib.load(tmp_path / f"{n}.nii.gz").dataobj) for n in ("plain", "both", "kept"))
    assert np.count_nonzero(kept) == 20 * 20 * 6 and np.count_nonzero(plain) == (16 + 400) * 6
    np.testing.assert_array_equal(both, plain)


def test_a_dicom_seg_written_meanwhile_is_kept_unless_replacing(tmp_path):
    from dicom_series import phantom, write_series

    from flareseg.dicom import read_series

    write_series(tmp_path / "series", phantom("LPS"))
    volume = read_series(tmp_path / "series")
    labels = np.zeros(volume.array.shape, np.uint8)
    out = tmp_path / "seg.dcm"
    out.write_bytes(b"another run's SEG")
    with pytest.raises(OutputExistsError):
        pipeline.write_case(labels, volume.geometry, volume.source, out, "dicom-seg", replace=False)
    assert out.read_bytes() == b"another run's SEG"
    pipeline.write_case(labels, volume.geometry, volume.source, out, "dicom-seg", replace=True)
    assert out.read_bytes()[128:132] == b"DICM"
    with pytest.raises(FlareSegError, match=r"DICOM SEG output needs a DICOM series as input"):
        pipeline.write_case(labels, volume.geometry, None, tmp_path / "none.dcm", "dicom-seg")
    assert not (tmp_path / "none.dcm").exists()


def test_a_case_that_fails_before_its_write_is_still_seen_by_on_case(tmp_path):
    paths = _folder(tmp_path / "in", 3)
    paths[1].write_bytes(paths[1].read_bytes()[:200])  # cut short: fails in its read
    seen: list[pipeline.CaseTiming] = []
    with _two_blob_runner() as runner:
        results = segment_folder(runner, paths, tmp_path / "out", batch_size=2, on_case=seen.append)
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert [(t.case, t.status) for t in seen] == [("c0", "ok"), ("c1", "failed"), ("c2", "ok")]


def test_cases_left_for_a_full_disk_are_not_even_read(tmp_path, monkeypatch, caplog):
    # c0's write (disk a) fails slowly; by c2's turn it is known, and c3 (disk a) is not read ahead (minutes each).
    paths = _folder(tmp_path / "in", 5)
    real_write, real_read = pipeline.write_case, reading.read_stage
    devices = {str(tmp_path / "a"): 1, str(tmp_path / "b"): 2}
    read: list[str] = []

    def write_case(labels, geometry, source, path, output_type="nifti", **kwargs):
        if Path(path).parent.name == "a":
            time.sleep(0.3)
            raise NoMoreWritesError(f"{path}: cannot write (No space left on device)")
        return real_write(labels, geometry, source, path, output_type, **kwargs)

    monkeypatch.setattr(pipeline, "write_case", write_case)
    monkeypatch.setattr(pipeline, "_file_system", lambda path: devices[str(Path(path).parent)])
    monkeypatch.setattr(reading, "read_stage", lambda path, *a: read.append(Path(path).name) or real_read(path, *a))
    jobs = [CaseJob(f"c{i}", p, tmp_path / "abbab"[i] / f"c{i}.nii.gz") for i, p in enumerate(paths)]
    with _two_blob_runner() as runner, caplog.at_level(logging.ERROR, logger=pipeline.log.name):
        results = run_cases(runner, jobs, batch_size=2)
    assert [r.status for r in results] == ["failed", "ok", "ok", "failed", "ok"]
    said = [r.getMessage() for r in caplog.records if r.name == pipeline.log.name and "not tried" in r.getMessage()]
    assert said == [  # c3 alone is left for disk a: c4 goes to b
        f"{tmp_path / 'a'}: no more writes there since case c0's failed; 1 case left for it not tried (free room "
        "and run again: finished cases are kept)"
    ]
    assert results[3].error == f"not tried: {tmp_path / 'a'} takes no more writes"
    assert "c3_0000.nii.gz" not in read and len(read) == 4


def test_the_slices_progress_and_the_reader_thread_ends_with_the_run(tmp_path):
    paths = _folder(tmp_path / "in", 2)
    calls: list[int] = []
    before = {t for t in threading.enumerate() if t.name.startswith("flareseg-read")}
    with _two_blob_runner() as runner:
        segment_folder(runner, paths, tmp_path / "out", batch_size=4, progress=calls.append)
    assert sum(calls) == 12 and len(calls) >= 4  # 6 slices per case, by batch
    after = {t for t in threading.enumerate() if t.name.startswith("flareseg-read") and t.is_alive()}
    assert after <= before  # no reader thread left per run (a service would gather them)


def test_timings_of_an_earlier_run_are_kept_for_its_skipped_cases_only(tmp_path):
    from flareseg.runtime.pipeline import CaseTiming, earlier_cases, summarize, write_timings

    path = tmp_path / "timings.json"
    for text in ("[1, 2]\n", "3\n", '"x"\n'):  # valid JSON, not a timings file: ignored, not a crash
        path.write_text(text)
        assert earlier_cases(path) == {}
    earlier = {c: {"case": c, "input": f"{c}_0000.nii.gz", "output": f"{c}.nii.gz", "infer_s": 9.0} for c in "abcd"}
    now = [
        CaseTiming("a", "a_0000.nii.gz", "a.nii.gz", status="skipped"),
        CaseTiming("b", "b_0000.nii.gz", "b.nii.gz"),  # measured again now
        CaseTiming("c", "c_0000.nii.gz", "c.nii.gz", status="failed", error="c: cut short"),
        CaseTiming("d", "d_0000.nii.gz", "d.dcm", status="skipped"),  # another output: not its measurement
    ]
    write_timings(now, path, {}, earlier=earlier)
    cases = {c["case"]: c for c in json.loads(path.read_text())["cases"]}
    assert cases["a"]["earlier_run"]["infer_s"] == 9.0
    assert all("earlier_run" not in cases[c] for c in "bcd")
    # A failure first is counted as one failed, wherever it is.
    assert summarize(now[2:3] + now[:2], 1.0).failed == 1


def test_a_case_s_wall_time_counts_its_read(tmp_path, monkeypatch):
    (ct,) = _folder(tmp_path / "in", 1)
    real_read = reading.read_case

    def slow_read(path, *args, **kwargs):
        time.sleep(0.5)  # a large volume's read, here in time only
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(reading, "read_case", slow_read)
    with _two_blob_runner() as runner:
        timing = segment_file(runner, ct, tmp_path / "c0.nii.gz", batch_size=2)
    assert timing.read_s >= 0.5 and timing.wall_s >= timing.read_s + timing.infer_s + timing.write_s - 0.01
