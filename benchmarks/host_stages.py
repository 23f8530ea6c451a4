"""Host stages of one case on the CPU (issue 10): read + percentiles + post-processing + write,
against a bare ``gzip.decompress`` of the same input file, in one process.

The volume is the issue's: a 512 x 512 x 300 int16 phantom stored LPS (100 phantom slices
of 0.8 x 0.8 x 2.5 mm repeated 3 times along S), written by nibabel as ``.nii.gz``, with
the phantom's own labels (about 6 % foreground) as the label map to post-process and write.

Stages timed, in rounds that alternate the order of the "today" and "new" code:

- ``gzip.decompress``: the standard library inflating the file's bytes (the yardstick);
- ``read``: ``flareseg.volume.read_ct``;
- ``percentiles``: ``flareseg.preprocess.volume_normalizer`` on the volume read;
- ``postprocess``: ``flareseg.postprocess.keep_largest_components``;
- ``write``: ``flareseg.volume.write_labels`` to ``.nii.gz``.

"today" is the code of commit ``BASELINE`` (below), loaded from git as separate modules
(``git show BASELINE:flareseg/volume.py`` and ``.../postprocess.py``); its percentiles are
``np.percentile``, which ``volume_normalizer`` called then. Wall and CPU (process) seconds
are medians over the rounds. A last pass, not timed, records the peak memory that
``tracemalloc`` sees (numpy buffers and bytes objects) during the read and the write.

Run: python benchmarks/host_stages.py [--rounds 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from flareseg.bench.measure import cpu_description
from flareseg.phantom import make_phantom
from flareseg.postprocess import keep_largest_components
from flareseg.preprocess import NormalizationStats, volume_normalizer
from flareseg.volume import from_canonical, read_ct, to_canonical, write_labels

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "428d3cc553e914344855246ece1a9a97c5915b17"  # before issue 10's I/O and post-processing work
STATS = NormalizationStats(mean=40.0, std=300.0)


def _baseline_module(name: str, relpath: str, revision: str = BASELINE) -> types.ModuleType:
    """The file ``relpath`` as it was at ``revision`` (default BASELINE), loaded as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:{relpath}"], check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(name)
    module.__file__ = f"{revision[:7]}:{relpath}"
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _case(work: Path) -> tuple[Path, np.ndarray]:
    """The issue's volume as .nii.gz (built once per work folder) and its canonical labels."""
    ct, mask = work / "lps300_0000.nii.gz", work / "lps300_mask.nii.gz"
    if not (ct.exists() and mask.exists()):
        p = make_phantom((512, 512, 100), (0.8, 0.8, 2.5), axcodes="LPS", seed=0)
        image = np.concatenate([p.image] * 3, axis=2)  # LPS: the third axis is S
        labels = np.concatenate([p.labels] * 3, axis=2)
        for data, path in ((image, ct), (labels, mask)):
            img = nib.Nifti1Image(data, p.affine)
            img.header.set_xyzt_units("mm", "sec")
            img.set_qform(p.affine, code=1)
            img.set_sform(p.affine, code=1)
            nib.save(img, path)  # nibabel's own gzip, as a scanner export or a converter would write it
    labels_file = np.asanyarray(nib.load(mask).dataobj)
    geometry = read_ct(ct).geometry
    # Inference produces a C-contiguous canonical map: post-process and write that.
    return ct, np.ascontiguousarray(to_canonical(labels_file, geometry))


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def _peak_mb(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _compression_levels(labels_file_order: np.ndarray, rounds: int) -> list[str]:
    """Size and CPU time of deflating the label map's voxels (Fortran order, one plane per call) at each level."""
    import zlib

    from isal import isal_zlib

    planes = [np.ascontiguousarray(labels_file_order[:, :, k].T) for k in range(labels_file_order.shape[2])]
    rows = []
    for name, module, level in [("zlib", zlib, 1), ("zlib", zlib, 6)] + [("ISA-L", isal_zlib, n) for n in range(4)]:
        times, size = [], 0
        for _ in range(rounds):
            c = time.process_time()
            deflate = module.compressobj(level, module.DEFLATED, 31)
            size = sum(len(deflate.compress(p)) for p in planes) + len(deflate.flush())
            times.append(time.process_time() - c)
        note = " (nibabel's default)" if (name, level) == ("zlib", 1) else ""
        rows.append(f"| {name} {level}{note} | {statistics.median(times):.3f} | {size / 2**10:,.0f} |")
    return ["| deflate level | CPU s | KiB |", "|---|---|---|", *rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flareseg-host-stages")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    old_volume = _baseline_module("flareseg_baseline_volume", "flareseg/volume.py")
    old_post = _baseline_module("flareseg_baseline_postprocess", "flareseg/postprocess.py")
    ct, labels = _case(args.work)
    raw = ct.read_bytes()
    out_new, out_old = args.work / "new_pred.nii.gz", args.work / "old_pred.nii.gz"

    def new_round() -> dict[str, tuple[float, float]]:
        r: dict[str, tuple[float, float]] = {}
        w, c, vol = _timed(lambda: read_ct(ct))
        r["read"] = (w, c)
        w, c, _ = _timed(lambda: volume_normalizer(vol.array, STATS, vol.slope, vol.inter))
        r["percentiles"] = (w, c)
        w, c, post = _timed(lambda: keep_largest_components(labels))
        r["postprocess"] = (w, c)
        w, c, _ = _timed(lambda: write_labels(post, vol.geometry, out_new))
        r["write"] = (w, c)
        return r

    def old_round() -> dict[str, tuple[float, float]]:
        r: dict[str, tuple[float, float]] = {}
        w, c, vol = _timed(lambda: old_volume.read_ct(ct))
        r["read"] = (w, c)
        w, c, _ = _timed(lambda: np.percentile(vol.array, STATS.percentiles))
        r["percentiles"] = (w, c)
        w, c, post = _timed(lambda: old_post.keep_largest_components(labels))
        r["postprocess"] = (w, c)
        w, c, _ = _timed(lambda: old_volume.write_labels(post, vol.geometry, out_old))
        r["write"] = (w, c)
        return r

    def bare() -> dict[str, tuple[float, float]]:
        w, c, _ = _timed(lambda: gzip.decompress(raw))
        return {"gzip.decompress": (w, c)}

    runs: dict[str, dict[str, list[tuple[float, float]]]] = {"today": {}, "new": {}, "bare": {}}
    for i in range(args.rounds):
        order = [("bare", bare), ("today", old_round), ("new", new_round)]
        if i % 2:
            order = order[::-1]
        for name, fn in order:
            for stage, t in fn().items():
                runs[name].setdefault(stage, []).append(t)

    # Same results: voxels read, post-processed labels, written label maps.
    new_vol, old_vol = read_ct(ct), old_volume.read_ct(ct)
    same_read = np.array_equal(new_vol.array, old_vol.array)
    same_post = np.array_equal(keep_largest_components(labels), old_post.keep_largest_components(labels))
    same_written = np.array_equal(np.asanyarray(nib.load(out_new).dataobj), np.asanyarray(nib.load(out_old).dataobj))
    new_geometry, old_geometry = new_vol.geometry, old_vol.geometry
    del new_vol, old_vol
    peaks = {
        "read": (_peak_mb(lambda: old_volume.read_ct(ct)), _peak_mb(lambda: read_ct(ct))),
        "write": (
            _peak_mb(lambda: old_volume.write_labels(labels, old_geometry, out_old)),
            _peak_mb(lambda: write_labels(labels, new_geometry, out_new)),
        ),
    }

    def med(name: str, stage: str, k: int) -> float:
        return statistics.median(t[k] for t in runs[name][stage])

    bare_w, bare_c = med("bare", "gzip.decompress", 0), med("bare", "gzip.decompress", 1)
    print(f"machine: {platform.machine()} {_cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}")
    print(
        f"input: {ct.name}, {np.prod(labels.shape):,} voxels int16 stored LPS, {len(raw) / 2**20:.1f} MiB gzip; "
        f"labels {np.count_nonzero(labels) / labels.size:.1%} foreground; {args.rounds} rounds, medians"
    )
    print()
    print("| stage | today wall s | new wall s | today/new | today CPU s | new CPU s | today/new (CPU) |")
    print("|---|---|---|---|---|---|---|")
    totals = {"today": [0.0, 0.0], "new": [0.0, 0.0]}
    for stage in ("read", "percentiles", "postprocess", "write"):
        ow, nw, oc, nc = (med(n, stage, k) for k, n in ((0, "today"), (0, "new"), (1, "today"), (1, "new")))
        totals["today"][0] += ow
        totals["new"][0] += nw
        totals["today"][1] += oc
        totals["new"][1] += nc
        print(f"| {stage} | {ow:.3f} | {nw:.3f} | {ow / nw:.1f}x | {oc:.3f} | {nc:.3f} | {oc / nc:.1f}x |")
    (ow, oc), (nw, nc) = totals["today"], totals["new"]
    print(f"| **sum of the four** | {ow:.3f} | {nw:.3f} | {ow / nw:.1f}x | {oc:.3f} | {nc:.3f} | {oc / nc:.1f}x |")
    print(f"| bare `gzip.decompress` | {bare_w:.3f} | | | {bare_c:.3f} | | |")
    print()
    print(
        f"sum / bare gzip.decompress: today {ow / bare_w:.2f}x wall ({oc / bare_c:.2f}x CPU), "
        f"new {nw / bare_w:.2f}x wall ({nc / bare_c:.2f}x CPU); target <= 2x"
    )
    print(
        f"peak traced memory (MiB), today -> new: read {peaks['read'][0]:.0f} -> {peaks['read'][1]:.0f}, "
        f"write {peaks['write'][0]:.0f} -> {peaks['write'][1]:.0f}"
    )
    print(
        f"written sizes: today {out_old.stat().st_size / 2**10:.0f} KiB, new {out_new.stat().st_size / 2**10:.0f} KiB"
    )
    print(f"identical: read {same_read}, post-processed {same_post}, written voxels {same_written}")
    print()
    print("\n".join(_compression_levels(from_canonical(labels, new_geometry), args.rounds)))
    return 0 if same_read and same_post and same_written else 1


def _cpu_name() -> str:
    return str(cpu_description()["cpu_model"])


if __name__ == "__main__":
    sys.exit(main())
