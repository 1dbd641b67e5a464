"""MultiHeadAttention with a KV cache as GroupQueryAttention, for families without rotary (GPT-2, OPT, ...).

onnxscript forms GroupQueryAttention only around a rotary embedding: absolute-position families get
MultiHeadAttention, whose cache grows by concatenation (every step copies the past into a present one column
longer). GroupQueryAttention with `kv_num_heads = num_heads` computes the same attention, and bound to one
buffer (runtimes/shared_cache.py) it writes each token in place: a gpt2 int8 decode step at batch 1 went from
8.4 to 5.6 ms, at batch 16 from 22.4 to 17.0 ms (past 64, 2 threads).

GroupQueryAttention masks causally up to each row's `seqlens_k` and sees nothing else, so it stands in only for
a MultiHeadAttention whose attention bias is exactly the causal and padding mask. That is checked by running
the bias's subgraph on probe inputs: ALiBi, a sliding window or anything else added there shows as a difference.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from optimizers.pass_types import add_initializer
from runtimes.decoder_lm import positions_of

_PAST_KEY, _PAST_VALUE, _ATTENTION_BIAS = 6, 7, 5  # MultiHeadAttention's input indices
# Probe feeds: (batch rows' attention masks, sequence, past): left and right padding, a prefill and a decode step.
_PROBES = ((np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]), 3, 4),
           (np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]), 5, 0),
           (np.array([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]), 1, 5))


def mha_to_gqa(model: ir.Model) -> int:
    """Replace every MultiHeadAttention with GroupQueryAttention when all of them take a past, no bias, and one
    attention bias that is the causal and padding mask; return how many were replaced (0: the graph as it was)."""
    attention = [n for n in model.graph if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
    if not attention or not all(_replaceable(n) for n in attention):
        return 0
    masks = {n.inputs[_ATTENTION_BIAS] for n in attention}
    if len(masks) != 1 or not _is_causal_padding_mask(model, masks.pop()):
        return 0
    positions = next((v for v in model.graph.inputs if v.name == "position_ids"), None)
    if positions is None:
        return 0
    seqlens, total = _sequence_lengths(model, positions)
    for node in attention:
        _replace(model.graph, node, seqlens, total)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)  # the mask's subgraph, now unread
    return len(attention)


def _replaceable(node: ir.Node) -> bool:
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    has = [value is not None for value in inputs]
    # query, key, value; no packed bias or key padding mask; an attention bias; past key and value.
    return (has[:3] == [True] * 3 and has[3:5] == [False, False] and all(has[5:8]) and len(node.outputs) == 3
            and not node.attributes.get_int("unidirectional", 0))


def _is_causal_padding_mask(model: ir.Model, mask: ir.Value) -> bool:
    """Whether `mask` `[batch, 1, sequence, past + sequence]` is 0 where a query may see a key (the key is not
    padding and not after it) and very negative elsewhere, for every probe; rows of padding queries aside."""
    import onnxruntime as ort

    probe = model.clone()  # shares the weights' data; only the mask's nodes and constants are kept below
    graph = probe.graph
    graph.outputs.clear()
    graph.outputs.append(next(v for n in graph for v in n.outputs if v.name == mask.name))
    onnx_ir.passes.common.RemoveUnusedNodesPass()(probe)
    used = [v for v in graph.inputs if v.uses()]
    graph.inputs.clear()
    graph.inputs.extend(used)
    try:
        session = ort.InferenceSession(ir.to_proto(probe).SerializeToString(), providers=["CPUExecutionProvider"])
        for attention_mask, sequence, past in _PROBES:
            got = session.run(None, _probe_feeds(graph.inputs, attention_mask, sequence, past))[0]
            if not _matches(got, attention_mask, sequence, past):
                return False
    except Exception:  # noqa: BLE001  a subgraph ONNX Runtime cannot run alone is no mask this pass understands
        return False
    return True


def _probe_feeds(inputs, attention_mask: np.ndarray, sequence: int, past: int) -> dict[str, np.ndarray]:
    batch, total = attention_mask.shape
    positions = positions_of(attention_mask)[:, past:]
    feeds = {}
    for value in inputs:
        if value.name == "attention_mask":
            feeds[value.name] = attention_mask.astype(np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = positions
        elif value.name == "input_ids":
            feeds[value.name] = np.ones((batch, sequence), np.int64)
        else:  # a cache input, read for its length: [batch, heads, past, dim]
            dims = [batch if i == 0 else past if i == 2 else (d if isinstance(d, int) else 1)
                    for i, d in enumerate(value.shape)]
            feeds[value.name] = np.zeros(dims, value.dtype.numpy())
    return feeds


def _matches(got: np.ndarray, attention_mask: np.ndarray, sequence: int, past: int) -> bool:
    batch, total = attention_mask.shape
    if got.shape != (batch, 1, sequence, total):
        return False
    keys, queries = np.arange(total), past + np.arange(sequence)
    allowed = (keys[None, None, :] <= queries[None, :, None]) & (attention_mask[:, None, :] == 1)
    real = attention_mask[:, past:] == 1  # [batch, sequence]: the queries that are tokens, not padding
    scores = got[:, 0][real]
    return bool(np.all(scores[allowed[real]] == 0) and np.all(scores[~allowed[real]] <= -1e4))


def _sequence_lengths(model: ir.Model, positions: ir.Value) -> tuple[ir.Value, ir.Value]:
    """GroupQueryAttention's `seqlens_k` (each row's last position, int32) and `total_sequence_length`, from
    `position_ids` as onnxscript's own GroupQueryAttention rule derives them: the cache layout is SLOT."""
    axis_1 = add_initializer(model, "gqa_axis_1", np.array([1], np.int64))
    axis_0 = add_initializer(model, "gqa_axis_0", np.array([0], np.int64))
    one = add_initializer(model, "gqa_one", np.array(1, np.int32))
    last = ir.node("ReduceMax", [positions, axis_1], {"keepdims": 0})
    seqlens = ir.node("Cast", [last.outputs[0]], {"to": ir.DataType.INT32})
    longest = ir.node("ReduceMax", [seqlens.outputs[0], axis_0], {"keepdims": 0})
    total = ir.node("Add", [longest.outputs[0], one])
    for node, name in ((last, "gqa_last_position"), (seqlens, "gqa_seqlens_k"), (longest, "gqa_longest"),
                       (total, "gqa_total_sequence_length")):
        node.name = node.outputs[0].name = name
    model.graph.insert_before(next(iter(model.graph)), [last, seqlens, longest, total])
    return seqlens.outputs[0], total.outputs[0]


