"""Worker processes (flare-eval's pool, the training DataLoader's): stopping is the parent's to handle.

A terminal's Ctrl-C and a process manager's SIGTERM go to the whole process group. A forked
worker would inherit the command's SIGTERM handler, which raises, and raise inside its pool's
own machinery: flare-eval's pool could then hang, and the DataLoader took the stop for a
worker crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

# SIGHUP (a closed terminal) where the platform has it: the commands unwind on it as on SIGTERM.
_STOP = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())


def pool_worker_signals(log_level: int | None = None) -> None:
    """A process pool worker's initialiser. Ctrl-C is the parent's: it cancels the cases not started and lets the
    running ones end. SIGTERM ends the worker at once, by default, as the pool relies on when it stops the workers
    of a broken pool (a worker that ignored it would hang the pool's shutdown).

    ``log_level``: the parent's level for flareseg's loggers. A worker started fresh (the spawn or forkserver start
    method: macOS, and Linux from Python 3.14) inherits no logging set-up, and its warnings would reach stderr as
    bare messages, naming neither their level nor their logger; it gets the commands' format at that level. A forked
    worker keeps the parent's handlers.
    """
    _worker_signals(sigterm=signal.SIG_DFL)
    if log_level is not None and not logging.getLogger().handlers:
        from flareseg.cli import LOG_FORMAT

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.basicConfig(level=logging.WARNING, handlers=[handler])
        logging.getLogger("flareseg").setLevel(log_level)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP held back while worker processes are forked (or a set of files is renamed, or a write
    handed over or waited for), then handled.

    A signal handled during a fork ran the command's handler inside the fork's own hooks, where
    its exception is dropped (the stop was lost), and one that reached a new worker before its
    initialiser ran the parent's handler there. Blocking them in this thread keeps them from
    the forked workers, but not from the process: another thread (tqdm's monitor, a BLAS pool)
    may take one, and Python then runs its handler here, inside the window. So for the window the
    handlers only note a signal, and it is raised again once the window is over. Outside the main
    thread (where Python runs no handlers) this does nothing.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    # What is changed is read first, and put back whatever happens: an exception raised between a change and its
    # bookkeeping (another signal's Python handler runs right after a call returns) left the stops blocked, or a
    # noting handler in place, for the rest of the process. A handler set outside Python (a program embedding it)
    # reads as None and could not be put back: that signal is only held back in the kernel, and its own handler
    # takes it after the window.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    handlers = {stop: handler for stop in _STOP if (handler := signal.getsignal(stop)) is not None}
    try:
        for stop in handlers:
            signal.signal(stop, lambda number, _frame: noted.append(number))
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one held back in the kernel is noted now
        first: BaseException | None = None
        for stop, handler in handlers.items():
            # signal.signal runs pending handlers before it sets one: a handler restored already may raise there,
            # and this one is then set again. Each signal is pending at most once, so a few tries always do.
            for _ in range(len(_STOP) + 1):
                try:
                    signal.signal(stop, handler)
                    break
                except BaseException as exc:
                    first = first or exc
        if first is not None:
            raise first
        for noted_signal in dict.fromkeys(noted):
            signal.raise_signal(noted_signal)  # the command's own handling, now that the workers exist


def loader_worker_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: both signals are the training process's. A worker that SIGTERM
    killed would make the loader raise a worker-crash error over the stop; the training process unwinds and ends
    its loader, whose workers then exit (they also exit when the training process is gone)."""
    _worker_signals(sigterm=signal.SIG_IGN)
    _parent_gone_quiet()


def _parent_gone_quiet() -> None:
    """In a loader worker: drop the traceback of multiprocessing's resource-sharing thread when the training
    process, which fetches the batches' file descriptors from it, has gone (stopped by SIGTERM, say): the
    connection resets, and the traceback would follow the command's one line on the shared stderr. That thread
    catches its errors itself and hands them to ``sys.excepthook``; with the parent still there, they are shown."""
    import traceback

    parent = os.getppid()
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, ConnectionError | EOFError):
            sharer = any(Path(f.filename).name == "resource_sharer.py" for f in traceback.extract_tb(tb))
            if sharer and _parent_gone(parent):
                return
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def _parent_gone(parent: int, wait_s: float = 1.0) -> bool:
    """Whether this process's parent has exited: it is re-parented then, a moment after the parent's sockets
    closed (which is what reset the connection), hence the short wait."""
    deadline = time.monotonic() + wait_s
    while os.getppid() == parent:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _worker_signals(sigterm: signal.Handlers) -> None:
    """Ctrl-C and a closed terminal's SIGHUP ignored (the parent's to handle), SIGTERM as given, and all let
    through again."""
    for parents in _STOP - {signal.SIGTERM}:
        signal.signal(parents, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, sigterm)
    if hasattr(signal, "pthread_sigmask"):  # forked with both blocked (see stop_signals_blocked)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP)


@contextlib.contextmanager
def cancelled_futures_quiet() -> Iterator[None]:
    """While a process pool shuts down with ``cancel_futures=True``: drop the traceback its manager thread can print
    when a worker's result arrives for a future just cancelled (``InvalidStateError``; CPython 3.11 sets the result
    without checking). Those cases were never to be scored; the traceback would only bury the command's one line.
    Any other thread error still goes to the hook in place before."""
    from concurrent.futures import InvalidStateError

    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        manager = args.thread is not None and type(args.thread).__module__ == "concurrent.futures.process"
        if not (manager and args.exc_type is InvalidStateError):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
