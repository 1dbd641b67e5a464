"""One MatMul for query, key and value: GroupQueryAttention's packed-QKV input.

onnxscript's `fuse_qkv_gqa` packs only a graph that already projects with one MatMul and splits it;
transformers projects q, k and v separately, so each GroupQueryAttention gets three MatMuls (and three bias
Adds, Qwen2) over one input. Joining their weights column-wise gives one MatMul (one MatMulNBits after int4)
and hands GQA the packed [batch, sequence, (heads + 2 kv_heads) * head_dim] activations, key and value
omitted, which the op splits itself.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optimizers.pass_types import add_initializer


def pack_qkv(model: ir.Model) -> int:
    """Pack the q/k/v projections of every GroupQueryAttention where they are plain MatMuls (+ constant bias)
    of one input with constant 2-D weights; returns how many were packed."""
    packed = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "GroupQueryAttention" or len(node.inputs) < 3:
            continue
        projections = [_projection(value) for value in node.inputs[:3]]
        if any(p is None for p in projections) or len({id(p[0]) for p in projections}) != 1:
            continue
        biases = [p[2] for p in projections]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            continue
        source = projections[0][0]
        name = f"{node.name or 'gqa'}_qkv"
        weight = add_initializer(model, f"{name}_weight",
                                 np.concatenate([p[1].const_value.numpy() for p in projections], axis=1))
        matmul = ir.node("MatMul", [source, weight], name=f"{name}_MatMul")
        steps = [matmul]
        if biases[0] is not None:
            bias = add_initializer(model, f"{name}_bias", np.concatenate([b.const_value.numpy() for b in biases]))
            steps.append(ir.node("Add", [matmul.outputs[0], bias], name=f"{name}_Add"))
        model.graph.insert_before(node, steps)
        node.replace_input_with(0, steps[-1].outputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        for projection in projections:
            _remove_unused(model, projection[3])
        packed += 1
    return packed


def _projection(value: ir.Value | None):
    """(input, weight, bias or None, nodes) when `value` is MatMul(input, constant [K, N]) [+ constant [N]] used
    only here; else None."""
    if value is None or len(value.uses()) != 1:
        return None
    node, bias, nodes = value.producer(), None, []
    if node is not None and node.op_type == "Add" and node.domain == "":
        constant = [i for i in node.inputs if i is not None and i.const_value is not None]
        computed = [i for i in node.inputs if i is not None and i.const_value is None]
        if len(constant) != 1 or len(computed) != 1 or len(constant[0].shape or ()) != 1 or len(computed[0].uses()) != 1:
            return None
        bias, nodes, node = constant[0], [node], computed[0].producer()
    if node is None or node.op_type != "MatMul" or node.domain != "":
        return None
    source, weight = node.inputs
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    return source, weight, bias, [*nodes, node]


def _remove_unused(model: ir.Model, nodes: list[ir.Node]) -> None:
    """Drop `nodes` (consumers first) and the initializers only they read."""
    for node in nodes:
        inputs = [i for i in node.inputs if i is not None]
        model.graph.remove(node, safe=True)
        for value in inputs:
            if value.is_initializer() and not value.uses() and value.name in model.graph.initializers:
                del model.graph.initializers[value.name]
