"""The start-up timeline: seconds since the process began, marked at points of a run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from flareseg.runtime import startup
from flareseg.runtime.startup import Timeline, process_age_s

linux_only = pytest.mark.skipif(process_age_s() is None, reason="needs /proc (Linux) for the process start time")


@linux_only
def test_process_age_counts_from_the_process_start_not_from_an_import():
    # A child that sleeps before importing the module: its age at the first call includes the sleep.
    code = "import time; time.sleep(0.4); from flareseg.runtime.startup import process_age_s; print(process_age_s())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert age >= 0.4 - 0.011  # the kernel's start time has a 10 ms resolution
    a = process_age_s()
    time.sleep(0.05)
    b = process_age_s()
    assert a is not None and b is not None and b - a >= 0.05 - 1e-3


@linux_only
def test_timeline_marks_in_order_and_stamps_its_end():
    timeline = Timeline()
    for name in ("main", "activated", "all_written"):
        timeline.mark(name)
    before = time.time()
    timeline.end()
    data = json.loads(json.dumps(timeline.to_dict()))
    marks = data["since_process_start_s"]
    assert list(marks) == ["main", "activated", "all_written", "end"]
    assert list(marks.values()) == sorted(marks.values()) and marks["main"] > 0
    assert before <= data["end_epoch_s"] <= time.time()


def test_without_a_process_start_the_timeline_stays_empty(monkeypatch):
    monkeypatch.setattr(startup, "process_age_s", lambda: None)
    timeline = Timeline()
    timeline.mark("main")
    timeline.end()
    assert timeline.marks == {} and timeline.end_epoch_s is not None


def test_the_command_module_imports_no_heavy_library_before_main():
    # flare-infer's first mark ("main") must not already hold torch's import: the package
    # loads its public names lazily, so importing the command module stays light.
    code = (
        "import sys, flareseg.runtime.cli\n"
        "print(sorted(m for m in ('torch', 'nibabel', 'cc3d', 'onnxruntime', 'tensorrt') if m in sys.modules))\n"
        "from flareseg.runtime import TorchRunner, segment_file\n"
        "print(TorchRunner.__module__, segment_file.__module__, 'torch' in sys.modules)\n"
        "import flareseg.runtime.runners, flareseg.runtime.pipeline, flareseg.export.metadata\n"
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'tensorrt', 'openvino') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    # The PyTorch path needs none of the exporters' or the other backends' libraries (onnx alone is ~0.7 s).
    assert out == ["[]", "flareseg.runtime.runners.pytorch flareseg.runtime.pipeline True", "[]"]


def test_an_unknown_runtime_name_is_an_attribute_error():
    import flareseg.runtime

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        flareseg.runtime.nothing_here  # noqa: B018
    assert {"segment_folder", "open_runner"} <= set(dir(flareseg.runtime))


def test_every_public_runtime_name_resolves():
    import flareseg.runtime

    for name in flareseg.runtime.__all__:
        assert getattr(flareseg.runtime, name).__name__ == name


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_the_first_read_starts_before_torch_is_imported(trained_checkpoint, tmp_path, folder):
    # A fresh flare-infer process: the first read must be under way before torch's import
    # begins, so that the two overlap. In a folder, that is the first case left to run.
    import nibabel as nib

    from flareseg.phantom import make_phantom

    cases = tmp_path / "cases"
    cases.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        nib.save(make_phantom((48, 48, 6), (8.0, 8.0, 10.0), seed=i).to_nifti()[0], cases / f"{name}_0000.nii.gz")
    if folder:
        inp, out = cases, tmp_path / "pred"
        out.mkdir()
        # finished: skipped, so b is the first read
        nib.save(make_phantom((48, 48, 6), (8.0, 8.0, 10.0), seed=0).to_nifti()[1], out / "a.nii.gz")
        done_before = (out / "a.nii.gz").read_bytes()
    else:
        inp, out = cases / "b_0000.nii.gz", tmp_path / "b.nii.gz"
    code = f"""
import importlib.abc, pathlib, sys, threading, time
events = []
reading_began = threading.Event()

class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not any(e == "torch" for e, _ in events):
            # A read submitted before this import gets the chance to begin whatever the
            # scheduler does; one submitted after it cannot, and comes second after 5 s.
            reading_began.wait(5)
            events.append(("torch", time.perf_counter()))
        return None

sys.meta_path.insert(0, Spy())
import flareseg.runtime.reading as reading
real = reading.read_ct

def read_ct(path, **kw):
    events.append((pathlib.Path(path).name[0], time.perf_counter()))
    reading_began.set()
    return real(path, **kw)

reading.read_ct = read_ct
from flareseg.runtime.cli import main
rc = main(["--model", {str(trained_checkpoint)!r}, "-i", {str(inp)!r}, "-o", {str(out)!r}, "-q"])
print(rc, [e for e, _ in sorted(events, key=lambda e: e[1])])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    expected = "0 ['b', 'torch', 'c']" if folder else "0 ['b', 'torch']"
    assert result.strip().splitlines()[-1] == expected
    assert (out / "b.nii.gz" if folder else out).is_file()
    if folder:
        assert (out / "a.nii.gz").read_bytes() == done_before and (out / "c.nii.gz").is_file()


def test_nothing_is_read_ahead_without_a_nifti_case_to_run_or_when_the_inputs_are_in_error(tmp_path, monkeypatch):
    import nibabel as nib
    import numpy as np
    from dicom_series import phantom, write_series

    from flareseg.runtime import jobs
    from flareseg.runtime.cli import _look_ahead, build_parser

    cases, out = tmp_path / "cases", tmp_path / "pred"
    cases.mkdir()
    out.mkdir()
    write_series(cases / "a_series", phantom(), patient_id="A", series_number=1)  # case "A_20260101_s1", first by name
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.int16), np.eye(4)), cases / "b_0000.nii.gz")

    def first(*extra: str):
        first, listed, _ = _look_ahead(
            build_parser().parse_args(["--model", "m.pt", "-i", str(cases), "-o", str(out), *extra])
        )
        assert listed in (None, [cases / "a_series", cases / "b_0000.nii.gz"])  # handed on to the run
        return first

    assert first() is None  # the first case to run is a series: read after the imports, as a series input is
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.uint8), np.eye(4)), out / "A_20260101_s1.nii.gz")  # done
    assert first() == cases / "b_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.uint8), np.eye(4)), out / "b.nii.gz")  # done
    assert first() is None  # every case is done: nothing to read
    assert first("--overwrite") is None  # the series comes first again
    monkeypatch.setattr(jobs, "list_cases", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    assert first("--overwrite") is None  # the run reports the folder's error itself, in its usual order


def test_a_folder_is_listed_once_per_run(trained_checkpoint, tmp_path, monkeypatch):
    import nibabel as nib

    from flareseg.phantom import make_phantom
    from flareseg.runtime import jobs
    from flareseg.runtime.cli import main

    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a", "b"):
        nib.save(make_phantom((32, 32, 3), (8.0, 8.0, 10.0)).to_nifti()[0], cases / f"{name}_0000.nii.gz")
    calls: list[str] = []
    real = jobs.list_cases
    monkeypatch.setattr(jobs, "list_cases", lambda folder, **kw: calls.append(str(folder)) or real(folder, **kw))
    assert main(["--model", str(trained_checkpoint), "-i", str(cases), "-o", str(tmp_path / "pred"), "-q"]) == 0
    assert calls == [str(cases)] and sorted(p.name for p in (tmp_path / "pred").glob("*.nii.gz")) == [
        "a.nii.gz",
        "b.nii.gz",
    ]
