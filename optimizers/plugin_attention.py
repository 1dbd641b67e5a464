"""Replace each layer's exported attention with torchkiln's own plugin node, kiln::CausalAttention.

For runtimes that host the plugin (TensorRT, through plugins/tensorrt_plugin.py; the pipeline refuses
the pass on backends that do not). The dynamo export computes attention, in every family, as

    MatMul(q * s1, K' * s2) [* s3] [+ bias]... -> Softmax [-> Where(IsNaN)] [-> Reshape] -> MatMul(., V')

where K' and V' are the layer's `present.N.key` / `present.N.value` outputs, reshaped, expanded over
grouped-query heads or transposed, and the biases are those the family record names (`plugin_biases`: the
causal and padding mask, plus ALiBi for BLOOM).
The walk below finds q, the present key and value and the product of the scalar scales; the plugin then
takes q (viewed as [batch, heads, q_len, head_dim]), the present cache, `attention_mask` as its key mask,
and the family's ALiBi slopes. onnxscript's pattern rewriter is not used: one pattern per family and
layout (4-D SDPA, BLOOM's 3-D baddbmm, GQA expansion) would be longer than this walk.

The pass then checks itself: the graph before and after, on a left-padded batch with a cache, must give
the same logits and cache within `tolerance` (the original through ONNX Runtime, the replaced one through
onnx.reference with the plugin computed by plugins.reference, in Python).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optimizers.pass_types import Pass, PassContext, PassOption, add_initializer, initializer_bytes
from plugins.onnx_node import DOMAIN, OP_TYPE, reference_evaluator
from runtimes.decoder_lm import contract_signature, past_inputs

_CACHE_OUTPUT = re.compile(r"present\.(\d+)\.(key|value)")
_VIEW_OPS = ("Reshape", "Expand", "Unsqueeze", "Transpose")
PARITY_CHECK_MAX_BYTES = 1 << 30


class NoMatch(Exception):
    """This Softmax is not the attention the plugin computes; the message says where the walk stopped."""


def kiln_attention(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    family = context.family
    if family is None:
        # The plugin rebuilds the biases the family's scores carry: without its record they are unknown.
        return model, {"replaced": 0, "skipped": {"*": "no family record: which biases the scores carry is unknown"}}
    if family.plugin_biases is None:
        reason = family.plugin_refusal or f"the plugin cannot replace {family.name}'s attention"
        return model, {"replaced": 0, "skipped": {"*": reason}}
    if context.facts is None:
        raise ValueError("kiln_attention needs the model's head count (PassContext.facts)")
    heads = context.facts.heads
    # The check runs the exported graph from a serialized copy: protobuf's 2 GB limit, and memory, bound it.
    check = context.option("kiln_attention", "check") and initializer_bytes(model) <= PARITY_CHECK_MAX_BYTES
    original = ir.to_proto(model).SerializeToString() if check else None

    caches = {v.name: v for v in model.graph.outputs if v.name and _CACHE_OUTPUT.fullmatch(v.name)}
    inputs = {v.name: v for v in model.graph.inputs}
    shared: dict[str, ir.Value] = {}
    replaced, skipped = 0, {}
    for node in list(model.graph):
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        try:
            match = _match(node, caches)
        except NoMatch as why:
            skipped[node.name or f"Softmax#{len(skipped)}"] = str(why)
            continue
        if not shared:
            shared = _shared_inputs(model, inputs["attention_mask"], heads, alibi=family.positions == "alibi")
        _replace(model, match, heads, shared)
        replaced += 1
    if replaced:
        model.opset_imports[DOMAIN] = 1
        ir.passes.common.RemoveUnusedNodesPass()(model)
    details = {"replaced": replaced, "biases": family.plugin_biases}
    if skipped:
        details["skipped"] = skipped
    if replaced and original is None:
        details["parity_check"] = f"skipped: weights over {PARITY_CHECK_MAX_BYTES >> 20} MiB, or option check=False"
    if replaced and original is not None:
        error = parity_error(original, model, context)
        tolerance = context.option("kiln_attention", "tolerance")
        details["parity_max_abs_error"] = error
        if not error <= tolerance:
            raise ValueError(f"the graph with kiln::CausalAttention differs from the exported one by {error:.3g} (> {tolerance})")
    return model, details


KILN_ATTENTION = Pass(
    "kiln_attention", kiln_attention,
    "attention -> the kiln plugin: a parity-checked kiln::CausalAttention node (TensorRT), "
    "or kiln::causal_attention calls in an AOTInductor package",
    options=(
        PassOption("check", bool, True, "compare the replaced graph with the exported one on a left-padded batch"),
        PassOption("tolerance", float, 1e-4, "largest absolute difference the check accepts"),
    ),
    creates=(f"{DOMAIN}::{OP_TYPE}",),
)


@dataclass
class _Match:
    query: ir.Value  # [batch, heads, q_len, head_dim], or BLOOM's [batch * heads, q_len, head_dim]
    key: ir.Value  # present.N.key
    value: ir.Value  # present.N.value
    scale: float  # the product of every scalar factor on the scores
    output: ir.Value  # MatMul(probabilities, value): what the plugin's output replaces


def _match(softmax: ir.Node, caches: dict[str, ir.Value]) -> _Match:
    probabilities = _after_nan_guard(softmax.outputs[0])
    product, read = _single_consumer(probabilities, skip=("Reshape",))
    if product.op_type != "MatMul" or product.inputs[0] is not read:
        raise NoMatch(f"the probabilities feed {product.op_type}, not MatMul(probabilities, value)")
    value, value_scale = _walk_to_cache(product.inputs[1], caches, "value")
    if value_scale != 1.0:
        raise NoMatch("the values are scaled, which the plugin does not do")

    scale, scores = 1.0, softmax.inputs[0]
    while True:
        node = scores.producer()
        if node is None:
            raise NoMatch("the scores come from a graph input")
        if node.op_type == "MatMul":
            break
        scaled = _scaling(node)
        if node.op_type == "Reshape":
            scores = node.inputs[0]
        elif scaled is not None:
            scores, factor = scaled
            scale *= factor
        elif node.op_type == "Add":
            # One side leads back to the q.K product; the other is a bias (mask, ALiBi) that the plugin rebuilds.
            paths = [i for i in node.inputs if _reaches_matmul(i)]
            if len(paths) != 1:
                raise NoMatch("an Add before Softmax has no single path back to the q.K product")
            scores = paths[0]
        else:
            raise NoMatch(f"{node.op_type} {node.name!r} sits between the q.K product and Softmax")
    query, q_scale = _strip_scales(node.inputs[0])
    key, k_scale = _walk_to_cache(node.inputs[1], caches, "key")
    if key.name.split(".")[1] != value.name.split(".")[1]:
        raise NoMatch(f"key {key.name} and value {value.name} belong to different layers")
    return _Match(query, key, value, scale * q_scale * k_scale, product.outputs[0])


def _after_nan_guard(probabilities: ir.Value) -> ir.Value:
    """SDPA's export maps NaN rows (no visible key) to 0: Where(IsNaN(p), 0, p). The plugin gives 0 there too."""
    users = {use.node.op_type: use.node for use in probabilities.uses()}
    if set(users) == {"IsNaN", "Where"}:
        return users["Where"].outputs[0]
    return probabilities


