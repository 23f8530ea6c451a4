"""Issue 10, items 1 and 6 on the GPU, in one call: device preprocessing and the memory-budget batch.

    python benchmarks/device/preprocess_check.py OUT.json        # on the GPU machine (about 2 min)
    python benchmarks/device/preprocess_check.py OUT.json --cpu  # dry run of the script itself, small

1. Exact percentiles: tensor_percentiles of the whole int16 volume on the device vs exact_percentiles
   (host) and np.percentile: equal; seconds for each.
2. infer_volume on a 512 x 512 x 300 int16 phantom, full-width network (random weights), fp16
   channels-last through TorchRunner: default CUDA path vs device_preprocess=True, alternating, 3 runs
   each: labels identical, seconds, bytes uploaded per slice.
3. measure_cuda_plan at --gpu-memory 1000 (default path and device preprocessing): the chosen batch
   and its figures; NVML above idle after a whole-volume run at that batch.
Then the CPU-verified tests marked for CUDA: tests/test_inferer.py and tests/test_memory.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flareseg.checkpoint import ModelInfo, save_checkpoint
from flareseg.network import NetworkConfig, build_training_network
from flareseg.percentiles import exact_percentiles
from flareseg.phantom import make_phantom
from flareseg.preprocess import NormalizationStats, tensor_percentiles, volume_normalizer
from flareseg.runtime.inferer import InferenceTimes, infer_volume
from flareseg.runtime.memory import measure_cuda_plan, nvml_used_mb
from flareseg.runtime.runners.pytorch import TorchRunner


def main() -> int:
    out_path, dry = Path(sys.argv[1]), "--cpu" in sys.argv
    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    idle = nvml_used_mb(device) if cuda else None  # before this process creates its CUDA context
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)", "idle_mb": idle}
    size, slices, width = ((512, 512), 100, 64) if cuda else ((64, 64), 8, 4)
    ph = make_phantom((size[1], size[0], slices), (0.8, 0.8, 2.5))
    vol = np.ascontiguousarray(np.tile(ph.image, (1, 1, 3)).transpose(2, 1, 0))  # (Z, Y, X) int16
    report["volume"] = list(vol.shape)

    t0 = time.perf_counter()
    ref = tuple(float(v) for v in np.percentile(vol, (1.0, 99.0)))
    t1 = time.perf_counter()
    host = exact_percentiles(vol, (1.0, 99.0))
    t2 = time.perf_counter()
    on_dev = torch.from_numpy(vol).to(device)
    if cuda:
        torch.cuda.synchronize()
    t3 = time.perf_counter()
    dev = tensor_percentiles(on_dev, (1.0, 99.0))
    t4 = time.perf_counter()
    del on_dev
    report["percentiles"] = {
        "np.percentile": ref,
        "exact_percentiles": host,
        "tensor_percentiles": dev,
        "equal": ref == host == dev,
        "np_s": t1 - t0,
        "host_s": t2 - t1,
        "device_s": t4 - t3,
    }

    stats = NormalizationStats(mean=-200.0, std=450.0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt = save_checkpoint(
            Path(tmp) / "random.pt",
            build_training_network(NetworkConfig(base_width=width)),
            ModelInfo(NetworkConfig(base_width=width), stats, slice_size=size),
        )
        kw = {"precision": "fp16", "channels_last": True} if cuda else {}
        with TorchRunner(ckpt, device=device, **kw) as runner:
            for dp in (False, True):
                plan = (
                    measure_cuda_plan(runner, 1000.0, size, vol.dtype, idle_mb=idle, device_preprocess=dp)
                    if cuda
                    else None
                )
                report[f"plan_device_preprocess_{dp}"] = plan.line() if plan else None
            batch = 8
            normalizer = volume_normalizer(vol, stats)
            runs: dict[bool, list[float]] = {False: [], True: []}
            labels = {}
            for _ in range(3):
                for dp in (False, True):
                    if cuda:
                        torch.cuda.synchronize()
                    times = InferenceTimes()
                    t0 = time.perf_counter()
                    labels[dp] = infer_volume(vol, normalizer, runner, batch, times=times, device_preprocess=dp)
                    runs[dp].append(time.perf_counter() - t0)
            report["infer"] = {
                "batch": batch,
                "default_s": runs[False],
                "device_preprocess_s": runs[True],
                "labels_identical": bool(np.array_equal(labels[False], labels[True])),
                "labels_agree": float(np.mean(labels[False] == labels[True])),
                "upload_bytes_per_slice": {
                    "default": 4 * size[0] * size[1],
                    "device": vol.itemsize * size[0] * size[1],
                },
            }
            if cuda:
                report["nvml_above_idle_after_runs_mb"] = (nvml_used_mb(device) or 0.0) - (idle or 0.0)
    tests = ["tests/test_inferer.py", "tests/test_memory.py", "tests/test_preprocess.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", *tests, "-q", "-rs"], capture_output=True, text=True)
    report["tests"] = {"rc": proc.returncode, "tail": proc.stdout[-1500:]}
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
