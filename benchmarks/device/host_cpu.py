"""The GPU machine's host CPU on issue 10's host stages, after whole_case.py (same input, same labels).

- Inflating the 512 x 512 x 300 case: a one-shot ISA-L decompress, flareseg's ``read_ct``,
  and rapidgzip (parallel inflate of an ordinary gzip stream) at 1 to all cores, when its
  wheel was carried, with the bytes checked equal.
- The percentiles' value histogram of the volume, and the read stage that counts it while
  the file inflates (``read_stage``) against reading, then counting.
- Post-processing the random-weight network's raw labels (the ``no-postprocess`` run of
  whole_case.py): the whole map at once, and streaming by slabs (what is left after
  inference, and in all), with the outputs checked equal.

    python benchmarks/device/host_cpu.py --work WORK --out device-out/host-cpu   # WORK: whole_case.py's --work
    H=/tmp/flareseg-host-stages   # host_stages.py's case, here, without raw labels:
    python benchmarks/device/host_cpu.py --work $H --ct $H/lps300_0000.nii.gz --out OUT --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from streaming_feed import stream_postprocess  # noqa: E402

from flareseg.atomic import write_text_atomic  # noqa: E402
from flareseg.percentiles import value_histogram  # noqa: E402
from flareseg.postprocess import keep_largest_components  # noqa: E402
from flareseg.runtime.reading import read_stage  # noqa: E402
from flareseg.volume import read_ct  # noqa: E402


def timed(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    """Median wall seconds of ``rounds`` calls, and the last result."""
    seconds, result = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds), result


def inflate(ct: Path, rounds: int) -> dict[str, Any]:
    from isal import isal_zlib

    raw = ct.read_bytes()
    rows: dict[str, Any] = {}
    rows["isal_zlib.decompress"], reference = timed(lambda: isal_zlib.decompress(raw, wbits=31), rounds)
    rows["flareseg read_ct"], _ = timed(lambda: read_ct(ct), rounds)
    try:
        import rapidgzip
    except ImportError as exc:
        rows["rapidgzip"] = f"not installed ({exc})"
        return rows
    rows["flareseg read_ct, threads=0 (rapidgzip, all cores)"], _ = timed(lambda: read_ct(ct, threads=0), rounds)
    cores = os.cpu_count() or 1
    for n in sorted({1, 2, 4, 8, cores}):
        if n > cores:
            continue

        def run(n: int = n) -> bytes:
            with rapidgzip.open(str(ct), parallelization=n) as f:
                return f.read()

        rows[f"rapidgzip x{n}"], out = timed(run, rounds)
        rows[f"rapidgzip x{n} equal"] = out == reference
    return rows


def postprocess(raw_labels: Path, rounds: int) -> dict[str, Any]:
    labels = np.ascontiguousarray(np.asarray(nib.load(raw_labels).dataobj).transpose(2, 1, 0))
    rows: dict[str, Any] = {"shape": list(labels.shape), "foreground": float(np.count_nonzero(labels) / labels.size)}
    rows["whole map"], whole = timed(lambda: keep_largest_components(labels), rounds)
    finish: list[float] = []

    def streaming() -> np.ndarray:
        out, seconds = stream_postprocess(labels)
        finish.append(seconds)
        return out

    rows["streaming, all"], out = timed(streaming, rounds)
    rows["streaming, finish only"] = statistics.median(finish)
    rows["equal"] = bool(np.array_equal(out, whole))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True, help="whole_case.py's work folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ct", type=Path, help="another .nii.gz to read (default: WORK/case_0000.nii.gz)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ct = args.ct or args.work / "case_0000.nii.gz"
    report: dict[str, Any] = {"cores": os.cpu_count()}

    def save(key: str, value: Any) -> None:  # after every section: a timeout loses only the one in flight
        report[key] = value
        write_text_atomic(json.dumps(report, indent=2) + "\n", args.out / "host_cpu.json")

    raw = args.work / "pred-no-postprocess.nii.gz"  # post-processing first: the figure the targets need
    save("postprocess_s", postprocess(raw, args.rounds) if raw.exists() else f"{raw} missing")
    volume = read_ct(ct)
    save("histogram_s", timed(lambda: value_histogram(volume.array), args.rounds)[0])
    save("read_then_count_s", timed(lambda: value_histogram(read_ct(ct).array), args.rounds)[0])
    save("read_stage_s", timed(lambda: read_stage(ct), args.rounds)[0])
    save("inflate_s", inflate(ct, args.rounds))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
