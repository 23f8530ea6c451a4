"""Slices per batch where nobody says: one rule for flare-infer and the Python API.

A module of its own, importing nothing heavy, so that ``flare-infer --help`` can state the defaults without
importing torch.
"""

from __future__ import annotations

#: On a 2-core CPU the full-width network is fastest at batch 2 (benchmarks/results/cpu-2core), and each extra
#: slice costs 0.4-0.5 GB of working memory.
CPU_BATCH = 2
#: On CUDA: the path measured on the H200 (fp16, channels_last).
GPU_BATCH = 8


def device_batch(device_type: str) -> int:
    """The default batch on a device of type ``device_type`` (``"cpu"``, ``"cuda"``)."""
    return GPU_BATCH if device_type == "cuda" else CPU_BATCH
