"""Graph cleanup before fusion and quantization: constant folding, dead code, shape simplification."""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import onnx_ir as ir

from optimizers.pass_types import Pass, PassContext, add_initializer


def cleanup(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """onnxscript's optimizer (constant folding, dead-code and identity elimination, inlining), then
    its shape-expression simplification rules, then the optimizer again on what they exposed."""
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions import shape_optimization

    before = sum(1 for _ in model.graph.all_nodes())
    with single_output_rewrites():
        optimize(model)
        simplified = shape_optimization.rules.apply_to_model(model)
        optimize(model)
    after = sum(1 for _ in model.graph.all_nodes())
    return model, {"nodes_removed": before - after, "shape_rewrites": simplified}


@contextlib.contextmanager
def single_output_rewrites():
    """onnxscript's optimizer without its multi-output rewrite rules, for as long as the block runs.

    onnxscript 0.7 matches a pattern with several output nodes (`SlicesSplit`: two Slices of one tensor ->
    Split) by scanning the whole graph once per candidate node, quadratic in the graph's size: on a 30-layer
    Llama (two rotary Slices per head input) that scan took over half of the export. The fusions that follow
    match the Slice form as well, so the rule buys nothing here.
    """
    from onnxscript import rewriter

    rules = rewriter._DEFAULT_REWRITE_RULES  # the tuple `optimize` reads at each call; it has no rules argument
    rewriter._DEFAULT_REWRITE_RULES = tuple(
        rule for rule in rules if getattr(getattr(rule, "_target_pattern", None), "has_single_output_node", True))
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def drop_unread_outputs(model: ir.Model) -> int:
    """Unname the optional outputs that nothing reads (a fused SkipSimplifiedLayerNormalization's mean and
    inverse deviation); returns how many. ONNX Runtime allocates and writes every named output: in a
    SmolLM-135M-shaped engine's batch-1 decode step its 60 fused norms took 762 us with them, 594 us without."""
    optional = _optional_outputs()
    dropped = 0
    for node in model.graph.all_nodes():
        for value, is_optional in zip(node.outputs, optional.get((node.domain or "", node.op_type), ())):
            if is_optional and value.name and not value.uses() and not value.is_graph_output():
                value.name = ""  # an empty name is an absent optional output
                dropped += 1
    return dropped


@functools.cache
def _optional_outputs() -> dict[tuple[str, str], tuple[bool, ...]]:
    """(domain, op type) -> whether each output is optional in every version ONNX Runtime registers (its own
    contrib ops included, which onnx's schemas lack); empty where this build does not list its schemas."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    listing = getattr(ort_state, "get_all_operator_schema", None)
    if listing is None:
        return {}
    optional_kind = ort_state.schemadef.OpSchema.FormalParameterOption.Optional
    flags: dict[tuple[str, str], tuple[bool, ...]] = {}
    for schema in listing():
        these = tuple(output.option == optional_kind for output in schema.outputs)
        known = flags.get((schema.domain, schema.name), these)
        flags[(schema.domain, schema.name)] = tuple(a and b for a, b in zip(known, these))
    return flags


CLEANUP = Pass("cleanup", cleanup, "constant folding, dead code, shape-expression simplification (onnxscript)")


def fold_weight_transposes(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """Store transposed weights as initializers: MatMul(x, Transpose(W)) -> MatMul(x, W'), Gemm transB=1 -> 0.

    The quantizers only take MatMuls whose weight is a constant initializer, and constant folding leaves
    large transposes alone (size limit). A tied LM head keeps its embedding too: the head gets its own copy
    (and an embedding gathered from a transposed head, as tied_head_layout leaves it, gets its own).
    """
    folded = 0
    transposed: dict[str, ir.Value] = {}

    def transposed_initializer(weight: ir.Value) -> ir.Value:
        if weight.name not in transposed:
            array = np.ascontiguousarray(weight.const_value.numpy().T)
            if isinstance(weight.const_value, ir.ExternalTensor):
                weight.const_value.release()  # unmaps the source's pages; the save reads them again
            transposed[weight.name] = add_initializer(model, f"{weight.name}.transposed", array)
        return transposed[weight.name]

    for node in list(model.graph.all_nodes()):
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx"):
            # An embedding gathered from Transpose(E'), as tied_head_layout leaves it: the table gets its copy,
            # so that the quantizers find it.
            table = _transposed_initializer_under(node.inputs[0])
            if table is not None:
                node.replace_input_with(0, transposed_initializer(table))
                folded += 1
            continue
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1 and _is_2d_initializer(weight):
            node.replace_input_with(1, transposed_initializer(weight))
            node.attributes["transB"] = ir.AttrInt64("transB", 0)
            folded += 1
            continue
        source = _transposed_initializer_under(weight)
        if source is not None:
            node.replace_input_with(1, transposed_initializer(source))
            folded += 1
    if folded:
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return model, {"weights_folded": folded}


FOLD_WEIGHT_TRANSPOSES = Pass("fold_weight_transposes", fold_weight_transposes, "transposed weights stored as initializers")


def tied_head_layout(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """A tied LM head stored in its MatMul's layout: MatMul(x, Transpose(E)), with E [vocab, hidden] the token
    embedding that a Gather also reads, becomes MatMul(x, E') with E' = E^T stored, and the Gather reads
    Transpose(E').

    ONNX Runtime's CPU MatMul prepacks a constant [K, N] weight once; MatMul(x, Transpose(E)) runs as FusedMatMul
    with transB, which it does not prepack: the fp32 head of a SmolLM-135M-shaped model took 3.37 ms of a 24 ms
    decode step as FusedMatMul, about 2.1 ms as a MatMul. ONNX Runtime folds the Transpose left on the
    embedding's side at load, once, into memory (as onnxruntime-genai's builder has its engines do), so the
    file still holds one copy of the table. The quantizing recipes have fold_weight_transposes instead: their
    head gets blocks of its own and the embedding shares or quantizes them (optimizers/quantize.py).
    """
    tables = []
    for node in list(model.graph.all_nodes()):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        table = _transposed_initializer_under(node.inputs[1])
        if table is None:
            continue
        producer = node.inputs[1].producer()
        if not any(user.op_type == "Gather" for user, _ in table.uses()):
            continue  # not an embedding: fold_weight_transposes' case
        head = add_initializer(model, f"{table.name}.transposed", np.ascontiguousarray(table.const_value.numpy().T))
        node.replace_input_with(1, head)
        embedding = ir.node("Transpose", [head], {"perm": [1, 0]}, name=f"{table.name}.embedding")
        model.graph.insert_before(next(iter(model.graph)), embedding)  # ahead of the Gather, early in the graph
        for user, index in list(table.uses()):
            if user is not producer:
                user.replace_input_with(index, embedding.outputs[0])
        tables.append(table)
    if tables:
        ir.passes.common.RemoveUnusedNodesPass()(model)  # the old Transposes
        for table in tables:
            if not table.uses() and table.name in model.graph.initializers:
                del model.graph.initializers[table.name]  # the table's one copy is now the head's
    return model, {"heads_moved": len(tables)}


TIED_HEAD_LAYOUT = Pass("tied_head_layout", tied_head_layout,
                        "tied LM head stored as its MatMul's weight; the embedding reads its transpose")


def _is_2d_initializer(value: ir.Value | None) -> bool:
    return (
        value is not None and value.is_initializer() and value.const_value is not None
        and len(value.const_value.shape) == 2
    )


def _transposed_initializer_under(value: ir.Value | None) -> ir.Value | None:
    """The 2-D initializer W when `value` is Transpose(W) with perm [1, 0], else None."""
    producer = value.producer() if value is not None else None
    if (producer is not None and producer.op_type == "Transpose"
            and list(producer.attributes.get_ints("perm", [1, 0])) == [1, 0] and _is_2d_initializer(producer.inputs[0])):
        return producer.inputs[0]
    return None
