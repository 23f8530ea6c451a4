"""flare-train on bad or changed input: run folders, data, masks, settings and resuming.

Each test names the defect it guards against; the runs are tiny (width 4, 32 x 32 slices).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flareseg.checkpoint import read_checkpoint
from flareseg.errors import FlareSegError
from flareseg.phantom import write_phantom_cases
from flareseg.preprocess import NormalizationStats
from flareseg.train import loop
from flareseg.train.cli import main as train_main
from flareseg.train.config import AugmentConfig, TrainConfig
from flareseg.train.data import dataset_stats, find_training_cases, split_cases
from flareseg.train.loss import LossWeights

TINY = ["--width", "4", "--size", "32", "--batch-size", "2", "--workers", "0", "--lr", "1e-3"]
QUICK = [*TINY, "--steps-per-epoch", "2", "--val-cases", "1", "-q"]


@pytest.fixture(scope="module")
def data_a(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("a")
    write_phantom_cases(root, 3, shape=(48, 48, 12), spacing=(7.0, 7.0, 10.0))
    return root


@pytest.fixture(scope="module")
def data_b(tmp_path_factory) -> Path:
    """Same case names as data_a, other volumes (shape, spacing, seed)."""
    root = tmp_path_factory.mktemp("b")
    write_phantom_cases(root, 3, shape=(40, 40, 10), spacing=(8.0, 8.0, 12.0), seed=7)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)  # copy2: the same modification times
    return dst


def _interrupt_after_caching(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C once statistics and cache are written: the network is built right after."""

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "build_training_network", stop)


def _stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. A reused run folder: statistics and cache belong to the data they were computed from.


def test_a_run_folder_left_by_an_interrupted_run_is_rebuilt_for_other_data(data_a, data_b, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _interrupt_after_caching(m)
        assert train_main(["--data", str(data_a), "--out", str(tmp_path / "ab"), "--epochs", "1", *QUICK]) == 130
    assert (tmp_path / "ab" / "cache" / "train_000.slices.npy").is_file()  # the interrupted run's cache is kept
    assert train_main(["--data", str(data_b), "--out", str(tmp_path / "ab"), "--epochs", "1", *QUICK]) == 0
    assert train_main(["--data", str(data_b), "--out", str(tmp_path / "clean"), "--epochs", "1", *QUICK]) == 0
    reused, clean = tmp_path / "ab", tmp_path / "clean"
    train_b = split_cases(find_training_cases(data_b), val_cases=1, seed=0)[0]
    expected = dataset_stats(train_b)
    stats = NormalizationStats.from_json((reused / "stats.json").read_text())
    assert (stats.mean, stats.std, stats.num_cases) == (expected.mean, expected.std, 2)
    for name in ("train_000", "train_001", "train_002"):  # every case's slices are data_b's, as in a clean run
        for kind in ("slices", "labels"):
            a, b = np.load(reused / "cache" / f"{name}.{kind}.npy"), np.load(clean / "cache" / f"{name}.{kind}.npy")
            assert a.shape == b.shape == (10, 32, 32) and np.array_equal(a, b), (name, kind)
    assert _files(reused / "cache") == _files(clean / "cache")  # nothing of data_a is left
    a, b = (torch.load(run / "last.pt", weights_only=True)["state_dict"] for run in (reused, clean))
    assert all(torch.equal(a[k], b[k]) for k in b)  # so the run itself is the clean run's


def test_a_rerun_with_another_size_or_a_changed_mask_rebuilds_what_changed(data_a, tmp_path, monkeypatch):
    data = _copy(data_a, tmp_path / "data")
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_after_caching(m)
        assert train_main(["--data", str(data), "--out", str(run), "--epochs", "1", *QUICK]) == 130
    stats_before = (run / "stats.json").read_text()
    # The same data at another size: the statistics are kept, the slices made again.
    argv = ["--data", str(data), "--out", str(run), "--epochs", "1", *QUICK, "--size", "48"]
    with monkeypatch.context() as m:
        _interrupt_after_caching(m)
        assert train_main(argv) == 130
    assert (run / "stats.json").read_text() == stats_before
    assert np.load(run / "cache" / "train_000.slices.npy").shape == (12, 48, 48)
    # One mask replaced (its organs removed): only that case's labels change; statistics stay (images unchanged).
    mask = data / "TrainingMask" / "train_002.nii.gz"
    img = nib.load(mask)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), mask)
    other = np.load(run / "cache" / "train_001.labels.npy")
    assert np.load(run / "cache" / "train_002.labels.npy").any()
    assert train_main(argv) == 0
    assert (run / "stats.json").read_text() == stats_before
    assert not np.load(run / "cache" / "train_002.labels.npy").any()
    assert np.array_equal(np.load(run / "cache" / "train_001.labels.npy"), other)


def test_a_trained_run_is_still_refused(data_a, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--data", str(data_a), "--out", str(run), "--epochs", "1", *QUICK]) == 0
    before = _files(run)
    capsys.readouterr()
    assert train_main(["--data", str(data_a), "--out", str(run), "--epochs", "1", *QUICK]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: {run}: a run already exists there (last.pt); use --resume {run} or another --out"
    ]
    assert _files(run) == before


# 2. A mask on another grid: reoriented when it is the same grid, refused when it is not.


def _mask_variant(sample_dir: Path, root: Path, transform: str) -> Path:
    (root / "TrainingImg").mkdir(parents=True)
    (root / "TrainingMask").mkdir()
    (root / "TrainingImg" / "train_000_0000.nii.gz").symlink_to(sample_dir / "TrainingImg" / "train_000_0000.nii.gz")
    m = nib.load(sample_dir / "TrainingMask" / "train_000.nii.gz")
    data, affine = np.asanyarray(m.dataobj), m.affine
    if transform == "lps":  # the same world grid, stored with X and Y reversed
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
        data, affine = data[::-1, ::-1], affine @ flip
    elif transform == "zyx":  # the same world grid, axes permuted
        data, affine = data.transpose(2, 1, 0), affine[:, [2, 1, 0, 3]]
    elif transform == "shift":
        affine = affine.copy()
        affine[0, 3] += 30.0
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), root / "TrainingMask" / "train_000.nii.gz")
    return root


def test_a_mask_stored_in_another_orientation_pairs_with_the_right_voxels(sample_dir, tmp_path, monkeypatch):
    argv = ["--epochs", "1", *TINY, "--val-cases", "0", "--steps-per-epoch", "1", "-q"]
    labels = {}
    for transform in ("same", "lps", "zyx"):
        data = _mask_variant(sample_dir, tmp_path / transform, transform)
        with monkeypatch.context() as m:
            _interrupt_after_caching(m)
            assert train_main(["--data", str(data), "--out", str(tmp_path / f"run-{transform}"), *argv]) == 130
        labels[transform] = np.load(tmp_path / f"run-{transform}" / "cache" / "train_000.truth.npy")
        assert labels[transform].shape == (112, 101, 122)
        assert np.array_equal(labels[transform], labels["same"]), transform  # lps: not the mirrored mask
    assert set(np.unique(labels["same"])) == {0, 1, 2, 3, 4}


