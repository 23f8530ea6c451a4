"""Stop signals around the forking of worker processes."""

from __future__ import annotations

import os
import signal
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


def test_outside_the_main_thread_it_changes_nothing():
    seen: list[object] = []

    def body() -> None:
        with stop_signals_blocked():
            seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, []) if hasattr(signal, "pthread_sigmask") else set())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen and signal.SIGINT not in seen[0]
