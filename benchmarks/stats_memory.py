"""Peak memory of ``compute_stats`` (training's normalisation statistics) on one 512 x 512 x 100 volume.

tracemalloc sees what ``compute_stats`` allocates; the input volume is made before tracing
starts. Run it with ``PYTHONPATH`` pointing at another tree (a ``git worktree``) to measure
an earlier commit the same way.

Run: python benchmarks/stats_memory.py [int16|float32]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from flareseg.preprocess import compute_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dtype", nargs="?", default="int16", choices=("int16", "float32"), help="the volume's type")
    args = parser.parse_args()
    vol = np.random.default_rng(0).integers(-1024, 3071, (100, 512, 512)).astype(args.dtype)
    tracemalloc.start()
    t = time.perf_counter()
    stats = compute_stats([vol])
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(
        f"{args.dtype} {vol.shape}: peak {peak / 2**20:.1f} MiB ({peak / vol.size:.2f} B/voxel), {seconds:.2f} s; "
        f"mean {stats.mean!r} std {stats.std!r}"
    )


if __name__ == "__main__":
    main()
