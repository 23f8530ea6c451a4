"""What every command shares: argument errors are one line naming the argument, with exit code 2."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flareseg.bench.cli import main as bench_main
from flareseg.evaluate.cli import main as eval_main
from flareseg.export.cli import main as export_main
from flareseg.phantom import main as phantom_main
from flareseg.runtime.cli import main as infer_main
from flareseg.train.cli import main as train_main

COMMANDS = {
    "flare-infer": (infer_main, ["-i", "ct.nii.gz", "-o", "out", "--model", "m.pt", "--gpu-memory", "nan"]),
    "flare-eval": (eval_main, ["--pred", "p", "--gt", "g", "--workers", "0"]),
    "flare-export": (export_main, ["m.pt", "-o", "out", "--verify-slices", "0"]),
    "flare-train": (train_main, ["--data", "d", "--out", "o", "--epochs", "0"]),
    "flare-bench": (bench_main, ["--slices", "0"]),
    "python -m flareseg.phantom": (phantom_main, ["out", "--cases", "0"]),
}


@pytest.mark.parametrize("prog", list(COMMANDS))
def test_an_argument_error_is_one_line_naming_the_argument(prog, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written, but a failure must not write beside the sources either
    main, argv = COMMANDS[prog]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # argparse alone prints its usage block first
    assert lines[0].startswith(f"{prog}: error: argument ") and lines[0].endswith(f"(see {prog} --help)")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N"),
        (["--device", "cuda:x"], "argument --device: expected cpu, cuda or cuda:N"),
        (["--device", "CPU"], "argument --device: expected cpu, cuda or cuda:N"),
        (["--device", "cuda:01"], "argument --device: expected cpu, cuda or cuda:N"),  # torch refuses it
        (["--device", "cuda:\u0661"], "argument --device: expected cpu, cuda or cuda:N"),  # a non-ASCII digit
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
        (["--threads", "0"], "argument --threads: expected an integer >= 1"),
        (["--read-threads", "-1"], "argument --read-threads: expected an integer >= 0"),
        (["--part-id", "-1"], "argument --part-id: expected an integer >= 0"),
        (["--timings", ""], "argument --timings: an empty path"),
        # the trailing / was dropped, and the output became a file of that name
        (["-o", "pred/ct.nii.gz/"], "argument -o/--output: pred/ct.nii.gz/: ends in / (a folder) but is named like"),
    ],
)
def test_flare_infer_refuses_bad_values_while_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        infer_main(["-i", "ct.nii.gz", "-o", "out", "--model", "m.pt", *argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flare-infer: error: {message}") and err.endswith("(see flare-infer --help)")
    assert "\n" not in err


def test_empty_paths_are_refused_by_every_command(capsys):
    for main, argv in (
        (infer_main, ["-i", "", "-o", "out", "--model", "m.pt"]),
        (eval_main, ["--pred", "", "--gt", "g"]),
        (export_main, ["", "-o", "out"]),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
        assert "an empty path (see " in capsys.readouterr().err


@pytest.mark.parametrize(("name", "code", "said"), [("SIGTERM", 143, "terminated"), ("SIGHUP", 129, "hung up")])
def test_sigterm_and_sighup_unwind_like_ctrl_c_and_leave_no_partial_file(tmp_path, name, code, said):
    """A real SIGTERM (a process manager) or SIGHUP (a closed terminal), sent by the command to itself while an
    atomic write is open. Before, SIGHUP ended the process at once (129) with the ``.part`` file left."""
    script = f"""
import argparse, os, signal, sys
from pathlib import Path
from flareseg.atomic import atomic_output
from flareseg.cli import add_common_arguments, run_command

def body(args):
    with atomic_output(Path({str(tmp_path / "out.bin")!r})) as tmp:
        tmp.write_bytes(b"half")
        os.kill(os.getpid(), signal.{name})
        signal.pause()  # not reached: the handler raises at once
    return 0

parser = argparse.ArgumentParser(prog="demo")
add_common_arguments(parser)
code = run_command(parser, body, [])
print(signal.getsignal(signal.{name}) is signal.SIG_DFL)
sys.exit(code)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.strip()) == (code, f"demo: {said}")
    assert done.stdout == "True\n"  # the default action is back once the command returns
    assert not any(tmp_path.iterdir())  # the half-written temporary file is gone


