"""Export metadata read back: from the ONNX file itself and from its sidecar, refused in one line when damaged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from flareseg.checkpoint import ModelInfo
from flareseg.errors import FlareSegError
from flareseg.export.metadata import (
    METADATA_KEY,
    ExportMetadata,
    check_graph_input,
    read_onnx_metadata,
    read_sidecar,
    sidecar_path,
)
from flareseg.network import NetworkConfig
from flareseg.preprocess import NormalizationStats


def _metadata() -> ExportMetadata:
    info = ModelInfo(NetworkConfig(base_width=4), NormalizationStats(mean=-300.0, std=450.0), (64, 64))
    return ExportMetadata(
        model=info,
        input_channels=1,
        output_kind="logits",
        label_dtype=None,
        precision="fp32",
        batch_profile=(1, 2, 4),
        source_checkpoint_sha256="0" * 64,
    )


def _onnx_with(tmp_path: Path, text: str) -> Path:
    """A one-node ONNX model whose flareseg metadata entry holds ``text``."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    helper.set_model_props(model, {METADATA_KEY: text})
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def test_metadata_round_trips_through_the_onnx_file_and_damage_is_one_line(tmp_path):
    meta = _metadata()
    assert read_onnx_metadata(_onnx_with(tmp_path, meta.to_json())) == meta
    path = _onnx_with(tmp_path, meta.to_json()[:-5])  # cut short
    with pytest.raises(FlareSegError, match=r"m.onnx: corrupt flareseg metadata \("):
        read_onnx_metadata(path)
    path = _onnx_with(tmp_path, json.dumps({**meta.to_dict(), "format": "another-tool"}))
    with pytest.raises(FlareSegError, match=r"m.onnx: no flareseg export metadata$"):
        read_onnx_metadata(path)
    lacking = meta.to_dict()
    del lacking["precision"]
    with pytest.raises(FlareSegError, match=r"m.onnx: export metadata lacks 'precision'$"):
        read_onnx_metadata(_onnx_with(tmp_path, json.dumps(lacking)))


def test_a_sidecar_that_is_not_a_json_object_is_refused_naming_it(tmp_path):
    model = tmp_path / "m.onnx"
    sidecar_path(model).write_text(json.dumps(_metadata().to_dict()))
    assert read_sidecar(model)["precision"] == "fp32"
    sidecar_path(model).write_text("[1, 2]")
    with pytest.raises(FlareSegError, match=r"m\.onnx\.json: sidecar is not a JSON object$"):
        read_sidecar(model)


def test_the_graph_input_is_checked_height_first_and_of_rank_four():
    # mutF review: only square models were checked, so swapped axes went unseen; and a 5-D input whose first four
    # axes agree ended in zip's ValueError where the rank check was missing.
    meta = dataclasses.replace(_metadata(), model=dataclasses.replace(_metadata().model, slice_size=(64, 96)))
    check_graph_input("m.onnx", meta, [None, 1, 64, 96])  # its own input: accepted
    with pytest.raises(FlareSegError, match=r"m.onnx: the graph takes N x 1 x 96 x 64 input, .* says N x 1 x 64 x 96"):
        check_graph_input("m.onnx", meta, [None, 1, 96, 64])
    with pytest.raises(FlareSegError, match=r"m.onnx: the graph takes N x 1 x 64 x 96 x 1 input"):
        check_graph_input("m.onnx", meta, [None, 1, 64, 96, 1])