def _single_consumer(value: ir.Value, skip=()) -> tuple[ir.Node, ir.Value]:
    """The one node that reads `value`, past any `skip` ops between them, and the value it reads."""
    while True:
        uses = list(value.uses())
        if len(uses) != 1:
            raise NoMatch(f"{value.name} has {len(uses)} consumers")
        node = uses[0].node
        if node.op_type not in skip:
            return node, value
        value = node.outputs[0]


def _scalar(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _scaling(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(the scaled input, the factor) when `node` multiplies or divides by a scalar constant, else None."""
    if node.op_type == "Div" and (divisor := _scalar(node.inputs[1])) is not None:
        return node.inputs[0], 1.0 / divisor
    if node.op_type == "Mul":
        for mine, other in ((1, 0), (0, 1)):
            if (factor := _scalar(node.inputs[mine])) is not None:
                return node.inputs[other], factor
    return None


def _strip_scales(value: ir.Value) -> tuple[ir.Value, float]:
    scale = 1.0
    while (node := value.producer()) is not None and (scaled := _scaling(node)) is not None:
        value, factor = scaled
        scale *= factor
    return value, scale


def _walk_to_cache(value: ir.Value, caches: dict[str, ir.Value], kind: str) -> tuple[ir.Value, float]:
    """Follow views (and scalar scales) of the key or value back to the layer's present.N.<kind> output."""
    scale = 1.0
    while value.name not in caches:
        node = value.producer()
        scaled = _scaling(node) if node is not None else None
        if scaled is not None:
            value, factor = scaled
            scale *= factor
        elif node is not None and node.op_type in _VIEW_OPS:
            value = node.inputs[0]
        else:
            raise NoMatch(f"the attention {kind} does not come from a present.N.{kind} output")
    if not value.name.endswith(kind):
        raise NoMatch(f"the attention {kind} comes from {value.name}")
    return value, scale


def _reaches_matmul(value: ir.Value, depth: int = 8) -> bool:
    node = value.producer()
    if node is None or depth == 0:
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type in ("Reshape", "Mul", "Div", "Add"):
        return _reaches_matmul(node.inputs[0], depth - 1) or (
            node.op_type == "Add" and _reaches_matmul(node.inputs[1], depth - 1)
        )
    return False


def alibi_slopes(heads: int) -> np.ndarray:
    """BLOOM's ALiBi slopes (transformers' build_alibi_tensor): a geometric series per power of two of heads."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**power for power in range(1, closest + 1)]
    if closest != heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base**power for power in range(1, 1 + 2 * min(closest, heads - closest), 2)]
    return np.array(slopes, dtype=np.float32)


def _shared_inputs(model: ir.Model, attention_mask: ir.Value, heads: int, alibi: bool) -> dict[str, ir.Value]:
    """The key mask, the slopes and the [-1, heads] head of the query's 4-D shape, made once for all layers.

    BLOOM positions keys by the running count of unmasked tokens; the plugin by their index. Under left
    padding the two differ by a constant per row, which softmax cancels.
    """
    cast = ir.node("Cast", [attention_mask], attributes={"to": ir.DataType.INT32}, name="kiln_attention/key_mask")
    model.graph.insert_before(next(iter(model.graph)), cast)
    slopes = alibi_slopes(heads) if alibi else np.zeros(heads, np.float32)
    return {
        "key_mask": cast.outputs[0],
        "slopes": add_initializer(model, "kiln_attention.alibi_slopes", slopes),
        "heads": add_initializer(model, "kiln_attention.batch_heads", np.array([-1, heads], np.int64)),
    }


def _replace(model: ir.Model, match: _Match, heads: int, shared: dict[str, ir.Value]) -> None:
    """q viewed as [batch, heads, q_len, head_dim] (BLOOM's is [batch * heads, q_len, head_dim]) -> plugin -> q's layout."""
    layer = match.key.name.split(".")[1]
    name = f"kiln_attention/layer{layer}"
    consumer = match.output.producer()
    last_two = ir.node("Shape", [match.query], attributes={"start": -2}, name=f"{name}/q_tail")
    shape = ir.node("Concat", [shared["heads"], last_two.outputs[0]], attributes={"axis": 0}, name=f"{name}/q_shape")
    query = ir.node("Reshape", [match.query, shape.outputs[0]], name=f"{name}/q_4d")
    attention = ir.node(
        OP_TYPE, [query.outputs[0], match.key, match.value, shared["key_mask"], shared["slopes"]],
        attributes={"scale": float(match.scale)}, domain=DOMAIN, name=name,
    )
    q_shape = ir.node("Shape", [match.query], name=f"{name}/out_shape")
    out = ir.node("Reshape", [attention.outputs[0], q_shape.outputs[0]], name=f"{name}/out")
    model.graph.insert_before(consumer, [last_two, shape, query, attention, q_shape, out])
    ir.convenience.replace_all_uses_with(match.output, out.outputs[0])


def parity_feeds(model: ir.Model, facts, padding=(2, 0), new: int = 3, past: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens and cache for a batch of len(padding) rows, each left-padded by that many of its
    past + new positions (so a padded row's first queries see no key)."""
    rng = np.random.default_rng(seed)
    batch, total = len(padding), past + new
    mask = np.array([[0] * pad + [1] * (total - pad) for pad in padding], np.int64)
    feeds = {
        "input_ids": rng.integers(0, max(facts.vocab_size, 2), (batch, new)).astype(np.int64),
        "attention_mask": mask,
        "position_ids": np.maximum(mask.cumsum(axis=1) - 1, 0)[:, past:],
    }
    for spec in past_inputs(contract_signature(facts)):
        _, kv_heads, _, width = spec.shape
        feeds[spec.name] = rng.standard_normal((batch, kv_heads, past, width)).astype(np.float32)
    return {v.name: feeds[v.name] for v in model.graph.inputs}


def parity_error(original: bytes, replaced: ir.Model, context: PassContext, feeds=None, implementation: str = "numpy") -> float:
    """Largest absolute difference between the graphs' outputs, over the positions that hold real tokens.

    Left-padding rows are left out: what a graph computes for a query that sees no key differs (zeros
    here, BLOOM's export averages every value), and those positions never reach a real token's output.
    """
    import onnxruntime

    feeds = parity_feeds(replaced, context.facts) if feeds is None else feeds
    session = onnxruntime.InferenceSession(original, providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    evaluator = reference_evaluator(ir.to_proto(replaced).SerializeToString(), implementation)
    got = dict(zip(evaluator.output_names, evaluator.run(None, feeds)))
    real_new = feeds["attention_mask"][:, -feeds["input_ids"].shape[1]:].astype(bool)  # [batch, new]
    real_all = feeds["attention_mask"].astype(bool)  # [batch, total]
    worst = 0.0
    for name, want in expected.items():
        keep = real_new if name == "logits" else real_all
        axis = 1 if name == "logits" else 2
        diff = np.abs(np.moveaxis(got[name], axis, 1)[keep] - np.moveaxis(want, axis, 1)[keep])
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst
