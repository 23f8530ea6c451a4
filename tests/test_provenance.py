"""Which model made a label map: the stamp in each output and in the timings, checked against hashlib."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flareseg import __version__
from flareseg.checkpoint import ModelInfo
from flareseg.errors import FlareSegError
from flareseg.network import NetworkConfig
from flareseg.phantom import make_phantom
from flareseg.preprocess import NormalizationStats
from flareseg.provenance import DESCRIP_BYTES, PLAIN_DESCRIPTION, HashStopped, ModelStamp
from flareseg.runtime.cli import main as infer_main
from flareseg.runtime.pipeline import segment_file
from flareseg.runtime.runners import FunctionRunner, open_runner
from flareseg.volume import read_ct, write_labels


def _descrip(path: Path) -> str:
    return bytes(nib.load(path).header["descrip"]).rstrip(b"\0").decode("ascii")


def _ct(path: Path, seed: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(make_phantom((40, 40, 5), (8.0, 8.0, 10.0), seed=seed).to_nifti()[0], path)
    return path


def test_a_stamp_is_the_files_sha256_and_size(tmp_path):
    model = tmp_path / "best.pt"
    model.write_bytes(b"not really a model, but bytes to hash" * 1000)
    stamp, _ = ModelStamp.read(model)
    assert stamp.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert (stamp.name, stamp.bytes) == ("best.pt", 37000)
    text = stamp.nifti_description()
    assert text == f"flareseg {__version__} sha256:{stamp.sha256[:16]} best.pt"
    assert stamp.dicom_parameters() == {"model": "best.pt", "model_sha256": stamp.sha256}
    odd = ModelStamp(name="a=1,b.onnx", bytes=1, sha256=stamp.sha256)
    assert odd.dicom_parameters()["model"] == "a_1_b.onnx"  # DICOM stores them as name=value,...


@pytest.mark.parametrize("name", ["m" * 200 + ".onnx", "modèle-ü.pt", "模型.pt", "x.pt"])
def test_a_long_or_non_ascii_name_is_shortened_never_the_digest(name):
    stamp = ModelStamp(name=name, bytes=1, sha256="ab" * 32)
    text = stamp.nifti_description()
    assert text.isascii() and len(text) <= DESCRIP_BYTES
    assert f"sha256:{'ab' * 8} " in text
    assert text.endswith("...") == (len(name) > 40)
    assert stamp.dicom_parameters()["model"].isascii()  # a series may declare no character set


def test_write_labels_refuses_a_description_the_header_cannot_hold(tmp_path):
    ct = _ct(tmp_path / "ct.nii.gz")
    vol = read_ct(ct)
    labels = np.zeros(vol.array.shape, np.uint8)
    for bad in ("x" * (DESCRIP_BYTES + 1), "café"):
        with pytest.raises(FlareSegError, match="79 ASCII characters"):
            write_labels(labels, vol.geometry, tmp_path / "out.nii.gz", description=bad)
    assert not (tmp_path / "out.nii.gz").exists()
    write_labels(labels, vol.geometry, tmp_path / "out.nii.gz", description="y" * DESCRIP_BYTES)
    assert _descrip(tmp_path / "out.nii.gz") == "y" * DESCRIP_BYTES


def test_the_outputs_and_timings_name_the_model_that_made_them(trained_checkpoint, tmp_path):
    """A model retrained under the same name gives outputs that say so: the digest, not the path, tells them apart."""
    cases = tmp_path / "in"
    for i in range(2):
        _ct(cases / f"c{i}_0000.nii.gz", seed=10 + i)
    model = tmp_path / "models" / "best.pt"
    model.parent.mkdir()
    shutil.copy(trained_checkpoint, model)
    first = hashlib.sha256(model.read_bytes()).hexdigest()
    assert infer_main(["--model", str(model), "-i", str(cases), "-o", str(tmp_path / "a"), "-q"]) == 0
    for i in range(2):
        assert _descrip(tmp_path / "a" / f"c{i}.nii.gz") == f"flareseg {__version__} sha256:{first[:16]} best.pt"
    context = json.loads((tmp_path / "a" / "timings.json").read_text())["context"]
    assert context["model_file"] == {"name": "best.pt", "bytes": model.stat().st_size, "sha256": first}

    # "Retrained": the same weights saved again with one changed, under the same name.
    ckpt = torch.load(model, weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1e-3
    torch.save(ckpt, model)
    second = hashlib.sha256(model.read_bytes()).hexdigest()
    assert second != first
    assert (
        infer_main(["--model", str(model), "-i", str(cases / "c0_0000.nii.gz"), "-o", str(tmp_path / "b"), "-q"]) == 0
    )
    assert _descrip(tmp_path / "b" / "c0.nii.gz") == f"flareseg {__version__} sha256:{second[:16]} best.pt"
    timings = json.loads((tmp_path / "b" / "c0.timings.json").read_text())
    assert timings["context"]["model_file"]["sha256"] == second


def test_the_model_is_hashed_once_per_content_off_the_main_thread(trained_checkpoint, tmp_path, monkeypatch):
    """The writer's thread hashes the model while the first case is inferred; later cases, and a later activation
    of the same file, reuse the digest (a stat tells the file is the one hashed)."""
    import threading

    calls: list[str] = []
    real = ModelStamp.read.__func__  # type: ignore[attr-defined]

    def counted(cls, path, stop=None):
        calls.append(threading.current_thread().name)
        return real(cls, path, stop)

    monkeypatch.setattr(ModelStamp, "read", classmethod(counted))
    with open_runner(trained_checkpoint) as runner:
        for i in range(2):
            ct = _ct(tmp_path / f"c{i}_0000.nii.gz", seed=i)
            segment_file(runner, ct, tmp_path / "out" / f"c{i}.nii.gz", batch_size=4)
    assert len(calls) == 1 and calls[0].startswith("flareseg-write")
    expected = hashlib.sha256(trained_checkpoint.read_bytes()).hexdigest()[:16]
    assert all(expected in _descrip(tmp_path / "out" / f"c{i}.nii.gz") for i in range(2))
    with runner:  # released, then loaded again: the same file, not read twice
        segment_file(runner, tmp_path / "c0_0000.nii.gz", tmp_path / "again" / "c0.nii.gz", batch_size=4)
    assert len(calls) == 1


def test_the_stamp_names_the_file_loaded_never_one_it_replaced(trained_checkpoint, tmp_path):
    """A model still being copied fails to load, and is hashed as it was then; the whole file, loaded next, must
    get its own digest. A file replaced after loading and before any hash cannot name what made the outputs: the
    case fails."""
    model = tmp_path / "best.pt"
    whole = trained_checkpoint.read_bytes()
    model.write_bytes(whole[: len(whole) // 2])  # still arriving
    ct = _ct(tmp_path / "c_0000.nii.gz")
    runner = open_runner(model)
    with pytest.raises(FlareSegError):
        segment_file(runner, ct, tmp_path / "first.nii.gz")
    model.write_bytes(whole)
    try:
        segment_file(runner, ct, tmp_path / "second.nii.gz")
        assert _descrip(tmp_path / "second.nii.gz").split()[2] == f"sha256:{hashlib.sha256(whole).hexdigest()[:16]}"
    finally:
        runner.deactivate()
    with open_runner(model) as loaded:  # loaded, not yet hashed
        retrained = tmp_path / "retrained.pt"
        retrained.write_bytes(whole + b"\0")  # another model, moved over the loaded one
        retrained.replace(model)
        with pytest.raises(FlareSegError, match=r"best\.pt: replaced since this run loaded it"):
            segment_file(loaded, ct, tmp_path / "third.nii.gz")
    assert not (tmp_path / "first.nii.gz").exists() and not (tmp_path / "third.nii.gz").exists()


def test_a_model_file_touched_or_relinked_after_its_loading_and_hashing_is_no_failure(trained_checkpoint, tmp_path):
    """Once the loaded file is hashed, its stamp stands: a backup tool touching it, or a link repointed to the
    next model, says nothing of the model this run loaded."""
    import os

    model = tmp_path / "models" / "v1.pt"
    model.parent.mkdir()
    model.write_bytes(trained_checkpoint.read_bytes())
    link = tmp_path / "models" / "latest.pt"
    link.symlink_to(model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:16]
    with open_runner(link) as runner:
        segment_file(runner, _ct(tmp_path / "a_0000.nii.gz"), tmp_path / "a.nii.gz")
        os.utime(model, ns=(model.stat().st_mtime_ns + 10**9,) * 2)
        segment_file(runner, _ct(tmp_path / "b_0000.nii.gz", seed=4), tmp_path / "b.nii.gz")
        (tmp_path / "models" / "v2.pt").write_bytes(model.read_bytes() + b"\0")
        link.unlink()
        link.symlink_to(tmp_path / "models" / "v2.pt")
        segment_file(runner, _ct(tmp_path / "c_0000.nii.gz", seed=5), tmp_path / "c.nii.gz")
    assert [_descrip(tmp_path / f"{c}.nii.gz").split()[2] for c in "abc"] == [f"sha256:{digest}"] * 3


def test_a_file_rewritten_in_place_with_its_old_times_put_back_is_hashed_again(tmp_path):
    """rsync --inplace -t: same size, same modification time, other bytes; the change time tells."""
    import os

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x" * 4096)
    first, identity = ModelStamp.read(model)
    st = model.stat()
    model.write_bytes(b"y" * 4096)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    second, again = ModelStamp.read(model)
    assert second.sha256 != first.sha256 and again != identity


def test_a_stop_gives_up_the_models_hash_at_once(tmp_path):
    """A stop waits for the writes in flight, not for a model hashed on a slow disk."""
    import threading

    model = tmp_path / "big.onnx"
    model.write_bytes(b"\0" * (8 << 20))
    stop = threading.Event()
    stop.set()
    with pytest.raises(HashStopped):
        ModelStamp.read(model, stop)
    assert ModelStamp.read(model)[0].sha256 == hashlib.sha256(model.read_bytes()).hexdigest()


def test_a_runner_without_a_model_file_writes_the_plain_description(tmp_path):
    info = ModelInfo(NetworkConfig(base_width=4, in_channels=3), NormalizationStats(mean=-120.0, std=420.0), (32, 32))

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros((x.shape[0], 5, *x.shape[2:]))

    runner = FunctionRunner(model, info)
    assert runner.stamp() is None
    with runner:
        segment_file(runner, _ct(tmp_path / "c_0000.nii.gz"), tmp_path / "c.nii.gz")
    assert _descrip(tmp_path / "c.nii.gz") == PLAIN_DESCRIPTION


def test_a_model_gone_before_it_was_hashed_fails_the_case_in_one_line(trained_checkpoint, tmp_path):
    model = tmp_path / "best.pt"
    shutil.copy(trained_checkpoint, model)
    with open_runner(model) as runner:
        model.unlink()  # loaded, then removed: its outputs cannot name it
        with pytest.raises(FlareSegError, match=r"best\.pt: cannot read the model to name it in the outputs"):
            segment_file(runner, _ct(tmp_path / "c_0000.nii.gz"), tmp_path / "c.nii.gz")
    assert not (tmp_path / "c.nii.gz").exists()


def test_a_run_that_stops_gives_up_the_hash_rather_than_waiting_for_it(trained_checkpoint, tmp_path, monkeypatch):
    """The writer's first job hashes the model; a run that stops (here its model fails to load) sets the stop, so
    a hash on a slow disk does not hold the stop up. The test double waits for the stop, and says if it came."""
    stopped: list[bool] = []

    def read(cls, path, stop=None):
        stopped.append(stop is not None and stop.wait(20))
        raise HashStopped(str(path))

    monkeypatch.setattr(ModelStamp, "read", classmethod(read))
    runner = open_runner(trained_checkpoint)

    def fail() -> None:
        raise FlareSegError("the model failed to load")

    monkeypatch.setattr(runner, "_activate", fail)
    with pytest.raises(FlareSegError, match="the model failed to load"):
        segment_file(runner, _ct(tmp_path / "c_0000.nii.gz"), tmp_path / "c.nii.gz")
    assert stopped == [True]


def test_a_stopped_command_does_not_hash_the_model_to_say_its_timings(trained_checkpoint, tmp_path, monkeypatch):
    """Ctrl-C during the first case: the writer's hash is given up, and the timings' stamp is not made then either
    (a hash on a slow disk would hold the stop up). The test double waits for the stop, and says if it came."""
    from flareseg.runtime import pipeline

    asked: list[bool] = []

    def read(cls, path, stop=None):
        asked.append(stop is not None and stop.wait(20))
        raise HashStopped(str(path))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelStamp, "read", classmethod(read))
    monkeypatch.setattr(pipeline, "_infer_stage", interrupted)
    argv = ["--model", str(trained_checkpoint), "-i", str(_ct(tmp_path / "c_0000.nii.gz")), "-o", str(tmp_path / "o")]
    assert infer_main([*argv, "-q"]) == 130
    assert asked and all(asked)
