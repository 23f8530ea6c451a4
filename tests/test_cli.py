"""What every command shares: argument errors are one line naming the argument, with exit code 2."""

from __future__ import annotations

import pytest

from flareseg.bench.cli import main as bench_main
from flareseg.evaluate import main as eval_main
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