def test_a_mask_on_another_grid_is_refused_before_anything_is_written(sample_dir, tmp_path, capsys):
    data = _mask_variant(sample_dir, tmp_path / "shift", "shift")
    run = tmp_path / "run"
    capsys.readouterr()
    argv = ["--data", str(data), "--out", str(run), "--epochs", "1", *TINY, "--val-cases", "0", "-q"]
    assert train_main(argv) == 2
    mask = data / "TrainingMask" / "train_000.nii.gz"
    assert _stderr_lines(capsys) == [
        f"flare-train: error: {mask}: mask voxels lie up to 30 mm away from its image's (train_000_0000.nii.gz): "
        "a different grid (shift, spacing or rotation), not the same grid stored in another orientation"
    ]
    assert not run.exists()


@pytest.mark.parametrize(("shift_mm", "refused"), [(0.0004, False), (0.3, True), (2.0, True)])
def test_a_mask_grid_is_taken_within_float32_rounding_and_refused_beyond(shift_mm, refused):
    """A header's float32 rounding (well under a micrometre here) is the same grid; 0.3 mm off on a 0.8 mm grid
    is a mask drawn on another reconstruction, whose organs would be trained over a third of a voxel off."""
    from flareseg.train.data import Case, check_mask_grid

    case = Case("c", Path("c_0000.nii.gz"), Path("c.nii.gz"))
    image = np.diag([0.8, 0.8, 2.5, 1.0])
    mask = image.copy()
    mask[:3, 3] += shift_mm / np.sqrt(3)  # along the diagonal: every axis moves
    if refused:
        with pytest.raises(FlareSegError, match=r"c\.nii\.gz: mask voxels lie up to .* mm away"):
            check_mask_grid(case, (64, 64, 20), image, (64, 64, 20), mask)
    else:
        check_mask_grid(case, (64, 64, 20), image, (64, 64, 20), mask)


def test_a_mask_of_another_shape_is_refused(data_a, data_b, tmp_path, capsys):
    data = _copy(data_a, tmp_path / "data")
    shutil.copy2(data_b / "TrainingMask" / "train_001.nii.gz", data / "TrainingMask" / "train_001.nii.gz")
    capsys.readouterr()
    assert train_main(["--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *QUICK]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: {data / 'TrainingMask' / 'train_001.nii.gz'}: mask grid 40x40x10 differs from its "
        "image's 48x48x12 (train_001_0000.nii.gz)"
    ]
    assert not (tmp_path / "run").exists()


# 3. Non-finite numbers: refused as arguments, and a non-finite loss stops the run.


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--rotation", "nan"),
        ("--shear", "inf"),
        ("--translation", "nan"),
        ("--augment-prob", "nan"),
        ("--lr", "inf"),
        ("--lr", "0"),
        ("--scale", "0.8,nan"),
        ("--loss-weights", "1,nan,0.7,0.6,0.5"),
        ("--loss-weights", "0,0,0,0,0"),
        ("--loss-weights", "1,-1,0,0,0"),
        ("--epochs", "0"),
        ("--steps-per-epoch", "0"),
        ("--batch-size", "0"),
        ("--accumulate", "0"),
        ("--width", "0"),
        ("--workers", "-1"),
        ("--val-list", ","),  # no names: not a silent --val-cases default
    ],
)
def test_bad_numbers_are_refused_as_arguments(data_a, tmp_path, capsys, option, value):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train_main(["--data", str(data_a), "--out", str(run), "--epochs", "1", *QUICK, option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err
    assert not run.exists()


def test_out_of_range_settings_are_refused_in_one_line(data_a, tmp_path, capsys):
    for option, value, words in [
        ("--translation", "1", "shift --translation 1: expected a fraction of the slice size in [0, 1)"),
        ("--augment-prob", "1.5", "probability --augment-prob 1.5: expected a share in [0, 1]"),
        ("--scale", "1.2,0.8", "expected LOW,HIGH with LOW <= HIGH"),
        ("--size", "40", "argument --size: slice size 40x40 must be positive multiples of 16"),
        ("--val-cases", "3", "--val-cases 3 leaves no training case: the data hold 3 case(s); hold out at most 2"),
    ]:
        capsys.readouterr()
        try:
            rc = train_main(
                ["--data", str(data_a), "--out", str(tmp_path / "run"), "--epochs", "1", *QUICK, option, value]
            )
        except SystemExit as exc:
            rc = exc.code
        assert rc == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_library_settings_refuse_non_finite_values():
    with pytest.raises(FlareSegError, match="rotation --rotation nan"):
        AugmentConfig(rotation_deg=float("nan"))
    with pytest.raises(FlareSegError, match=r"scale range --scale 0\.8,inf"):
        AugmentConfig(scale=(0.8, float("inf")))
    with pytest.raises(FlareSegError, match="lr=nan"):
        TrainConfig(data="d", out="o", lr=float("nan"))
    with pytest.raises(FlareSegError, match="loss weights must be 5 finite numbers"):
        TrainConfig(data="d", out="o", loss_weights=(1.0, float("nan"), 0.0, 0.0, 0.0))
    with pytest.raises(FlareSegError, match=r"5 finite numbers >= 0 \(final,aux1..aux4\), got \(1.0, -0.8,"):
        TrainConfig(data="d", out="o", loss_weights=(1.0, -0.8, 0.7, 0.6, 0.5))  # the CLI's parser is not the check
    with pytest.raises(FlareSegError, match="final output's loss weight must be > 0"):
        TrainConfig(data="d", out="o", loss_weights=(0.0, 0.0, 0.0, 0.0, 0.0))
    with pytest.raises(FlareSegError, match="steps_per_epoch=0"):
        TrainConfig(data="d", out="o", steps_per_epoch=0)
    with pytest.raises(FlareSegError, match="--device cuda:01: expected cpu, cuda or cuda:N"):
        TrainConfig(data="d", out="o", device="cuda:01")  # the command line's rule: one rule for both
    for bad in ((float("nan"), (0.8, 0.7, 0.6, 0.5)), (1.0, (0.8, float("inf"), 0.6, 0.5)), (0.0, (0.0,) * 4)):
        with pytest.raises(FlareSegError, match="loss weights must be finite, non-negative and not all 0"):
            LossWeights(final=bad[0], aux=bad[1])  # type: ignore[arg-type]
    assert LossWeights(final=0.0, aux=(1.0, 0.0, 0.0, 0.0)).aux[0] == 1.0  # the library allows aux-only losses
    # A library caller's paths may be Path objects; they are kept as the strings config.json records.
    assert TrainConfig(data=Path("d"), out=Path("o")).data == "d"  # type: ignore[arg-type]
    # Configs written when 0 meant "one pass" still load, as that.
    old = {**TrainConfig(data="d", out="o").to_dict(), "steps_per_epoch": 0}
    assert TrainConfig.from_dict(old).steps_per_epoch is None


def test_a_non_finite_loss_stops_the_run_in_one_line(data_a, tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    argv = ["--data", str(data_a), "--out", str(run), "--epochs", "1", *QUICK, "--lr", "1e30"]
    assert train_main([*argv, "--steps-per-epoch", "3"]) == 2  # Adam's first step puts weights near 1e30
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("flare-train: error: epoch 1, step 2/3: the training loss is nan")
    assert not run.exists()  # a new run that never reached a checkpoint leaves nothing


@pytest.mark.parametrize("poison", ["nan", "inf"])  # an isnan check let inf through to the epoch's weight check
def test_a_non_finite_loss_never_replaces_a_good_checkpoint(data_a, tmp_path, monkeypatch, capsys, poison):
    run = tmp_path / "run"
    assert train_main(["--data", str(data_a), "--out", str(run), "--epochs", "1", *QUICK]) == 0
    good = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "log.jsonl")}
    real = loop.deep_supervision_loss
    calls = []

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        loss = real(*args, **kwargs)  # type: ignore[arg-type]
        return loss * float(poison) if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "deep_supervision_loss", poisoned)
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--epochs", "2", "-q"]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: epoch 2, step 2/2: the training loss is {poison} (not finite); stopped, "
        "no checkpoint written for this epoch (try a new run with a lower --lr)"
    ]
    assert {name: (run / name).read_bytes() for name in good} == good


