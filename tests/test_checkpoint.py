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


def _tiny():
    from flareseg.checkpoint import ModelInfo
    from flareseg.network import NetworkConfig, build_training_network
    from flareseg.preprocess import NormalizationStats

    net = build_training_network(NetworkConfig(base_width=4))
    return net, ModelInfo(network=net.config, normalization=NormalizationStats(mean=0.0, std=1.0), slice_size=(32, 32))


def test_a_checkpoint_of_another_format_version_is_refused_naming_both(tmp_path):
    import pytest
    import torch

    from flareseg.checkpoint import FORMAT_VERSION, read_checkpoint, save_checkpoint
    from flareseg.errors import FlareSegError

    save_checkpoint(tmp_path / "now.pt", *_tiny())
    payload = torch.load(tmp_path / "now.pt", weights_only=True)
    assert read_checkpoint(tmp_path / "now.pt")["format_version"] == FORMAT_VERSION
    torch.save({**payload, "format_version": FORMAT_VERSION + 1}, tmp_path / "later.pt")
    with pytest.raises(FlareSegError) as err:
        read_checkpoint(tmp_path / "later.pt")
    assert str(err.value) == (
        f"{tmp_path / 'later.pt'}: checkpoint format version {FORMAT_VERSION + 1}, this flareseg reads {FORMAT_VERSION}"
    )


def test_extra_keys_cannot_replace_the_format_s_own_and_nothing_is_written(tmp_path):
    import pytest

    from flareseg.checkpoint import read_checkpoint, save_checkpoint
    from flareseg.errors import FlareSegError

    for key in ("state_dict", "normalization"):
        with pytest.raises(FlareSegError, match=rf"extra keys \['{key}'\] clash with the format's own keys"):
            save_checkpoint(tmp_path / "x.pt", *_tiny(), extra={key: 1})
        assert not (tmp_path / "x.pt").exists()
    save_checkpoint(tmp_path / "x.pt", *_tiny(), extra={"epoch": 3})
    assert read_checkpoint(tmp_path / "x.pt")["epoch"] == 3


def test_a_slice_size_must_be_positive_multiples_of_sixteen():
    import pytest

    from flareseg.errors import FlareSegError
    from flareseg.shapes import check_slice_size

    assert check_slice_size((512, 384)) == (512, 384)
    for size in ((0, 0), (-16, 16), (520, 512), (512, 520)):  # each axis checked
        with pytest.raises(FlareSegError, match=r"must be positive multiples of 16"):
            check_slice_size(size)
    for size in ((64.0, 64), ("64", 64), (64,)):  # integers only, and two of them
        with pytest.raises(FlareSegError, match=r"^slice size .*: expected two integers, height and width$"):
            check_slice_size(size)


def test_a_checkpoint_without_weights_or_with_malformed_model_information_is_refused_in_one_line(tmp_path):
    import pytest
    import torch

    from flareseg.checkpoint import ModelInfo, read_checkpoint, save_checkpoint
    from flareseg.errors import FlareSegError

    save_checkpoint(tmp_path / "whole.pt", *_tiny())
    payload = torch.load(tmp_path / "whole.pt", weights_only=True)
    torch.save({k: v for k, v in payload.items() if k != "state_dict"}, tmp_path / "empty.pt")
    with pytest.raises(FlareSegError, match=r"empty.pt: checkpoint has no weights$"):
        read_checkpoint(tmp_path / "empty.pt")
    info = _tiny()[1].to_dict()
    with pytest.raises(FlareSegError, match=r"^m.pt: malformed model information \(invalid literal for int"):
        ModelInfo.from_dict({**info, "slice_size": ["tall", 64]}, source="m.pt")
