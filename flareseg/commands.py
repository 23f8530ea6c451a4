"""The installed commands (``flare-infer`` and the others): each imports its module inside a guard.

A command's module pulls in torch, scipy or nibabel, seconds of imports before its own
Ctrl-C handling starts: an interrupt there would end in a traceback and death by signal.
Here it is the same one line and exit code 130 as once the command runs.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

from flareseg.cli import INTERRUPTED
from flareseg.errors import interrupts_kept


def _run(prog: str, module: str, function: str = "main") -> NoReturn:
    try:
        with interrupts_kept(ImportError):  # torch reports an interrupt in its set-up as an ImportError
            command = getattr(importlib.import_module(module), function)
        code = command()
    except KeyboardInterrupt:  # during the imports, or before the command's own handling (its parser's imports)
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    sys.exit(code)


def flare_infer() -> NoReturn:
    _run("flare-infer", "flareseg.runtime.cli", "entry")


def flare_train() -> NoReturn:
    _run("flare-train", "flareseg.train.cli")


def flare_export() -> NoReturn:
    _run("flare-export", "flareseg.export.cli", "entry")


def flare_eval() -> NoReturn:
    _run("flare-eval", "flareseg.evaluate.cli")


def flare_bench() -> NoReturn:
    _run("flare-bench", "flareseg.bench.cli")
