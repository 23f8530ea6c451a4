"""Worker processes (flare-eval's pool, the training DataLoader's): stopping is left to the parent.

A terminal's Ctrl-C and a process manager's SIGTERM go to the whole process group. A forked
worker would inherit the command's SIGTERM handler and raise inside its pool's own machinery,
which can then hang (flare-eval) or turn the stop into a worker crash (the DataLoader). The
workers ignore both signals; the parent unwinds, cancels what has not started and ends them.
"""

from __future__ import annotations

import signal


def ignore_stop_signals(*_: object) -> None:
    """A worker's initialiser (any arguments, e.g. the DataLoader's worker id): ignore SIGINT and SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
