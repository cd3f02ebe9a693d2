"""Rewrite the graphs' InstanceNormalization nodes so onnxruntime normalises as accurately as torch.

Both exporters emit GroupNorm as Reshape -> InstanceNormalization -> Reshape -> affine, and
onnxruntime's InstanceNormalization loses precision when a group's mean is large against its
spread (its statistics are float32 sums over up to ~400k values): on first_radio.yaml at
320x320, synthetic radio maps (flat building and far-field regions) came out 1.3e-4..3e-4 from
torch, whose own fp32 error against float64 is 1.3e-5. Each node is replaced by the same
function with its statistics computed in float64. It costs onnxruntime on CPU about 2.5x the
InstanceNormalization time (see docs/export.md for the effect on a whole encode/decode).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_AXES, _COLUMN = "precise_norm/axes", "precise_norm/column_shape"


class PreciseNormError(ValueError):
    """An InstanceNormalization node has an input this rewrite does not handle."""


def _input_types(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(rank, element type) of every value shape inference can see."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input)
    return {v.name: (len(v.type.tensor_type.shape.dim), v.type.tensor_type.elem_type)
            for v in values if v.type.tensor_type.HasField("shape")}


def _reduce_mean(x: str, out: str, opset: int) -> onnx.NodeProto:
    """Mean over axis 2, keeping it; opset 18 moved `axes` from an attribute to an input."""
    if opset >= 18:
        return helper.make_node("ReduceMean", [x, _AXES], [out], keepdims=1)
    return helper.make_node("ReduceMean", [x], [out], axes=[2], keepdims=1)


def _float64_norm(node: onnx.NodeProto, prefix: str, elem_type: int, eps: str,
                  opset: int) -> list:
    """Statistics in float64 (mean and mean of squares: no cancellation at 53 bits); the
    normalisation in float32 as (x - mean) * (scale / std) + bias, cast back to the input type."""
    x, scale, bias = node.input
    p = f"{prefix}/"
    is_float = elem_type == TensorProto.FLOAT
    x32, y32 = (x, node.output[0]) if is_float else (p + "x32", p + "y32")
    nodes = [] if is_float else [helper.make_node("Cast", [x], [x32], to=TensorProto.FLOAT)]
    nodes += [
        helper.make_node("Cast", [x], [p + "x64"], to=TensorProto.DOUBLE),
        _reduce_mean(p + "x64", p + "mean", opset),
        helper.make_node("Mul", [p + "x64", p + "x64"], [p + "x64_sq"]),
        _reduce_mean(p + "x64_sq", p + "mean_sq", opset),
        helper.make_node("Mul", [p + "mean", p + "mean"], [p + "sq_mean"]),
        helper.make_node("Sub", [p + "mean_sq", p + "sq_mean"], [p + "var"]),
        helper.make_node("Add", [p + "var", eps], [p + "var_eps"]),
        helper.make_node("Sqrt", [p + "var_eps"], [p + "std"]),
        helper.make_node("Cast", [p + "mean"], [p + "mean32"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [p + "std"], [p + "std32"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [scale], [p + "scale32"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [bias], [p + "bias32"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", [p + "scale32", _COLUMN], [p + "scale_col"]),
        helper.make_node("Reshape", [p + "bias32", _COLUMN], [p + "bias_col"]),
        helper.make_node("Div", [p + "scale_col", p + "std32"], [p + "gain"]),
        helper.make_node("Sub", [x32, p + "mean32"], [p + "centred"]),
        helper.make_node("Mul", [p + "centred", p + "gain"], [p + "scaled"]),
        helper.make_node("Add", [p + "scaled", p + "bias_col"], [y32]),
    ]
    if not is_float:
        nodes.append(helper.make_node("Cast", [y32], list(node.output), to=elem_type))
    return nodes


def precise_instance_norms(model: onnx.ModelProto) -> int:
    """Replace every InstanceNormalization (rank-3 input) in place; returns how many."""
    types = _input_types(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes, eps_names, count = [], {}, 0
    for node in model.graph.node:
        if node.op_type != "InstanceNormalization":
            nodes.append(node)
            continue
        rank, elem_type = types.get(node.input[0], (None, None))
        if rank != 3:
            raise PreciseNormError(f"InstanceNormalization {node.name!r}: expected a rank-3 "
                                   f"input [N, groups, L] (as GroupNorm exports), got rank {rank}")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        eps_name = eps_names.setdefault(eps, f"precise_norm/eps_{len(eps_names)}")
        nodes += _float64_norm(node, f"precise_norm_{count}", elem_type, eps_name, opset)
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        axes = [numpy_helper.from_array(np.array([2], np.int64), _AXES)] if opset >= 18 else []
        model.graph.initializer.extend(
            axes + [numpy_helper.from_array(np.array([-1, 1], np.int64), _COLUMN)]
            + [numpy_helper.from_array(np.array(eps, np.float64), name)
               for eps, name in eps_names.items()])
    return count
