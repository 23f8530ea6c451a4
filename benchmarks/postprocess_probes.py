"""The measurements behind three statements in postprocess.md, each a section of this script.

1. ``bincount``: numpy's ``np.bincount`` on the component ids of a 300-slice all-organ map,
   as one whole ``uint32`` array and as ``intp`` pieces of a million ids (the counts are
   checked equal).
2. ``gil``: cc3d on the two halves of that map, one after the other and in two threads: the
   same time means that cc3d holds the GIL.
3. ``phantom``: post-processing the issue's realistic phantom labels (512 x 512 x 300,
   6.3 % foreground) in rounds that each read the CT first, as ``flare-infer`` does: today
   in place and with a copy, and d5c0499's version (loaded from git). CPU seconds per round.

Run: python benchmarks/postprocess_probes.py [--rounds 6] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import cc3d
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_stages import _baseline_module, _case
from postprocess_bench import _labelled_everywhere

from flareseg.postprocess import keep_largest_components
from flareseg.volume import read_ct


def _wall(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bincount(labels: np.ndarray) -> None:
    components, n = cc3d.connected_components(labels, connectivity=26, return_N=True)
    ids = components[labels != 0]
    whole: list[np.ndarray] = []
    pieces: list[np.ndarray] = []

    def in_pieces() -> None:
        counts = np.zeros(n + 1, np.int64)
        for i in range(0, ids.size, 1 << 20):
            counts += np.bincount(ids[i : i + (1 << 20)].astype(np.intp), minlength=n + 1)
        pieces.append(counts)

    print(f"bincount of {ids.size:,} uint32 ids ({n} components), wall s:")
    for _ in range(3):
        a = _wall(lambda: whole.append(np.bincount(ids, minlength=n + 1)))
        b = _wall(in_pieces)
        print(f"  whole uint32 array {a:.3f}   intp pieces of 1 M {b:.3f}")
    print(f"  equal counts: {all(np.array_equal(w, p) for w, p in zip(whole, pieces, strict=True))}")


def gil(labels: np.ndarray) -> None:
    halves = [np.ascontiguousarray(labels[: len(labels) // 2]), np.ascontiguousarray(labels[len(labels) // 2 :])]
    for h in halves:
        cc3d.connected_components(h, connectivity=26)  # warm up the allocator

    def both_in_threads() -> None:
        threads = [
            threading.Thread(target=cc3d.connected_components, args=(h,), kwargs={"connectivity": 26}) for h in halves
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    print("cc3d on two halves, wall s:")
    for _ in range(3):
        serial = _wall(lambda: [cc3d.connected_components(h, connectivity=26) for h in halves])
        print(f"  one after the other {serial:.3f}   two threads {_wall(both_in_threads):.3f}")


def phantom(work: Path, rounds: int) -> None:
    old = _baseline_module("postprocess_d5c0499", "flareseg/postprocess.py", "d5c0499")
    ct, labels = _case(work)
    methods = {
        "today, in place": lambda lab: keep_largest_components(lab, in_place=True),
        "today, copy": keep_largest_components,
        "d5c0499": old.keep_largest_components,
    }
    print("phantom labels, each round after reading the CT, CPU s:")
    for _ in range(rounds):
        cells = []
        for name, fn in methods.items():
            volume, lab = read_ct(ct), labels.copy()
            t = time.process_time()
            fn(lab)
            cells.append(f"{name} {time.process_time() - t:.3f}")
            del volume, lab
        print("  " + "; ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flareseg-host-stages")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dense = _labelled_everywhere((300, 512, 512))
    bincount(dense)
    gil(dense)
    del dense
    phantom(args.work, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
