"""A CT volume in, a uint8 label map out: read, normalise, infer, post-process, write.

The normalisation uses the statistics carried by the model (checkpoint, ONNX metadata
or engine sidecar), never statistics recomputed from the input. Folders are processed
case by case: finished cases are skipped, a failing case is reported and the others go
on, and every output is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flareseg.atomic import write_text_atomic
from flareseg.errors import FlareSegError
from flareseg.postprocess import keep_largest_components
from flareseg.preprocess import volume_normalizer
from flareseg.runtime.inferer import InferenceTimes, infer_volume
from flareseg.runtime.runners import Runner
from flareseg.volume import NIFTI_SUFFIXES, case_id, find_cases, read_ct, write_labels

log = logging.getLogger(__name__)


@dataclass
class CaseTiming:
    case: str
    input: str
    output: str
    status: str = "ok"  # ok | skipped | failed
    error: str | None = None
    slices: int = 0
    shape: tuple[int, int, int] | None = None
    read_s: float = 0.0
    preprocess_s: float = 0.0
    infer_s: float = 0.0
    postprocess_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    peak_rss_mb: float | None = None
    peak_gpu_allocated_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        if self.status != "ok":
            return f"{self.case}: {self.status}" + (f" ({self.error})" if self.error else "")
        gpu = f", peak GPU {self.peak_gpu_allocated_mb:.0f} MB" if self.peak_gpu_allocated_mb is not None else ""
        rss = f", peak RSS {self.peak_rss_mb:.0f} MB" if self.peak_rss_mb is not None else ""
        return (
            f"{self.case}: {self.slices} slices, read {self.read_s:.2f}s, preprocess {self.preprocess_s:.2f}s, "
            f"infer {self.infer_s:.2f}s ({1000 * self.infer_s / max(self.slices, 1):.1f} ms/slice), "
            f"postprocess {self.postprocess_s:.2f}s, write {self.write_s:.2f}s, total {self.total_s:.2f}s{rss}{gpu}"
        )


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter for this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (since start, or since :func:`reset_peak_rss`)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


def segment_file(
    runner: Runner,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    postprocess: bool = True,
    progress: Callable[[int], None] | None = None,
) -> CaseTiming:
    """Segment one CT volume with an activated runner and write its label map atomically."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not output_path.name.endswith(NIFTI_SUFFIXES):
        raise FlareSegError(f"{output_path}: output must end in .nii.gz or .nii")
    if output_path.resolve() == input_path.resolve():
        raise FlareSegError(f"{output_path}: refusing to overwrite the input volume")
    timing = CaseTiming(case=case_id(input_path), input=str(input_path), output=str(output_path))
    reset_peak_rss()
    cuda = runner.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(runner.device)
    t0 = time.perf_counter()
    volume = read_ct(input_path)
    t1 = time.perf_counter()
    normalizer = volume_normalizer(volume.array, runner.info.normalization, volume.slope, volume.inter)
    t2 = time.perf_counter()
    times = InferenceTimes()
    labels = infer_volume(volume.array, normalizer, runner, batch_size, progress=progress, times=times)
    if cuda:
        torch.cuda.synchronize(runner.device)
    t3 = time.perf_counter()
    geometry = volume.geometry
    del volume  # the stored voxels are no longer needed: free them before post-processing
    if postprocess:
        labels = keep_largest_components(labels)
    t4 = time.perf_counter()
    write_labels(labels, geometry, output_path)
    t5 = time.perf_counter()
    timing.slices, timing.shape = int(labels.shape[0]), geometry.shape
    timing.read_s = t1 - t0
    timing.preprocess_s = (t2 - t1) + times.normalize_s
    timing.infer_s = (t3 - t2) - times.normalize_s
    timing.postprocess_s, timing.write_s, timing.total_s = t4 - t3, t5 - t4, t5 - t0
    timing.peak_rss_mb = peak_rss_mb()
    if cuda:
        timing.peak_gpu_allocated_mb = torch.cuda.max_memory_allocated(runner.device) / 2**20
    return timing


def output_name(input_path: str | os.PathLike[str]) -> str:
    """FLARE21 naming: ``test_001_0000.nii.gz`` -> ``test_001.nii.gz``."""
    return f"{case_id(input_path)}.nii.gz"


def list_cases(folder: str | os.PathLike[str], *, num_parts: int = 1, part_id: int = 0) -> list[Path]:
    """NIfTI files of a folder, sorted, then this part's share (every ``num_parts``-th case)."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise FlareSegError(f"part {part_id} of {num_parts} is not valid: need 0 <= part-id < num-parts")
    cases = list(find_cases(folder).values())
    if not cases:
        raise FlareSegError(f"{folder}: no .nii or .nii.gz files")
    return cases[part_id::num_parts]


def segment_folder(
    runner: Runner,
    inputs: Sequence[Path],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    postprocess: bool = True,
    overwrite: bool = False,
    on_case: Callable[[CaseTiming], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[CaseTiming]:
    """Segment each input into ``out_dir`` (FLARE21 names); skip finished cases; go on after a failure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path in inputs:
        target = out / output_name(path)
        if target.exists() and not overwrite:
            timing = CaseTiming(case=case_id(path), input=str(path), output=str(target), status="skipped")
        else:
            try:
                timing = segment_file(
                    runner, path, target, batch_size=batch_size, postprocess=postprocess, progress=progress
                )
            except FlareSegError as exc:
                log.error("%s", exc)
                timing = CaseTiming(
                    case=case_id(path), input=str(path), output=str(target), status="failed", error=str(exc)
                )
        results.append(timing)
        if on_case:
            on_case(timing)
    return results


def write_timings(results: Sequence[CaseTiming], path: str | os.PathLike[str], context: dict[str, Any]) -> Path:
    """Per-case timings and the run's context (runner, batch size, machine) as JSON, atomically."""
    data = {"context": context, "cases": [r.to_dict() for r in results]}
    return write_text_atomic(json.dumps(data, indent=2) + "\n", path)
