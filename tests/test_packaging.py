"""The built package: what a user's ``pip install`` gets."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_py_typed_so_type_checkers_read_our_annotations(tmp_path):
    """Without the PEP 561 marker, mypy treats every flareseg name in a user's code as Any."""
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools installed")
    src = tmp_path / "src"
    shutil.copytree(REPO / "flareseg", src / "flareseg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    cmd.append(str(src))
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("flareseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "flareseg/py.typed" in names
    assert "flareseg/runtime/pipeline.py" in names  # the packages themselves, so the check above means something