def _replace(graph: ir.Graph, node: ir.Node, seqlens: ir.Value, total: ir.Value) -> None:
    heads = node.attributes.get_int("num_heads")
    attributes = {"num_heads": heads, "kv_num_heads": heads}
    if "scale" in node.attributes:
        attributes["scale"] = node.attributes.get_float("scale")
    query, key, value = node.inputs[:3]
    packed = _split_source(query, key, value)
    inputs = [packed, None, None] if packed is not None else [query, key, value]
    grouped = ir.node("GroupQueryAttention", [*inputs, node.inputs[_PAST_KEY], node.inputs[_PAST_VALUE], seqlens, total],
                      attributes, domain="com.microsoft", num_outputs=3, name=f"{node.name}_GroupQueryAttention")
    graph.insert_after(node, [grouped])
    for old, new in zip(node.outputs, grouped.outputs):
        name, old.name = old.name, f"{old.name}_replaced"
        new.name, new.type, new.shape = name, old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _split_source(query: ir.Value, key: ir.Value, value: ir.Value) -> ir.Value | None:
    """X when query, key and value are the three equal parts of Split(X) on the last axis (GPT-2's packed
    projection): GroupQueryAttention then takes X as it is, its packed-QKV form."""
    split = query.producer()
    if split is None or split.op_type != "Split" or split.domain != "" or list(split.outputs) != [query, key, value]:
        return None
    whole = split.inputs[0]
    if whole.shape is None or split.attributes.get_int("axis", 0) not in (-1, len(whole.shape) - 1):
        return None
    sizes = split.inputs[1] if len(split.inputs) > 1 else None
    if sizes is not None and (sizes.const_value is None or len(set(sizes.const_value.numpy().tolist())) != 1):
        return None
    return whole
