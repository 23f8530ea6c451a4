"""The inferer's paths: host preprocessing, the staged device-preprocessing pipeline, runners with a minimum batch."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from flareseg.checkpoint import ModelInfo
from flareseg.errors import FlareSegError
from flareseg.network import NetworkConfig
from flareseg.preprocess import NormalizationStats, volume_normalizer
from flareseg.runtime import FunctionRunner
from flareseg.runtime.inferer import InferenceTimes, infer_volume, staged_buffer_bytes, upload_dtype

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

STATS = NormalizationStats(mean=-120.0, std=420.0)


def _network(in_channels: int = 3, seed: int = 0) -> torch.nn.Module:
    """A small convolutional scorer (random weights, varied argmax): the pipeline, not the model, is under test."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 5, 3, padding=1)
    ).eval()


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return _network()


def _info(channels: int = 3) -> ModelInfo:
    return ModelInfo(
        network=NetworkConfig(base_width=4, in_channels=channels), normalization=STATS, slice_size=(64, 64)
    )


class _Recorder:
    """The network as a runner function, keeping a copy of every input batch it was given."""

    def __init__(self, net: torch.nn.Module, output_kind: str = "logits") -> None:
        self.net, self.output_kind, self.inputs = net, output_kind, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.inputs.append(batch.detach().clone())
        with torch.inference_mode():
            # Slice by slice: a convolution's rounding may depend on the batch size, a slice's scores must not.
            scores = torch.cat([self.net(x[None]) for x in batch])
        return scores.argmax(1) if self.output_kind == "labels" else scores


class _MinBatchRunner(FunctionRunner):
    """A runner that refuses batches below its minimum, as a TensorRT profile does."""

    min_batch = 4

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] < self.min_batch:
            raise FlareSegError(f"batch {batch.shape[0]} is below the profile's minimum {self.min_batch}")
        return super()._infer(batch)


