"""fp32 -> fp16 ONNX conversion that keeps float32 inputs and outputs.

The deploy graph uses a handful of operators (Conv, ConvTranspose, Relu, MaxPool, Concat,
Resize, Shape, ArgMax, Cast), so the conversion is explicit rather than generic: every
float32 weight becomes float16, except the ``roi`` and ``scales`` inputs of Resize, which
the ONNX specification requires to stay float32. A Cast after each float32 input and
before each float32 output keeps the model's interface unchanged for callers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flareseg.errors import FlareSegError

_KEEP_FLOAT32_INPUTS = {"Resize": (1, 2)}  # roi, scales


def _float32_only_names(graph: onnx.GraphProto) -> set[str]:
    keep = set()
    for node in graph.node:
        for idx in _KEEP_FLOAT32_INPUTS.get(node.op_type, ()):
            if idx < len(node.input) and node.input[idx]:
                keep.add(node.input[idx])
    return keep


def _rename(graph: onnx.GraphProto, name: str, side: str) -> str:
    """Point every node's ``side`` ("input" or "output") named ``name`` at ``name__fp16``; return that name."""
    half = f"{name}__fp16"
    for node in graph.node:
        names = node.input if side == "input" else node.output
        for i, n in enumerate(names):
            if n == name:
                names[i] = half
    return half


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp16 copy of ``model`` with the same float32 inputs and outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    if any(n.op_type not in _SUPPORTED for n in graph.node):
        unknown = sorted({n.op_type for n in graph.node} - _SUPPORTED)
        raise FlareSegError(f"fp16 conversion does not know operators {unknown}")
    keep = _float32_only_names(graph)
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT and node.output[0] not in keep:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT and node.output[0] not in keep:
                    attr.i = TensorProto.FLOAT16
    # Cast float32 graph inputs to fp16 on entry, fp16 outputs back to float32 on exit.
    new_nodes = [
        helper.make_node("Cast", [inp.name], [_rename(graph, inp.name, "input")], to=TensorProto.FLOAT16)
        for inp in graph.input
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT
    ]
    tail = [
        helper.make_node("Cast", [_rename(graph, out.name, "output")], [out.name], to=TensorProto.FLOAT)
        for out in graph.output
        if out.type.tensor_type.elem_type == TensorProto.FLOAT
    ]
    nodes = [*new_nodes, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale float32 annotations; re-inferred below
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


_SUPPORTED = {"Conv", "ConvTranspose", "Relu", "MaxPool", "Concat", "Resize", "Shape", "ArgMax", "Cast", "Constant"}
