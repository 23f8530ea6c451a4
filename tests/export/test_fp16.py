"""The fp16 conversion on a graph of every operator it knows, in ONNX Runtime against the fp32 graph.

The deploy network's own graph holds no Constant, no Cast to float and no Resize, so the export tests do not
reach those branches: this graph does.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from flareseg.errors import FlareSegError
from flareseg.export.fp16 import convert_to_fp16


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _graph(extra: list[onnx.NodeProto] = ()) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.5, (2, 1, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["x"], ["x_cast"], to=TensorProto.FLOAT),  # float to float: fp16 inside
        _constant("w", weight),
        helper.make_node("Conv", ["x_cast", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        _constant("roi", np.zeros(0, np.float32)),  # Resize's roi and scales must stay float32 (ONNX spec)
        _constant("scales", np.array([1, 1, 2, 2], np.float32)),
        helper.make_node("Resize", ["relu", "roi", "scales"], ["y"], mode="nearest"),
        *extra,
    ]
    graph = helper.make_graph(
        nodes,
        "fp16-operators",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 12, 12])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_every_known_operator_is_converted_and_the_interface_stays_float32():
    fp32 = _graph()
    half = convert_to_fp16(fp32)
    constants = {n.output[0]: n.attribute[0].t.data_type for n in half.graph.node if n.op_type == "Constant"}
    assert constants == {"w": TensorProto.FLOAT16, "roi": TensorProto.FLOAT, "scales": TensorProto.FLOAT}
    inner_cast = next(n for n in half.graph.node if n.op_type == "Cast" and n.output[0] == "x_cast")
    assert inner_cast.attribute[0].i == TensorProto.FLOAT16
    elem = [v.type.tensor_type.elem_type for v in (*half.graph.input, *half.graph.output)]
    assert elem == [TensorProto.FLOAT, TensorProto.FLOAT]
    x = np.random.default_rng(1).normal(0, 1, (1, 1, 6, 6)).astype(np.float32)
    want, got = _run(fp32, x), _run(half, x)
    assert got.dtype == np.float32 and got.shape == want.shape == (1, 2, 12, 12)
    assert np.abs(got - want).max() <= 1e-2 * max(1.0, float(np.abs(want).max()))  # fp16 rounding, no more
    assert fp32.graph.node[1].attribute[0].t.data_type == TensorProto.FLOAT  # the fp32 model is left as it was


def test_an_operator_it_does_not_know_is_refused_by_name():
    extra = [helper.make_node("Sigmoid", ["y"], ["unused"])]
    with pytest.raises(FlareSegError, match=r"^fp16 conversion does not know operators \['Sigmoid'\]$"):
        convert_to_fp16(_graph(extra))