def _volume(shape=(11, 48, 80), dtype=np.int16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth structure plus noise, so that several classes appear and the argmax is not trivial.
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    hu = 600 * np.sin(3 * x + 2 * y) * np.cos(2 * z) + rng.normal(0, 80, shape) - 100
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        hu = np.clip(hu + (1100 if info.min == 0 else 0), info.min, info.max)  # unsigned: shift above zero
    return hu.astype(dtype)


def _run(stored, runner_cls, recorder, batch_size, *, device_preprocess, slope=1.0, inter=0.0, channels=3):
    normalizer = volume_normalizer(stored, STATS, slope, inter)
    runner = runner_cls(recorder, _info(channels), output_kind=recorder.output_kind)
    done, times = [], InferenceTimes()
    with runner:
        labels = infer_volume(
            stored,
            normalizer,
            runner,
            batch_size,
            progress=done.append,
            times=times,
            device_preprocess=device_preprocess,
        )
    return labels, done, times


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_device_preprocessing_gives_the_host_path_s_inputs_and_labels_bit_for_bit(net, batch_size):
    stored = _volume()
    host_rec, dev_rec = _Recorder(net), _Recorder(net)
    host, host_done, host_times = _run(stored, FunctionRunner, host_rec, batch_size, device_preprocess=False)
    dev, dev_done, times = _run(stored, FunctionRunner, dev_rec, batch_size, device_preprocess=True)
    for t in (host_times, times):  # the first labels land after one batch, within the run (loop overhead aside)
        assert t.first_labels_s is not None and 0 < t.first_labels_s <= t.infer_s + t.normalize_s + 0.5
    assert dev.shape == stored.shape and dev.dtype == np.uint8
    assert len(np.unique(host)) >= 2  # the comparison is not between two constant maps
    np.testing.assert_array_equal(dev, host)
    assert [x.shape for x in dev_rec.inputs] == [x.shape for x in host_rec.inputs]
    assert all(torch.equal(a, b) for a, b in zip(dev_rec.inputs, host_rec.inputs, strict=True))
    assert sum(dev_done) == sum(host_done) == stored.shape[0]
    expected = [min(batch_size, stored.shape[0] - s) for s in range(0, stored.shape[0], batch_size)]
    assert times.batch_sizes == expected and times.batches == len(expected)


@pytest.mark.parametrize(
    ("dtype", "slope", "inter", "view"),
    [
        (np.int16, 1.0, 0.0, "flipped"),
        (np.int16, 0.5, -1024.0, "transposed"),
        (np.uint16, 1.0, -1024.0, "plain"),
        (np.int32, 1.0, 0.0, "plain"),
        (np.float64, 1.0, 0.0, "flipped"),
        (np.uint8, 2.0, -128.0, "plain"),
        (np.dtype(">i2"), 1.0, 0.0, "flipped"),  # a big-endian NIfTI
    ],
)
def test_device_preprocessing_handles_stored_dtypes_and_views(net, dtype, slope, inter, view):
    base = _volume((9, 64, 64), dtype=dtype, seed=1)
    stored = {"plain": base, "flipped": base[::-1, :, ::-1], "transposed": base.transpose(0, 2, 1)}[view]
    host, _, _ = _run(stored, FunctionRunner, _Recorder(net), 4, device_preprocess=False, slope=slope, inter=inter)
    dev, _, _ = _run(stored, FunctionRunner, _Recorder(net), 4, device_preprocess=True, slope=slope, inter=inter)
    np.testing.assert_array_equal(dev, host)


def test_device_preprocessing_with_a_one_channel_model_and_label_outputs(net):
    folded = _network(in_channels=1, seed=1)
    stored = _volume((7, 40, 56), seed=2)
    for output_kind in ("logits", "labels"):
        host, _, _ = _run(
            stored, FunctionRunner, _Recorder(folded, output_kind), 3, device_preprocess=False, channels=1
        )
        dev, _, _ = _run(stored, FunctionRunner, _Recorder(folded, output_kind), 3, device_preprocess=True, channels=1)
        np.testing.assert_array_equal(dev, host)


@pytest.mark.parametrize("device_preprocess", [False, True])
def test_short_last_batch_is_padded_to_the_runner_s_minimum(net, device_preprocess):
    stored = _volume((10, 64, 64), seed=3)
    plain, _, _ = _run(stored, FunctionRunner, _Recorder(net), 4, device_preprocess=False)
    rec = _Recorder(net)
    padded, done, times = _run(stored, _MinBatchRunner, rec, 4, device_preprocess=device_preprocess)
    np.testing.assert_array_equal(padded, plain)
    assert [x.shape[0] for x in rec.inputs] == [4, 4, 4]  # 10 slices: 4 + 4 + (2 padded to 4)
    assert torch.count_nonzero(rec.inputs[-1][2:]) == 0  # the padding is zero slices
    assert sum(done) == 10 and times.batch_sizes == [4, 4, 2]  # padded outputs are dropped
    # A volume shorter than the minimum is padded too.
    short, _, _ = _run(stored[:3], _MinBatchRunner, _Recorder(net), 4, device_preprocess=device_preprocess)
    np.testing.assert_array_equal(
        short, _run(stored[:3], FunctionRunner, _Recorder(net), 4, device_preprocess=False)[0]
    )


@pytest.mark.parametrize("device_preprocess", [False, True])
@pytest.mark.parametrize("slices", [9, 12, 13])  # odd and even batch counts: the last two slots swap
def test_on_labels_sees_final_slices_in_order(net, device_preprocess, slices):
    stored = _volume((slices, 32, 48), seed=4)
    expected, _, _ = _run(stored, FunctionRunner, _Recorder(net), 4, device_preprocess=False)
    seen: list[tuple[int, np.ndarray]] = []
    normalizer = volume_normalizer(stored, STATS)
    times = InferenceTimes()
    with FunctionRunner(_Recorder(net), _info(3)) as runner:

        def on_labels(labels: np.ndarray, stop: int) -> None:
            seen.append((stop, labels[:stop].copy()))  # what the caller may rely on at this point
            time.sleep(0.01)

        labels = infer_volume(
            stored, normalizer, runner, 4, times=times, device_preprocess=device_preprocess, on_labels=on_labels
        )
    np.testing.assert_array_equal(labels, expected)
    stops = [stop for stop, _ in seen]
    assert stops == sorted(set(stops)) and stops[-1] == slices and len(stops) == -(-slices // 4)
    for stop, prefix in seen:
        np.testing.assert_array_equal(prefix, expected[:stop])  # slices [0, stop) were final when reported
    assert times.on_labels_s >= 0.01 * len(stops) and times.infer_s >= 0


@pytest.mark.parametrize("device_preprocess", [False, True])
def test_callback_time_is_taken_off_infer_time_once_per_call_by_a_clock_that_only_callbacks_move(
    net, monkeypatch, device_preprocess
):
    import types

    import flareseg.runtime.inferer as inferer

    now = [0.0]  # seconds on the inferer's clock: each callback takes 10, everything else none
    monkeypatch.setattr(inferer, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    stored = _volume((8, 32, 48), seed=5)
    normalizer = volume_normalizer(stored, STATS)
    times = InferenceTimes()

    def on_labels(labels: np.ndarray, stop: int) -> None:
        now[0] += 10.0

    with FunctionRunner(_Recorder(net), _info(3)) as runner:
        for call in range(1, 4):
            infer_volume(
                stored, normalizer, runner, 4, times=times, on_labels=on_labels, device_preprocess=device_preprocess
            )
            # Two batches a call: 20 s of callbacks each time, and not one of them in infer_s, on any call.
            assert (times.on_labels_s, times.infer_s, times.normalize_s) == (20.0 * call, 0.0, 0.0), call


def test_a_batch_size_below_the_runner_s_minimum_is_refused(net):
    with pytest.raises(FlareSegError, match="batch size 2 is below the model's minimum batch 4"):
        _run(_volume((5, 64, 64)), _MinBatchRunner, _Recorder(net), 2, device_preprocess=False)


def test_upload_dtypes_and_staging_bytes():
    assert upload_dtype(np.dtype(np.int16)) == (np.dtype(np.int16), torch.int16)
    assert upload_dtype(np.dtype(np.uint16)) == (np.dtype(np.float32), torch.float32)  # torch lacks uint16 arithmetic
    assert upload_dtype(np.dtype(np.float64)) == (np.dtype(np.float32), torch.float32)
    assert upload_dtype(np.dtype(">i2")) == (np.dtype(np.int16), torch.int16)
    # int16 slices travel in half the bytes of the float32 slices of the default path.
    int16 = staged_buffer_bytes(8, (512, 512), np.dtype(np.int16), device_preprocess=True)
    assert int16 * 2 == staged_buffer_bytes(8, (512, 512), np.dtype(np.int16), device_preprocess=False)
    assert int16 == 2 * 8 * 512 * 512 * 2


@needs_cuda
@pytest.mark.parametrize("batch_size", [3, 8])
def test_cuda_device_preprocessing_matches_the_default_cuda_path(net, batch_size):
    """On the GPU both paths resize on the device: the network inputs must be identical bit for bit."""
    stored = _volume((21, 48, 80), seed=4)[:, ::-1]
    cuda_net = net.to("cuda")
    results = {}
    for device_preprocess in (False, True):
        rec = _Recorder(cuda_net)
        runner = FunctionRunner(rec, _info(), device="cuda")
        with runner:
            labels = infer_volume(
                stored, volume_normalizer(stored, STATS), runner, batch_size, device_preprocess=device_preprocess
            )
        results[device_preprocess] = (labels, [x.cpu() for x in rec.inputs])
    np.testing.assert_array_equal(results[True][0], results[False][0])
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1], strict=True))
    net.to("cpu")