def test_non_finite_weights_are_never_saved():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    loop._check_weights(net, 0)
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(FlareSegError, match=r"epoch 4: 1 weight tensors hold non-finite values \(0.weight, ...\)"):
        loop._check_weights(net, 3)


# 4. Resuming: RUN_DIR itself, wherever it is now, and the run's own settings.


def _trained(data: Path, run: Path) -> Path:
    assert train_main(["--data", str(data), "--out", str(run), "--epochs", "1", *QUICK]) == 0
    return run


def test_a_resume_of_no_run_or_back_in_epochs_or_without_last_pt_is_one_line(data_a, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text('{"epochs": ')
    cases = [
        ([], "--data and --out are required (or --resume RUN_DIR)"),
        (["--resume", str(empty)], f"{empty}: no config.json, not a flare-train run directory"),
        (["--resume", str(tmp_path / "list")], "config.json: not a training config (expected a JSON object)"),
        (["--resume", str(tmp_path / "cut")], "config.json: unreadable config ("),
    ]
    run = tmp_path / "run"
    assert train_main(["--data", str(data_a), "--out", str(run), "--epochs", "2", *QUICK]) == 0
    cases.append((["--resume", str(run), "--epochs", "1"], f"--epochs 1: run {run} has already done 2 epochs"))
    for argv, said in cases:
        capsys.readouterr()
        assert train_main([*argv, "-q"]) == 2, argv
        lines = _stderr_lines(capsys)
        assert len(lines) == 1 and said in lines[0], (argv, lines)
    (run / "last.pt").unlink()  # best.pt, the weights alone, is no state to go on from
    assert train_main(["--resume", str(run), "--epochs", "3", "-q"]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: --resume {run}: no last.pt to resume from (but best.pt is there)"
    ]


def test_resume_writes_into_the_folder_given_after_a_copy_or_a_move(data_a, tmp_path, monkeypatch):
    original = _trained(data_a, tmp_path / "runs" / "t1")
    before = _files(original)
    copy = tmp_path / "runs" / "r1"
    shutil.copytree(original, copy)
    assert train_main(["--resume", str(copy), "--epochs", "2", "-q"]) == 0
    assert _files(original) == before  # the original run is untouched
    assert [json.loads(line)["epoch"] for line in (copy / "log.jsonl").read_text().splitlines()] == [1, 2]
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    copy.rename(moved)
    monkeypatch.chdir(tmp_path / "elsewhere")  # another working directory, a relative RUN_DIR
    assert train_main(["--resume", "moved", "--epochs", "3", "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["moved"]
    assert not copy.exists()
    assert [json.loads(line)["epoch"] for line in (moved / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((moved / "config.json").read_text())["data"] == str(data_a)


def test_resume_finds_the_data_of_a_run_recorded_with_relative_paths(data_a, tmp_path, monkeypatch):
    """Configs written before paths were made absolute: data and out relative to the first run's folder."""
    project = tmp_path / "project"
    _copy(data_a, project / "data")
    run = _trained(project / "data", project / "runs" / "old")
    config = json.loads((run / "config.json").read_text())
    config.update(data="data", out="runs/old", steps_per_epoch=2)
    (run / "config.json").write_text(json.dumps(config))
    moved = project / "runs" / "renamed"
    run.rename(moved)
    monkeypatch.chdir(tmp_path)  # not the folder the paths were relative to
    assert train_main(["--resume", str(moved), "--epochs", "2", "-q"]) == 0
    assert json.loads((moved / "config.json").read_text())["data"] == str(project / "data")
    assert not (tmp_path / "runs").exists()
    # Data that cannot be found: one line that says where it looked and what to do.
    (project / "data").rename(project / "gone")
    config["data"] = "data"
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(FlareSegError, match=r"the run's training data data are not found \(looked in .*--data"):
        train_main_raw(["--resume", str(moved), "--epochs", "3"])
    assert train_main(["--resume", str(moved), "--epochs", "3", "--data", str(project / "gone"), "-q"]) == 0


def train_main_raw(argv: list[str]) -> int:
    """The command's body without the error edge, to match the FlareSegError itself."""
    from flareseg.train.cli import _main, build_parser

    return _main(build_parser().parse_args(argv))


def test_resume_refuses_settings_and_data_that_differ_from_the_run(data_a, data_b, tmp_path, capsys):
    run = _trained(data_a, tmp_path / "run")
    before = _files(run)
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--epochs", "2", "--width", "8", "--lr", "0.1"]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: --resume {run}: --width 8 (the run has 4); --lr 0.1 (the run has 0.001): a resumed "
        "run keeps its settings (only --epochs, --device, --workers, --cudnn-benchmark may change, and --accumulate to "
        "keep the global batch)"
    ]
    assert train_main(["--resume", str(run), "--epochs", "2", "--data", str(data_b)]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: {data_b}: not the data run {run} was trained on (3 cases (images and masks) then, 3 "
        "now; changed train_000, train_001, train_002); start a new run with another --out"
    ]
    # The run's own training images (its statistics hold), but other ground truth, or another validation image:
    # the scores that chose best.pt would be compared across different truths.
    split = json.loads((run / "split.json").read_text())
    for kind, case in (("mask", split["train"][0]), ("image", split["validation"][0])):
        other = _copy(data_a, tmp_path / f"other-{kind}")
        path = (
            other / "TrainingMask" / f"{case}.nii.gz"
            if kind == "mask"
            else other / "TrainingImg" / f"{case}_0000.nii.gz"
        )
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        data = np.where(data == 1, 3, data).astype(data.dtype) if kind == "mask" else data[::-1].copy()
        nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
        assert train_main(["--resume", str(run), "--epochs", "2", "--data", str(other)]) == 2
        assert _stderr_lines(capsys) == [
            f"flare-train: error: {other}: not the data run {run} was trained on (3 cases (images and masks) then, 3 "
            f"now; changed {case}); start a new run with another --out"
        ]
    assert train_main(["--resume", str(run), "--out", str(tmp_path / "other")]) == 2
    assert "a resumed run writes into its own folder" in capsys.readouterr().err
    one = tmp_path / "one"  # a single case: the run's split (1 held out) cannot split it
    for sub in ("TrainingImg", "TrainingMask"):
        (one / sub).mkdir(parents=True)
    shutil.copy2(data_a / "TrainingImg" / "train_000_0000.nii.gz", one / "TrainingImg")
    shutil.copy2(data_a / "TrainingMask" / "train_000.nii.gz", one / "TrainingMask")
    assert train_main(["--resume", str(run), "--epochs", "2", "--data", str(one)]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: {one}: not the data run {run} was trained on (--val-cases 1 leaves no training case: "
        "the data hold 1 case(s); hold out at most 0); start a new run with another --out"
    ]
    # A run made before data.json (its statistics name the training images only): a mask with a label the data
    # may not hold is refused when its slices are cached, and the run's config.json still names its own data.
    bad = _copy(data_a, tmp_path / "bad")
    mask = next((bad / "TrainingMask").iterdir())
    img = nib.load(mask)
    labels = np.asanyarray(img.dataobj).copy()
    labels[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), mask)
    (run / "data.json").rename(tmp_path / "data.json")
    assert train_main(["--resume", str(run), "--epochs", "2", "--data", str(bad)]) == 2
    assert "outside 0..4" in capsys.readouterr().err
    (tmp_path / "data.json").rename(run / "data.json")
    assert json.loads((run / "config.json").read_text())["data"] == json.loads(before["config.json"])["data"]
    shutil.rmtree(run / "cache")  # rebuilt from the run's own data: what matters is that nothing else changed
    assert {k: v for k, v in _files(run).items() if not k.startswith("cache")} == {
        k: v for k, v in before.items() if not k.startswith("cache")
    }
    # The same settings given again are no difference; a copy of the data (same files) is the same data.
    copy = _copy(data_a, tmp_path / "copy")
    argv = ["--resume", str(run), "--epochs", "2", "--width", "4", "--lr", "1e-3", "--data", str(copy), "-q"]
    assert train_main(argv) == 0


def test_resume_knows_a_mask_relabelled_at_the_same_size_and_takes_a_touched_copy(data_a, tmp_path, capsys, caplog):
    """Uncompressed masks keep their size when relabelled: the run's data.json knows each mask by its digest."""
    data = tmp_path / "data"
    for sub in ("TrainingImg", "TrainingMask"):
        (data / sub).mkdir(parents=True)
        for packed in (data_a / sub).iterdir():
            nib.save(nib.load(packed), data / sub / packed.name.removesuffix(".gz"))
    run = _trained(data, tmp_path / "run")
    copy = _copy(data, tmp_path / "copy")
    for path in copy.rglob("*.nii"):
        os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)  # copied without keeping the times
    validation = json.loads((run / "split.json").read_text())["validation"][0]
    mask = data / "TrainingMask" / f"{validation}.nii"
    img = nib.load(mask)
    labels = np.asanyarray(img.dataobj)
    size = mask.stat().st_size
    nib.save(nib.Nifti1Image(np.where(labels == 1, 0, labels).astype(labels.dtype), img.affine, img.header), mask)
    assert mask.stat().st_size == size
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--epochs", "2", "-q"]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: {data}: not the data run {run} was trained on (3 cases (images and masks) then, 3 now; "
        f"changed {validation}); start a new run with another --out"
    ]
    with caplog.at_level(logging.WARNING, logger="flareseg.train.loop"):
        assert train_main(["--resume", str(run), "--epochs", "2", "--data", str(copy), "-q"]) == 0
    assert any("new modification times (same names, sizes and mask contents" in r.getMessage() for r in caplog.records)


def test_a_run_whose_data_json_holds_no_mask_digests_resumes(data_a, tmp_path, capsys):
    """data.json as a version before the masks' digests wrote it: the same data are not taken for other data."""
    run = _trained(data_a, tmp_path / "run")
    record = json.loads((run / "data.json").read_text())
    for case in record["cases"]:
        del case["mask"]["sha256"]
    (run / "data.json").write_text(json.dumps(record))
    assert train_main(["--resume", str(run), "--epochs", "2", "-q"]) == 0
    assert all("sha256" in c["mask"] for c in json.loads((run / "data.json").read_text())["cases"])


def test_a_damaged_config_is_refused_on_resume_in_one_line_naming_it(data_a, tmp_path, capsys):
    run = _trained(data_a, tmp_path / "run")
    config = run / "config.json"
    good = json.loads(config.read_text())
    for key, value, words in [
        ("augment", "xy", "augment='xy' (expected an object of settings)"),
        ("slice_size", [32], "slice_size=(32,) (expected height, width)"),
        ("val_list", "case1", "val_list='case1' (wrong type)"),
        ("epochs", 2.5, "epochs=2.5 (wrong type)"),
        ("seed", "x", "seed='x' (wrong type)"),
        ("amp", 1, "amp=1 (wrong type)"),
    ]:
        config.write_text(json.dumps({**good, key: value}))
        before = _files(run)
        capsys.readouterr()
        assert train_main(["--resume", str(run), "--epochs", "2", "-q"]) == 2, key
        (line,) = _stderr_lines(capsys)
        assert line.startswith(f"flare-train: error: {config}: invalid training ") and words in line, line
        assert _files(run) == before


def test_the_library_refuses_a_trained_run_and_takes_any_integer_seed(data_a, tmp_path):
    run = _trained(data_a, tmp_path / "run")
    before = _files(run)
    again = TrainConfig.load(run).replace(seed=5)
    with pytest.raises(FlareSegError, match=r"a run already exists there \(last\.pt\)"):
        loop.train(again)
    assert _files(run) == before
    # Seeds torch takes are used as they are (runs recorded with them resume as they ran); larger ones, which
    # once overflowed after minutes of caching, are reduced.
    assert [loop._generator_seed(v) for v in (5, -1, 2**64 - 1)] == [5, -1, 2**64 - 1]
    assert loop._generator_seed(2**64 + 7) == 7 and loop._generator_seed(-(2**63) - 1) == 2**64 - 2**63 - 1
    big = TrainConfig.load(run).replace(seed=10**16, out=str(tmp_path / "big"))
    assert loop.train(big).run_dir == (tmp_path / "big").resolve()


def test_a_resumed_run_says_the_epoch_it_starts_with(data_a, tmp_path, caplog):
    run = _trained(data_a, tmp_path / "run")
    caplog.set_level(logging.INFO, logger="flareseg.train.loop")
    assert train_main(["--resume", str(run), "--epochs", "2"]) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming")]
    assert len(said) == 1 and " at epoch 2 " in said[0], said


def test_a_resumed_run_whose_best_pt_was_moved_says_so_and_names_no_file_that_is_not_there(
    data_a, tmp_path, capsys, caplog, monkeypatch
):
    """best.pt moved to a deploy folder, or a run copied without it: the last line must not name a missing file
    (a script would export it), and the start says what brings it back."""
    run = _trained(data_a, tmp_path / "run")
    (run / "best.pt").unlink()
    real = loop.validate

    def validate(*args, **kwargs):  # no later epoch beats the first: best.pt stays missing
        return {**real(*args, **kwargs), "dsc_mean": -1.0}

    monkeypatch.setattr(loop, "validate", validate)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="flareseg.train.loop"):
        assert train_main(["--resume", str(run), "--epochs", "2"]) == 0
    best = json.loads((run / "log.jsonl").read_text().splitlines()[0])["dsc_mean"]
    assert [r.getMessage() for r in caplog.records if "best.pt" in r.getMessage()] == [
        f"{run}: best.pt is missing (moved or removed?); only an epoch that beats mean DSC {best:.4f} (epoch 1) "
        "writes it again"
    ]
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"best mean validation DSC {best:.4f} at epoch 1: {run / 'best.pt'} is missing (moved or removed since that "
        "epoch)"
    )
    assert not (run / "best.pt").exists()


# 5. Errors of the environment: one line, no traceback.


def test_an_unusable_out_or_device_is_one_line(data_a, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")  # resolving it would create "nowhere"
    cases = [
        (["--out", str(afile)], f"--out {afile}: exists and is not a folder"),
        (["--out", str(tmp_path / "link")], f"{tmp_path / 'link'}: a broken symbolic link is in the way"),
        (["--out", "/proc/flareseg-test/run"], "/proc/flareseg-test/run: cannot create files in /proc"),
        (["--out", str(tmp_path / "r"), "--device", "cuda:99"], "--device cuda:99: "),
    ]
    for argv, words in cases:
        capsys.readouterr()
        assert train_main(["--data", str(data_a), *argv, "--epochs", "1", *QUICK]) == 2
        lines = _stderr_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith(f"flare-train: error: {words}"), lines
    assert train_main(["--data", str(data_a), "--out", str(tmp_path / "link"), "--epochs", "1", *QUICK]) == 2
    assert _stderr_lines(capsys) == [f"flare-train: error: {tmp_path / 'link'}: a broken symbolic link is in the way"]
    for device in ("foo", "mps", "CUDA"):  # refused while parsing
        with pytest.raises(SystemExit) as stopped:
            train_main(["--data", str(data_a), "--out", str(tmp_path / "r"), "--device", device, *QUICK])
        lines = _stderr_lines(capsys)
        assert stopped.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("flare-train: error: argument --device: expected cpu, cuda or cuda:N"), lines
    assert afile.read_text() == "x" and not (tmp_path / "r").exists() and not (tmp_path / "nowhere").exists()


# 6. Zero never means the default; the default is one full pass.


def test_the_default_epoch_is_one_full_pass_over_the_training_slices(data_a, tmp_path):
    run = tmp_path / "run"
    argv = ["--data", str(data_a), "--out", str(run), "--epochs", "1", *TINY, "--val-cases", "1", "-q"]
    assert train_main(argv) == 0
    record = json.loads((run / "log.jsonl").read_text())
    assert record["steps"] == 2 * 12 // 2  # two training cases of 12 slices, batches of 2
    assert json.loads((run / "config.json").read_text())["steps_per_epoch"] is None
    # Fewer slices than one batch (a single small case, a large batch): one step, each slice drawn at least once.
    run = tmp_path / "large-batch"
    argv = ["--data", str(data_a), "--out", str(run), "--epochs", "1", *TINY, "--val-cases", "1", "-q"]
    assert train_main([*argv, "--batch-size", "32"]) == 0
    record = json.loads((run / "log.jsonl").read_text())
    assert record["steps"] == 1 and np.isfinite(record["loss"])


# 7. A failed run leaves nothing behind.


def test_a_failed_run_leaves_no_output(data_a, tmp_path, capsys):
    run = tmp_path / "runs" / "x1"
    assert train_main(["--data", str(tmp_path / "nope"), "--out", str(run), "--epochs", "1", *QUICK]) == 2
    assert not (tmp_path / "runs").exists()
    # A damaged image found only when its voxels are read (the statistics): the new folder goes too.
    data = _copy(data_a, tmp_path / "data")
    image = data / "TrainingImg" / "train_002_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:-2000])
    capsys.readouterr()
    assert train_main(["--data", str(data), "--out", str(run), "--epochs", "1", *QUICK]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"flare-train: error: {image}: truncated or corrupt voxel data")
    assert not (tmp_path / "runs").exists()
    # A folder that was there before is left there, with what it held.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert train_main(["--data", str(data), "--out", str(tmp_path / "mine"), "--epochs", "1", *QUICK]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # Also when named through a folder that does not exist: "missing/../mine" is "mine".
    detour = tmp_path / "missing" / ".." / "mine"
    assert train_main(["--data", str(data), "--out", str(detour), "--epochs", "1", *QUICK]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (tmp_path / "missing").exists()


def test_a_failed_runs_cleanup_stops_at_the_folders_it_made(data_a, tmp_path, capsys):
    """An empty folder that was there before the run (a mount point, a project folder made ahead) is not the run's."""
    data = _copy(data_a, tmp_path / "data")
    image = data / "TrainingImg" / "train_002_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:-2000])  # found when the statistics read it: the run's folder is made
    (tmp_path / "projects").mkdir()
    run = tmp_path / "projects" / "runs" / "x1"
    assert train_main(["--data", str(data), "--out", str(run), "--epochs", "1", *QUICK]) == 2
    assert "truncated or corrupt voxel data" in capsys.readouterr().err
    assert (tmp_path / "projects").is_dir() and not (tmp_path / "projects" / "runs").exists()


def test_a_run_that_fails_after_an_epoch_keeps_it(data_a, tmp_path, capsys, monkeypatch):
    """A failure in epoch 2 (a full disk, a bad batch) leaves epoch 1's checkpoint to resume from, not nothing."""
    real = loop.validate
    calls: list[int] = []

    def validate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FlareSegError("validation: the disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", validate)
    run = tmp_path / "runs" / "x1"
    assert train_main(["--data", str(data_a), "--out", str(run), "--epochs", "2", *QUICK]) == 2
    assert _stderr_lines(capsys) == ["flare-train: error: validation: the disk went away"]
    assert read_checkpoint(run / "last.pt")["train_state"]["epoch"] == 0  # counted from 0: epoch 1 done
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]


def test_weights_gone_non_finite_stop_the_run_before_their_checkpoint(data_a, tmp_path, capsys, monkeypatch):
    """A finite loss can still step to infinite weights: such an epoch is never saved over the last good one."""
    real = loop._train_epoch

    def train_epoch(e, epoch, net, *args):
        record = real(e, epoch, net, *args)
        if epoch == 1:
            with torch.no_grad():
                next(net.parameters()).view(-1)[0] = float("inf")
        return record

    monkeypatch.setattr(loop, "_train_epoch", train_epoch)
    run = tmp_path / "run"
    assert train_main(["--data", str(data_a), "--out", str(run), "--epochs", "3", *QUICK]) == 2
    (line,) = _stderr_lines(capsys)
    assert line.startswith("flare-train: error: epoch 2: 1 weight tensors hold non-finite values (")
    assert "no checkpoint written for this epoch" in line
    assert read_checkpoint(run / "last.pt")["train_state"]["epoch"] == 0  # epoch 1's, the last good one
    best = read_checkpoint(run / "best.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())


def test_resume_refuses_a_last_pt_of_another_width_than_its_config(data_a, tmp_path, capsys):
    """A config.json edited by hand (or a last.pt copied from another run) would resume into another network."""
    run = tmp_path / "run"
    assert train_main(["--data", str(data_a), "--out", str(run), "--epochs", "1", *QUICK]) == 0
    config = json.loads((run / "config.json").read_text())
    config["base_width"] = 8
    (run / "config.json").write_text(json.dumps(config))
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--epochs", "2", "-q"]) == 2
    (line,) = _stderr_lines(capsys)
    assert line == (
        f"flare-train: error: {run / 'last.pt'}: width 4, slices (32, 32); {run / 'config.json'} says width 8, "
        "slices (32, 32)"
    )
    assert (run / "last.pt").read_bytes() == before


def test_a_second_run_into_a_folder_still_training_is_refused(data_a, tmp_path, capsys, monkeypatch):
    """A job submitted twice, or a --resume of a run still in training, would write its config.json and split.json
    over this one's while this one's checkpoints went on: a later resume mixed the two. It is refused, and the
    running run is untouched. The other run is a real second process, started while this one validates."""
    import subprocess

    run = tmp_path / "run"
    other_runs: list[subprocess.CompletedProcess[str]] = []
    real = loop.validate

    def validate(*args, **kwargs):
        if not other_runs:
            for extra in (
                ["--data", str(data_a), "--out", str(run), "--epochs", "2", "--seed", "7"],
                ["--resume", str(run)],
            ):
                cmd = [sys.executable, "-m", "flareseg.train.cli", *extra, *(QUICK if "--data" in extra else ["-q"])]
                other_runs.append(subprocess.run(cmd, capture_output=True, text=True, timeout=300))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", validate)
    assert train_main(["--data", str(data_a), "--out", str(run), "--epochs", "1", *QUICK]) == 0
    refused = f"--out {run}: another flare-train is training in this folder now; wait for it to end (then --resume it)"
    assert [other.returncode for other in other_runs] == [2, 2]
    for other in other_runs:
        assert other.stderr.strip().splitlines()[-1].startswith(f"flare-train: error: {refused}")
    assert json.loads((run / "config.json").read_text())["seed"] == 0  # this run's, not the refused one's
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]
    assert train_main(["--resume", str(run), "--epochs", "2", "-q"]) == 0  # ended: the lock went with it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks, and /proc to see the worker alive")
def test_the_run_lock_goes_with_its_process_not_with_the_workers_it_forked(tmp_path):
    """Killed by the OOM killer, the trainer's forked DataLoader workers live on for a few seconds: an automatic
    requeue must not be refused as "another flare-train" meanwhile. The lock is not inherited by forks."""
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    code = f"""
import os, signal, sys, time
from pathlib import Path
from flareseg.train.loop import _hold_run
_hold_run(Path({str(run)!r}))
child = os.fork()
if child == 0:  # a loader worker: lives on after its parent (not on the pipe the test reads to its end)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    worker = int(proc.stdout.split()[0])
    try:
        assert proc.returncode == -signal.SIGKILL
        assert Path(f"/proc/{worker}/status").read_text().split("State:")[1].split()[0] == "S"  # alive, asleep
        fd = loop._hold_run(run)  # taken at once: the lock went with the trainer
        os.close(fd)
    finally:
        os.kill(worker, signal.SIGKILL)
        time.sleep(0.1)


def test_a_second_run_in_the_same_process_is_refused_and_leaves_the_first_ones_lock(tmp_path):
    """A POSIX lock does not stand between two holders in one process, and closing any descriptor of its file
    drops it: a second run in this process (threads, a notebook) must be refused before it opens the file."""
    import subprocess

    run = tmp_path / "run"
    fd = loop._hold_run(run)
    try:
        with pytest.raises(FlareSegError, match="another flare-train is training in this folder now"):
            loop._hold_run(run)
        (tmp_path / "alias").symlink_to(run)
        with pytest.raises(FlareSegError, match="another flare-train is training in this folder now"):
            loop._hold_run(tmp_path / "alias")  # another name for the same folder
        code = f"from pathlib import Path; from flareseg.train.loop import _hold_run; _hold_run(Path({str(run)!r}))"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert other.returncode == 1 and "another flare-train is training in this folder now" in other.stderr
    finally:
        loop._release_run(fd)
    loop._release_run(loop._hold_run(run))  # let go: free again


def test_running_out_of_gpu_memory_is_one_line_with_the_way_out(data_a, tmp_path, capsys, monkeypatch):
    def validate(*args, **kwargs):  # what a CUDA allocation failure raises, without a GPU
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB\nmore detail")

    monkeypatch.setattr(loop, "validate", validate)
    run = tmp_path / "runs" / "x1"
    assert train_main(["--data", str(data_a), "--out", str(run), "--epochs", "1", *QUICK]) == 2
    assert _stderr_lines(capsys) == [
        "flare-train: error: training: the GPU ran out of memory at batch size 2 (CUDA out of memory. Tried to "
        "allocate 3.00 GiB); lower --batch-size and raise --accumulate by as much"
    ]
    assert not (tmp_path / "runs").exists()  # failed before its first checkpoint: nothing left


# 8. Progress bars only on a terminal.


def test_no_progress_bar_when_stderr_is_not_a_terminal(data_a, tmp_path, capsys, caplog, monkeypatch):
    argv = ["--data", str(data_a), "--epochs", "1", *TINY, "--val-cases", "1", "--steps-per-epoch", "2"]
    with caplog.at_level(logging.INFO, logger="flareseg"):
        assert train_main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert any("epoch 1: loss" in r.getMessage() for r in caplog.records)  # not quiet: bars would be allowed
    err = capsys.readouterr().err
    assert "\r" not in err and "%|" not in err and "caching slices" not in err
    # On a terminal they are shown.
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", terminal)
    assert train_main([*argv, "--out", str(tmp_path / "tty")]) == 0
    shown = terminal.getvalue()
    assert "caching slices" in shown and "epoch 1/1" in shown and "validation" in shown
    assert "steps_s=" not in shown  # one rate: tqdm's own step/s


# 9. Unpaired files are errors both ways.


def test_a_mask_without_an_image_is_an_error(data_a, tmp_path):
    data = _copy(data_a, tmp_path / "data")
    (data / "TrainingImg" / "train_001_0000.nii.gz").rename(data / "TrainingImg" / "train_01_0000.nii.gz")
    with pytest.raises(FlareSegError, match=r"TrainingImg: no mask in TrainingMask/ for train_01_0000.nii.gz"):
        find_training_cases(data)
    (data / "TrainingImg" / "train_01_0000.nii.gz").unlink()
    with pytest.raises(FlareSegError) as err:
        find_training_cases(data)
    assert str(err.value) == f"{data / 'TrainingMask'}: no image in TrainingImg/ for train_001.nii.gz"
    assert os.path.exists(data / "TrainingMask" / "train_001.nii.gz")


def test_the_log_gains_whole_lines_only_and_a_half_line_left_by_a_crash_goes(tmp_path):
    from flareseg.atomic import atomic_outputs

    path = tmp_path / "log.jsonl"

    def append(record):
        with atomic_outputs() as outputs:
            loop._append_record(path, record, outputs)

    append({"epoch": 1})
    append({"epoch": 2})
    path.write_text(path.read_text() + '{"epoch": 3, "lo')  # an append cut short
    append({"epoch": 3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"epoch": e} for e in (1, 2, 3)]
    # A run resumed from epoch 1's checkpoint does epoch 2 again: its record replaces the later ones.
    append({"epoch": 2, "again": True})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"epoch": 1}, {"epoch": 2, "again": True}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
@pytest.mark.parametrize(("stop", "code", "said"), [("SIGTERM", 143, "terminated"), ("SIGHUP", 129, "hung up")])
def test_a_stop_to_the_process_group_with_loader_workers_stops_cleanly_and_keeps_the_run(
    data_a, tmp_path, stop, code, said
):
    # The DataLoader's workers get the group's SIGTERM too. Having inherited the command's handler, they died
    # raising it, and the loader turned that into a RuntimeError: a traceback, exit 1, the run folder removed.
    # A closed terminal's SIGHUP reaches them too: they leave it to the training process, which stops as on SIGTERM.
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "flareseg.train.cli", "--data", str(data_a), "--out", str(run), "--epochs", "3"]
    cmd += [*TINY[:-4], "--workers", "2", "--lr", "1e-3", "--steps-per-epoch", "400", "--val-cases", "1", "-q"]
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "split.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the cache is built: the epoch and its loader workers start now
    time.sleep(2.0)
    os.killpg(proc.pid, getattr(signal, stop))
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"flare-train did not end within 60 s of {stop}")
    assert proc.returncode == code and err.decode().strip().splitlines() == [f"flare-train: {said}"], err
    assert (run / "stats.json").exists() and (run / "config.json").exists()  # kept, as after Ctrl-C
    deadline = time.monotonic() + 20  # the loader's workers exit once they see their parent gone (a watchdog)
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("loader workers were left running 20 s after the training process ended")


def test_a_label_map_among_the_images_is_refused_before_the_statistics(data_a, tmp_path, capsys):
    data = _copy(data_a, tmp_path / "data")
    image = data / "TrainingImg" / "train_001_0000.nii.gz"
    shutil.copy2(data / "TrainingMask" / "train_001.nii.gz", image)  # a mask copied to the images by mistake
    run = tmp_path / "run"
    assert train_main(["--data", str(data), "--out", str(run), "--epochs", "1", *QUICK]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: {image}: looks like a label map, not a CT (every voxel is a class 0..4, none is air); "
        "TrainingImg/ takes CT images"
    ]
    assert not run.exists()


def test_a_run_folder_inside_the_training_data_is_refused(data_a, tmp_path, capsys):
    data = _copy(data_a, tmp_path / "data")
    before = _files(data)
    for out in (data, data / "TrainingImg", data / "TrainingMask" / "run"):
        assert train_main(["--data", str(data), "--out", str(out), "--epochs", "1", *QUICK]) == 2
        assert _stderr_lines(capsys) == [
            f"flare-train: error: --out {out}: inside the training data {data}; give the run a folder of its own"
        ]
    assert _files(data) == before and not (data / "TrainingMask" / "run").exists()
    assert train_main(["--data", str(data), "--out", str(data / "runs" / "a"), "--epochs", "1", *QUICK]) == 0


def test_resuming_a_complete_run_says_so_and_changes_nothing(data_a, tmp_path, caplog):
    run = _trained(data_a, tmp_path / "run")
    before = _files(run)
    caplog.set_level(logging.INFO, logger="flareseg.train.loop")
    assert train_main(["--resume", str(run)]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "flareseg.train.loop"]
    assert said == [f"{run}: complete, all 1 epochs done; --epochs N (more than 1) trains it further"]
    assert _files(run) == before


def test_the_device_defaults_to_a_gpu_where_there_is_one_and_says_so(tmp_path, monkeypatch, caplog):
    """A stand-in says a GPU is present: the configuration is checked, not trained."""
    from flareseg.train import cli as train_cli

    parse = train_cli.build_parser().parse_args
    monkeypatch.setattr(train_cli, "default_device", lambda: "cuda")
    with caplog.at_level("INFO", logger="flareseg.train.cli"):
        config = train_cli._new_config(parse(["--data", str(tmp_path), "--out", str(tmp_path / "run")]))
    assert config.device == "cuda" and "device: cuda (--device chooses)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="flareseg.train.cli"):
        config = train_cli._new_config(
            parse(["--data", str(tmp_path), "--out", str(tmp_path / "r"), "--device", "cpu"])
        )
    assert config.device == "cpu" and "device:" not in caplog.text
    monkeypatch.undo()
    assert train_cli.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_best_pt_is_the_first_epoch_of_the_best_score_and_a_tie_does_not_replace_it(data_a, tmp_path, monkeypatch):
    # flare-infer deploys best.pt: written every epoch, or on a tie, it would be a later and no better model.
    from flareseg.checkpoint import read_checkpoint
    from flareseg.labels import LABELS, ORGANS

    scores = iter([0.5, 0.4, 0.5])

    def validate(*args, **kwargs):
        mean = next(scores)
        return {**{f"dsc_{LABELS[o]}": mean for o in ORGANS}, "dsc_mean": mean}

    monkeypatch.setattr(loop, "validate", validate)
    run = tmp_path / "run"
    assert train_main(["--data", str(data_a), "--out", str(run), "--epochs", "3", *QUICK]) == 0
    best, last = read_checkpoint(run / "best.pt"), read_checkpoint(run / "last.pt")
    assert (best["train_state"]["epoch"], best["train_state"]["best_epoch"]) == (0, 1)
    assert (last["train_state"]["epoch"], last["train_state"]["best_epoch"]) == (2, 1)
    assert any(not torch.equal(v, last["state_dict"][k]) for k, v in best["state_dict"].items())
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["best_dsc_mean"] for r in records] == [0.5, 0.5, 0.5]


def test_each_epoch_draws_its_own_slice_order_and_augmentation():
    # The epoch left out of the streams: every epoch the same slices in the same order, the same transforms.
    order = [loop._global_order(500, 4, 8, loop._epoch_generator(0, epoch, 0)) for epoch in (0, 1)]
    assert not torch.equal(order[0], order[1])
    again = loop._global_order(500, 4, 8, loop._epoch_generator(0, 1, 0))
    assert torch.equal(order[1], again)  # and the same epoch, the same order: a resumed run repeats it exactly
    streams = [torch.rand(8, generator=loop._epoch_generator(0, 1, s)) for s in (0, 1)]
    assert not torch.equal(streams[0], streams[1])  # order and augmentation are separate streams


def test_a_job_submitted_twice_is_told_the_first_is_training_not_to_resume_it(data_a, tmp_path):
    # The check for a trained run came before the lock: the second job was told to --resume a run under way.
    run = _trained(data_a, tmp_path / "run")
    again = ["--data", str(data_a), "--out", str(run), "--epochs", "2", *QUICK]
    fd = loop._hold_run(run)  # the first job, training on after its first epoch
    try:
        with pytest.raises(FlareSegError, match="another flare-train is training in this folder now"):
            train_main_raw(again)
    finally:
        loop._release_run(fd)
    with pytest.raises(FlareSegError, match=r"a run already exists there \(last\.pt\); use --resume"):
        train_main_raw(again)


def test_a_resume_from_a_copy_of_best_pt_or_of_another_runs_last_pt_is_refused(data_a, tmp_path, capsys):
    run = _trained(data_a, tmp_path / "run")
    other = tmp_path / "other"
    assert train_main(["--data", str(data_a), "--out", str(other), "--epochs", "1", "--seed", "7", *QUICK]) == 0
    # best.pt copied over a damaged last.pt: it keeps no optimiser state, which ended the resume in a traceback.
    shutil.copy(run / "best.pt", run / "last.pt")
    before = _files(run)
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--epochs", "2"]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: {run / 'last.pt'}: holds no optimiser state (a copy of best.pt, which keeps the "
        "weights alone?), so the run cannot go on where it stopped; put the run's own last.pt back, or train anew "
        "into another --out"
    ]
    assert _files(run) == before  # refused before config.json, stats.json, split.json and data.json were rewritten
    # Another run's last.pt: it went on with that run's statistics and weights, and rewrote this run's records.
    shutil.copy(other / "last.pt", run / "last.pt")
    before = _files(run)
    assert train_main(["--resume", str(run), "--epochs", "2"]) == 2
    assert _stderr_lines(capsys) == [
        f"flare-train: error: {run / 'last.pt'}: saved by a run of other settings than {run / 'config.json'} "
        "(seed 7 (the run has 0)): not this run's checkpoint?"
    ]
    assert _files(run) == before  # nothing rewritten


def test_a_cache_file_cut_short_is_made_again(data_a, tmp_path, caplog):
    # A full disk or a copy cut a cached array short: the resume ended in a traceback from np.load's mapping.
    run = _trained(data_a, tmp_path / "run")
    victim = sorted((run / "cache").glob("*.slices.npy"))[0]
    whole = np.load(victim)
    victim.write_bytes(victim.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="flareseg.train.data"):
        assert train_main(["--resume", str(run), "--epochs", "2", "-q"]) == 0
    case = victim.name.split(".")[0]
    assert [r.getMessage() for r in caplog.records if r.name == "flareseg.train.data"] == [
        f"slice cache: files of 1 cases are missing or cut short ({case}); caching them again"
    ]
    np.testing.assert_array_equal(np.load(victim), whole)
    # Validated on its training case (--val-cases 0), a new run's full-resolution files were never made: not "cut".
    caplog.clear()
    argv = ["--data", str(data_a), "--out", str(tmp_path / "v0"), "--epochs", "1", *TINY, "--steps-per-epoch", "1"]
    with caplog.at_level(logging.WARNING, logger="flareseg.train.data"):
        assert train_main([*argv, "--val-cases", "0", "-q"]) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "flareseg.train.data"] == []


def test_a_one_pixel_bottleneck_with_one_slice_a_batch_is_refused_before_any_work(data_a, tmp_path):
    # BatchNorm at a 1x1 bottleneck needs two slices: found at the first step, in a traceback, after the cache.
    argv = ["--data", str(data_a), "--out", str(tmp_path / "r"), "--size", "16", "--batch-size", "1"]
    with pytest.raises(FlareSegError) as info:
        train_main_raw([*argv, "--width", "4", "--epochs", "1", "--workers", "0", "-q"])
    assert str(info.value) == (
        "--size 16x16 with --batch-size 1: the network's bottleneck is 1x1, and its BatchNorm needs 2 values a "
        "channel in training; give --batch-size 2 or more, or a larger --size"
    )
    assert not (tmp_path / "r").exists()


def test_a_run_folder_whose_lock_cannot_be_opened_names_the_lock_not_the_folder(tmp_path, capsys):
    # On a read-only file system a --resume said "--out RUN: cannot create the run folder": the folder was there,
    # and the user had given --resume; the lock file was what could not be opened. A folder in its place stands in
    # for the read-only file system here (root writes anywhere else).
    from flareseg.train import loop

    run = tmp_path / "run"
    (run / loop.RUN_LOCK).mkdir(parents=True)
    with pytest.raises(FlareSegError, match=rf"^{re.escape(str(run / loop.RUN_LOCK))}: cannot open the run's lock "
                       r"file \(Is a directory\)$"):  # fmt: skip
        loop._hold_run(run)
