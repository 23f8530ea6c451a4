"""OpenVINO runner in a fresh process: activation, warm-up at one batch, a full and a 1-slice batch; peak RSS.

Shows which batch sizes the runner compiled and what the process's peak RSS (ru_maxrss)
was: each compiled size holds its own weights and buffers.

Run: python benchmarks/openvino_rss.py MODEL.onnx BATCH
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from flareseg.runtime.runners import OpenVINORunner


def main() -> None:
    model, batch = sys.argv[1], int(sys.argv[2])
    runner = OpenVINORunner(model)
    t = time.perf_counter()
    runner.activate()
    activate_s = time.perf_counter() - t
    t = time.perf_counter()
    runner.warm_up(batch)
    warm_s = time.perf_counter() - t
    x = torch.zeros((batch, runner.input_channels, *runner.info.slice_size))
    runner.infer(x)
    runner.infer(x[:1])  # a volume's short last batch
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"batch {batch}: activate {activate_s:.2f} s, warm-up {warm_s:.2f} s, peak RSS {peak_mb:.0f} MB, "
        f"compiled for batches {sorted(runner._compiled)}"
    )


if __name__ == "__main__":
    main()