def test_an_error_mid_volume_waits_for_the_copies_in_flight(net, monkeypatch):
    # On CUDA an upload may still write a slot's device buffer when a later batch fails; the staged pipeline must
    # wait for its copy stream before the buffers are freed. On the CPU its streams are no-ops: this test double
    # counts the waits.
    from flareseg.runtime import inferer

    waits: list[str] = []

    class CopyStream(inferer._Immediate):
        def synchronize(self) -> None:
            waits.append("copy")

    real_init = inferer._Streams.__init__

    def streams_init(self, device: torch.device) -> None:
        real_init(self, device)
        self.copy = CopyStream()

    monkeypatch.setattr(inferer._Streams, "__init__", streams_init)
    calls = []

    def failing(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        if len(calls) == 2:
            raise RuntimeError("the second batch fails")
        return _Recorder(net)(batch)

    stored = _volume()
    with pytest.raises(RuntimeError, match="the second batch fails"):
        _run(stored, FunctionRunner, _RunnerFunction(failing), 4, device_preprocess=True)
    assert calls == [4, 4] and waits == ["copy"]
    waits.clear()
    _run(stored, FunctionRunner, _Recorder(net), 4, device_preprocess=True)
    assert waits == []  # a volume that ends well waits on its events as it harvests, not on the stream
    # A wait that fails too (a sticky CUDA error) does not hide the first error, which is the one to report.
    monkeypatch.setattr(CopyStream, "synchronize", lambda self: (_ for _ in ()).throw(RuntimeError("sticky")))
    calls.clear()
    with pytest.raises(RuntimeError, match="the second batch fails"):
        _run(stored, FunctionRunner, _RunnerFunction(failing), 4, device_preprocess=True)


class _RunnerFunction:
    """A plain function with the output kind _run asks its recorder for."""

    output_kind = "logits"

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.fn(batch)


def test_label_outputs_are_resized_by_pixel_centres():
    # A model that outputs labels at 32 x 32 for 48 x 40 slices: each slice pixel takes the label under its centre.
    from flareseg.runtime.inferer import scores_to_labels

    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 5, (2, 32, 32)))
    got = scores_to_labels(labels, (48, 40), "labels")
    rows = np.floor((np.arange(48) + 0.5) * 32 / 48).astype(int)
    cols = np.floor((np.arange(40) + 0.5) * 32 / 40).astype(int)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), labels.numpy()[:, rows][:, :, cols])


