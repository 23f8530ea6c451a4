"""What every console command shares: logging set-up and the error edge.

A :class:`~flareseg.errors.FlareSegError` becomes one line on stderr and exit code 2;
library code never prints or exits.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from flareseg.errors import FlareSegError, interrupts_kept, no_room

log = logging.getLogger("flareseg.cli")
_T = TypeVar("_T")

#: The exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130
#: The exit code of a command stopped by SIGTERM (128 + SIGTERM), as shells report it.
TERMINATED = 143
#: The exit code of a command whose terminal closed (128 + SIGHUP): an ssh session dropped, a window closed.
HUNG_UP = 129
#: The exit codes of a command stopped from outside rather than ended by its work.
STOPPED = (INTERRUPTED, TERMINATED, HUNG_UP)

#: The signals that stop a command and unwind it as Ctrl-C does (SIGHUP where the platform has it).
_STOPS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that it unwinds as Ctrl-C does.

    A process manager's SIGTERM, or the hang-up of a closed terminal, would otherwise end the
    process at once, leaving a write in progress as a hidden ``.part`` file; unwinding lets the
    writer finish its file and removes what was not finished.
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = signum


def _raise_terminated(signum: int, frame: object, terminals: Sequence[int] = ()) -> None:
    if signum == getattr(signal, "SIGHUP", None):
        # Those that were a terminal and are no longer (a hung-up terminal no longer answers as one): a line or a
        # bar written there would fail (EIO) mid-unwind. A `kill -HUP` with the terminal still open keeps it.
        _to_null([fd for fd in terminals if not _is_terminal(fd)])
    raise Terminated(signum)


def _to_null(descriptors: Sequence[int]) -> None:
    if not descriptors:
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in descriptors:
            os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="debug lines too (-vv: other libraries' info lines too)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or info lines: results, warnings and errors only"
    )


#: How the commands' log lines read (worker processes started fresh take it too: flareseg.workers).
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class BarAwareHandler(logging.StreamHandler):
    """Log lines that make room for a progress bar: written with ``tqdm.write``, which lifts the bars on the
    stream, prints the line and draws them again, rather than the line landing on the bar's."""

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:  # started with stderr closed: dropped, as a plain handler drops them (not stdout)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def run_command(
    parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int], argv: Sequence[str] | None = None
) -> int:
    """Parse ``argv``, configure logging, run ``body`` and map errors to exit codes."""
    parser.error = _one_line_error(parser)  # type: ignore[method-assign,assignment]
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    # Our own messages at the chosen level; third-party libraries (onnxscript, torch) only warnings.
    root = logging.getLogger()
    theirs = [h for h in root.handlers if not getattr(h, "_flareseg", False)]  # an embedding program's: untouched
    ours = BarAwareHandler(sys.stderr)
    ours.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.WARNING, handlers=[ours])
    logging.getLogger("flareseg").setLevel(level)
    root_level = root.level  # -vv's change is the command's alone: a program calling main() gets it back
    if args.verbose > 1 and not args.quiet and root_level > logging.INFO:  # NOTSET (0) lets everything through
        root.setLevel(logging.INFO)
    # nibabel logs a header fault it cannot fix at ERROR, then raises; pydicom's decoders log each
    # failure's traceback at ERROR, then raise. Our one-line error says it, naming the file.
    # (Filters are added once per process: the same function each time.)
    logging.getLogger("nibabel.global").addFilter(_below_error)  # it also has a handler of its own
    for handler in root.handlers:
        if handler not in theirs:  # the handler basicConfig made, now or in an earlier command
            handler.addFilter(_no_pydicom_errors)  # pydicom's child loggers' records reach only the handlers
            handler._flareseg = True  # type: ignore[attr-defined]
    previous = _catch_stops()
    _STDOUT_LOST.clear()
    try:
        with interrupts_kept(ImportError):  # a stop in a lazy import's set-up (torch's, ONNX Runtime's) is a stop
            code = body(args)
        return 2 if code == 0 and _STDOUT_LOST.is_set() else code  # said when it happened
    except FlareSegError as exc:
        _tell(f"{parser.prog}: error: {exc}")
        return 2
    except MemoryError as exc:  # numpy's too-large array (a subclass), Python's own
        _tell(f"{parser.prog}: error: {_out_of_memory(exc)}")
        return 2
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc):  # torch's CPU allocator says it in a plain RuntimeError
            _tell(f"{parser.prog}: error: {_out_of_memory(exc)}")
            return 2
        if _gpu_out_of_memory(exc):  # outside a case's inference (which says its batch): loading, warm-up, a graph
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            _tell(f"{parser.prog}: error: the GPU ran out of memory ({first}); free it, or lower the batch size")
            return 2
        raise
    except BrokenPipeError as exc:
        if _stdout_gone():  # whoever read stdout has gone (`| head`): no traceback for that
            return 1
        _tell(f"{parser.prog}: error: {exc}")  # a pipe of some other kind: say so
        return 2
    except KeyboardInterrupt as exc:
        if not isinstance(exc, Terminated):
            _tell(f"{parser.prog}: interrupted")
            return INTERRUPTED
        _tell(f"{parser.prog}: {'hung up' if 128 + exc.signum == HUNG_UP else 'terminated'}")
        return 128 + exc.signum
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
        root.setLevel(root_level)


