"""The read stage and its reader thread: prefetching, hand-over, closing; no torch on import."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import save

from flareseg.errors import FlareSegError
from flareseg.phantom import make_phantom
from flareseg.preprocess import exact_percentiles
from flareseg.runtime import reading
from flareseg.runtime.reading import Reader, read_stage


def _ct(tmp_path, name="c0_0000.nii.gz", seed=0):
    return save(make_phantom((40, 36, 5), (8.0, 8.0, 10.0), seed=seed).to_nifti()[0], tmp_path / name)


def test_read_stage_gives_the_volume_and_the_exact_percentiles(tmp_path):
    read = read_stage(_ct(tmp_path))
    assert read.volume.array.shape == (5, 36, 40) and read.read_s >= 0 and read.histogram_s >= 0
    assert read.histogram is not None
    assert read.histogram.percentiles((1.0, 99.0)) == exact_percentiles(read.volume.array, (1.0, 99.0))


def test_a_prefetched_read_is_handed_out_once_and_others_are_read_in_turn(tmp_path, monkeypatch):
    a, b = _ct(tmp_path, "a_0000.nii.gz", 1), _ct(tmp_path, "b_0000.nii.gz", 2)
    calls: list[str] = []
    real = reading.read_case
    monkeypatch.setattr(reading, "read_case", lambda path, **kw: calls.append(path.name) or real(path, **kw))
    with Reader() as reader:
        reader.prefetch(a)
        reader.prefetch(a)  # twice: still one read
        first = reader.submit(a)
        assert first.result().volume.geometry.path == a
        again, other = reader.submit(a), reader.submit(b)  # the prefetch is spent: a is read again
        assert again is not first and other.result().volume.geometry.path == b
        np.testing.assert_array_equal(again.result().volume.array, first.result().volume.array)
    assert calls == ["a_0000.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz"]


def test_closing_cancels_reads_not_begun_and_after_an_error_does_not_wait(tmp_path, monkeypatch):
    path = _ct(tmp_path)
    release = threading.Event()
    real = reading.read_case

    def slow(p, **kw):
        release.wait(10)
        return real(p, **kw)

    monkeypatch.setattr(reading, "read_case", slow)
    reader = Reader()
    under_way, queued = reader.submit(path), reader.submit(path)
    t = time.perf_counter()
    with pytest.raises(FlareSegError), reader:
        raise FlareSegError("an error elsewhere")
    assert time.perf_counter() - t < 5  # the read under way was not awaited
    assert queued.cancelled() and not under_way.done()
    release.set()
    assert under_way.result(10).volume.array.shape == (5, 36, 40)  # it ends on its own


def test_the_reader_checks_its_thread_count_at_once():
    with pytest.raises(FlareSegError, match="read threads"):
        Reader(-1)


def test_reading_imports_no_torch():
    code = "import sys, flareseg.runtime.reading; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