def test_a_runner_s_output_that_is_not_what_it_promises_is_one_line_not_a_label_map():
    # A callable's output was never checked: labels 7..10 were written as a label map, 3 classes of 5 or another
    # slice size were resized into one without a word, and a tuple (a network left in training mode) or a numpy
    # array ended in an AttributeError deep in the inferer.
    ct = np.full((3, 40, 48), -200, np.int16)
    normalizer = volume_normalizer(ct, STATS)

    def run(fn, output_kind="logits"):
        with FunctionRunner(fn, _info(1), output_kind=output_kind) as runner:
            return infer_volume(ct, normalizer, runner, 2)

    scores = lambda x, c=5: torch.zeros((x.shape[0], c, *x.shape[2:]))  # noqa: E731
    assert run(scores).shape == (3, 40, 48)  # what it promises: through
    wide = " (255: or a value outside 0..255, which the check sees as 255)"
    cases = {
        "training mode": (lambda x: (scores(x), scores(x)), "logits", "FunctionRunner returned a tuple, expected a "
                          "torch.Tensor (a network in training mode returns one per output level: call .eval())"),
        "numpy": (lambda x: scores(x).numpy(), "logits", "FunctionRunner returned a ndarray, expected a torch.Tensor"),
        "classes": (lambda x: scores(x, 3), "logits", "FunctionRunner returned shape (2, 3, 64, 64) for a batch of 2; "
                    "expected scores (2, 5, 64, 64)"),
        "size": (lambda x: scores(x)[..., :10], "logits", "FunctionRunner returned shape (2, 5, 64, 10) for a batch "
                 "of 2; expected scores (2, 5, 64, 64)"),
        "batch": (lambda x: scores(x)[:1], "logits", "FunctionRunner returned shape (1, 5, 64, 64) for a batch of 2; "
                  "expected scores (2, 5, 64, 64)"),
        "labels as scores": (lambda x: scores(x), "labels", "FunctionRunner returned shape (2, 5, 64, 64) for a "
                             "batch of 2; expected labels (2, 64, 64)"),
        "label range": (lambda x: torch.full((x.shape[0], *x.shape[2:]), 7, dtype=torch.uint8), "labels",
                        "FunctionRunner returned labels [7], outside 0..4"),
        "float labels": (lambda x: torch.full((x.shape[0], *x.shape[2:]), 1.5), "labels",
                         "FunctionRunner returned labels of type torch.float32, expected an integer type"),
        # int32 259 wrapped to 3 in the cast to uint8, a class: beyond uint8 it is said as 255
        "int32 beyond uint8": (lambda x: torch.full((x.shape[0], *x.shape[2:]), 259, dtype=torch.int32), "labels",
                               "FunctionRunner returned labels [255], outside 0..4" + wide),
        "negative": (lambda x: torch.full((x.shape[0], *x.shape[2:]), -1, dtype=torch.int32), "labels",
                     "FunctionRunner returned labels [255], outside 0..4" + wide),
    }  # fmt: skip
    for what, (fn, kind, message) in cases.items():
        with pytest.raises(FlareSegError) as info:
            run(fn, kind)
        assert str(info.value) == message, what
    with pytest.raises(FlareSegError, match=r"^output_kind must be 'logits' or 'labels', got 'probs'$"):
        FunctionRunner(scores, _info(1), output_kind="probs")  # type: ignore[arg-type]
    with pytest.raises(FlareSegError, match=r"^FunctionRunner needs the model's ModelInfo, got NoneType$"):
        FunctionRunner(scores, None)  # type: ignore[arg-type]
    # A device string of no backend's is the same line everywhere (was torch's RuntimeError listing its 20 kinds).
    for device in ("gpu", "cuda:x", ""):
        with pytest.raises(FlareSegError, match=r"^device must be cpu or cuda\[:i\], got "):
            FunctionRunner(scores, _info(1), device=device)


