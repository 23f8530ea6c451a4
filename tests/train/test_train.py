"""flare-train: learning on real data, exact resume, loss weights, augmentation, DDP."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flareseg.checkpoint import load_model, read_checkpoint
from flareseg.errors import FlareSegError
from flareseg.evaluate import evaluate_folders
from flareseg.phantom import write_phantom_cases
from flareseg.runtime.cli import main as infer_main
from flareseg.train.augment import augment_batch, max_displacement_px, sample_affines
from flareseg.train.cli import main as train_main
from flareseg.train.config import AugmentConfig, TrainConfig
from flareseg.train.data import find_training_cases, split_cases

TINY = ["--width", "4", "--size", "32", "--batch-size", "2", "--workers", "0", "--lr", "1e-3", "-q"]


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_cases(root, 3, shape=(48, 48, 12), spacing=(7.0, 7.0, 10.0))
    return root


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_short_training_on_the_real_sample_learns(sample_dir, tmp_path):
    """Data, augmentation, loss and optimiser together: the training case is learnt."""
    run = tmp_path / "run"
    argv = ["--data", str(sample_dir), "--out", str(run), "--width", "8", "--size", "64", "--epochs", "6"]
    argv += ["--steps-per-epoch", "50", "--batch-size", "8", "--lr", "3e-3", "--val-cases", "0", "--workers", "0"]
    argv += ["--rotation", "10", "--translation", "0.05", "--scale", "0.9,1.1", "--shear", "5", "-q"]
    assert train_main(argv) == 0
    log = _log(run)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["loss"] < log[0]["loss"] / 3
    best = max(log, key=lambda r: r["dsc_mean"])
    assert best["dsc_liver"] > 0.85 and best["dsc_spleen"] > 0.85
    # The saved best model, run through flare-infer and scored by flare-eval, agrees.
    pred = tmp_path / "pred"
    assert (
        infer_main(["--model", str(run / "best.pt"), "-i", str(sample_dir / "TrainingImg"), "-o", str(pred), "-q"]) == 0
    )
    ev = evaluate_folders(pred, sample_dir / "TrainingMask", progress=False)
    assert ev.organ_values(1, 0)[0] == pytest.approx(best["dsc_liver"], abs=1e-6)
    assert ev.organ_values(3, 0)[0] == pytest.approx(best["dsc_spleen"], abs=1e-6)
    for r in log:
        assert r["steps_per_s"] > 0 and 0 <= r["data_time_fraction"] < 1


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(phantom_data, tmp_path):
    common = ["--data", str(phantom_data), "--steps-per-epoch", "3", "--val-cases", "1", *TINY]
    assert train_main([*common, "--out", str(tmp_path / "straight"), "--epochs", "2"]) == 0
    assert train_main([*common, "--out", str(tmp_path / "split"), "--epochs", "1"]) == 0
    assert train_main(["--resume", str(tmp_path / "split"), "--epochs", "2", "-q"]) == 0
    a = read_checkpoint(tmp_path / "straight" / "last.pt")
    b = read_checkpoint(tmp_path / "split" / "last.pt")
    assert a["train_state"]["epoch"] == b["train_state"]["epoch"] == 1
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert _log(tmp_path / "straight")[-1]["loss"] == _log(tmp_path / "split")[-1]["loss"]
    # The resumed optimiser carried its state: Adam's step count continued from 3 to 6.
    steps = {int(s["step"]) for s in b["train_state"]["optimizer"]["state"].values()}
    assert steps == {6}


def test_each_epoch_draws_its_own_augmentations_at_the_size_asked(phantom_data, tmp_path, monkeypatch):
    # Seeding every epoch's stream with the first epoch's number still trained, resumed and repeated exactly.
    from flareseg.train import loop

    seen = []

    def recording(images, labels, thetas):
        seen.append((tuple(images.shape[-2:]), thetas.clone()))
        return augment_batch(images, labels, thetas)

    monkeypatch.setattr(loop, "augment_batch", recording)
    run = tmp_path / "run"
    argv = ["--data", str(phantom_data), "--out", str(run), "--epochs", "2", "--steps-per-epoch", "1"]
    assert train_main([*argv, "--val-cases", "1", *TINY, "--size", "32,48", "--augment-prob", "1"]) == 0
    assert [shape for shape, _ in seen] == [(32, 48), (32, 48)]  # not square: H,W kept apart
    assert json.loads((run / "config.json").read_text())["slice_size"] == [32, 48]
    assert not torch.allclose(seen[0][1], seen[1][1])


def test_weights_follow_from_the_seed_alone_and_the_callers_generators_are_untouched(phantom_data, tmp_path):
    import random

    common = ["--data", str(phantom_data), "--epochs", "1", "--steps-per-epoch", "1", "--val-cases", "1", "-q", *TINY]
    weights = []
    for name, global_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(global_seed)
        random.seed(global_seed)
        np.random.seed(global_seed)
        before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        assert train_main([*common, "--out", str(tmp_path / name)]) == 0
        assert torch.equal(torch.get_rng_state(), before[0])
        assert random.getstate() == before[1]
        assert np.array_equal(np.random.get_state()[1], before[2])
        weights.append(read_checkpoint(tmp_path / name / "last.pt")["state_dict"])
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())  # the callers' seeds differed
    assert train_main([*common, "--out", str(tmp_path / "c"), "--seed", "7"]) == 0
    other = read_checkpoint(tmp_path / "c" / "last.pt")["state_dict"]
    assert not all(torch.equal(v, other[k]) for k, v in weights[0].items())


def test_an_epochs_checkpoints_and_log_record_land_together_or_not_at_all(phantom_data, tmp_path, monkeypatch, caplog):
    from flareseg.train import loop

    real_save, written = loop.save_checkpoint, []

    def save_then_stop(path, *args, **kwargs):
        if written:  # Ctrl-C while the epoch's second checkpoint is written
            raise KeyboardInterrupt
        written.append(Path(path).name)
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    run = tmp_path / "run"
    argv = ["--data", str(phantom_data), "--out", str(run), "--epochs", "1", "--steps-per-epoch", "1"]
    assert train_main([*argv, "--val-cases", "1", *TINY]) == 130
    # best.pt was written, but not renamed into place without its last.pt: a best.pt alone was a run that
    # --resume refused (no last.pt) and a new run refused too (a run is there).
    assert written == ["best.pt"]
    assert not any((run / name).exists() for name in ("best.pt", "last.pt", "log.jsonl"))
    assert not [p.name for p in run.iterdir() if ".part" in p.name]
    monkeypatch.undo()
    # "No checkpoint yet" is said once the run's lock is held: to a --resume refused because another flare-train
    # trains there, it said "starting it from epoch 1" and then refused.
    said = f"{run}: no checkpoint yet (stopped in its first epoch); starting it from epoch 1"
    fd = loop._hold_run(run)
    try:
        with caplog.at_level(logging.INFO, logger="flareseg.train.loop"):
            assert train_main(["--resume", str(run)]) == 2
        assert said not in [r.getMessage() for r in caplog.records]
    finally:
        loop._release_run(fd)
    with caplog.at_level(logging.INFO, logger="flareseg.train.loop"):
        assert train_main(["--resume", str(run)]) == 0
    assert said in [r.getMessage() for r in caplog.records]
    assert [r["epoch"] for r in _log(run)] == [1]
    assert read_checkpoint(run / "best.pt")["train_state"]["best_epoch"] == 1


def test_a_run_stopped_after_an_epoch_says_how_to_resume_it(phantom_data, tmp_path, monkeypatch, caplog):
    from flareseg.train import loop

    real_save, saves = loop.save_checkpoint, []

    def save_then_stop(path, *args, **kwargs):
        saves.append(Path(path).name)
        if len(saves) > 2:  # epoch 1's best.pt and last.pt are kept; Ctrl-C at epoch 2's
            raise KeyboardInterrupt
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    run = tmp_path / "my run"
    argv = ["--data", str(phantom_data), "--out", str(run), "--epochs", "2", "--steps-per-epoch", "1"]
    with caplog.at_level(logging.WARNING, logger="flareseg.train"):
        assert train_main([*argv, "--val-cases", "1", *TINY]) == 130
    assert caplog.messages == [
        f"{run}: stopped; `flare-train --resume '{run}'` goes on after its last finished epoch"  # pasted as it is
    ]
    monkeypatch.undo()
    caplog.clear()
    assert train_main(["--resume", str(run), "-q"]) == 0
    assert [r["epoch"] for r in _log(run)] == [1, 2] and not caplog.messages


def test_an_epochs_log_record_is_renamed_into_place_before_its_checkpoints(phantom_data, tmp_path, monkeypatch):
    # Killed between the renames, a record ahead of last.pt is replaced when the epoch is done again; a last.pt
    # ahead of the log left that epoch's record missing for good.
    import os

    real_replace, renamed = os.replace, []

    def replace(src, dst):
        renamed.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    argv = ["--data", str(phantom_data), "--out", str(run), "--epochs", "1", "--steps-per-epoch", "1"]
    assert train_main([*argv, "--val-cases", "1", *TINY]) == 0
    epoch_set = [name for name in renamed if name in ("log.jsonl", "best.pt", "last.pt")]
    assert epoch_set == ["log.jsonl", "best.pt", "last.pt"]


def test_checkpoint_holds_what_inference_needs_and_refuses_mismatches(phantom_data, tmp_path):
    run = tmp_path / "run"
    assert (
        train_main(
            [
                "--data",
                str(phantom_data),
                "--out",
                str(run),
                "--epochs",
                "1",
                "--steps-per-epoch",
                "1",
                "--val-cases",
                "1",
                *TINY,
            ]
        )
        == 0
    )
    rng = torch.get_rng_state()
    net, info, payload = load_model(run / "best.pt")
    assert torch.equal(torch.get_rng_state(), rng)  # the weights were loaded, not initialised first
    assert all(torch.equal(v, payload["state_dict"][k]) for k, v in net.state_dict().items())
    assert info.network.base_width == 4 and info.slice_size == (32, 32)
    assert info.normalization.num_cases == 2 and info.normalization.std > 0  # statistics of the training split
    assert json.loads((run / "stats.json").read_text())["mean"] == info.normalization.mean
    assert payload["versions"]["torch"] == str(torch.__version__)
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-3
    from flareseg.network import NetworkConfig

    with pytest.raises(FlareSegError, match="base_width: checkpoint 4, expected 64"):
        load_model(run / "best.pt", expect=NetworkConfig())
    broken = dict(payload)
    del broken["normalization"]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(FlareSegError, match="missing normalization"):
        load_model(tmp_path / "broken.pt")
    torch.save(dict(payload, network={**payload["network"], "base_width": 8}), tmp_path / "wide.pt")
    with pytest.raises(FlareSegError, match=r"weights do not fit the recorded network \(size mismatch for \w"):
        load_model(tmp_path / "wide.pt")
    wrong = dict(payload, network={**payload["network"], "num_classes": 3})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(FlareSegError, match=r"label map .* does not name classes 0\.\.2"):
        load_model(tmp_path / "wrong.pt")
    assert train_main(["--data", str(phantom_data), "--out", str(run), "--epochs", "1", *TINY]) == 2


def test_split_is_seeded_and_explicit_lists_are_honoured(phantom_data, tmp_path):
    cases = find_training_cases(phantom_data)
    a, b = split_cases(cases, val_cases=1, seed=0), split_cases(cases, val_cases=1, seed=0)
    assert a == b and len(a[1]) == 1 and a[1][0] not in a[0]
    # --seed draws another split (a split that ignored it would hold out the same case for every seed).
    held_out = {split_cases(cases, val_cases=1, seed=seed)[1][0].name for seed in range(12)}
    assert held_out == {c.name for c in cases}
    train_c, val_c = split_cases(cases, val_cases=0)
    assert val_c == train_c == cases  # 0: validate on the training cases
    assert [c.name for c in split_cases(cases, val_cases=1, val_list=["train_002"])[1]] == ["train_002"]
    names = ", ".join(c.name for c in cases[:3]) + (f" and {len(cases) - 3} more" if len(cases) > 3 else "")
    with pytest.raises(FlareSegError) as info:
        split_cases(cases, val_cases=1, val_list=["nope"])
    assert str(info.value) == f"--val-list: no case nope in the data (its cases: {names})"
    # Named twice, a case counted double in the mean DSC that chooses best.pt; all of them left none to train on.
    with pytest.raises(FlareSegError, match=r"^--val-list names train_002 more than once$"):
        split_cases(cases, val_cases=1, val_list=["train_002", "train_001", "train_002"])
    with pytest.raises(FlareSegError, match=rf"^--val-list holds all {len(cases)} cases of the data, which leaves"):
        split_cases(cases, val_cases=1, val_list=[c.name for c in cases])
    a_file = next((phantom_data / "TrainingImg").iterdir())
    for given, said in ((phantom_data / "nowhere", "no such folder"), (a_file, "not a folder")):  # not "missing ..."
        with pytest.raises(FlareSegError, match=rf"^{re.escape(str(given))}: {said} \(expected the FLARE21 layout"):
            find_training_cases(given)
    (tmp_path / "half" / "TrainingImg").mkdir(parents=True)
    with pytest.raises(FlareSegError, match=r"half: missing TrainingMask/ \(expected the FLARE21 layout"):
        find_training_cases(tmp_path / "half")
    (tmp_path / "half" / "TrainingMask").mkdir()
    with pytest.raises(FlareSegError, match=r"half/TrainingImg: no training cases$"):
        find_training_cases(tmp_path / "half")


def test_a_damaged_statistics_file_is_one_line_naming_it(tmp_path):
    from flareseg.train.data import read_stats_file

    path = tmp_path / "stats.json"
    for text, said in (("{", "unreadable statistics"), ("[1, 2]", "not dataset statistics (expected a JSON object)")):
        path.write_text(text)
        with pytest.raises(FlareSegError, match=rf"^{re.escape(str(path))}: {re.escape(said)}"):
            read_stats_file(path)
    path.write_text('{"mean": 1.0}')  # a key missing: the statistics' own refusal, with the file's name before it
    with pytest.raises(FlareSegError, match=rf"^{re.escape(str(path))}: "):
        read_stats_file(path)


def test_cached_masks_take_the_label_under_each_pixel_centre_as_the_images_do(phantom_data, tmp_path):
    # 48 -> 32 pixels: output pixel i covers source [1.5 i, 1.5 (i + 1)); its centre falls in source pixel
    # floor(1.5 (i + 0.5)), the pixel the bilinear image resize (half-pixel centres) also centres on.
    from flareseg.preprocess import NormalizationStats
    from flareseg.train.data import SliceCache
    from flareseg.volume import read_labels, to_canonical

    case = find_training_cases(phantom_data)[0]
    cache = SliceCache(tmp_path / "cache", NormalizationStats(mean=0.0, std=100.0), (32, 32))
    cache.build([case])
    _, labels = cache.slices(case)
    truth = to_canonical(*read_labels(case.mask))
    centre = np.floor(1.5 * (np.arange(32) + 0.5)).astype(int)
    expected = truth[:, centre][:, :, centre]
    assert labels.shape == expected.shape and np.array_equal(labels, expected)
    assert len(np.unique(expected)) > 2  # organs present: the check is not of background alone


def test_a_mask_rewritten_at_the_same_size_is_cached_again(tmp_path):
    """Corrected labels saved over a mask (uncompressed: the same size) are trained on, not the cached old ones;
    only the modification time tells the files apart."""
    from flareseg.preprocess import NormalizationStats
    from flareseg.train.data import SliceCache

    root = tmp_path / "data"
    write_phantom_cases(root, 1, shape=(32, 32, 4), spacing=(8.0, 8.0, 10.0))
    for packed in list(root.rglob("*.nii.gz")):
        nib.save(nib.load(packed), packed.with_name(packed.name.removesuffix(".gz")))
        packed.unlink()
    (case,) = find_training_cases(root)
    cache = SliceCache(tmp_path / "cache", NormalizationStats(mean=0.0, std=100.0), (32, 32))
    cache.build([case])
    _, before = cache.slices(case)
    assert (before == 1).any()
    mask = nib.load(case.mask)
    data = np.asanyarray(mask.dataobj).copy()
    data[data == 1] = 3  # the liver relabelled spleen
    size, mtime = case.mask.stat().st_size, case.mask.stat().st_mtime_ns
    nib.save(nib.Nifti1Image(data, mask.affine, mask.header), case.mask)
    os.utime(case.mask, ns=(mtime + 10**9, mtime + 10**9))  # a clock coarser than the rewrite cannot hide it
    assert case.mask.stat().st_size == size
    cache.build([case])
    _, after = cache.slices(case)
    assert not (after == 1).any() and np.array_equal(after == 3, (before == 1) | (before == 3))


def test_validation_volumes_stored_with_a_slope_and_offset_are_scored_in_hounsfield_units(tmp_path):
    """A validation image stored as unsigned integers with scl_slope/scl_inter (as many scanners store CT) is
    validated on the same intensities as its HU twin: the cache keeps the stored values and their scaling."""
    from flareseg.preprocess import NormalizationStats
    from flareseg.train.data import SliceCache
    from flareseg.train.loop import validation_volumes

    root = tmp_path / "data"
    write_phantom_cases(root, 1, shape=(32, 32, 4), spacing=(8.0, 8.0, 10.0))
    (case,) = find_training_cases(root)
    twin_root = tmp_path / "scaled"
    (twin_root / "TrainingImg").mkdir(parents=True)
    (twin_root / "TrainingMask").mkdir()
    (twin_root / "TrainingMask" / case.mask.name).write_bytes(case.mask.read_bytes())
    image = nib.load(case.image)
    hu = np.asanyarray(image.dataobj).astype(np.int32)
    twin = nib.Nifti1Image(((hu + 1024) * 2).astype(np.uint16), image.affine)
    twin.header.set_slope_inter(0.5, -1024.0)
    nib.save(twin, twin_root / "TrainingImg" / case.image.name)
    (scaled,) = find_training_cases(twin_root)

    stats = NormalizationStats(mean=-300.0, std=400.0)
    normalised = []
    for name, one in (("plain", case), ("scaled", scaled)):
        cache = SliceCache(tmp_path / name, stats, (32, 32))
        cache.build([one], full_resolution=True)
        (volume,) = validation_volumes(cache, [one], stats)
        normalised.append((np.asarray(volume.stored), volume.normalizer(np.asarray(volume.stored)), volume.truth))
    (plain_stored, plain, plain_truth), (scaled_stored, scaled_out, scaled_truth) = normalised
    assert not np.array_equal(plain_stored, scaled_stored)  # the twin's stored values are not HU
    assert np.array_equal(plain_truth, scaled_truth)
    assert plain.std() > 0.1  # intensities that vary: the check is not of a constant
    np.testing.assert_allclose(scaled_out, plain, rtol=0, atol=1e-5)


def test_augmentation_moves_image_and_mask_together():
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(6, 64, 64)
    img[:, 20:44, 16:40] = torch.linspace(1, 2, 24)  # a textured square
    lab = (img > 0).long() * 2
    theta = sample_affines(6, (64, 64), AugmentConfig(), g)
    assert max_displacement_px(theta, (64, 64)) > 5
    warped, warped_lab = augment_batch(img - 1.0, lab, theta)
    assert warped_lab.unique().tolist() == [0, 2]  # nearest: no new label values
    from scipy import ndimage

    interior = torch.from_numpy(np.stack([ndimage.binary_erosion(m, iterations=1) for m in (warped_lab == 2).numpy()]))
    assert (warped + 1.0)[interior].min() >= 0.9  # the square's intensities land where its label lands
    exterior = torch.from_numpy(np.stack([ndimage.binary_erosion(m, iterations=1) for m in (warped_lab == 0).numpy()]))
    assert (warped + 1.0)[exterior].max() < 0.5  # and nowhere else (only the edges blend, bilinearly)
    assert float(((warped + 1.0) > 0.5).float().mean()) == pytest.approx(
        float((warped_lab == 2).float().mean()), abs=0.02
    )
    same = sample_affines(6, (64, 64), AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(theta, same)
    identity = sample_affines(3, (64, 48), AugmentConfig(0, 0, (1, 1), 0), g)
    out, out_lab = augment_batch(img[:3, :, :48], lab[:3, :, :48], identity)
    assert torch.allclose(out, img[:3, :, :48], atol=1e-5) and torch.equal(out_lab, lab[:3, :, :48])


def test_invalid_settings_are_refused():
    with pytest.raises(FlareSegError, match="lr=0"):
        TrainConfig(data="d", out="o", lr=0)
    with pytest.raises(FlareSegError, match="needs a CUDA device"):
        TrainConfig(data="d", out="o", amp=True)
    with pytest.raises(FlareSegError, match="scale range"):
        AugmentConfig(scale=(1.2, 0.8))


def test_each_slice_of_a_step_gets_its_own_augmentation_across_micro_batches(phantom_data, tmp_path, monkeypatch):
    """Accumulated micro-batches take their own rows of the step's transforms: sharing the first micro-batch's
    rows would train on half as many distinct augmentations, and no longer equal the W-process run."""
    from flareseg.train import loop

    used: list[torch.Tensor] = []
    real = loop.augment_batch

    def augment(images, labels, thetas):
        used.append(thetas.clone())
        return real(images, labels, thetas)

    monkeypatch.setattr(loop, "augment_batch", augment)
    argv = ["--data", str(phantom_data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]
    argv += ["--steps-per-epoch", "3", "--accumulate", "2", "--val-cases", "1", "--augment-prob", "1"]
    assert train_main(argv) == 0
    rows = torch.cat(used).flatten(1)
    assert len(used) == 3 * 2 and rows.shape[0] == 3 * 2 * 2
    assert len(torch.unique(rows, dim=0)) == rows.shape[0]  # each slice of the epoch its own transform


def _torchrun(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """A two-process torchrun command and its environment: one thread per process, a free port (--standalone: a
    fixed one failed when another run of the suite held it), and torchelastic's folders in the test's own."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], env