def test_under_nohup_a_hang_up_is_left_ignored_and_the_command_runs_on(tmp_path):
    script = f"""
import argparse, os, signal, sys
from pathlib import Path
from flareseg.atomic import atomic_output
from flareseg.cli import add_common_arguments, run_command

def body(args):
    with atomic_output(Path({str(tmp_path / "out.bin")!r})) as tmp:
        os.kill(os.getpid(), signal.SIGHUP)
        tmp.write_bytes(b"whole")
    return 0

signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
parser = argparse.ArgumentParser(prog="demo")
add_common_arguments(parser)
sys.exit(run_command(parser, body, []))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert (tmp_path / "out.bin").read_bytes() == b"whole"


@pytest.mark.skipif(sys.platform != "linux", reason="opens a pseudo-terminal as a session's controlling terminal")
def test_a_closed_terminal_stops_the_command_cleanly_though_its_output_went_to_that_terminal(tmp_path):
    """A real hang-up: the command's controlling terminal (a pseudo-terminal, its stdout and stderr) is closed
    while it writes a file and keeps writing lines to the terminal. Writing there after the hang-up fails (EIO);
    the command must still unwind as on SIGTERM: exit 129, no ``.part`` file, the file not left half written."""

    out, said = tmp_path / "out.bin", tmp_path / "code.txt"
    script = f"""
import argparse, fcntl, os, sys, termios, time
from pathlib import Path
from flareseg.atomic import atomic_output
from flareseg.cli import add_common_arguments, run_command

os.setsid()
fcntl.ioctl(1, termios.TIOCSCTTY, 0)  # the pseudo-terminal becomes this session's controlling terminal

def body(args):
    try:
        with atomic_output(Path({str(out)!r})) as tmp:
            tmp.write_bytes(b"half")
            print("ready", flush=True)
            for _ in range(400):  # 20 s at most: the hang-up comes long before
                print("working", file=sys.stderr, flush=True)
                time.sleep(0.05)
    finally:
        print("what was done", flush=True)  # as flare-infer says the cases it finished, while it unwinds
    return 0

