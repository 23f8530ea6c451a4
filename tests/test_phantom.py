"""The synthetic phantom: labels, Hounsfield values, orientation, FLARE21 layout."""

from __future__ import annotations

import contextlib

import nibabel as nib
import numpy as np
import pytest

from flareseg.errors import FlareSegError
from flareseg.phantom import main, make_phantom


def test_phantom_has_all_organs_with_plausible_hounsfield_values():
    ph = make_phantom((96, 96, 48), spacing=(4.0, 4.0, 6.0), seed=3)
    assert ph.image.dtype == np.int16 and ph.labels.dtype == np.uint8
    assert set(np.unique(ph.labels)) == {0, 1, 2, 3, 4}
    counts = np.bincount(ph.labels.ravel(), minlength=5)
    assert counts[1] > counts[3] > counts[4] > 0  # liver > spleen > pancreas
    medians = {k: float(np.median(ph.image[ph.labels == k])) for k in (1, 2, 3, 4)}
    assert 40 < medians[1] < 80 and 30 < medians[3] < 70 and 20 < medians[4] < 60 and medians[2] > 100
    assert np.median(ph.image[0]) < -950  # air at the edge of the field of view
    assert ph.image.max() > 400  # bone


def test_liver_is_on_the_patients_right_and_spleen_on_the_left():
    ph = make_phantom((64, 64, 32), spacing=(6.0, 6.0, 8.0))
    ijk = {k: np.argwhere(ph.labels == k).mean(0) for k in (1, 3)}
    world = {k: ph.affine[:3, :3] @ v + ph.affine[:3, 3] for k, v in ijk.items()}
    assert world[1][0] > 0 > world[3][0]  # RAS+: +x points to the patient's right


@pytest.mark.parametrize("axcodes", ["LPS", "ASR"])
def test_orientation_changes_storage_not_anatomy(axcodes):
    ras = make_phantom((40, 36, 20), seed=1)
    other = make_phantom((40, 36, 20), seed=1, axcodes=axcodes)
    assert nib.aff2axcodes(other.affine) == tuple(axcodes)
    # The same world point holds the same label.
    for ijk in ([5, 7, 3], [20, 18, 10], [33, 30, 15]):
        world = ras.affine @ np.array([*ijk, 1.0])
        other_ijk = np.round(np.linalg.inv(other.affine) @ world)[:3].astype(int)
        assert ras.labels[tuple(ijk)] == other.labels[tuple(other_ijk)]


def test_bad_arguments_are_refused():
    with pytest.raises(FlareSegError, match="shape"):
        make_phantom((10, 10))
    with pytest.raises(FlareSegError, match="spacing"):
        make_phantom(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(FlareSegError, match="orientation"):
        make_phantom((8, 8, 8), axcodes="RRS")


def test_command_writes_flare21_layout(tmp_path):
    assert main([str(tmp_path), "--cases", "2", "--shape", "32,32,16"]) == 0
    assert sorted(p.name for p in (tmp_path / "TrainingImg").iterdir()) == [
        "train_000_0000.nii.gz",
        "train_001_0000.nii.gz",
    ]
    assert sorted(p.name for p in (tmp_path / "TrainingMask").iterdir()) == ["train_000.nii.gz", "train_001.nii.gz"]
    img = nib.load(tmp_path / "TrainingImg" / "train_001_0000.nii.gz")
    assert img.shape == (32, 32, 16) and img.get_data_dtype() == np.int16


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--spacing", "nan,1,1"], "argument --spacing: expected a finite number"),
        (["--shape", "abc"], "argument --shape: expected an integer, got 'abc'"),
        (["--shape", "32,32"], "argument --shape: expected three comma-separated values"),
        (["--seed", "-5"], "argument --seed: expected an integer >= 0"),
        (["--cases", "0"], "argument --cases: expected an integer >= 1"),
        (["--orientation", "XYZ"], "invalid orientation XYZ"),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "ph"
    with pytest.raises(SystemExit) if argv[0] != "--orientation" else contextlib.nullcontext() as stopped:
        assert main([str(out), "--shape", "16,16,8", *argv]) == 2
    if stopped is not None:
        assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and not any("Traceback" in line for line in err)
    assert not out.exists()


def test_an_output_that_cannot_be_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main([str(tmp_path / "afile"), "--shape", "16,16,8"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "afile is a file" in err and (tmp_path / "afile").read_text() == "x"


def test_existing_cases_are_refused_before_anything_is_written_unless_overwrite(tmp_path, capsys):
    # Phantom files carry real FLARE21 names: pointed at a real dataset, they would replace real scans.
    assert main([str(tmp_path), "--cases", "1", "--shape", "32,32,8", "-q"]) == 0
    first = (tmp_path / "TrainingImg" / "train_000_0000.nii.gz").read_bytes()
    capsys.readouterr()
    assert main([str(tmp_path), "--cases", "2", "--shape", "40,40,8", "-q"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m flareseg.phantom: error: {tmp_path / 'TrainingImg' / 'train_000_0000.nii.gz'}: exists and 1 "
        "more; a phantom replaces no file unasked (--overwrite)"
    )
    assert (tmp_path / "TrainingImg" / "train_000_0000.nii.gz").read_bytes() == first
    assert not (tmp_path / "TrainingImg" / "train_001_0000.nii.gz").exists()  # nothing of the run was written
    assert main([str(tmp_path), "--cases", "2", "--shape", "40,40,8", "--overwrite", "-q"]) == 0
    assert nib.load(tmp_path / "TrainingImg" / "train_000_0000.nii.gz").shape == (40, 40, 8)


def test_each_case_of_a_phantom_folder_is_a_different_patient(tmp_path):
    # A copy of one case under several names would have demos validate on a training case.
    from flareseg.phantom import write_phantom_cases

    (a, _), (b, _) = write_phantom_cases(tmp_path, 2, shape=(32, 32, 8), spacing=(8.0, 8.0, 10.0))
    assert not np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
