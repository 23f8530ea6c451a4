"""Where a fresh process spends its time outside the stages: a timeline since the process started.

``flare-infer`` marks points of its run (entering ``main`` after the interpreter's
start, the heavy imports done, the runner activated, the last output written, the runner released) in seconds
since the process began, read from the kernel (Linux), so the interpreter's own start-up
is counted too. The end is also stamped in wall-clock time, so that whoever started the
process can tell how long its exit (freeing the CUDA context, the pinned memory, ...) took.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any


def process_age_s() -> float | None:
    """Seconds since this process started (Linux, 10 ms resolution), or None where the kernel does not say."""
    try:
        with open("/proc/self/stat") as f:
            # The command name (field 2) may hold spaces: the fields after its closing ')' start at field 3.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@dataclass
class Timeline:
    """Named points of a run, in seconds since the process started (absent where that is unknown)."""

    marks: dict[str, float] = field(default_factory=dict)
    end_epoch_s: float | None = None

    def mark(self, name: str) -> None:
        age = process_age_s()
        if age is not None:
            self.marks[name] = round(age, 4)

    def end(self) -> None:
        """The last mark, ``end``, also stamped in wall-clock seconds (``time.time()``)."""
        self.mark("end")
        self.end_epoch_s = time.time()

    def to_dict(self) -> dict[str, Any]:
        return {"since_process_start_s": dict(self.marks), "end_epoch_s": self.end_epoch_s}