parser = argparse.ArgumentParser(prog="demo")
add_common_arguments(parser)
code = run_command(parser, body, [])
Path({str(said)!r}).write_text(str(code))
sys.exit(code)
"""
    assert _close_its_terminal_once_ready(script) == 129
    assert said.read_text() == "129"  # the command returned its code itself: it was not killed by the signal
    assert not any(p.name != "code.txt" for p in tmp_path.iterdir())  # neither out.bin nor its .part


def test_running_out_of_host_memory_is_one_line_and_other_runtime_errors_stay_tracebacks(capsys):
    import argparse

    import numpy as np
    import torch

    from flareseg.cli import add_common_arguments, run_command

    parser = argparse.ArgumentParser(prog="flare-x")
    add_common_arguments(parser)

    def numpy_too_large(_args):
        np.empty((1 << 44,), np.uint8)  # 16 TiB: numpy raises _ArrayMemoryError, a MemoryError

    def torch_allocator(_args):  # what torch's CPU allocator raises, word for word
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 400000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    assert run_command(parser, numpy_too_large, []) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("flare-x: error: out of memory (Unable to allocate") and "batch sizes" in line
    assert run_command(parser, torch_allocator, []) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("flare-x: error: out of memory (can't allocate memory: you tried to allocate 400000000000")

    def gpu_full_while_loading(_args):  # torch's CUDA allocator, outside a case (a model's .to, a warm-up)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1.5 GiB free)")

    assert run_command(parser, gpu_full_while_loading, []) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "flare-x: error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; "
        "1.5 GiB free)); free it, or lower the batch size"
    )

    def a_bug(_args):
        raise RuntimeError("an ordinary bug")

    with pytest.raises(RuntimeError, match="an ordinary bug"):
        run_command(parser, a_bug, [])


def test_a_batch_that_runs_out_of_gpu_memory_is_one_line_and_gives_the_cache_back(monkeypatch):
    """torch.cuda.empty_cache is a test double here (no GPU): it records that the failed batch's blocks are freed
    once its error is gone, for the next case of a folder."""
    import torch

    from flareseg.errors import FlareSegError, gpu_memory_errors

    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    with pytest.raises(FlareSegError) as raised, gpu_memory_errors("case.nii.gz", 8, "lower --batch-size"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    assert str(raised.value) == (
        "case.nii.gz: the GPU ran out of memory at batch size 8 (CUDA out of memory. Tried to allocate 1.00 GiB); "
        "lower --batch-size"
    )
    assert emptied == [True]
    with pytest.raises(RuntimeError, match="not memory"), gpu_memory_errors("case.nii.gz", 8, "lower --batch-size"):
        raise RuntimeError("not memory")
    assert emptied == [True]


def test_ctrl_c_during_a_commands_imports_is_one_line_and_exit_130(monkeypatch, capsys):
    """importlib.import_module is a test double here: it raises as Ctrl-C inside torch's import would."""
    from pathlib import Path

    import tomllib

    from flareseg import commands

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == ["flare-bench", "flare-eval", "flare-export", "flare-infer", "flare-train"]
    for prog, target in scripts.items():
        module, function = target.split(":")
        assert module == "flareseg.commands" and callable(getattr(commands, function)), prog

        def interrupted(name: str):
            raise KeyboardInterrupt

        def interrupted_in_an_extension(name: str):  # pybind11 (torch._C) wraps it in its module's set-up
            raise ImportError("initialization failed") from KeyboardInterrupt()

        for importer in (interrupted, interrupted_in_an_extension):
            with monkeypatch.context() as m:
                m.setattr(commands.importlib, "import_module", importer)
                with pytest.raises(SystemExit) as stopped:
                    getattr(commands, function)()
            assert stopped.value.code == 130
            assert capsys.readouterr().err == f"{prog}: interrupted\n"


