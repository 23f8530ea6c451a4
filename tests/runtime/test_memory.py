"""Choosing the CUDA batch for a whole-device GPU memory budget: the decision over measured numbers."""

from __future__ import annotations

import json
import math
import sys
import time
import types

import numpy as np
import pytest
import torch

from flareseg.checkpoint import ModelInfo
from flareseg.errors import FlareSegError
from flareseg.network import NetworkConfig
from flareseg.preprocess import NormalizationStats
from flareseg.runtime import FunctionRunner
from flareseg.runtime.memory import (
    DEFAULT_CANDIDATES,
    MB,
    measure_cuda_plan,
    nvml_index,
    nvml_used_mb,
    plan_batch,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

# Issue 10's NVML readings above idle on an H200 (fp16, channels-last), and made-up larger batches.
H200 = {1: 973.0, 2: 1155.0, 4: 1601.0, 8: 2453.0, 16: 4100.0, 32: 7400.0}


class _Measure:
    """Looks measurements up and records which batches were asked for."""

    def __init__(self, figures: dict[int, float]) -> None:
        self.figures, self.asked = figures, []

    def __call__(self, batch: int) -> float:
        self.asked.append(batch)
        return self.figures[batch]


@pytest.mark.parametrize(
    ("budget", "chosen", "asked"),
    [
        # The chosen batch is measured again after the larger one that did not fit.
        (1000.0, 1, [1, 2, 1]),
        (1155.0, 2, [1, 2, 4, 2]),  # a figure equal to the budget fits
        (2000.0, 4, [1, 2, 4, 8, 4]),
        (1e6, 32, list(DEFAULT_CANDIDATES)),
    ],
)
def test_the_largest_fitting_batch_is_chosen_and_the_search_stops_at_the_first_misfit(budget, chosen, asked):
    measure = _Measure(H200)
    plan = plan_batch(budget, context_mb=621.0, weights_mb=40.0, measure=measure)
    assert plan.batch == chosen and plan.predicted_mb == H200[chosen]
    assert measure.asked == asked  # no warm-up batch beyond the first that does not fit, and one check
    assert [m.batch for m in plan.measured] == asked
    line = plan.line()
    assert f"batch {chosen} fits the {budget:.0f} MB" in line and "CUDA context 621 MB" in line and "above idle" in line


class _Growing(_Measure):
    """Each batch measured after a larger one reads what that one left loaded (CUDA's lazy kernel modules)."""

    def __call__(self, batch: int) -> float:
        extra = 60.0 * len({b for b in self.asked if b > batch})
        return super().__call__(batch) + extra


def test_the_chosen_batch_is_measured_again_and_steps_down_if_it_no_longer_fits():
    measure = _Growing({1: 700.0, 2: 960.0, 4: 1300.0})
    plan = plan_batch(1000.0, 621.0, 40.0, measure, candidates=(1, 2, 4))
    # 2 fitted at 960 MB, but with batch 4's kernels resident it reads 1020 MB: batch 1 (760 MB) it is.
    assert measure.asked == [1, 2, 4, 2, 1] and plan.batch == 1 and plan.predicted_mb == 820.0
    assert [(m.batch, m.device_mb) for m in plan.measured][-2:] == [(2, 1020.0), (1, 820.0)]


def test_a_budget_of_exactly_the_context_and_weights_is_measured_not_refused():
    plan = plan_batch(1000.0, 600.0, 400.0, lambda batch: 1000.0, candidates=(1,))
    assert plan.batch == 1 and plan.predicted_mb == 1000.0  # a batch at exactly the budget fits


def test_a_budget_below_the_context_names_the_context_cost():
    measure = _Measure(H200)
    with pytest.raises(FlareSegError, match=r"CUDA context 621 MB \+ model 40 MB = 661 MB"):
        plan_batch(600.0, context_mb=621.0, weights_mb=40.0, measure=measure)
    assert measure.asked == []  # nothing is run when the context alone does not fit


def test_a_budget_too_small_for_batch_one_names_its_figure():
    with pytest.raises(FlareSegError, match="too small for even batch 1, which needs 973 MB"):
        plan_batch(900.0, context_mb=621.0, weights_mb=40.0, measure=_Measure(H200))


def test_batch_one_refused_after_a_larger_batch_is_named_by_the_figure_that_refused_it():
    measure = _Growing({1: 960.0, 2: 1300.0})  # 1 fits at first; with batch 2's kernels resident, 1020 MB
    with pytest.raises(FlareSegError) as err:
        plan_batch(1000.0, 621.0, 40.0, measure, candidates=(1, 2))
    assert measure.asked == [1, 2, 1]
    assert str(err.value) == (
        "GPU memory budget 1000 MB is too small for even batch 1, which needs 1020 MB once batch 2's kernels were "
        "loaded, 960 MB before (CUDA context 621 MB, model 40 MB); raise --gpu-memory"
    )
    measure = _Growing({1: 900.0, 2: 960.0, 4: 1300.0})  # the kernels named are the largest batch's
    with pytest.raises(FlareSegError, match=r"which needs 1020 MB once batch 4's kernels were loaded, 900 MB before"):
        plan_batch(1000.0, 621.0, 40.0, measure, candidates=(1, 2, 4))


@pytest.mark.parametrize("budget", [0.0, -5.0, math.nan])
def test_a_budget_must_be_positive(budget):
    with pytest.raises(FlareSegError, match="positive number of MB"):
        plan_batch(budget, context_mb=1.0, weights_mb=1.0, measure=_Measure(H200))


def test_candidates_respect_the_runner_s_batch_range():
    measure = _Measure(H200)
    plan = plan_batch(1e6, 621.0, 40.0, measure, min_batch=2, max_batch=8)
    assert plan.batch == 8 and measure.asked == [2, 4, 8]
    with pytest.raises(FlareSegError, match="no candidate batch size"):
        plan_batch(1e6, 621.0, 40.0, _Measure(H200), candidates=(1, 2), min_batch=4)
    # Unsorted, repeated candidates are tried once each, smallest first.
    measure = _Measure(H200)
    assert plan_batch(1200.0, 621.0, 40.0, measure, candidates=(4, 1, 2, 2)).batch == 2
    assert measure.asked == [1, 2, 4, 2]


def test_without_an_idle_reading_the_plan_says_its_figures_are_whole_device():
    plan = plan_batch(1000.0, 621.0, 40.0, _Measure(H200), idle_known=False)
    assert "whole device" in plan.line() and not plan.idle_known


def test_the_plan_serialises_what_was_measured_and_chosen():
    plan = plan_batch(1000.0, 621.0, 40.0, _Measure(H200))
    data = json.loads(json.dumps(plan.to_dict()))  # timings.json holds it
    assert data["batch"] == plan.batch and data["predicted_mb"] == plan.predicted_mb
    assert [m["batch"] for m in data["measured"]] == [m.batch for m in plan.measured]
    assert [m["device_mb"] for m in data["measured"]] == [m.device_mb for m in plan.measured]


def test_a_batch_the_device_has_no_room_for_does_not_fit_whatever_the_budget():
    full = {**H200, 4: math.inf}  # the measurement ran out of device memory (a shared or small GPU)
    plan = plan_batch(1e6, 621.0, 40.0, _Measure(full))
    assert plan.batch == 2 and "4: out of device memory" in plan.line()
    data = json.loads(json.dumps(plan.to_dict(), allow_nan=False))  # valid JSON: no Infinity
    assert [m["device_mb"] for m in data["measured"]] == [973.0, 1155.0, None, 1155.0]
    with pytest.raises(FlareSegError, match="batch 1 does not fit in the GPU's free memory"):
        plan_batch(1e6, 621.0, 40.0, _Measure({1: math.inf}))


def test_nvml_reads_the_gpu_that_cuda_visible_devices_makes_cuda_0(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [nvml_index(i) for i in (None, 0, 2)] == [0, 0, 2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert [nvml_index(i) for i in (None, 0, 1)] == [3, 3, 1]
    with pytest.raises(FlareSegError, match=r"cuda:2 \(CUDA_VISIBLE_DEVICES='3,1'\)"):
        nvml_index(2)
    # An empty variable hides every GPU: torch's mapping fails on it with an IndexError (a traceback once).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(FlareSegError, match=r"cuda:0 \(CUDA_VISIBLE_DEVICES=''\): it shows no GPU$"):
        nvml_index(0)


class _FakeNvml(types.ModuleType):
    """A stand-in for nvidia-ml-py that records which GPU was asked for (it drives our code, measures nothing)."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: int) -> None:
        super().__init__("pynvml")
        self.gpus, self.asked, self.open = gpus, [], 0

    def nvmlInit(self) -> None:
        self.open += 1

    def nvmlShutdown(self) -> None:
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self.asked.append(index)
        if index >= self.gpus:
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(used=(handle + 1) * MB, total=80 * MB, free=(79 - handle) * MB)


def test_memory_readings_come_from_the_gpu_cuda_runs_on(monkeypatch):
    from flareseg.bench.measure import NvmlSampler

    fake = _FakeNvml(gpus=4)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert nvml_used_mb(torch.device("cuda", 0)) == 3.0 and fake.asked == [2]
    with NvmlSampler(0, interval=0.01) as sampler:
        pass
    assert fake.asked[-1] == 2 and sampler.idle == 3 * MB and fake.open == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # a GPU NVML does not have: one line, NVML closed again
    with pytest.raises(FlareSegError, match="NVML cannot read GPU 7's memory: Invalid Argument"):
        NvmlSampler(0)
    assert fake.open == 0


def test_a_reading_nvml_fails_to_give_is_skipped_and_counted_not_fatal(monkeypatch):
    from flareseg.bench.measure import NvmlSampler

    class Flaky(_FakeNvml):
        calls = 0

        def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
            Flaky.calls += 1
            if Flaky.calls % 2 == 0:  # every other reading: a transient NVML error
                raise self.NVMLError("GPU is lost")
            return super().nvmlDeviceGetMemoryInfo(handle)

    fake = Flaky(gpus=1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with NvmlSampler(0, interval=0.005) as sampler:
        time.sleep(0.1)
    summary = sampler.summary()
    assert summary["nvml_failed_samples"] >= 1 and summary["nvml_samples"] >= 1
    assert summary["nvml_failed_samples"] + summary["nvml_samples"] + 1 == Flaky.calls  # + 1: the idle reading
    assert len(sampler.times) == len(sampler.samples) and fake.open == 0


def test_measuring_needs_a_cuda_runner_and_nvml_is_optional(monkeypatch):
    info = ModelInfo(NetworkConfig(base_width=4), NormalizationStats(mean=0.0, std=1.0), slice_size=(64, 64))
    with FunctionRunner(lambda x: x, info) as runner, pytest.raises(FlareSegError, match="needs a CUDA runner"):
        measure_cuda_plan(runner, 1000.0, (64, 64), np.dtype(np.int16))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py absent: no NVML reading, no error
    assert nvml_used_mb(torch.device("cuda", 0)) is None


@needs_cuda
def test_measured_plan_on_the_gpu():
    info = ModelInfo(NetworkConfig(base_width=4), NormalizationStats(mean=0.0, std=1.0), slice_size=(64, 64))
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).cuda()
    with FunctionRunner(conv, info, device="cuda") as runner, torch.inference_mode():
        plan = measure_cuda_plan(runner, 100_000.0, (96, 96), np.dtype(np.int16), candidates=(1, 2, 4))
    assert plan.batch == 4 and plan.context_mb > 0
    figures = [m.device_mb for m in plan.measured]
    assert figures == sorted(figures)


def test_allocation_failures_of_cudnn_and_cublas_count_as_no_room():
    from flareseg.errors import no_room

    assert no_room(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert no_room(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert no_room(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not no_room(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not no_room(ValueError("CUDA out of memory"))  # not an error torch raises for it


def test_stepping_down_takes_the_next_smaller_batch_not_the_smallest():
    # Batch 4 fitted (950 MB) until batch 8's kernels were resident (1010 MB): the next smaller batch, 2, still
    # fits with them, and it is the one taken; batch 1 would halve the throughput for nothing.
    measure = _Growing({1: 500.0, 2: 600.0, 4: 950.0, 8: 1300.0})
    plan = plan_batch(1000.0, 621.0, 40.0, measure, candidates=(1, 2, 4, 8))
    assert measure.asked == [1, 2, 4, 8, 4, 2] and plan.batch == 2