def _gpu_out_of_memory(exc: BaseException) -> bool:
    """Whether an error is a GPU allocation failure; asked only where torch is loaded already."""
    if "torch" not in sys.modules:
        return False
    return no_room(exc)


def _out_of_memory(exc: BaseException) -> str:
    """One line for a host allocation that failed: what could not be allocated, and the way out."""
    text = str(exc).strip()
    what = text[text.find("can't allocate") :] if "can't allocate" in text else text.splitlines()[0] if text else ""
    return (
        f"out of memory ({what[:160] or type(exc).__name__}); lower the sizes, widths or batch sizes given, "
        "or free memory"
    )


def _catch_stops() -> dict[int, Any]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` while a command runs; the handlers it replaces.

    Only where a signal still has its default action and from the main thread: a program
    that embeds a command and handles one itself keeps its own handler, and a command run
    under ``nohup`` (SIGHUP ignored) runs on when its terminal closes.
    On SIGHUP, standard output and error go to the null device if they were the terminal.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    terminals = [fd for fd in (1, 2) if _is_terminal(fd)]  # asked now: a hung-up terminal no longer says
    handler = functools.partial(_raise_terminated, terminals=terminals)
    return {stop: signal.signal(stop, handler) for stop in _STOPS if signal.getsignal(stop) is signal.SIG_DFL}


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def _no_pydicom_errors(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or not (record.name == "pydicom" or record.name.startswith("pydicom."))


def _one_line_error(parser: argparse.ArgumentParser) -> Callable[[str], NoReturn]:
    """argparse's error, as one line like every other error (argparse prints its usage block first)."""

    def error(message: str) -> NoReturn:
        _tell(f"{parser.prog}: error: {message} (see {parser.prog} --help)")
        raise SystemExit(2)

    return error


def _tell(line: str) -> None:
    """A line on stderr, if anything still reads it: in one write, so that processes sharing the stream (torchrun's
    ranks) cannot interleave their lines (print writes the text and its newline apart)."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # stderr closed or gone
        pass


def _stdout_gone() -> bool:
    """True when stdout's reader has gone; stdout then goes to the null device, and the work on without it."""
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        return True
    try:
        sys.stdout.flush()
        return False
    except BrokenPipeError:
        pass
    except OSError as exc:
        if exc.errno != errno.EIO:  # EIO: a terminal that hung up, gone as a pipe's reader is
            return False
    except ValueError:
        return False
    try:
        _to_null([sys.stdout.fileno()])
    except (OSError, ValueError, AttributeError):  # no file descriptor behind this stdout
        pass
    return True


def say(line: str, write: Callable[[str], None] | None = None) -> None:
    """A result line on stdout (through ``write``, else print); once stdout's reader has gone, silently nothing.

    A run piped into ``head`` must not lose the cases still to come for want of a reader. A stdout that refuses
    writes (a log file on a full disk) is said once on stderr and goes to the null device too: the work goes on
    (its results are files), and the command's exit code is 2 at its end (:data:`_STDOUT_LOST`).
    """
    if sys.stdout is None:  # started with stdout closed
        return
    try:
        (write or print)(line)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()
    except OSError as exc:
        if exc.errno == errno.EIO:
            _stdout_gone()  # its terminal hung up (the SIGHUP that follows may still be held back)
            return
        if not _STDOUT_LOST.is_set():
            _STDOUT_LOST.set()
            why = exc.strerror or exc
            log.error("stdout: cannot write (%s): its lines are lost from here on, the work goes on", why)
        try:
            _to_null([sys.stdout.fileno()])  # what is still buffered for it is then dropped, not retried
        except (OSError, ValueError, AttributeError):  # no file descriptor behind this stdout
            pass


#: Set by :func:`say` once stdout refused a write; the command running then ends with exit code 2.
_STDOUT_LOST = threading.Event()


def end_command(code: int) -> NoReturn:
    """End a command that returned ``code``: at once (:func:`exit_now`), but the usual way after Ctrl-C, SIGTERM or
    SIGHUP, which waits for a worker still finishing an atomic write.

    Skipping the teardown also closes the second or so in which a Ctrl-C, after the last file was written, would
    interrupt the interpreter's exit handlers with a traceback.
    """
    if code in STOPPED:
        sys.exit(code)
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code``, skipping the interpreter's teardown.

    Unloading torch at exit (and a CUDA context, pinned memory) takes 0.4-0.5 s of a fresh
    process on the 2-core CPU, where the whole start-up is 1.3 s (benchmarks/startup.md). A command calls this only
    after returning normally: its outputs are then written and closed and its worker
    threads joined, so nothing is lost once the logging handlers, stdout and stderr (and
    the C library's stdout buffer) are flushed here. An interrupted command exits the
    usual way instead, which waits for a worker still finishing an atomic write.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: the process started with it closed
                stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    try:  # what C and C++ libraries wrote through the C library's own stdout buffer
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(code)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 must not quietly mean "the default")."""
    return _bounded(int, text, minimum=1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded(int, text, minimum=0)


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf would poison whatever they feed)."""
    return _bounded(float, text)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _bounded(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _bounded(float, text, minimum=0)


def is_device_name(text: str) -> bool:
    """``cpu``, ``cuda`` or ``cuda:N`` (N without leading zeros: ``cuda:01`` is not a name torch prints)."""
    return re.fullmatch(r"cpu|cuda(:(0|[1-9][0-9]*))?", text, flags=re.ASCII) is not None


def device_name(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N`` (torch would parse others into a traceback later)."""
    if is_device_name(text):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N (N = 0, 1, ...), got {text!r}")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``--threads`` for PyTorch on the CPU: the process's intra-op thread count, set at a command's edge for its
    run (runners never change process-wide settings) and restored after it, for a program that calls ``main``.
    None changes nothing."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    log.info("torch CPU threads: %d", threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def warn_threads_beyond_cores(threads: int | None, option: str = "--threads") -> None:
    cores = os.cpu_count() or 1
    if threads is not None and threads > cores:
        log.warning("%s %d on %d CPU cores: threads beyond the cores only wait for each other", option, threads, cores)


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu`` (what nnU-Net and TotalSegmentator users expect)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def path_arg(text: str) -> Path:
    """argparse type: a path; an empty one is refused (it would quietly mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return float(_bounded(float, text, minimum=0, maximum=1))


def _bounded(
    kind: type[int] | type[float], text: str, *, minimum: float | None = None, maximum: float | None = None
) -> Any:
    what = "an integer" if kind is int else "a number"
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if maximum is not None and not (minimum or 0) <= value <= maximum:
        raise argparse.ArgumentTypeError(f"expected {what} in [{minimum or 0:g}, {maximum:g}], got {text!r}")
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what} >= {minimum:g}, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: '1,8,32' -> (1, 8, 32), positive integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def batch_profile(text: str) -> tuple[int, int, int]:
    """argparse type: 'MIN,OPT,MAX' batch sizes."""
    values = int_list(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX, got {text!r}")
    from flareseg.export.options import check_batch_profile

    return _checked_here(check_batch_profile, (values[0], values[1], values[2]))


def slice_size(text: str) -> tuple[int, int]:
    """argparse type: 'H' or 'H,W'."""
    values = int_list(text)
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected H or H,W, got {text!r}")
    from flareseg.shapes import check_slice_size

    return _checked_here(check_slice_size, (values[0], values[-1]))


def _checked_here(check: Callable[[_T], _T], value: _T) -> _T:
    """A library check run as the options are read, so that argparse names the option in its refusal."""
    try:
        return check(value)
    except FlareSegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
