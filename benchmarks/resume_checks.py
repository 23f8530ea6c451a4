"""What the checks of a resumed run cost: a done case's result against its input, and the sweep for leftovers.

Three measurements, each against the same work without the check, alternated round by round (medians):

1. ``plan_folder`` over N done NIfTI cases (the real sample CT under N names, each with its label map on its
   grid): with :func:`~flareseg.runtime.jobs.result_of_another_scan` (shape and affine from both headers)
   against without it.
2. The same over N done DICOM series (links to the real sample series, 20 slices, a results folder each, as
   they share a case name): the series' DICOM files counted against the result's slices.
3. One small atomic write into a folder of F other files against an empty folder: the sweep for a killed
   writer's leftovers lists the folder at every write.

    python benchmarks/resume_checks.py [--cases 100] [--rounds 5] [--files 20000]

Needs the sample data in ../shared/data (see its README).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flareseg.atomic import atomic_output
from flareseg.dicom import read_series
from flareseg.runtime import jobs
from flareseg.volume import read_ct, write_labels

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _nifti_cases(folder: Path, n: int) -> tuple[list[Path], Path]:
    ct = DATA / "flare21-sample" / "TrainingImg" / "train_000_0000.nii.gz"
    vol = read_ct(ct)
    (folder / "in").mkdir()
    (folder / "out").mkdir()
    first = write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, folder / "out" / "c000.nii.gz")
    inputs = []
    for i in range(n):
        (folder / "in" / f"c{i:03d}_0000.nii.gz").symlink_to(ct)
        inputs.append(folder / "in" / f"c{i:03d}_0000.nii.gz")
        if i:
            os.link(first, folder / "out" / f"c{i:03d}.nii.gz")
    return inputs, folder / "out"


def _dicom_cases(folder: Path, n: int) -> tuple[list[Path], Path]:
    """N links to the sample series, each with its result in a folder of its own (one series, one case name)."""
    series = DATA / "dicom-sample"
    vol = read_series(series)
    (folder / "in").mkdir()
    inputs = []
    first: Path | None = None
    for i in range(n):
        sub = folder / "in" / f"s{i:03d}"
        sub.symlink_to(series, target_is_directory=True)
        inputs.append(sub)
        (planned,) = jobs.plan_folder([sub], folder / "out" / f"{i:03d}")
        assert planned.output is not None
        planned.output.parent.mkdir(parents=True)
        if first is None:
            first = write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, planned.output)
        else:
            os.link(first, planned.output)
    return inputs, folder / "out"


def _plan_s(inputs: list[Path], out: Path, check: bool) -> float:
    real = jobs.result_of_another_scan
    if not check:
        jobs.result_of_another_scan = lambda *args: None  # type: ignore[assignment]
    try:
        t = time.perf_counter()
        if inputs[0].is_dir():  # series: a folder of results each (see _dicom_cases)
            statuses = [p.status for i, s in enumerate(inputs) for p in jobs.plan_folder([s], out / f"{i:03d}")]
        else:
            statuses = [p.status for p in jobs.plan_folder(inputs, out)]
        elapsed = time.perf_counter() - t
    finally:
        jobs.result_of_another_scan = real  # type: ignore[assignment]
    assert set(statuses) == {"skipped"}, statuses  # every case done, with or without the check
    return elapsed


def _write_s(folder: Path) -> float:
    t = time.perf_counter()
    with atomic_output(folder / "result.nii.gz", keep_suffix=".nii.gz") as tmp:
        tmp.write_bytes(b"x" * 4096)
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--files", type=int, default=20000)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"needs the sample data in {DATA}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind, make in (("NIfTI", _nifti_cases), ("DICOM series", _dicom_cases)):
            (root / kind).mkdir()
            inputs, out = make(root / kind, args.cases)
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.rounds):
                for check in (False, True):
                    times[check].append(_plan_s(inputs, out, check))
            without, with_ = statistics.median(times[False]), statistics.median(times[True])
            print(
                f"plan {args.cases} done {kind} cases: {1000 * without:.0f} ms without the check, "
                f"{1000 * with_:.0f} ms with it ({1000 * (with_ - without) / args.cases:.2f} ms a case more)"
            )
        empty, full = root / "empty", root / "full"
        empty.mkdir()
        full.mkdir()
        for i in range(args.files):
            (full / f"case_{i:05d}.nii.gz").write_bytes(b"")
        writes: dict[str, list[float]] = {"empty": [], "full": []}
        for _ in range(args.rounds * 20):
            writes["empty"].append(_write_s(empty))
            writes["full"].append(_write_s(full))
        e, f = statistics.median(writes["empty"]), statistics.median(writes["full"])
        print(
            f"one atomic write: {1000 * e:.2f} ms into an empty folder, {1000 * f:.2f} ms into one of {args.files} "
            f"files ({1000 * (f - e):.2f} ms more: the sweep's listing)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
