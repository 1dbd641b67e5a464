"""`logits_to_keep`: an optional input that lets a prefill run the LM head on its last positions only.

Generation reads the last position's logits; a 32-token prefill of a 49k-vocabulary model otherwise spends
about a fifth of its time on logits it throws away. The input is an initializer (default 0: every position,
transformers' meaning of `logits_to_keep=0`), so the IO contract is unchanged: Optimum and onnxruntime-genai
never feed it and get all logits; kiln's decode loop feeds it (the manifest records `logits_to_keep`).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optimizers.pass_types import Pass, PassContext, add_initializer

INPUT = "logits_to_keep"
# Ops between the LM head and `logits` that act on each position alone (soft-capping, a dtype cast).
_PER_POSITION = {"Div", "Mul", "Tanh", "Add", "Sub", "Cast"}
_HEADS = {"MatMul", "Gemm", "FusedMatMul"}


def logits_to_keep(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
    head = _lm_head(logits)
    if head is None:
        return model, {"applied": False, "why": "no MatMul found behind 'logits' through per-position ops"}
    keep = ir.Value(name=INPUT, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64))
    keep.const_value = ir.tensor(np.array(0, np.int64), name=INPUT)
    model.graph.inputs.append(keep)
    model.graph.register_initializer(keep)
    # Slice(hidden, starts=[-keep], ends=[max], axes=[1]): keep 0 slices from 0, every position.
    negative = ir.node("Neg", [keep], name="logits_to_keep_Neg")
    starts = ir.node("Reshape", [negative.outputs[0], add_initializer(model, "logits_to_keep_shape", np.array([1]))],
                     name="logits_to_keep_Reshape")
    ends = add_initializer(model, "logits_to_keep_ends", np.array([np.iinfo(np.int64).max]))
    axes = add_initializer(model, "logits_to_keep_axes", np.array([1]))
    sliced = ir.node("Slice", [head.inputs[0], starts.outputs[0], ends, axes], name="logits_to_keep_Slice")
    model.graph.insert_before(head, [negative, starts, sliced])
    head.replace_input_with(0, sliced.outputs[0])
    return model, {"applied": True, "lm_head": head.name, "manifest": {"logits_to_keep": True}}


def _lm_head(value: ir.Value | None) -> ir.Node | None:
    """The MatMul that makes `value` (logits), through ops that act on each position alone; None if another op
    is in the way."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in _PER_POSITION and node.domain == "":
        computed = [i for i in node.inputs if i is not None and i.const_value is None]
        if len(computed) != 1:
            return None
        node = computed[0].producer()
    if node is None or node.op_type not in _HEADS or node.inputs[0] is None:
        return None
    hidden = node.inputs[0]
    return node if hidden.shape is None or len(hidden.shape) == 3 else None


LOGITS_TO_KEEP = Pass(
    "logits_to_keep", logits_to_keep,
    "an optional input (default: all positions) that lets a prefill compute only its last positions' logits",
)
