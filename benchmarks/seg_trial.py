"""What `check_seg_writable`'s trial SEG costs a case before inference (DICOM SEG output only).

The trial builds a SEG from every slice's header with one voxel marked, so that highdicom's checks across the
slices (a shared orientation, one study and series) run before inference, where a refusal costs nothing. It is
timed against a trial of the first slice's header alone (what the check tried before), on a phantom series of
512 x 512 slices written by the tests' own series writer. Both run alternately; the figures are medians.

Run: python benchmarks/seg_trial.py [--slices 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' DICOM series writer

from dicom_series import write_series

from flareseg.dicom import read_series, seg
from flareseg.phantom import make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        write_series(folder, make_phantom((512, 512, args.slices), (0.8, 0.8, 2.5), ("L", "P", "S"), seed=1))
        volume = read_series(folder)
        spacing = volume.geometry.spacing[2]

        def first_slice() -> None:
            first = seg._referencable(volume.source.datasets[0], spacing)
            seg._segmentation(folder, [first], np.zeros((1, 512, 512), np.uint8), present=False, model=None)

        def every_slice() -> None:
            seg.check_seg_writable(volume)

        trials = {"first slice's header": first_slice, "every slice's header": every_slice}
        for trial in trials.values():  # imports and first calls out of the figures
            trial()
        times: dict[str, list[float]] = {name: [] for name in trials}
        for _ in range(args.rounds):
            for name, trial in trials.items():
                start = time.perf_counter()
                trial()
                times[name].append(time.perf_counter() - start)
    print(f"{volume.array.shape[0]} slices of 512 x 512, median of {args.rounds} rounds:")
    for name, seconds in times.items():
        print(f"  {name}: {statistics.median(seconds):.3f} s")


if __name__ == "__main__":
    main()