@pytest.mark.parametrize("device_preprocess", [False, True])
def test_slices_with_nan_or_infinite_scores_are_counted(device_preprocess):
    # argmax turns NaN (a model overflowing in fp16) into a label without a word; such slices are now counted.
    ct = np.full((7, 40, 48), -200, np.int16)
    normalizer = volume_normalizer(ct, STATS)
    calls: list[int] = []

    def scores(x):
        out = torch.zeros((x.shape[0], 5, *x.shape[2:]))
        out[0, 2, 5, 5] = torch.nan  # the first slice of each batch
        if len(calls) == 1:
            out[-1, 0, 0, 0] = torch.inf  # and the last of the second
        calls.append(x.shape[0])
        return out

    times = InferenceTimes(nonfinite_slices=1)  # times may hold another volume's: added to
    with FunctionRunner(scores, _info(1)) as runner:
        infer_volume(ct, normalizer, runner, 3, times=times, device_preprocess=device_preprocess)
        assert calls == [3, 3, 1] and times.nonfinite_slices == 1 + 4
        fine = InferenceTimes()
        infer_volume(ct, normalizer, runner, 7, times=fine)
    assert fine.nonfinite_slices == 1  # one batch: its first slice alone
    labels = InferenceTimes()
    with FunctionRunner(lambda x: torch.zeros((x.shape[0], *x.shape[2:]), dtype=torch.uint8), _info(1),
                        output_kind="labels") as runner:  # fmt: skip
        infer_volume(ct, normalizer, runner, 3, times=labels)
    assert labels.nonfinite_slices == 0


_INFO = ModelInfo(network=NetworkConfig(base_width=4, in_channels=1), normalization=STATS, slice_size=(64, 64))
_CT = np.full((3, 40, 48), -200, np.int16)


@pytest.mark.parametrize("label", [5, -254], ids=["the-class-count", "wraps-into-class-2"])
def test_labels_outside_the_classes_are_refused_at_the_edges(label):
    # 5 is one past 0..4; int32 -254 becomes 2 in uint8, a class, where -1 (255) was the only negative tested.
    dtype = torch.uint8 if label >= 0 else torch.int32
    fn = lambda x: torch.full((x.shape[0], *x.shape[2:]), label, dtype=dtype)  # noqa: E731
    with FunctionRunner(fn, _INFO, output_kind="labels") as runner:
        with pytest.raises(FlareSegError, match=r"outside 0\.\.4"):
            infer_volume(_CT, volume_normalizer(_CT, STATS), runner, 2)


def test_non_finite_scores_are_counted_by_slice_not_by_value():
    def fn(x):
        out = torch.zeros((x.shape[0], 5, *x.shape[2:]))
        out[0, :, :3, :3] = torch.nan  # 45 values of one slice
        return out

    times = InferenceTimes()
    with FunctionRunner(fn, _INFO) as runner:
        infer_volume(_CT, volume_normalizer(_CT, STATS), runner, 3, times=times)
    assert times.nonfinite_slices == 1


def test_a_batch_one_above_the_runners_maximum_is_refused_for_a_short_volume_too():
    class AtMostFour(FunctionRunner):
        max_batch = 4

    fn = lambda x: torch.zeros((x.shape[0], 5, *x.shape[2:]))  # noqa: E731
    with AtMostFour(fn, _INFO) as runner:
        with pytest.raises(FlareSegError, match="batch size 5 exceeds the model's maximum batch 4"):
            infer_volume(_CT, volume_normalizer(_CT, STATS), runner, 5)  # 3 slices: one batch of 3
