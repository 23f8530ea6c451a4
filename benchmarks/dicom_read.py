"""Reading the shared DICOM sample (20 slices, 512 x 512, JPEG 2000 lossless) against reading the same CT as NIfTI.

The sample is converted once with dicom2nifti (an independent tool) into a temporary folder;
read_ct then reads that file (float64, as dicom2nifti writes it) and an int16 copy (how
FLARE21 CTs are stored). read_series reads the DICOM files serially (pydicom's default
JPEG 2000 codec, pylibjpeg-openjpeg) and with decoding threads (Pillow's codec, which
releases the GIL). A decode-only section times each codec alone, serial and threaded, to
show which one overlaps in threads. Runs alternate between candidates; medians are reported.

Run: python benchmarks/dicom_read.py [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.pixels import pixel_array

from flareseg.dicom import read_series
from flareseg.volume import read_ct

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-sample"


def _decode_all(files: list[Path], plugin: str, threads: int) -> None:
    def one(path: Path) -> np.ndarray:
        return pixel_array(path, decoding_plugin=plugin)

    if threads == 1:
        for f in files:
            one(f)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=min(8, len(os.sched_getaffinity(0))))
    args = parser.parse_args()
    if not any(SAMPLE.glob("*.dcm")):
        raise SystemExit(f"DICOM sample not found at {SAMPLE}")
    import dicom2nifti

    files = sorted(SAMPLE.glob("*.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        converted = Path(tmp) / "sample_float64.nii.gz"
        t = time.perf_counter()
        dicom2nifti.dicom_series_to_nifti(str(SAMPLE), str(converted), reorient_nifti=False)
        convert_s = time.perf_counter() - t
        img = nib.load(converted)
        int16 = Path(tmp) / "sample_int16.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16), img.affine), int16)

        ref = read_ct(int16)
        for threads in (1, args.threads):
            vol = read_series(SAMPLE, threads=threads)
            if not np.array_equal(vol.hu(), ref.hu()):
                raise SystemExit(f"read_series(threads={threads}) differs from the NIfTI conversion")

        t_label = f"{args.threads} threads"
        candidates: dict[str, Callable[[], object]] = {
            "NIfTI read_ct, int16 .nii.gz": lambda: read_ct(int16),
            "NIfTI read_ct, dicom2nifti float64 .nii.gz": lambda: read_ct(converted),
            "DICOM read_series, threads=1 (pylibjpeg codec)": lambda: read_series(SAMPLE, threads=1),
            f"DICOM read_series, threads={args.threads} (Pillow codec)": lambda: read_series(
                SAMPLE, threads=args.threads
            ),
            "decode only: pylibjpeg, serial": lambda: _decode_all(files, "pylibjpeg", 1),
            f"decode only: pylibjpeg, {t_label}": lambda: _decode_all(files, "pylibjpeg", args.threads),
            "decode only: pillow, serial": lambda: _decode_all(files, "pillow", 1),
            f"decode only: pillow, {t_label}": lambda: _decode_all(files, "pillow", args.threads),
            "headers only: dcmread(stop_before_pixels)": lambda: [
                pydicom.dcmread(f, stop_before_pixels=True) for f in files
            ],
        }
        names = list(candidates)
        for fn in candidates.values():
            fn()  # warm up: imports, page cache
        runs: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(args.repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order each round
                t = time.perf_counter()
                candidates[name]()
                runs[name].append(time.perf_counter() - t)

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {len(os.sched_getaffinity(0))} usable cores")
    print(
        f"python {platform.python_version()}, pydicom {pydicom.__version__}, nibabel {nib.__version__}, "
        f"dicom2nifti conversion (once) {convert_s:.2f} s"
    )
    print(f"sample: {len(files)} slices 512 x 512 JPEG 2000 lossless; {args.repeats} alternating runs each\n")
    base = statistics.median(runs[names[0]])
    print("| what | median (s) | min-max (s) | vs int16 NIfTI |")
    print("|---|---|---|---|")
    for name in names:
        r, med = runs[name], statistics.median(runs[name])
        print(f"| {name} | {med:.3f} | {min(r):.3f}-{max(r):.3f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
