"""Post-processing speed: flareseg (whole map, and streaming by slabs) against its two previous versions and scipy.

Two 512 x 512 x 400 uint8 label maps: five organ ellipsoids with 20,000 false-positive
specks (what an undertrained network leaves), and a worst case where every voxel is
labelled (blobs of all five labels, as a network with random weights produces). Methods
run alternately, round by round; the figures are medians of CPU (process) seconds, which
a busy machine disturbs less than wall time (wall medians are printed too).

Run: python benchmarks/postprocess_bench.py [--rounds 5]
     python benchmarks/postprocess_bench.py --memory [--slices 300]   # peak memory per method
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from flareseg.labels import COMPONENTS_KEPT
from flareseg.postprocess import keep_largest_components

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_stages import _baseline_module
from streaming_feed import stream_postprocess

_PREVIOUS = _baseline_module("previous_postprocess", "flareseg/postprocess.py")
#: The first rewrite (issue 10): one cc3d pass over the foreground's box, whole-array bookkeeping.
_BOX_ONLY = _baseline_module("box_only_postprocess", "flareseg/postprocess.py", "d5c0499")


def _previous(labels: np.ndarray) -> np.ndarray:
    """flareseg's implementation before issue 10 (one cc3d pass over the whole map), loaded from git."""
    return _PREVIOUS.keep_largest_components(labels)


#: CPU seconds of the streaming method's last finish() call: what is left once inference ends.
_FINISH_CPU: list[float] = []


def _streaming(labels: np.ndarray) -> np.ndarray:
    """StreamingPostprocessor fed 8 slices at a time, as flare-infer's default CUDA batch lands."""
    out, finish = stream_postprocess(labels, clock=time.process_time)
    _FINISH_CPU.append(finish)
    return out


def _box_only(labels: np.ndarray) -> np.ndarray:
    return _BOX_ONLY.keep_largest_components(labels)


def _scipy_reference(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    structure = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
    for label, k in COMPONENTS_KEPT.items():
        comp, n = ndimage.label(labels == label, structure=structure)
        if n <= k:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        keep = np.zeros(n + 1, dtype=bool)
        keep[1 + np.argsort(-sizes, kind="stable")[:k]] = True
        out[(comp > 0) & ~keep[comp]] = 0
    return out


def _organs_with_specks(shape: tuple[int, int, int] = (400, 512, 512), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    labels = np.zeros(shape, dtype=np.uint8)
    organs = [
        (1, (200, 250, 180), (90, 110, 100)),
        (3, (210, 300, 360), (50, 50, 40)),
        (2, (180, 330, 170), (40, 30, 25)),
        (2, (180, 330, 340), (40, 30, 25)),
        (4, (170, 260, 260), (20, 20, 70)),
    ]
    for label, (cz, cy, cx), (rz, ry, rx) in organs:
        labels[((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = label
    # false-positive specks, as an undertrained network leaves them
    specks = rng.integers(0, labels.size, 20000)
    labels.ravel()[specks] = rng.integers(1, 5, specks.size).astype(np.uint8)
    return labels


def _labelled_everywhere(shape=(400, 512, 512), seed=0) -> np.ndarray:
    """Smooth random class scores, argmax: blobs of every label filling the volume."""
    rng = np.random.default_rng(seed)
    small = (shape[0], shape[1] // 4, shape[2] // 4)
    scores = ndimage.gaussian_filter(rng.standard_normal((5, *small)).astype(np.float32), (0, 2, 2, 2))
    labels = scores.argmax(0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(labels, 4, axis=1), 4, axis=2))


def _time(fn: Callable[[np.ndarray], np.ndarray], labels: np.ndarray) -> tuple[float, float, np.ndarray]:
    w, c = time.perf_counter(), time.process_time()
    out = fn(labels)
    return time.perf_counter() - w, time.process_time() - c, out


def _in_place(labels: np.ndarray) -> np.ndarray:
    return keep_largest_components(labels, in_place=True)


def _streaming_in_place(labels: np.ndarray) -> np.ndarray:
    return stream_postprocess(labels, in_place=True)[0]


#: What --memory measures, each in a fresh process: flare-infer's two ways (in place), and the earlier versions.
MEMORY_METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "flareseg, in place": _in_place,
    "streaming, in place": _streaming_in_place,
    "flareseg, copy": keep_largest_components,
    "d5c0499 (box, whole arrays)": _box_only,
    "previous (one cc3d pass)": _previous,
}
MAPS: dict[str, Callable[..., np.ndarray]] = {
    "organs + specks": _organs_with_specks,
    "labelled everywhere": _labelled_everywhere,
}


def _peak_above_start_mb(map_name: str, method: str, slices: int) -> float:
    """Run one method on one map in this (fresh) process: its peak RSS above the RSS before it, MiB."""
    from flareseg.runtime.pipeline import peak_rss_mb, reset_peak_rss

    labels = MAPS[map_name]((slices, 512, 512))
    if not reset_peak_rss():
        raise SystemExit("--memory needs Linux (/proc/self/clear_refs)")
    with open("/proc/self/status") as f:
        start = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    MEMORY_METHODS[method](labels)
    peak = peak_rss_mb()
    assert peak is not None
    return peak - start


def _memory(slices: int) -> None:
    print(f"peak RSS above the RSS before the call, MiB; each method in a fresh process; {slices} x 512 x 512 maps")
    for map_name in MAPS:
        cells = []
        for method in MEMORY_METHODS:
            code = (
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import postprocess_bench as b; "
                f"print(b._peak_above_start_mb({map_name!r}, {method!r}, {slices}))"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            cells.append(f"{method} {float(out.split()[-1]):.0f}")
        print(f"{map_name}: " + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="peak memory of each method instead, fresh processes")
    parser.add_argument("--slices", type=int, default=300, help="with --memory: slices of the maps")
    args = parser.parse_args()
    if args.memory:
        _memory(args.slices)
        return
    methods: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "flareseg (box, pieces)": keep_largest_components,
        "streaming (slabs of 32)": _streaming,
        "d5c0499 (box, whole arrays)": _box_only,
        "previous (one cc3d pass)": _previous,
        "scipy.ndimage": _scipy_reference,
    }
    print(f"machine: {platform.machine()} {platform.processor() or ''} cores={os.cpu_count()}")
    for name, labels in (("organs + specks", _organs_with_specks()), ("labelled everywhere", _labelled_everywhere())):
        print(f"\n{name}: {labels.shape} uint8, {np.count_nonzero(labels) / labels.size:.1%} foreground")
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
        outputs: dict[str, np.ndarray] = {}
        for fn in methods.values():
            fn(labels[:50])  # warm up
        for i in range(args.rounds):
            order = list(methods.items()) if i % 2 == 0 else list(methods.items())[::-1]
            for m, fn in order:
                w, c, outputs[m] = _time(fn, labels)
                runs[m].append((w, c))
        base = statistics.median(c for _, c in runs["previous (one cc3d pass)"])
        for m, r in runs.items():
            cpu, wall = statistics.median(c for _, c in r), statistics.median(w for w, _ in r)
            print(f"{m:28s} CPU {cpu:6.3f} s  wall {wall:6.3f} s  previous/this {base / cpu:5.1f}x")
        finish = statistics.median(_FINISH_CPU[-args.rounds :])
        print(f"{'  of which finish()':28s} CPU {finish:6.3f} s  (left after inference; the rest overlaps it)")
        first = next(iter(outputs.values()))
        print(f"identical outputs: {all(np.array_equal(first, o) for o in outputs.values())}")


if __name__ == "__main__":
    main()