def test_a_stop_in_a_lazy_imports_set_up_is_a_stop_and_an_error_while_stopping_stays_an_error(capsys):
    # torch is imported inside each command's body (flare-infer's pipeline, flare-export's exporter): a stop in its
    # set-up came as ImportError("initialization failed") and ended in a traceback (diff review). An error of our
    # own raised while a stop was handled (a write that failed meanwhile) is that error, as before.
    import argparse

    from flareseg.cli import add_common_arguments, run_command
    from flareseg.errors import FlareSegError

    def stopped_in_an_import(args):
        raise ImportError("initialization failed") from KeyboardInterrupt()

    def failed_while_stopping(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise FlareSegError("out/timings.json: cannot write (No space left on device)") from None

    def missing(args):
        raise ImportError("No module named 'cc3d'")

    parser = argparse.ArgumentParser(prog="demo")
    add_common_arguments(parser)
    assert run_command(parser, stopped_in_an_import, []) == 130
    assert capsys.readouterr().err == "demo: interrupted\n"
    assert run_command(parser, failed_while_stopping, []) == 2
    assert capsys.readouterr().err == "demo: error: out/timings.json: cannot write (No space left on device)\n"
    with pytest.raises(ImportError, match="cc3d"):  # a real missing module is not taken for a stop
        run_command(parser, missing, [])


def test_an_error_quoting_a_multi_line_message_is_still_one_line():
    from flareseg.errors import FlareSegError

    quoted = "Unable to decode:\n  gdcm: no codec\n  pillow: broken data stream\n"
    assert str(FlareSegError(f"s/CT1.dcm: cannot decode ({quoted})")) == (
        "s/CT1.dcm: cannot decode (Unable to decode: gdcm: no codec; pillow: broken data stream)"
    )
    assert str(FlareSegError("one line")) == "one line"


def test_pydicom_tracebacks_are_left_to_the_one_line_error():
    """In a fresh process, as on the command line (pytest's own log handlers would hide what stderr shows)."""
    code = """
import argparse, logging, sys
from flareseg.cli import add_common_arguments, run_command
from flareseg.errors import FlareSegError

def body(args):
    try:
        raise OSError("broken data stream")
    except OSError:
        logging.getLogger("pydicom.pixels.decoders.base").error("broken data stream", exc_info=True)
    logging.getLogger("pydicom").warning("a warning is still said")
    raise FlareSegError("s: cannot decode the pixel data of CT1.dcm (broken data stream)")

parser = argparse.ArgumentParser(prog="demo")
add_common_arguments(parser)
sys.exit(run_command(parser, body, []))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "WARNING pydicom: a warning is still said",
        "demo: error: s: cannot decode the pixel data of CT1.dcm (broken data stream)",
    ]


def test_a_program_that_embeds_a_command_keeps_its_own_log_handlers_as_they_were():
    import argparse
    import logging

    from flareseg.cli import add_common_arguments, run_command

    mine = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(mine)
    level = root.level
    try:
        parser = argparse.ArgumentParser(prog="demo")
        add_common_arguments(parser)
        assert run_command(parser, lambda args: 0, []) == 0
        assert mine.filters == []
        root.setLevel(logging.ERROR)
        assert run_command(parser, lambda args: 0, ["-vv"]) == 0
        assert root.level == logging.ERROR  # -vv's info lines were the command's alone
    finally:
        root.setLevel(level)
        root.removeHandler(mine)


def test_every_commands_help_imports_neither_torch_nor_onnx():
    # --help, and an option refused while parsing, answer at once: the heavy libraries (seconds
    # of import) come only with the work itself.
    code = (
        "import sys, importlib\n"
        "for name in ('runtime', 'export', 'bench', 'train', 'evaluate'):\n"
        "    importlib.import_module(f'flareseg.{name}.cli').build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'openvino', 'tensorrt') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]"]


def test_a_log_line_during_a_progress_bar_gets_a_line_of_its_own():
    # The export's INFO lines once landed on its bar's line ("...| 0/4 [...]INFO flareseg...").
    import io
    import logging

    from tqdm import tqdm

    from flareseg.cli import BarAwareHandler

    stream = io.StringIO()
    handler = BarAwareHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("flareseg.test_bar")
    log.addHandler(handler)
    log.propagate = False
    try:
        with tqdm(total=4, desc="flare-export", file=stream, disable=False) as bar:
            bar.update()
            log.warning("exporting m.pt")
            bar.update()
    finally:
        log.removeHandler(handler)
        log.propagate = True
    lines = stream.getvalue().replace("\r", "\n").splitlines()
    assert "WARNING flareseg.test_bar: exporting m.pt" in lines  # whole, not glued to the bar


def test_with_stderr_closed_log_lines_are_dropped_not_sent_to_stdout():
    import io
    import logging

    from flareseg.cli import BarAwareHandler

    handler = BarAwareHandler(io.StringIO())
    handler.stream = None  # as StreamHandler(sys.stderr) is made when a process starts with stderr closed
    stdout = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(stdout):
        handler.emit(logging.LogRecord("flareseg.x", logging.ERROR, __file__, 1, "a failed case", None, None))
    assert stdout.getvalue() == ""


@pytest.mark.skipif(sys.platform != "linux", reason="opens a pseudo-terminal as a session's controlling terminal")
def test_result_lines_to_a_terminal_that_hung_up_are_dropped_not_raised(tmp_path):
    """Under nohup (SIGHUP ignored) with stdout still on the terminal, or before a held-back SIGHUP is handled:
    a result line to the hung-up terminal failed with EIO and ended the command with a traceback."""

    said, failed = tmp_path / "code.txt", tmp_path / "traceback.txt"
    script = f"""
import fcntl, os, signal, sys, termios, time, traceback
from pathlib import Path
from flareseg.cli import say

# The terminal is gone when a failure would be printed: it goes to a file, for the assertion to show.
sys.excepthook = lambda *exc: Path({str(failed)!r}).write_text("".join(traceback.format_exception(*exc)))
signal.signal(signal.SIGHUP, signal.SIG_IGN)
os.setsid()
fcntl.ioctl(1, termios.TIOCSCTTY, 0)
print("ready", flush=True)
for _ in range(1200):  # until the terminal has hung up (a minute at most: a loaded machine is slow)
    time.sleep(0.05)
    try:
        termios.tcgetattr(1)
    except (OSError, termios.error):
        break
for i in range(3):
    say(f"case {{i}} done")
Path({str(said)!r}).write_text("said")
"""
    code = _close_its_terminal_once_ready(script)
    assert code == 0, failed.read_text() if failed.exists() else f"exit code {code}, no traceback"
    assert said.read_text() == "said"


def _close_its_terminal_once_ready(script: str) -> int:
    """Run ``script`` with a pseudo-terminal as stdout and stderr (it makes it its controlling terminal), close
    the terminal once the script prints "ready" (the kernel then sends SIGHUP to its session); its exit code."""
    import os
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    seen = b""
    try:
        # The whole line, alone: under load the script's print of it once met the terminal closed (EIO), its
        # test not begun (a partial line, or "ready" inside another line: "already").
        while b"\nready\n" not in b"\n" + seen.replace(b"\r\n", b"\n"):
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, f"the script never started: {seen!r}"
            seen += os.read(master, 4096)
    finally:
        os.close(master)
    return proc.wait(timeout=60)


def test_an_error_line_is_one_write_so_processes_sharing_stderr_cannot_split_it(monkeypatch):
    # torchrun's ranks share one stderr: print wrote the text and its newline apart, and another rank's line landed
    # between them ("...outside 0..4flare-train: error: ...").
    import argparse
    import io

    from flareseg.cli import add_common_arguments, run_command
    from flareseg.errors import FlareSegError

    class Writes(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def write(self, s: str) -> int:
            self.calls.append(s)
            return super().write(s)

    stream = Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    parser = argparse.ArgumentParser(prog="flare-x")
    add_common_arguments(parser)

    def body(_: argparse.Namespace) -> int:
        raise FlareSegError("case.nii.gz: labels [7] outside 0..4")

    assert run_command(parser, body, []) == 2
    assert stream.calls == ["flare-x: error: case.nii.gz: labels [7] outside 0..4\n"]


def test_each_verbosity_shows_what_its_help_says():
    # -v once did nothing (the default already showed info lines; only -vv changed the level).
    script = """
import argparse, logging, sys
from flareseg.cli import add_common_arguments, run_command

def body(args):
    logging.getLogger("flareseg.demo").debug("ours-debug")
    logging.getLogger("flareseg.demo").info("ours-info")
    logging.getLogger("somelib").info("theirs-info")
    logging.getLogger("somelib").warning("theirs-warning")
    return 0

parser = argparse.ArgumentParser(prog="demo")
add_common_arguments(parser)
sys.exit(run_command(parser, body, sys.argv[1:]))
"""
    expected = {
        ("-q",): ["theirs-warning"],
        (): ["ours-info", "theirs-warning"],
        ("-v",): ["ours-debug", "ours-info", "theirs-warning"],
        ("-vv",): ["ours-debug", "ours-info", "theirs-info", "theirs-warning"],
    }
    for argv, lines in expected.items():
        done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        shown = [line.rsplit(": ", 1)[-1] for line in done.stderr.splitlines()]
        assert shown == lines, (argv, done.stderr)


@pytest.mark.parametrize("code", [129, 130, 143])
def test_a_stopped_command_ends_after_a_worker_finishes_its_write(tmp_path, code):
    # A stopped command must not skip the teardown that waits for a worker still finishing an atomic write.
    script = """
import sys, threading, time
from pathlib import Path
from flareseg.cli import end_command

def write():
    time.sleep(0.5)
    Path(sys.argv[1]).write_text("whole")

threading.Thread(target=write).start()
end_command(int(sys.argv[2]))
"""
    out = tmp_path / "written.txt"
    done = subprocess.run([sys.executable, "-c", script, str(out), str(code)], capture_output=True, timeout=60)
    assert done.returncode == code and out.read_text() == "whole"


def test_a_command_ended_by_its_stdout_reader_leaving_exits_1_without_a_traceback(monkeypatch, capsys):
    import argparse

    from flareseg import cli
    from flareseg.cli import add_common_arguments, run_command

    parser = argparse.ArgumentParser(prog="demo")
    add_common_arguments(parser)
    monkeypatch.setattr(cli, "_stdout_gone", lambda: True)

    def body(args):
        raise BrokenPipeError(32, "Broken pipe")

    assert run_command(parser, body, []) == 1  # its work was not finished: not 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (a device whose writes fail)")
def test_a_stdout_that_refuses_writes_is_said_once_and_the_work_goes_on_to_exit_2(tmp_path):
    # A log file on a full disk: each case's line raised, and flare-infer's run ended in a traceback after one case.
    script = (
        "import argparse, pathlib, sys\n"
        "from flareseg.cli import add_common_arguments, run_command, say\n"
        "parser = argparse.ArgumentParser(prog='demo')\n"
        "add_common_arguments(parser)\n"
        "def body(args):\n"
        "    for i in range(3):\n"
        "        say(f'case {i} done')\n"
        "    pathlib.Path(sys.argv[1]).write_text('all cases')\n"
        "    return 0\n"
        "sys.exit(run_command(parser, body, []))\n"
    )
    out = tmp_path / "work.txt"
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", script, str(out)], stdout=full, stderr=subprocess.PIPE, timeout=60)
    said = done.stderr.decode().splitlines()
    assert done.returncode == 2 and out.read_text() == "all cases"
    lost = "stdout: cannot write (No space left on device): its lines are lost from here on, the work goes on"
    assert said == [f"ERROR flareseg.cli: {lost}"]


class _RefusingStdout:
    """A stdout whose first write fails (a full disk) and whose later ones succeed where it has a descriptor (room
    was made) and fail where it has none: it drives say()'s handling, it is no terminal."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd, self.failed = fd, False

    def write(self, text: str) -> int:
        if not self.failed or self.fd is None:
            self.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(self.fd, text.encode())

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        if self.fd is None:
            raise ValueError("no descriptor")
        return self.fd


def _say_three_lines(monkeypatch, stdout) -> int:
    import argparse

    from flareseg.cli import add_common_arguments, run_command, say

    parser = argparse.ArgumentParser(prog="demo")
    add_common_arguments(parser)

    def body(args) -> int:
        for i in range(3):
            say(f"case {i} done")
        return 0

    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", stdout)
        return run_command(parser, body, [])


def test_a_lost_stdout_is_said_once_its_later_lines_go_nowhere_and_the_next_command_is_not_marked(
    monkeypatch, tmp_path, caplog, capsys
):
    # mutF review: /dev/full cannot tell these apart, since its writes fail every time.
    with caplog.at_level(logging.ERROR, logger="flareseg.cli"):
        assert _say_three_lines(monkeypatch, _RefusingStdout()) == 2  # no descriptor to send to /dev/null
    assert sum("stdout: cannot write" in r.getMessage() for r in caplog.records if r.name == "flareseg.cli") == 1
    log = tmp_path / "log.txt"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT)
    try:
        assert _say_three_lines(monkeypatch, _RefusingStdout(fd)) == 2
    finally:
        os.close(fd)
    assert log.read_text() == ""  # not 'case 1 done' and 'case 2 done' after a lost 'case 0 done'
    capsys.readouterr()
    assert _say_three_lines(monkeypatch, sys.stdout) == 0  # a writable stdout again: this command lost nothing
    assert capsys.readouterr().out.splitlines() == ["case 0 done", "case 1 done", "case 2 done"]


def test_every_command_writes_its_results_through_say():
    # say() keeps a command going when its stdout's reader leaves or its stdout refuses writes; a bare print() to
    # stdout ended flare-export and flare-bench in a traceback on a full disk (diff review).
    import ast

    import flareseg

    package = Path(flareseg.__file__).parent
    bare = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                if not any(k.arg == "file" for k in node.keywords):
                    bare.append(f"{path.relative_to(package)}:{node.lineno}")
    assert bare == []  # say()'s own `(write or print)(line)` is the one print to stdout


def test_the_bounds_of_counts_and_numbers_are_inclusive():
    from flareseg.cli import non_negative_float, non_negative_int, positive_int

    assert (positive_int("1"), non_negative_int("0"), non_negative_float("0")) == (1, 0, 0.0)
