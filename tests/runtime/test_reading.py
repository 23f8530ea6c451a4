"""The read stage and its reader thread: prefetching, hand-over, closing; no torch on import."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import save

from flareseg.errors import FlareSegError
from flareseg.percentiles import exact_percentiles, value_histogram
from flareseg.phantom import make_phantom
from flareseg.runtime import reading
from flareseg.runtime.reading import Reader, read_stage


def _ct(tmp_path, name="c0_0000.nii.gz", seed=0):
    return save(make_phantom((40, 36, 5), (8.0, 8.0, 10.0), seed=seed).to_nifti()[0], tmp_path / name)


def test_read_stage_gives_the_volume_and_the_exact_percentiles(tmp_path):
    read = read_stage(_ct(tmp_path))
    assert read.volume.array.shape == (5, 36, 40) and read.read_s >= 0 and read.histogram_s >= 0
    assert read.histogram is not None
    assert read.histogram.percentiles((1.0, 99.0)) == exact_percentiles(read.volume.array, (1.0, 99.0))


def _whole_counts(monkeypatch) -> list[tuple[int, ...]]:
    """Spy on the read stage's count of a whole volume (the fallback when nothing was counted while inflating)."""
    calls: list[tuple[int, ...]] = []
    real = reading.value_histogram
    monkeypatch.setattr(reading, "value_histogram", lambda a: calls.append(a.shape) or real(a))
    return calls


def test_a_gzipped_int16_file_is_counted_while_it_inflates_and_other_reads_after(tmp_path, monkeypatch):
    whole = _whole_counts(monkeypatch)
    image = make_phantom((40, 36, 5), (8.0, 8.0, 10.0), seed=3).to_nifti()[0]
    gz, plain = save(image, tmp_path / "a_0000.nii.gz"), save(image, tmp_path / "b_0000.nii")
    streamed, after = read_stage(gz), read_stage(plain)
    assert whole == [(5, 36, 40)]  # the .nii only: the .nii.gz was counted while it inflated
    for read in (streamed, after):
        assert read.histogram is not None
        expected = value_histogram(read.volume.array)
        np.testing.assert_array_equal(read.histogram.counts, expected.counts)
        assert read.histogram.low == expected.low
    floats = nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine)
    assert read_stage(save(floats, tmp_path / "c_0000.nii.gz")).histogram is None  # float CT: np.percentile later
    wide = nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.int32), image.affine)
    read = read_stage(save(wide, tmp_path / "d_0000.nii.gz"))
    assert read.histogram is not None and read.histogram.voxels == read.volume.array.size
    assert len(whole) == 3  # float and int32: counted after the read


def test_a_parallel_read_is_counted_after_it_with_the_same_histogram(tmp_path, monkeypatch):
    pytest.importorskip("rapidgzip", reason="rapidgzip (the [dev] and [gpu] extras) is not installed")
    path = _ct(tmp_path)
    serial = read_stage(path)
    whole = _whole_counts(monkeypatch)
    parallel = read_stage(path, threads=2)
    assert whole == [(5, 36, 40)]
    assert serial.histogram is not None and parallel.histogram is not None
    np.testing.assert_array_equal(parallel.histogram.counts, serial.histogram.counts)


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
