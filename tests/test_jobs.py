"""A run's plan: which cases of a folder run, which are skipped and which are refused; no torch on import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flareseg.errors import FlareSegError
from flareseg.runtime import jobs
from flareseg.runtime.jobs import CaseJob, plan_folder


def _inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [folder / f"c{i}_0000.nii.gz" for i in range(4)]
    for p in paths:
        p.write_bytes(b"not read by the plan")
    empty_series = folder / "series"
    empty_series.mkdir()  # a folder input without DICOM files: its name cannot be read
    return [*paths, empty_series]


def test_the_plan_runs_skips_and_refuses_each_case_in_order(tmp_path):
    inputs, out = _inputs(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "c1.nii.gz").write_bytes(b"done")  # finished: skipped
    (out / "c2.nii.gz").mkdir()  # ... unless overwritten; a folder is then in the way
    plan = list(plan_folder(inputs, out))
    assert [(p.case, p.status) for p in plan] == [
        ("c0", "run"),
        ("c1", "skipped"),
        ("c2", "skipped"),  # its output exists, even if it is a folder
        ("c3", "run"),
        ("series", "failed"),
    ]
    assert plan[0].job == CaseJob("c0", inputs[0], out / "c0.nii.gz")
    assert str(plan[4].error) == f"{inputs[4]}: no DICOM files" and plan[4].output is None
    again = list(plan_folder(inputs, out, overwrite=True))
    assert [p.status for p in again] == ["run", "run", "failed", "run", "failed"]
    assert str(again[2].error) == f"{out / 'c2.nii.gz'}: a folder is in the way of the output"
    with pytest.raises(FlareSegError, match="c1 is skipped, not run"):
        _ = plan[1].job
    seg = list(plan_folder(inputs[:1], out, "dicom-seg"))
    assert seg[0].status == "failed" and "DICOM SEG output needs a DICOM series" in str(seg[0].error)


def test_the_plan_is_lazy_so_the_first_case_to_run_is_found_at_once(tmp_path, monkeypatch):
    inputs, out = _inputs(tmp_path), tmp_path / "out"
    named: list[str] = []
    real = jobs.input_case_name
    monkeypatch.setattr(jobs, "input_case_name", lambda p: named.append(p.name) or real(p))
    first = next(p for p in plan_folder(inputs, out) if p.status == "run")
    assert first.input == inputs[0] and named == ["c0_0000.nii.gz"]


def test_planning_imports_no_torch():
    code = "import sys, flareseg.runtime.jobs; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
