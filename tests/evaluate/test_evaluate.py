"""flare-eval: matching, scoring, CSV, summary, and errors at the command line."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BAD_INPUT_KINDS, bad_inputs, reorient, save
from scipy import ndimage

from flareseg.errors import FlareSegError
from flareseg.evaluate import evaluate_folders
from flareseg.evaluate.cli import main
from flareseg.metrics import dice
from flareseg.phantom import make_phantom


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def _perturb(mask_path: Path, out: Path) -> np.ndarray:
    img = nib.load(mask_path)
    lab = np.asarray(img.dataobj).copy()
    liver = lab == 1
    lab[liver & ~ndimage.binary_erosion(liver)] = 0  # peel the liver's outer layer
    lab[lab == 4] = 0  # miss the pancreas entirely
    save(nib.Nifti1Image(lab, img.affine, img.header), out)
    return lab


def test_real_sample_against_itself_scores_one_and_perturbed_scores_less(tmp_path, sample_mask, capsys):
    gt_dir = sample_mask.parent
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(sample_mask, same / sample_mask.name)
    assert main(["--pred", str(same), "--gt", str(gt_dir), "-o", str(tmp_path / "a.csv"), "-q"]) == 0
    row = _read_csv(tmp_path / "a.csv")["train_000"]
    assert row["status"] == "ok"
    assert all(
        float(row[f"{o}_{m}"]) == 1.0 for o in ("liver", "kidneys", "spleen", "pancreas") for m in ("dsc", "nsd")
    )
    assert "100.00 ±  0.00" in capsys.readouterr().out

    worse = tmp_path / "worse"
    worse.mkdir()
    perturbed = _perturb(sample_mask, worse / "train_000.nii.gz")
    assert main(["--pred", str(worse), "--gt", str(gt_dir), "-o", str(tmp_path / "b.csv"), "-q"]) == 0
    row = _read_csv(tmp_path / "b.csv")["train_000"]
    gt = np.asarray(nib.load(sample_mask).dataobj)
    assert float(row["liver_dsc"]) == pytest.approx(dice(gt == 1, perturbed == 1), abs=1e-6)
    assert 0.5 < float(row["liver_dsc"]) < 1.0
    # a 3 mm layer removed is beyond the 1 mm tolerance: the liver's surface is mostly missed
    assert float(row["liver_nsd"]) < 0.5
    assert float(row["pancreas_dsc"]) == float(row["pancreas_nsd"]) == 0.0
    assert float(row["kidneys_dsc"]) == float(row["spleen_nsd"]) == 1.0


@pytest.fixture
def phantom_dirs(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    for i in range(3):
        _, lab = make_phantom((48, 40, 24), seed=i).to_nifti()
        save(lab, gt_dir / f"case_{i:03d}.nii.gz")
    return gt_dir, pred_dir


def test_missing_and_extra_predictions_are_reported(phantom_dirs, tmp_path, capsys):
    gt_dir, pred_dir = phantom_dirs
    shutil.copy(gt_dir / "case_000.nii.gz", pred_dir / "case_000.nii.gz")
    shutil.copy(gt_dir / "case_001.nii.gz", pred_dir / "case_001_0000.nii.gz")  # channel tag tolerated
    shutil.copy(gt_dir / "case_001.nii.gz", pred_dir / "stray_009.nii.gz")
    assert (
        main(["--pred", str(pred_dir), "--gt", str(gt_dir), "-o", str(tmp_path / "r.csv"), "-q", "--workers", "2"]) == 0
    )
    rows = _read_csv(tmp_path / "r.csv")
    assert sorted(rows) == ["case_000", "case_001", "case_002"]
    assert rows["case_002"]["status"] == "missing" and float(rows["case_002"]["liver_dsc"]) == 0.0
    assert float(rows["case_001"]["liver_nsd"]) == 1.0
    out = capsys.readouterr().out
    assert "2 cases scored, 1 missing (scored 0), 1 extra (not scored)" in out
    assert "missing predictions: case_002" in out and "extra predictions without ground truth: stray_009" in out
    ev = evaluate_folders(pred_dir, gt_dir, progress=False)
    assert ev.organ_values(1, 0) == [1.0, 1.0, 0.0]


def _expect_cli_error(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flare-eval: error:")
    for needle in needles:
        assert needle in err[0]


def test_shape_mismatch_names_both_files_and_writes_nothing(phantom_dirs, tmp_path, capsys):
    gt_dir, pred_dir = phantom_dirs
    _, small = make_phantom((40, 40, 24), seed=0).to_nifti()
    save(small, pred_dir / "case_000.nii.gz")
    out = tmp_path / "r.csv"
    _expect_cli_error(
        ["--pred", str(pred_dir), "--gt", str(gt_dir), "-o", str(out), "-q"],
        capsys,
        f"{pred_dir / 'case_000.nii.gz'}: prediction of shape (40, 40, 24), its ground truth (48, 40, 24) "
        f"({gt_dir / 'case_000.nii.gz'}), in any voxel order",
    )
    assert not out.exists()


def test_affine_mismatch_names_both_files(phantom_dirs, capsys):
    gt_dir, pred_dir = phantom_dirs
    gt = nib.load(gt_dir / "case_001.nii.gz")
    shifted = gt.affine.copy()
    shifted[0, 3] += 5.0
    save(nib.Nifti1Image(np.asarray(gt.dataobj), shifted), pred_dir / "case_001.nii.gz")
    _expect_cli_error(
        ["--pred", str(pred_dir), "--gt", str(gt_dir), "-q"],
        capsys,
        f"{pred_dir / 'case_001.nii.gz'}: prediction voxels lie up to 5 mm from its ground truth's "
        f"({gt_dir / 'case_001.nii.gz'}): another grid (shift, spacing or rotation)",
    )


def test_ground_truth_labels_outside_range_name_the_file(phantom_dirs, capsys):
    gt_dir, pred_dir = phantom_dirs
    gt = nib.load(gt_dir / "case_002.nii.gz")
    lab = np.asarray(gt.dataobj).copy()
    lab[0, 0, 0] = 9
    save(nib.Nifti1Image(lab, gt.affine), gt_dir / "case_002.nii.gz")
    shutil.copy(gt_dir / "case_000.nii.gz", pred_dir / "case_002.nii.gz")
    _expect_cli_error(
        ["--pred", str(pred_dir), "--gt", str(gt_dir), "-q"], capsys, "case_002.nii.gz", "labels [9] outside 0..4"
    )


def test_prediction_labels_outside_range_name_the_file(phantom_dirs, capsys):
    # A FLARE22 13-organ map is refused, not scored on its first four labels (the challenge's script ignored the rest).
    gt_dir, pred_dir = phantom_dirs
    pred = nib.load(gt_dir / "case_001.nii.gz")
    lab = np.asarray(pred.dataobj).copy()
    lab[lab == 2] = 13
    save(nib.Nifti1Image(lab, pred.affine), pred_dir / "case_001.nii.gz")
    _expect_cli_error(
        ["--pred", str(pred_dir), "--gt", str(gt_dir), "-q"], capsys, "case_001.nii.gz", "labels [13] outside 0..4"
    )


def test_missing_folder_is_an_error(tmp_path, capsys):
    _expect_cli_error(["--pred", str(tmp_path / "nope"), "--gt", str(tmp_path)], capsys, "nope: folder not found")
    (tmp_path / "a-file").write_text("x")
    _expect_cli_error(["--pred", str(tmp_path / "a-file"), "--gt", str(tmp_path)], capsys, "a-file: not a directory")
    (tmp_path / "gone").symlink_to(tmp_path / "moved-away")
    gone = ["--pred", str(tmp_path / "gone"), "--gt", str(tmp_path)]
    _expect_cli_error(gone, capsys, f"gone: a broken symbolic link (to {tmp_path / 'moved-away'})")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's 'invalid value' beside our line was a second one
@pytest.mark.parametrize("kind", [k for k in BAD_INPUT_KINDS if k != "missing"])
def test_bad_prediction_file_fails_the_command_with_one_line(phantom_dirs, tmp_path, capsys, kind):
    gt_dir, pred_dir = phantom_dirs
    bad, problem = bad_inputs(tmp_path)[kind]
    target = pred_dir / ("case_000" + (".nii" if bad.name.endswith(".nii") else ".nii.gz"))
    shutil.copy(bad, target)
    out = tmp_path / "r.csv"
    if kind == "non-finite":
        problem = "label map holds non-finite values"  # a label map's own wording
    _expect_cli_error(
        ["--pred", str(pred_dir), "--gt", str(gt_dir), "-o", str(out), "-q"], capsys, str(target), problem
    )
    assert not out.exists()


def test_the_csv_can_never_replace_an_input_and_is_checked_before_scoring(phantom_dirs, tmp_path, capsys):
    gt_dir, pred_dir = phantom_dirs
    shutil.copy(gt_dir / "case_000.nii.gz", pred_dir / "case_000.nii.gz")
    before = (gt_dir / "case_000.nii.gz").read_bytes()
    base = ["--pred", str(pred_dir), "--gt", str(gt_dir), "-q"]
    for target in (gt_dir / "case_000.nii.gz", pred_dir / "case_000.nii.gz", pred_dir / "c_001.nii", Path("")):
        _expect_cli_error([*base, "-o", str(target)], capsys, "must end in .csv")
    (tmp_path / "afile").write_text("x")
    _expect_cli_error([*base, "-o", str(tmp_path / "afile" / "r.csv")], capsys, "afile is a file")
    link = tmp_path / "results.csv"  # a .csv name whose write would land in a label map
    link.symlink_to(gt_dir / "case_000.nii.gz")
    _expect_cli_error([*base, "-o", str(link)], capsys, "a file of another kind; refusing to write through it")
    assert (gt_dir / "case_000.nii.gz").read_bytes() == before
    assert sorted(p.name for p in pred_dir.iterdir()) == ["case_000.nii.gz"]


def test_a_csv_that_cannot_be_written_loses_none_of_the_scores(phantom_dirs, tmp_path, capsys, monkeypatch):
    # A full disk at the CSV threw away every score (NSD on real data takes minutes) and printed no table.
    from flareseg.evaluate import cli

    gt_dir, pred_dir = phantom_dirs
    shutil.copy(gt_dir / "case_000.nii.gz", pred_dir / "case_000.nii.gz")
    out = tmp_path / "r.csv"

    def full_disk(text, path):
        raise FlareSegError(f"{path}: cannot write (No space left on device)")

    monkeypatch.setattr(cli, "write_text_atomic", full_disk)
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir), "-o", str(out), "-q"]) == 2
    printed = capsys.readouterr()
    assert printed.err.strip() == f"flare-eval: error: {out}: cannot write (No space left on device)"
    assert "| liver    |  33.33 ± 47.14" in printed.out and "1 case scored, 2 missing" in printed.out
    assert "case,status,liver_dsc" in printed.out and "case_000,ok,1.000000,1.000000" in printed.out
    assert not out.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (a device whose writes fail)")
@pytest.mark.parametrize("with_csv", [True, False])
def test_a_stdout_that_cannot_be_written_loses_no_csv_and_exits_2(phantom_dirs, tmp_path, with_csv):
    # The table was printed first, so stdout on a full disk ended the command (a traceback, exit 1) before the CSV.
    gt_dir, pred_dir = phantom_dirs
    shutil.copy(gt_dir / "case_000.nii.gz", pred_dir / "case_000.nii.gz")
    out = tmp_path / "r.csv"
    argv = [sys.executable, "-m", "flareseg.evaluate.cli", "--pred", str(pred_dir), "--gt", str(gt_dir), "-q"]
    with open("/dev/full", "w") as full:
        done = subprocess.run([*argv, *(["-o", str(out)] if with_csv else [])], stdout=full, stderr=subprocess.PIPE)
    said = done.stderr.decode().splitlines()
    assert done.returncode == 2
    lost = "stdout: cannot write (No space left on device): its lines are lost from here on, the work goes on"
    assert said == [f"ERROR flareseg.cli: {lost}"]
    assert out.exists() == with_csv
    if with_csv:
        assert "case_000,ok,1.000000,1.000000" in out.read_text()


def test_numbers_are_checked_and_the_tolerance_is_recorded(phantom_dirs, tmp_path, capsys):
    gt_dir, pred_dir = phantom_dirs
    shutil.copy(gt_dir / "case_000.nii.gz", pred_dir / "case_000.nii.gz")
    base = ["--pred", str(pred_dir), "--gt", str(gt_dir), "-q"]
    for bad in (["--tolerance", "nan"], ["--tolerance", "-1"], ["--workers", "0"], ["--workers", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *bad])
        assert exit_info.value.code == 2 and bad[0] in capsys.readouterr().err
    assert main([*base, "--tolerance", "2.5", "-o", str(tmp_path / "r.csv")]) == 0
    rows = _read_csv(tmp_path / "r.csv")
    assert {r["nsd_tolerance_mm"] for r in rows.values()} == {"2.5"}


def test_an_empty_prediction_folder_is_an_error_and_ignored_files_are_named(phantom_dirs, tmp_path, capsys, caplog):
    gt_dir, pred_dir = phantom_dirs
    _expect_cli_error(
        ["--pred", str(pred_dir), "--gt", str(gt_dir), "-q"], capsys, str(pred_dir), "no NIfTI predictions"
    )
    shutil.copy(gt_dir / "case_000.nii.gz", pred_dir / "case_000.nii.gz")
    shutil.copy(gt_dir / "case_001.nii.gz", pred_dir / "case_001.NII.GZ")
    (pred_dir / "case_002.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir), "-q"]) == 0
    assert "case_001.NII.GZ: ignored: a NIfTI file must end in .nii or .nii.gz, in lower case" in caplog.text
    assert "case_002.nii.gz: ignored: a link to nothing" in caplog.text
    assert "2 missing (scored 0)" in capsys.readouterr().out
    (gt_dir / "case_009.nii.gz").mkdir()  # a folder named as a case: its case would be missing from the scores unsaid
    caplog.clear()
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir), "-q"]) == 0
    assert f"{gt_dir / 'case_009.nii.gz'}: ignored: a folder, not a NIfTI file" in caplog.messages


def test_a_prediction_rotated_onto_other_axes_is_said_so_not_given_two_equal_shapes(phantom_dirs, capsys):
    gt_dir, pred_dir = phantom_dirs
    gt = nib.load(gt_dir / "case_000.nii.gz")
    turn = np.array([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # 90 degrees about x
    save(nib.Nifti1Image(np.asanyarray(gt.dataobj), turn @ gt.affine), pred_dir / "case_000.nii.gz")
    _expect_cli_error(
        ["--pred", str(pred_dir), "--gt", str(gt_dir), "-q"],
        capsys,
        f"{pred_dir / 'case_000.nii.gz'}: prediction of shape (48, 40, 24) with voxel axes RSP, its ground truth "
        f"(48, 40, 24) with RAS ({gt_dir / 'case_000.nii.gz'}): another grid",
    )


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("stop", "code", "said", "delays"),
    [(signal.SIGTERM, 143, "terminated", (0.2, 0.8)), (signal.SIGHUP, 129, "hung up", (0.5,))],
)
def test_sigterm_or_sighup_to_the_process_group_ends_a_pooled_run(tmp_path, stop, code, said, delays):
    # A process manager (systemd, a pod, `timeout`) signals the whole group: the pool's workers too. Workers that
    # inherited the command's SIGTERM handler raised inside the pool's machinery, and the run could hang there.
    # A closed terminal's SIGHUP reaches the group too: the workers leave it to the command, which stops as on
    # Ctrl-C (before, it killed every process at once, with no line).
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    labels = make_phantom((96, 96, 48), (3.0, 3.0, 4.0), seed=1).to_nifti()[1]
    for i in range(120):  # about 4 s of scoring on 2 cores
        save(labels, gt / f"c{i:03d}.nii.gz")
        save(labels, pred / f"c{i:03d}.nii.gz")
    cmd = [sys.executable, "-m", "flareseg.evaluate", "--pred", str(pred), "--gt", str(gt), "--workers", "2"]
    for delay in delays:
        out = tmp_path / f"after-{delay}.csv"
        proc = subprocess.Popen([*cmd, "-o", str(out), "-q"], start_new_session=True, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # until the pool's two workers exist: then the signal reaches them too
        time.sleep(delay)
        os.killpg(proc.pid, stop)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"flare-eval did not end within 60 s of {stop.name}, {delay} s into scoring")
        # Only our line: the traceback CPython's pool manager thread can print for a cancelled case is dropped.
        assert proc.returncode == code and err.decode().startswith(f"flare-eval: {said}"), err
        assert not out.exists()
        with pytest.raises(ProcessLookupError):  # no worker left behind in the group
            os.killpg(proc.pid, 0)


def test_run_as_a_module_it_still_logs_as_flareseg(phantom_dirs, tmp_path):
    """Under ``python -m`` (and ``torchrun -m``) a module's __name__ is __main__, outside the flareseg loggers."""
    gt_dir, pred_dir = phantom_dirs
    shutil.copy(gt_dir / "case_000.nii.gz", pred_dir / "case_000.nii.gz")
    out = tmp_path / "r.csv"
    argv = [sys.executable, "-m", "flareseg.evaluate.cli", "--pred", str(pred_dir), "--gt", str(gt_dir), "-o", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert f"INFO flareseg.evaluate.cli: wrote {out}" in done.stderr.splitlines()


def test_predictions_named_for_no_ground_truth_case_are_an_error(phantom_dirs, tmp_path, capsys):
    # A folder of the wrong cases would otherwise score every case 0 and exit 0.
    gt_dir, pred_dir = phantom_dirs
    shutil.copy(gt_dir / "case_000.nii.gz", pred_dir / "validation_002.nii.gz")
    out = tmp_path / "r.csv"
    _expect_cli_error(
        ["--pred", str(pred_dir), "--gt", str(gt_dir), "-q", "-o", str(out)],
        capsys,
        str(pred_dir),
        "no prediction is named for a ground truth case",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("given", "written"), [("0.1234567", "0.1234567"), ("1", "1"), ("2.5", "2.5"), ("-0", "0"), ("1e-7", "1e-07")]
)
def test_the_tolerance_is_written_as_scored_not_rounded(phantom_dirs, tmp_path, capsys, given, written):
    gt_dir, pred_dir = phantom_dirs
    shutil.copy(gt_dir / "case_000.nii.gz", pred_dir / "case_000.nii.gz")
    args = ["--pred", str(pred_dir), "--gt", str(gt_dir), "-q", "--tolerance", given, "-o", str(tmp_path / "r.csv")]
    assert main(args) == 0
    assert float(written) == float(given)
    assert {r["nsd_tolerance_mm"] for r in _read_csv(tmp_path / "r.csv").values()} == {written}
    table = capsys.readouterr().out.splitlines()[:6]
    assert f"NSD (%) @ {written} mm" in table[0]
    assert len({len(line) for line in table}) == 1  # the columns stay in line


def _shifted_box_pair(folder: Path, case: str, zooms: tuple[float, float, float], shift_axis: int) -> None:
    """A liver box and its prediction shifted by 2 voxels along ``shift_axis``, on an anisotropic grid."""
    gt = np.zeros((24, 20, 16), np.uint8)
    gt[6:16, 5:14, 4:11] = 1
    pred = np.roll(gt, 2, axis=shift_axis)
    affine = np.diag([*zooms, 1.0])
    (folder / "gt").mkdir(exist_ok=True)
    (folder / "pred").mkdir(exist_ok=True)
    save(nib.Nifti1Image(gt, affine), folder / "gt" / f"{case}.nii.gz")
    save(nib.Nifti1Image(pred, affine), folder / "pred" / f"{case}.nii.gz")


def test_scores_use_the_tolerance_given_and_the_spacing_of_each_axis(tmp_path):
    # The CSV said --tolerance 2.5 whatever tolerance scored it, and reversed spacings went unseen: every other
    # fixture scored at 1 mm on grids whose errors lay along one axis.
    from flareseg.metrics import normalized_surface_dice

    zooms = (0.8, 1.0, 5.0)
    _shifted_box_pair(tmp_path, "case_001", zooms, shift_axis=2)  # 2 x 5 mm along the third axis
    _shifted_box_pair(tmp_path, "case_000", zooms, shift_axis=0)  # 2 x 0.8 mm along the first
    for tolerance in (1.0, 3.0, 12.0):
        csv_path = tmp_path / f"r{tolerance}.csv"
        argv = ["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-q", "-o", str(csv_path)]
        assert main([*argv, "--tolerance", str(tolerance)]) == 0
        rows = _read_csv(csv_path)
        assert list(rows)[:2] == ["case_000", "case_001"]  # sorted by case, whatever order they were scored in
        for case in ("case_000", "case_001"):
            gt = np.asarray(nib.load(tmp_path / "gt" / f"{case}.nii.gz").dataobj)
            pred = np.asarray(nib.load(tmp_path / "pred" / f"{case}.nii.gz").dataobj)
            expected = normalized_surface_dice(gt, pred, zooms, tolerance)
            assert float(rows[case]["liver_nsd"]) == pytest.approx(expected, abs=1e-4)
    low, high = _read_csv(tmp_path / "r1.0.csv"), _read_csv(tmp_path / "r12.0.csv")
    assert float(low["case_001"]["liver_nsd"]) < 0.9 < float(high["case_001"]["liver_nsd"])
    # Scored with the spacings reversed, the same pair would have scored otherwise: the check above can fail.
    gt = np.asarray(nib.load(tmp_path / "gt" / "case_000.nii.gz").dataobj)
    pred = np.asarray(nib.load(tmp_path / "pred" / "case_000.nii.gz").dataobj)
    assert abs(normalized_surface_dice(gt, pred, zooms[::-1], 1.0) - float(low["case_000"]["liver_nsd"])) > 0.05


def test_a_prediction_shifted_by_a_hundredth_of_a_millimetre_is_refused(phantom_dirs, capsys):
    gt_dir, pred_dir = phantom_dirs
    img = nib.load(gt_dir / "case_000.nii.gz")
    affine = img.affine.copy()
    affine[0, 3] += 0.01
    save(nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header), pred_dir / "case_000.nii.gz")
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir), "-q"]) == 2
    assert "prediction voxels lie up to 0.01 mm from its ground truth's" in capsys.readouterr().err


