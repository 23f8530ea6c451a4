"""Checkpoints as files: what a full disk does to a save."""

from __future__ import annotations

import subprocess
import sys

SAVE_ON_A_FULL_DISK = """
import resource, signal, sys
from flareseg.checkpoint import ModelInfo, save_checkpoint
from flareseg.errors import FlareSegError
from flareseg.network import NetworkConfig, build_training_network
from flareseg.preprocess import NormalizationStats

net = build_training_network(NetworkConfig(base_width=4))
info = ModelInfo(network=net.config, normalization=NormalizationStats(mean=0.0, std=1.0), slice_size=(32, 32))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
try:
    save_checkpoint(sys.argv[1], net, info)
except FlareSegError as exc:
    print("FlareSegError:", exc)
"""


def test_a_save_that_runs_out_of_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    # torch.save reported it as an internal RuntimeError ("unexpected pos ..."), a traceback.
    target = tmp_path / "last.pt"
    run = subprocess.run([sys.executable, "-c", SAVE_ON_A_FULL_DISK, str(target)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (line,) = run.stdout.splitlines()
    assert line.startswith(f"FlareSegError: {target}: ") and "File too large" in line
    assert list(tmp_path.iterdir()) == []
