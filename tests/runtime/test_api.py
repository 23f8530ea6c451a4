"""The runtime API as a long-running service uses it: arrays in memory, shared runners, one exception type."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import reorient, save

from flareseg.checkpoint import ModelInfo, load_model
from flareseg.errors import FlareSegError
from flareseg.network import NetworkConfig
from flareseg.phantom import make_phantom
from flareseg.preprocess import NormalizationStats, volume_normalizer
from flareseg.runtime import (
    FunctionRunner,
    OnnxRuntimeRunner,
    OpenVINORunner,
    TorchRunner,
    list_inputs,
    segment_array,
    segment_file,
    segment_folder,
)
from flareseg.runtime.inferer import infer_volume
from flareseg.runtime.pipeline import peak_rss_mb

WAIT_S = 20.0


def _phantom_image(scaled: bool) -> nib.Nifti1Image:
    img = make_phantom((48, 40, 7), (8.0, 9.0, 10.0), seed=5).to_nifti()[0]
    if not scaled:
        return img
    # Stored values with a slope and an intercept, as many scanners write them: HU = 2 * stored - 1024.
    hu = np.asanyarray(img.dataobj).astype(np.float64)
    out = nib.Nifti1Image(np.round((hu + 1024) / 2).astype(np.int16), img.affine, img.header.copy())
    out.header.set_slope_inter(2.0, -1024.0)
    return out


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("P", "I", "R")])
@pytest.mark.parametrize("scaled", [False, True])
def test_an_array_in_memory_gets_the_labels_its_file_gets(trained_checkpoint, tmp_path, axcodes, scaled):
    img = reorient(_phantom_image(scaled), axcodes)
    ct = save(img, tmp_path / "c_0000.nii.gz")
    with TorchRunner(trained_checkpoint) as runner:
        segment_file(runner, ct, tmp_path / "c.nii.gz", batch_size=3)
        labels = segment_array(runner, nib.load(ct).get_fdata(dtype=np.float32), img.affine, batch_size=3)
    written = np.asanyarray(nib.load(tmp_path / "c.nii.gz").dataobj)
    assert labels.dtype == np.uint8 and labels.shape == img.shape
    assert np.count_nonzero(written) > 100  # organs found, so the agreement below means something
    np.testing.assert_array_equal(labels, written)


def test_an_array_is_checked_as_a_file_is(trained_checkpoint):
    img = _phantom_image(False)
    hu = np.asanyarray(img.dataobj).astype(np.float32)
    with_nan = hu.copy()
    with_nan[3, 4, 5] = np.nan
    cases = {
        "not finite": (with_nan, img.affine),
        "3D volume": (hu[:, :, 0], img.affine),
        "4 x 4 affine": (hu, img.affine[:3, :3]),
        "singular": (hu, np.zeros((4, 4))),
        "empty volume": (hu[:, :, :0], img.affine),
        r"last row is \[1.0, 1.0, 1.0, 5.0\]": (hu, np.vstack([img.affine[:3], [1.0, 1.0, 1.0, 5.0]])),
        "unsupported voxel type": (hu > 0, img.affine),
        "label map": (np.asanyarray(make_phantom((48, 40, 7), (8.0, 9.0, 10.0), seed=5).labels), img.affine),
    }
    with TorchRunner(trained_checkpoint) as runner:
        for expected, (array, affine) in cases.items():
            with pytest.raises(FlareSegError, match=expected) as err:
                segment_array(runner, array, affine, name="case 7")
            assert str(err.value).startswith("case 7") and "\n" not in str(err.value)


def test_a_folder_given_as_one_path_is_refused_not_split_into_characters(trained_checkpoint, tmp_path):
    ct = save(_phantom_image(False), tmp_path / "c_0000.nii.gz")
    with TorchRunner(trained_checkpoint) as runner:
        for given in (str(tmp_path), tmp_path, str(ct)):
            with pytest.raises(FlareSegError, match=r"takes a list of inputs.*list_inputs"):
                segment_folder(runner, given, tmp_path / "out")  # type: ignore[arg-type]
        (done,) = segment_folder(runner, list(list_inputs(tmp_path).values()), tmp_path / "out")
    assert done.status == "ok" and (tmp_path / "out" / "c.nii.gz").is_file()


def test_a_folder_listed_by_list_inputs_is_taken_as_it_is_given(trained_checkpoint, tmp_path):
    # As the README and the refusal above suggest: list_inputs gives case name -> input. Its keys were once
    # taken for paths, and every case failed with "file not found".
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b", "a"):
        save(_phantom_image(False), folder / f"{name}_0000.nii.gz")
    with TorchRunner(trained_checkpoint) as runner:
        done = segment_folder(runner, list_inputs(folder), tmp_path / "out")
    assert [(t.case, t.status) for t in done] == [("a", "ok"), ("b", "ok")]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz"]


class _CountingRunner(FunctionRunner):
    """A test double: the trained network, counting activations, whose batches can be held up by an event."""

    def __init__(self, checkpoint: Path) -> None:
        net, info, _ = load_model(checkpoint)
        self.activations = 0
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()

        def fn(batch: torch.Tensor) -> torch.Tensor:
            self.entered.set()
            assert self.release.wait(WAIT_S)
            with torch.inference_mode():
                return net(batch)

        super().__init__(fn, info)

    def _activate(self) -> None:
        time.sleep(0.2)  # long enough for a second thread to arrive while the first loads
        self.activations += 1


def test_threads_sharing_an_inactive_runner_load_its_model_once(trained_checkpoint):
    runner = _CountingRunner(trained_checkpoint)
    threads = [threading.Thread(target=runner.activate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert runner.activations == 1 and runner.is_active


def test_deactivating_waits_for_a_batch_in_flight_in_another_thread(trained_checkpoint):
    runner = _CountingRunner(trained_checkpoint).activate()
    runner.release.clear()
    out: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: out.append(runner.infer(torch.zeros(2, 3, 64, 64))))
    worker.start()
    assert runner.entered.wait(WAIT_S)
    stopper = threading.Thread(target=runner.deactivate)
    stopper.start()
    stopper.join(0.3)
    assert stopper.is_alive() and runner.is_active  # held back while the batch runs
    runner.release.set()
    worker.join(WAIT_S)
    stopper.join(WAIT_S)
    assert out and out[0].shape == (2, 5, 64, 64) and not runner.is_active
    # A service's other thread whose `with` ended: said so, not "must be activated" to a caller who had activated it.
    with pytest.raises(FlareSegError, match=r"was deactivated \(a `with` block's end, another thread's too\)"):
        runner.infer(torch.zeros(2, 3, 64, 64))
    with pytest.raises(FlareSegError, match="must be activated before infer"):
        _CountingRunner(trained_checkpoint).infer(torch.zeros(2, 3, 64, 64))


def test_misuse_of_a_runner_is_a_one_line_project_error(trained_checkpoint, tmp_path):
    # A service catches FlareSegError; these leaked torch's, numpy's or the backend's own exceptions.
    for runner_type in (OnnxRuntimeRunner, OpenVINORunner):
        assert runner_type(tmp_path / "m.onnx").describe() == runner_type.__name__  # not loaded: its name
    with pytest.raises(FlareSegError, match="device must be cpu or cuda"):
        TorchRunner(trained_checkpoint, device="gpu")
    img = _phantom_image(False)
    with TorchRunner(trained_checkpoint) as runner:
        with pytest.raises(FlareSegError, match="the batch is empty"):
            runner.infer(torch.zeros(0, runner.input_channels, 64, 64))
        with pytest.raises(FlareSegError, match=r"positive integer, got 2\.5"):
            segment_array(runner, np.asanyarray(img.dataobj), img.affine, batch_size=2.5)  # type: ignore[arg-type]
        stats = runner.info.normalization
        with pytest.raises(FlareSegError, match="integers or floats"):
            infer_volume(np.zeros((2, 8, 8), np.complex64), volume_normalizer(np.zeros(4), stats), runner, 2)


def test_a_volume_with_nan_gets_no_normaliser():
    # NaN percentiles would clip every voxel to NaN, and the network would find no organ, silently.
    stats = NormalizationStats(mean=0.0, std=1.0)
    volume = np.zeros((2, 4, 4), np.float32)
    volume[0, 0, 0] = np.nan
    with pytest.raises(FlareSegError, match="not finite"):
        volume_normalizer(volume, stats)


def test_the_labels_come_back_in_the_inputs_memory_layout_and_shape(trained_checkpoint):
    img = _phantom_image(False)
    hu = np.asanyarray(img.dataobj).astype(np.float32)
    with TorchRunner(trained_checkpoint) as runner:
        fortran = segment_array(runner, np.asfortranarray(hu), img.affine, batch_size=4)
        c_order = segment_array(runner, np.ascontiguousarray(hu), img.affine, batch_size=4)
        singleton = segment_array(runner, hu[..., None], img.affine, batch_size=4)
    assert fortran.flags.f_contiguous and c_order.flags.c_contiguous and singleton.shape == (*hu.shape, 1)
    assert np.count_nonzero(fortran) > 100
    np.testing.assert_array_equal(fortran, c_order)
    np.testing.assert_array_equal(fortran, singleton[..., 0])


_INFO = ModelInfo(network=NetworkConfig(base_width=4, in_channels=1), normalization=NormalizationStats(0.0, 1.0),
                  slice_size=(64, 64))  # fmt: skip


@pytest.mark.skipif(peak_rss_mb() is None, reason="needs Linux's /proc/self/status (VmHWM)")
def test_a_segmentation_leaves_the_process_peak_rss_counter_alone(tmp_path):
    # segment_file reset the kernel's counter on each call, lowering the peak a service watches of itself.
    ct = save(_phantom_image(False), tmp_path / "c_0000.nii.gz")
    bump = np.ones(200 * 2**20, np.uint8)  # 200 MiB, touched
    del bump
    before = peak_rss_mb()
    with FunctionRunner(lambda x: torch.zeros((x.shape[0], 5, *x.shape[2:])), _INFO) as runner:
        timing = segment_file(runner, ct, tmp_path / "c.nii.gz")
        segment_array(runner, np.asanyarray(nib.load(ct).dataobj), nib.load(ct).affine)
    assert peak_rss_mb() >= before and timing.peak_rss_mb >= before


def test_labels_a_callable_returns_must_be_integers_and_are_said_as_refused():
    volume, affine = np.full((48, 40, 3), -200, np.int16), np.diag([8.0, 9.0, 10.0, 1.0])
    for value, dtype, words in [
        (1.5, torch.float32, r"returned labels of type torch\.float32, expected an integer type"),  # was class 1
        (-1, torch.int64, r"returned labels \[255\], outside 0\.\.4 \(255: or a value outside 0\.\.255"),
    ]:
        fn = lambda x, value=value, dtype=dtype: torch.full((x.shape[0], *x.shape[2:]), value, dtype=dtype)  # noqa: E731
        with FunctionRunner(fn, _INFO, output_kind="labels") as runner:
            with pytest.raises(FlareSegError, match=words):
                segment_array(runner, volume, affine)