def _pair_on_an_anisotropic_grid(tmp_path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A phantom ground truth on 3.5 x 3 x 5 mm voxels, and a prediction of it with the liver eroded and
    the spleen moved two voxels: scores that a flip or a spacing on the wrong axis would change."""
    _, gt = make_phantom((48, 40, 24), (3.5, 3.0, 5.0), seed=0).to_nifti()
    labels = np.asarray(gt.dataobj).astype(np.uint8)
    pred = labels.copy()
    liver = pred == 1
    pred[liver & ~ndimage.binary_erosion(liver)] = 0
    pred[pred == 3] = 0
    pred[np.roll(labels == 3, 2, axis=1)] = 3
    (tmp_path / "gt").mkdir()
    save(gt, tmp_path / "gt" / "case_000.nii.gz")
    return gt, pred


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("S", "R", "A"), ("P", "I", "L")], ids="".join)
def test_a_prediction_on_the_same_grid_stored_in_another_voxel_order_scores_as_if_it_were_not(tmp_path, axcodes):
    """SimpleITK's DICOMOrient(img, "LPS") written as it is, or a RAS-canonical pipeline's output: the same voxels
    of the world, in another order. It was refused as another grid (or another shape); it is brought onto the
    ground truth's voxels and scores exactly what the same prediction stored as the ground truth scores."""
    from flareseg.evaluate import evaluate_case

    gt, pred = _pair_on_an_anisotropic_grid(tmp_path)
    as_gt = save(nib.Nifti1Image(pred, gt.affine), tmp_path / "as_gt.nii.gz")
    other = save(reorient(nib.Nifti1Image(pred, gt.affine), axcodes), tmp_path / "other.nii.gz")
    assert nib.aff2axcodes(nib.load(other).affine) == axcodes
    expected = evaluate_case(tmp_path / "gt" / "case_000.nii.gz", as_gt).scores
    assert evaluate_case(tmp_path / "gt" / "case_000.nii.gz", other).scores == expected
    assert 0.5 < expected[1][0] < 0.99 and expected[3][0] < 0.9  # the eroded liver and the moved spleen
    assert expected[2] == (1.0, 1.0)  # the kidneys untouched: a flip would have moved them


def test_a_spacing_off_by_a_micrometre_a_voxel_is_another_grid_however_small_each_entry(tmp_path, capsys):
    """9e-4 mm a voxel passed a per-entry tolerance of 1e-3 mm, with the far edge 0.04 mm off (0.46 mm on a
    512 grid): voxel centres are compared now."""
    gt, pred = _pair_on_an_anisotropic_grid(tmp_path)
    affine = gt.affine.copy()
    affine[0, 0] += 9e-4
    (tmp_path / "pred").mkdir()
    save(nib.Nifti1Image(pred, affine), tmp_path / "pred" / "case_000.nii.gz")
    assert main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-q"]) == 2
    assert "prediction voxels lie up to 0.0423 mm from its ground truth's" in capsys.readouterr().err


def test_a_ground_truth_whose_pixdim_and_affine_disagree_is_scored_with_a_warning(tmp_path, caplog):
    """An sform of 3.5 x 3 x 5 mm voxels with pixdim 1 x 1 x 1: NSD is measured with pixdim's, as the header's
    spacing, and the disagreement is said, naming the file and both."""
    import logging

    from flareseg.evaluate import evaluate_case

    gt, pred = _pair_on_an_anisotropic_grid(tmp_path)
    odd = nib.Nifti1Image(np.asarray(gt.dataobj), gt.affine)
    odd.header.set_qform(None, code=0)
    odd.header["pixdim"][1:4] = 1.0
    path = save(odd, tmp_path / "odd.nii.gz")
    assert nib.load(path).header.get_zooms() == (1.0, 1.0, 1.0)
    prediction = save(nib.Nifti1Image(pred, gt.affine), tmp_path / "pred.nii.gz")
    with caplog.at_level(logging.WARNING, logger="flareseg.evaluate"):
        evaluate_case(path, prediction)
    (said,) = [r.getMessage() for r in caplog.records if r.name == "flareseg.evaluate.scoring"]
    assert (
        said == f"{path}: pixdim gives voxels of 1 x 1 x 1 mm, its affine 3.5 x 3 x 5 mm; NSD is measured with "
        "pixdim's, as the header's spacing"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flareseg.evaluate"):
        evaluate_case(tmp_path / "gt" / "case_000.nii.gz", prediction)
    assert not [r for r in caplog.records if r.name == "flareseg.evaluate.scoring"]


def test_the_summary_shows_each_metric_in_its_own_column_with_the_population_std():
    # Two cases, DSC and NSD apart: a table filling NSD's column with DSC values, or the sample std, reads wrong.
    from flareseg.evaluate.scoring import CaseResult, Evaluation
    from flareseg.evaluate.tables import summary_table

    scores = [{o: (1.0, 0.5) for o in (1, 2, 3, 4)}, {o: (0.0, 0.25) for o in (1, 2, 3, 4)}]
    ev = Evaluation(results=[CaseResult(f"c{i}", s) for i, s in enumerate(scores)], tolerance_mm=2.0)
    liver = next(line for line in summary_table(ev).splitlines() if line.startswith("| liver"))
    cells = [c.strip() for c in liver.strip("|").split("|")]
    assert cells == ["liver", "50.00 ± 50.00", "37.50 ± 12.50"]  # pstdev: the cases are the population
    # Three cases, 1, 1 and 0: the mean (the paper's Table 4) is 66.67, a median would read 100.
    scores = [{o: (1.0, 1.0) for o in (1, 2, 3, 4)}] * 2 + [{o: (0.0, 0.0) for o in (1, 2, 3, 4)}]
    ev = Evaluation(results=[CaseResult(f"c{i}", s) for i, s in enumerate(scores)], tolerance_mm=1.0)
    liver = next(line for line in summary_table(ev).splitlines() if line.startswith("| liver"))
    assert [c.strip() for c in liver.strip("|").split("|")] == ["liver", "66.67 ± 47.14", "66.67 ± 47.14"]
    assert "\n3 cases scored, 0 missing" in summary_table(ev)
    assert "\n1 case scored, 0 missing" in summary_table(Evaluation(results=ev.results[:1], tolerance_mm=1.0))


def test_the_default_nsd_tolerance_is_flare21_s_one_millimetre(phantom_dirs, tmp_path, capsys):
    gt_dir, pred_dir = phantom_dirs
    for case in ("case_001", "case_002"):  # case_000 missing: its row still comes first, rows in case order
        shutil.copy(gt_dir / f"{case}.nii.gz", pred_dir / f"{case}.nii.gz")
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir), "-o", str(tmp_path / "r.csv"), "-q"]) == 0
    assert "NSD (%) @ 1 mm" in capsys.readouterr().out
    rows = _read_csv(tmp_path / "r.csv")
    assert list(rows) == ["case_000", "case_001", "case_002"]
    assert {r["nsd_tolerance_mm"] for r in rows.values()} == {"1"}


def test_workers_started_fresh_say_their_warnings_in_the_command_s_format(tmp_path):
    """Under the spawn start method (macOS; forkserver, Linux's from Python 3.14, alike) a worker inherits no
    logging set-up: its warnings reached stderr bare, naming neither level nor logger. Ground truth saved by
    nibabel into uint8 (slope 4/255) is read with a warning, in each of two workers."""
    truth = np.zeros((8, 8, 4), np.float32)
    truth[2:5, 2:5, 1:3] = 1
    truth[6, 6, 0] = 4
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
        for case in ("case_000", "case_001"):
            img = nib.Nifti1Image(truth, np.eye(4))
            if folder == "gt":
                img.set_data_dtype(np.uint8)  # a slope of 4/255: 1 reads back as 1.0039
            else:
                img = nib.Nifti1Image(truth.astype(np.uint8), np.eye(4))
            save(img, tmp_path / folder / f"{case}.nii.gz")
    script = (
        "import multiprocessing, sys; multiprocessing.set_start_method('spawn'); "
        "from flareseg.evaluate.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = ["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--workers", "2", "-q"]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "read rounded to the nearest" in line]
    assert len(said) == 2, done.stderr
    assert all(line.startswith("WARNING flareseg.volume: ") for line in said), said
