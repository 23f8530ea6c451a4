"""Worker processes (flare-eval's pool, the training DataLoader's): stopping is left to the parent.

A terminal's Ctrl-C and a process manager's SIGTERM go to the whole process group. A forked
worker would inherit the command's SIGTERM handler, which raises, and raise inside its pool's
own machinery: flare-eval's pool could then hang, and the DataLoader took the stop for a
worker crash. A worker that SIGTERM simply killed is no better: the pool or the loader then
reports a crashed worker before the parent has handled its own signal (measured: a traceback
and exit 1 about one time in six). So workers ignore both; the parent unwinds, cancels the
work not started, and its pool or loader ends the workers once their current item is done.
"""

from __future__ import annotations

import signal


def ignore_stop_signals(*_: object) -> None:
    """A worker's initialiser (any arguments, e.g. the DataLoader's worker id): ignore SIGINT and SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