def test_two_process_torchrun_keeps_replicas_identical_and_equals_accumulation(phantom_data, tmp_path):
    common = ["--data", str(phantom_data), "--epochs", "1", "--steps-per-epoch", "3", "--val-cases", "1", *TINY]
    cmd, env = _torchrun(tmp_path)
    cmd += ["-m", "flareseg.train.cli", *common, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _log(tmp_path / "ddp")[-1]["replica_divergence"] == 0.0
    # One process accumulating 2 micro-batches of 2 sees the same global batches. It runs with one thread, as each
    # rank does: with two, the convolutions sum in another order, and Adam made one weight of an Intel Xeon's run
    # 1.6e-5 off (a gradient near zero, whose rounding noise its normalised step turns into a whole step).
    single = [
        sys.executable,
        "-m",
        "flareseg.train.cli",
        *common,
        "--out",
        str(tmp_path / "single"),
        "--accumulate",
        "2",
    ]
    proc = subprocess.run(single, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = read_checkpoint(tmp_path / "ddp" / "last.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "single" / "last.pt")["state_dict"]

    # Compared: every parameter that receives a gradient. Not compared: BatchNorm running
    # statistics (DDP keeps rank 0's, accumulation updates them with every micro-batch) and
    # convolution biases followed by BatchNorm (their gradient is analytically zero, and Adam
    # turns float rounding noise into full-size steps).
    def pre_bn_bias(key: str) -> bool:
        prefix, _, last = key.rpartition(".")
        head, _, idx = prefix.rpartition(".")
        return last == "bias" and idx.isdigit() and f"{head}.{int(idx) + 1}.running_mean" in a

    compared = [k for k in a if a[k].is_floating_point() and "running_" not in k and not pre_bn_bias(k)]
    assert len(compared) > 60
    for key in compared:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    np.testing.assert_allclose(_log(tmp_path / "ddp")[-1]["loss"], _log(tmp_path / "single")[-1]["loss"], rtol=1e-4)

    # The DDP run resumed as one process: its global batch (2 processes x 2) needs --accumulate 2, which is
    # then recorded. Left out, the resume is refused, naming it, rather than train on half the batch unsaid.
    ddp = tmp_path / "ddp"
    assert read_checkpoint(ddp / "last.pt")["train_state"]["world"] == 2
    resume = [sys.executable, "-m", "flareseg.train.cli", "--resume", str(ddp), "--epochs", "2", "-q"]
    proc = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"flare-train: error: {ddp / 'last.pt'}: trained with a global batch of 4 slices (2 processes x batch 2 x "
        "accumulate 1); this resume's would be 2 (1 x 2 x 1): --accumulate 2 keeps it"
    ]
    assert len(_log(ddp)) == 1
    proc = subprocess.run([*resume, "--accumulate", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(_log(ddp)) == 2 and json.loads((ddp / "config.json").read_text())["accumulate"] == 2
    state = read_checkpoint(ddp / "last.pt")["train_state"]
    assert (state["world"], state["config"]["accumulate"], state["epoch"]) == (1, 2, 1)


def test_a_bad_case_the_main_process_of_a_torchrun_job_finds_is_each_process_s_one_line(tmp_path):
    # Found while rank 0 alone cached the slices, it left rank 1 waiting at a barrier, to end in gloo's
    # "Connection closed by peer" traceback, which torchrun named as the first failure.
    data = tmp_path / "data"
    write_phantom_cases(data, 3, shape=(32, 32, 8), spacing=(8.0, 8.0, 10.0))
    mask = data / "TrainingMask" / "train_001.nii.gz"
    image = nib.load(mask)
    labels = np.asarray(image.dataobj).copy()
    labels[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(labels, image.affine, image.header), mask)
    cmd, env = _torchrun(tmp_path)
    cmd += ["-m", "flareseg.train.cli", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1"]
    cmd += ["--steps-per-epoch", "2", "--val-list", "train_000", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    said = f"{mask}: labels [7] outside 0..4"
    # Each rank's line is one write (print wrote the text and its newline apart, and the ranks' lines interleaved
    # in the stream they share); found wherever it starts, in case another process's output ends without one.
    errors = sorted(
        re.findall(rf"flare-train: error: {re.escape(said)}(?: \(on the main process\))?(?=\n)", proc.stderr)
    )
    assert proc.returncode != 0 and errors == [
        f"flare-train: error: {said}",
        f"flare-train: error: {said} (on the main process)",
    ]
    assert "Connection closed" not in proc.stderr and "RuntimeError" not in proc.stderr


def test_a_resume_keeps_the_global_batch_of_the_run():
    from flareseg.train.loop import _check_global_batch

    config = TrainConfig(data="d", out="o", batch_size=2, accumulate=3)
    then = {"config": {"batch_size": 2, "accumulate": 3}}
    _check_global_batch(Path("run"), config, {**then, "world": 1}, 1)  # the same: nothing to say
    _check_global_batch(Path("run"), config.replace(accumulate=1), {**then, "world": 1}, 3)  # 3 x 2 x 1 = 1 x 2 x 3
    with pytest.raises(FlareSegError, match=r"global batch of 6 slices \(1 process x batch 2 x accumulate 3\); this "
                       r"resume's would be 12 \(2 x 2 x 3\): resume it on 1 process$"):  # fmt: skip
        _check_global_batch(Path("run"), config, {**then, "world": 1}, 2)  # 6 slices over 2 x 2: no whole --accumulate
    with pytest.raises(FlareSegError, match=r"would be 8 \(2 x 2 x 2\): --accumulate 3 keeps it$"):
        _check_global_batch(Path("run"), config.replace(accumulate=2), {**then, "world": 2}, 2)
    # A last.pt from before the process count was recorded: its own accumulation only.
    _check_global_batch(Path("run"), config, then, 1)
    with pytest.raises(FlareSegError, match=r"^--accumulate 1: run.last\.pt does not record how many processes "):
        _check_global_batch(Path("run"), config.replace(accumulate=1), then, 1)


def test_the_defaults_are_the_papers_and_each_aux_weight_reaches_its_level(phantom_data, tmp_path, monkeypatch):
    # Table 3: Adam at 1e-5; weights 1 for the final output, then 0.8..0.5 from the full-resolution level down.
    config = TrainConfig(data="d", out="o")
    assert (config.lr, config.loss_weights, config.batch_size) == (1e-5, (1.0, 0.8, 0.7, 0.6, 0.5), 4)
    # 100 epochs on 512 x 512 slices, 10 cases held out, rotation and shear of +-20 degrees, 20 % shifts, 0.8-1.2.
    assert (config.epochs, config.slice_size, config.val_cases, config.base_width) == (100, (512, 512), 10, 64)
    assert config.augment == AugmentConfig(20.0, 0.2, (0.8, 1.2), 20.0, 1.0)
    with pytest.raises(FlareSegError, match="shear"):  # the parser refuses it too; a program's own call the same
        AugmentConfig(shear_deg=-1.0)
    with pytest.raises(FlareSegError, match=r"shear --shear 90: expected degrees in \[0, 90\), finite"):
        AugmentConfig(shear_deg=90.0)  # tan(90 degrees) is none: at 89.99 a corner moved 86,905 pixels
    from flareseg.train import loop

    seen = []
    real = loop.deep_supervision_loss

    def loss(logits, aux, labels, weights):
        seen.append(weights)
        return real(logits, aux, labels, weights)

    monkeypatch.setattr(loop, "deep_supervision_loss", loss)
    argv = ["--data", str(phantom_data), "--out", str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "1"]
    assert train_main([*argv, "--val-cases", "1", "--loss-weights", "1,0.4,0.3,0.2,0.1", *TINY]) == 0
    assert [(w.final, w.aux) for w in seen] == [(1.0, (0.4, 0.3, 0.2, 0.1))]


def _forward_px(theta: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward transforms (pixels, about the centre) and translations that ``sample_affines``' matrices undo."""
    h, w = size
    norm = torch.tensor([[2.0 / w, 0.0], [0.0, 2.0 / h]], dtype=torch.float64)
    theta = theta.double()
    inverse = torch.linalg.inv(norm) @ theta[:, :, :2] @ norm
    forward = torch.linalg.inv(inverse)
    shift = (torch.linalg.inv(norm) @ theta[:, :, 2:])[..., 0]
    return forward, -(forward @ shift[..., None])[..., 0]


def test_each_augmentation_draws_over_its_whole_range_and_no_further():
    # The together-with-the-mask test alone let a one-sided rotation, no shear or a width-scaled y shift through.
    g = torch.Generator().manual_seed(0)
    size, n = (40, 64), 4000  # not square: x shifts scale with the width, y shifts with the height
    none = {"rotation_deg": 0.0, "translation": 0.0, "scale": (1.0, 1.0), "shear_deg": 0.0}
    forward, _ = _forward_px(sample_affines(n, size, AugmentConfig(**{**none, "rotation_deg": 30.0}), g), size)
    angle = torch.rad2deg(torch.atan2(forward[:, 1, 0], forward[:, 0, 0]))
    assert angle.abs().max() <= 30.0 + 1e-3 and angle.min() < -27 and angle.max() > 27
    forward, _ = _forward_px(sample_affines(n, size, AugmentConfig(**{**none, "shear_deg": 20.0}), g), size)
    shear = torch.rad2deg(torch.atan(forward[:, 0, 1]))
    assert forward[:, 1, 0].abs().max() < 1e-5 and shear.abs().max() <= 20.0 + 1e-3
    assert shear.min() < -18 and shear.max() > 18  # both ways: a one-sided draw biases every run
    forward, _ = _forward_px(sample_affines(n, size, AugmentConfig(**{**none, "scale": (0.8, 1.2)}), g), size)
    scale = torch.linalg.det(forward).sqrt()
    assert 0.8 - 1e-4 <= scale.min() < 0.82 and 1.18 < scale.max() <= 1.2 + 1e-4
    _, shift = _forward_px(sample_affines(n, size, AugmentConfig(**{**none, "translation": 0.2}), g), size)
    reach = shift.abs().amax(0)  # x, y in pixels
    assert 0.19 * 64 < reach[0] <= 0.2 * 64 + 1e-3 and 0.19 * 40 < reach[1] <= 0.2 * 40 + 1e-3
    low, high = shift.amin(0), shift.amax(0)  # each axis both ways
    assert low[0] < -0.19 * 64 and high[0] > 0.19 * 64 and low[1] < -0.19 * 40 and high[1] > 0.19 * 40


def _validation_scores(monkeypatch, prediction: np.ndarray, truth: np.ndarray) -> dict:
    """loop.validate over one volume whose network's labels are ``prediction`` (the inference is replaced)."""
    from flareseg.checkpoint import ModelInfo
    from flareseg.network import NetworkConfig, build_training_network
    from flareseg.preprocess import NormalizationStats
    from flareseg.train import loop

    monkeypatch.setattr(loop, "infer_volume", lambda *a, **k: prediction.copy())
    net = build_training_network(NetworkConfig(base_width=4))
    info = ModelInfo(network=net.config, normalization=NormalizationStats(mean=0.0, std=1.0), slice_size=(32, 32))
    volume = loop.ValidationVolume(np.zeros_like(truth, dtype=np.int16), truth, None)
    return loop.validate(net, [volume], info, torch.device("cpu"), 2)


def _four_organs() -> np.ndarray:
    truth = np.zeros((8, 32, 32), np.uint8)
    for organ, (a, b) in zip((1, 2, 3, 4), ((2, 8), (10, 16), (18, 24), (26, 31)), strict=True):
        truth[2:6, a:b, 2:12] = organ
    return truth


def test_validation_scores_the_labels_flare_infer_would_write(monkeypatch):
    # The score that picks best.pt: after each organ's largest component is kept, as in flare-infer.
    truth = _four_organs()
    prediction = truth.copy()
    prediction[1, 20:22, 25:27] = 1  # an island of liver apart from its body: post-processing removes it
    assert _validation_scores(monkeypatch, prediction, truth)["dsc_mean"] == 1.0


def test_the_validation_mean_is_over_all_four_organs(monkeypatch):
    truth = _four_organs()
    prediction = np.where(truth == 4, 0, truth).astype(np.uint8)  # the pancreas missed
    scores = _validation_scores(monkeypatch, prediction, truth)
    assert scores["dsc_pancreas"] == 0.0 and scores["dsc_liver"] == scores["dsc_kidneys"] == 1.0
    assert scores["dsc_mean"] == 0.75


def test_the_training_statistics_clip_each_volume_to_its_1_and_99_percentiles(tmp_path):
    from flareseg.phantom import make_phantom
    from flareseg.train.data import Case, dataset_stats

    image, mask = make_phantom((64, 64, 16), (6.0, 6.0, 8.0), seed=5).to_nifti()
    nib.save(image, tmp_path / "a_0000.nii.gz")
    nib.save(mask, tmp_path / "a.nii.gz")
    stats = dataset_stats([Case("a", tmp_path / "a_0000.nii.gz", tmp_path / "a.nii.gz")])
    hu = np.asarray(nib.load(tmp_path / "a_0000.nii.gz").get_fdata(), dtype=np.float64)
    clipped = np.clip(hu, *np.percentile(hu, [1.0, 99.0]))
    assert tuple(stats.percentiles) == (1.0, 99.0)  # SPEC: clipped to [1, 99] percentiles
    assert stats.mean == pytest.approx(clipped.mean(), rel=1e-4, abs=1e-3)
    assert stats.std == pytest.approx(clipped.std(), rel=1e-4, abs=1e-3)


def test_the_default_epoch_is_one_pass_in_steps_of_batch_times_accumulate(phantom_data, tmp_path):
    run = tmp_path / "run"
    argv = ["--data", str(phantom_data), "--out", str(run), "--epochs", "1", "--val-cases", "1", *TINY]
    assert train_main([*argv, "--accumulate", "2"]) == 0
    assert _log(run)[0]["steps"] == 2 * 12 // (2 * 2)  # two training cases of 12 slices, 2 x 2 slices a step


def test_an_epochs_slice_order_has_exactly_the_slices_its_steps_take():
    from flareseg.train.loop import _global_order

    for n_slices, steps, batch in [(24, 2, 2), (24, 1, 32), (24, 5, 7)]:
        order = _global_order(n_slices, steps, batch, torch.Generator().manual_seed(0))
        assert len(order) == steps * batch and set(order.tolist()) <= set(range(n_slices))
    assert set(_global_order(24, 1, 32, torch.Generator().manual_seed(0)).tolist()) == set(range(24))
