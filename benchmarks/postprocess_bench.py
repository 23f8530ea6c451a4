"""Post-processing speed on a 512 x 512 x 400 label map: cc3d (what flareseg uses) against scipy.ndimage.

Run: python benchmarks/postprocess_bench.py
"""

from __future__ import annotations

import platform
import time

import numpy as np
from scipy import ndimage

from flareseg.labels import COMPONENTS_KEPT
from flareseg.postprocess import keep_largest_components


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


def _label_map(shape=(400, 512, 512), seed=0) -> np.ndarray:
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


def main() -> None:
    labels = _label_map()
    timings = {}
    for name, fn in (("cc3d (flareseg)", keep_largest_components), ("scipy.ndimage", _scipy_reference)):
        fn(labels[:50])  # warm up
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            out = fn(labels)
            runs.append(time.perf_counter() - t)
        timings[name] = (min(runs), out)
    same = np.array_equal(timings["cc3d (flareseg)"][1], timings["scipy.ndimage"][1])
    print(f"machine: {platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()}")
    print(f"label map {labels.shape} uint8, {np.count_nonzero(labels)} foreground voxels")
    for name, (t, _) in timings.items():
        print(f"{name:18s} best of 3: {t:.2f} s")
    print(f"identical outputs: {same}")


if __name__ == "__main__":
    main()
