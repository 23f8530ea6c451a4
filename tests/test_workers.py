"""Stop signals around the forking of worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from flareseg.workers import stop_signals_blocked


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
@pytest.mark.parametrize("other_thread", [False, True])
def test_a_stop_during_the_window_is_handled_once_it_is_over(other_thread):
    # With another thread running (which may take the signal), Python would still run the handler in the window.
    idle = threading.Event()
    if other_thread:
        threading.Thread(target=idle.wait, args=(5,), daemon=True).start()
    reached = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with stop_signals_blocked():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # long enough for any thread to take it and Python to run a handler
                reached = True
    finally:
        idle.set()
    assert reached  # nothing was raised inside the window
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # and the mask as it was


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
@pytest.mark.parametrize("where", ["after the block", "after a handler"])
def test_an_exception_as_the_window_opens_leaves_the_signals_as_they_were(monkeypatch, where):
    """A double of the two calls that open the window: each makes the real change, then raises as another signal's
    Python handler would right after the call returned (a timer's, say). The stops stayed blocked for the rest of the
    process, or a handler that only notes them stayed in place: every later Ctrl-C was lost."""
    real_sigmask, real_signal = signal.pthread_sigmask, signal.signal

    def sigmask(how, mask):
        previous = real_sigmask(how, mask)
        if where == "after the block" and how == signal.SIG_BLOCK and signal.SIGINT in set(mask):
            raise KeyboardInterrupt
        return previous

    def set_handler(number, handler):
        previous = real_signal(number, handler)
        if where == "after a handler" and handler is not signal.default_int_handler and number == signal.SIGINT:
            raise KeyboardInterrupt
        return previous

    monkeypatch.setattr(signal, "pthread_sigmask", sigmask)
    monkeypatch.setattr(signal, "signal", set_handler)
    with pytest.raises(KeyboardInterrupt), stop_signals_blocked():
        pytest.fail("the window opened")  # the exception came first
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with pytest.raises(KeyboardInterrupt):  # and a Ctrl-C is one again
        signal.raise_signal(signal.SIGINT)


def test_outside_the_main_thread_it_changes_nothing():
    seen: list[object] = []

    def body() -> None:
        with stop_signals_blocked():
            seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, []) if hasattr(signal, "pthread_sigmask") else set())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen and signal.SIGINT not in seen[0]


def test_a_cancelled_futures_error_of_the_pool_manager_thread_is_dropped_and_others_are_not():
    """Threads of our own stand in for the pool's manager thread (a class of its module) and for any other."""
    from concurrent.futures import InvalidStateError

    from flareseg.workers import cancelled_futures_quiet

    manager_class = type("_ExecutorManagerThread", (threading.Thread,), {"__module__": "concurrent.futures.process"})
    seen: list[tuple[str, type]] = []
    before = threading.excepthook
    threading.excepthook = lambda args: seen.append((args.thread.name, args.exc_type))
    try:
        with cancelled_futures_quiet():
            for cls, name, error in (
                (manager_class, "manager", InvalidStateError("CANCELLED")),
                (manager_class, "manager-other", RuntimeError("a real fault")),
                (threading.Thread, "plain", InvalidStateError("not the pool's")),
            ):

                def fail(error: Exception = error) -> None:
                    raise error

                thread = cls(target=fail, name=name)
                thread.start()
                thread.join()
        assert seen == [("manager-other", RuntimeError), ("plain", InvalidStateError)]
        restored = threading.excepthook
    finally:
        threading.excepthook = before
    assert restored is not before and restored.__name__ == "<lambda>"  # our stand-in hook is back after the block


@pytest.mark.parametrize("parent_gone", [True, False])
def test_a_loader_worker_drops_the_resource_sharers_traceback_once_the_parent_is_gone(parent_gone):
    # The training process stopped by SIGTERM: the worker's fd-sharing thread finds its connection closed, and
    # its traceback once followed "flare-train: terminated". With the parent still there, it is shown.
    code = (
        "import os, time\n"
        "from multiprocessing import process, resource_sharer\n"
        "from multiprocessing.connection import Client\n"
        "import flareseg.workers as workers\n"
        "workers._parent_gone_quiet()\n"
        f"workers._parent_gone = lambda parent, wait_s=1.0: {parent_gone}\n"
        "r, w = os.pipe()\n"
        "shared = resource_sharer.DupFd(r)  # the real sharing thread, as a worker's batches use it\n"
        "Client(shared._id[0], authkey=process.current_process().authkey).close()  # the peer goes away\n"
        "time.sleep(0.5)\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert ("resource_sharer" in err and "EOFError" in err) is not parent_gone, err


def test_a_signal_whose_handler_was_set_outside_python_is_held_back_but_left_alone(monkeypatch):
    """An embedding program's C handler reads as None and cannot be set back from Python: the window once spun on
    restoring it, at full CPU, with SIGTERM's handler left swallowing stops. (A stand-in getsignal says None.)"""
    real_getsignal, real_signal, swapped = signal.getsignal, signal.signal, []
    monkeypatch.setattr(signal, "getsignal", lambda s: None if s == signal.SIGHUP else real_getsignal(s))
    monkeypatch.setattr(signal, "signal", lambda s, h: swapped.append(s) or real_signal(s, h))
    before = real_getsignal(signal.SIGTERM)
    with stop_signals_blocked():
        assert signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # still held back in the kernel
    assert signal.SIGHUP not in swapped and signal.SIGTERM in swapped
    assert real_getsignal(signal.SIGTERM) is before


def test_a_parent_is_gone_once_this_process_is_re_parented_and_not_before():
    import os

    from flareseg.workers import _parent_gone

    assert not _parent_gone(os.getppid(), wait_s=0.05)  # our parent is there: not gone, after the wait
    assert _parent_gone(os.getppid() + 1 if os.getppid() != 1 else 2, wait_s=0.05)  # another pid than ours: gone


def _signal_state() -> tuple[object, object, list[int]]:
    """In a worker: SIGTERM's and SIGINT's dispositions, and the stop signals blocked in it."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sorted(int(s) for s in blocked & stops)


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
@pytest.mark.parametrize("kind", ["pool", "loader"])
def test_workers_forked_in_the_window_take_their_own_signals_unblocked(kind):
    """Forked while the stops are blocked (as flare-eval's pool and the DataLoader's workers are where fork is the
    start method, Linux's default up to Python 3.13; the test forks explicitly): a pool worker
    dies of SIGTERM by default (a broken pool's shutdown relies on it), a loader worker ignores it (the trainer's
    to handle); both ignore Ctrl-C, and neither keeps the parent's block, which would hold a SIGTERM forever."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from flareseg.workers import loader_worker_signals, pool_worker_signals

    initializer = pool_worker_signals if kind == "pool" else loader_worker_signals
    with stop_signals_blocked():
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), initializer=initializer)
        future = pool.submit(_signal_state)
    with pool:
        sigterm, sigint, blocked = future.result(timeout=60)
    assert sigterm == (signal.SIG_DFL if kind == "pool" else signal.SIG_IGN)
    assert sigint == signal.SIG_IGN and blocked == []
