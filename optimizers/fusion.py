"""Fuse the exported graph into ONNX Runtime's contrib ops, with onnxscript's `optimize_for_ort`.

Rules of our own are added only where the stock fusions miss or mishandle a graph that
`torch.onnx.export(dynamo=True)` produces from transformers 5 (each rule's comment says what): two run
before the stock fusions, one (rotary cos/sin cache, for GroupQueryAttention) among them, opt-in.
"""
from __future__ import annotations

import contextlib
import logging
import math

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.cos_sin_cache import CosSinCacheFusion

from optimizers.cleanup import drop_unread_outputs, single_output_rewrites
from optimizers.mha_to_gqa import mha_to_gqa
from optimizers.packed_qkv import pack_qkv
from optimizers.pass_types import Pass, PassContext, PassOption
from runtimes.decoder_lm import APPEND, SLOT

ATTENTION_OPS = ("MultiHeadAttention", "GroupQueryAttention", "Attention")
_PAST_INPUT = {"MultiHeadAttention": 6, "GroupQueryAttention": 3, "Attention": 4}  # index of the past (key)


def _flat_gemm(op, x, flat_shape, weight, out_shape):
    # The bias is optional: the exporter drops an all-zero one.
    gemm = op.Gemm(op.Reshape(x, flat_shape), weight, _allow_other_inputs=True, _outputs=["gemm"])
    return op.Reshape(gemm, out_shape)


def _flat_gemm_check(context, x, flat_shape, weight, gemm, out_shape, **_) -> bool:
    node = gemm.producer()
    plain = all(
        node.attributes.get_float(name, 1.0) == 1.0 for name in ("alpha", "beta")
    ) and not any(node.attributes.get_int(name, 0) for name in ("transA", "transB"))
    flat = flat_shape.const_value
    out = gemm.uses()[0].node.outputs[0].shape if gemm.uses() else None
    return bool(
        plain and flat is not None and flat.numpy().tolist()[:1] == [-1] and x.shape is not None
        and len(x.shape) >= 3 and out is not None and len(out) == 3 and list(out)[:2] == list(x.shape)[:2]
    )


def _matmul_3d(op, x, weight, gemm, **_):
    if len(x.shape) != 3:
        x = op.Reshape(x, op.Constant(value_ints=[0, 0, -1]))
    product = op.MatMul(x, weight)
    inputs = gemm.producer().inputs
    return op.Add(product, inputs[2]) if len(inputs) > 2 and inputs[2] is not None else product


# GPT-2's Conv1D exports as Reshape([B,S,D] -> [B*S,D]) -> Gemm -> Reshape(-> [B,S,N]). onnxscript's
# gemm_to_matmul_add rule skips it (symbolic dims), and its MHA fusion then replaces the attention
# output's Reshape([B,S,H,Dh] -> [B*S,D]) with a [B,S,D] MultiHeadAttention output that the Gemm cannot
# take (ORT: "Gemm input 0 expected to have rank 2"). A 3-D MatMul + Add keeps the graph valid.
FLAT_GEMM_TO_MATMUL = pattern.RewriteRule(_flat_gemm, _matmul_3d, _flat_gemm_check, name="FlatGemmToMatMul")


def _gelu_tanh_half_first(op, x):
    inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715)), math.sqrt(2.0 / math.pi))
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(inner), 1.0))


def _fast_gelu(op, x):
    return op.FastGelu(x, _domain="com.microsoft")


# transformers' NewGELU (GPT-2, GPT-Neo, "gelu_new") exports as (0.5 * x) * (1 + tanh(...)); onnxscript's
# GeluTanhFusion only matches x * (0.5 * (1 + tanh(...))).
GELU_TANH_HALF_FIRST = pattern.RewriteRule(_gelu_tanh_half_first, _fast_gelu, name="GeluTanhHalfFirst")

class _MulFreqsCosSinCache(CosSinCacheFusion):
    """transformers 5 computes rotary angles as `position_ids[..., None].float() * inv_freq` (a broadcast Mul,
    [B, S, E]); onnxscript's cos/sin-cache rule expects 4.x's `inv_freq @ position_ids` and a Transpose, so
    without this rule the rotary fusion is undone and GroupQueryAttention cannot form."""

    def pattern(self, op, x, inv_freq, position_ids, interleaved, num_heads):
        angles = op.Mul(op.Cast(op.Unsqueeze(position_ids, [2]), to=ir.DataType.FLOAT), inv_freq)
        emb = op.Concat(angles, angles, axis=-1)
        return op.RotaryEmbedding(
            x, op.Unsqueeze(op.Cos(emb), [1]), op.Unsqueeze(op.Sin(emb), [1]),
            interleaved=interleaved, num_heads=num_heads, _domain="ai.onnxruntime._fusion",
        )

    def check(self, context, inv_freq, position_ids, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if inv_freq.const_value is None or len(inv_freq.const_value.shape) != 1:
            return result.fail("inv_freq is not a 1-D constant.", inv_freq)
        if position_ids.shape is None or len(position_ids.shape) != 2:
            return result.fail("position_ids is not 2-D.", position_ids)
        return result

    def rewrite(self, op, x, inv_freq, position_ids, interleaved, num_heads, **_):
        return super().rewrite(op, x, inv_freq, position_ids, interleaved, num_heads, freqs=None, dtype=None)


MUL_FREQS_COS_SIN_CACHE = _MulFreqsCosSinCache.rule("MulFreqsCosSinCache", cast=False)


def _optimize_for_ort(model: ir.Model, rotary_cache: bool) -> tuple[ir.Model, dict[str, int]]:
    """onnxscript's `optimize_for_ort`; with `rotary_cache`, its steps (as of onnxscript 0.7) one by one with
    our cos/sin-cache rule after its own: the library has no hook between its fusions. Returns the model
    and the count per fusion."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    if not rotary_cache:
        return optimize_for_ort(model)
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import _core as core

    rewrite(model, [core._gemm_to_matmul_add.gemm_to_matmul_add_rule])
    model = core._pre_optimize(model)
    counts = {}

    def fuse(name, func, **kwargs):
        counts[name] = func(model, **kwargs)

    fuse("erf_gelu", core.fuse_erfgelu)
    fuse("rms_normalization", core.fuse_rms_normalization)
    fuse("skip_layer_normalization", core.fuse_skip_layer_normalization)
    fuse("skip_rms_normalization", core.fuse_skip_rms_normalization)
    fuse("rotary_embedding", core.fuse_rotary_embedding)
    fuse("cos_sin_cache", core.fuse_cos_sin_cache)
    counts[MUL_FREQS_COS_SIN_CACHE.name] = pattern.RewriteRuleSet([MUL_FREQS_COS_SIN_CACHE]).apply_to_model(model)
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    fuse("partial_rotary_embedding", core.fuse_partial_rotary_embedding)
    fuse("sdpa", core.fuse_sdpa, apply_shape_inference=True)
    scales = [n.attributes.get_float("scale") for n in model.graph.all_nodes() if n.op_type == "SDPA"]
    fuse("gqa", core.fuse_gqa)
    _carry_scales(model, scales)
    fuse("packed_qkv_for_gqa", core.fuse_qkv_gqa)
    fuse("mha1", core.fuse_mha1)
    fuse("mha2", core.fuse_mha2)
    fuse("mha_scale", core.fuse_mha_scale)
    if counts["mha1"] or counts["mha2"]:
        fuse("mha_bias", core.fuse_mha_bias)
        fuse("attention", core.fuse_attention)
    fuse("gelu", core.fuse_gelu)
    fuse("bias_gelu", core.fuse_bias_gelu)
    fuse("sdpa_via_mha", core.replace_sdpa_by_mha)
    optimize(model)  # inline the intermediate fusion functions that no later fusion consumed
    rewrite(model, core.ORT_PATTERN_REWRITE_RULES)
    ir.passes.Sequential(
        ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
        ir.passes.common.RemoveInitializersFromInputsPass(),
        ir.passes.common.ShapeInferencePass(),
    )(model)
    return model, counts


@contextlib.contextmanager
def _quiet_shape_inference():
    """onnx's shape inference rejects some exported graphs (diffusers' UNet: a Reshape whose inferred target has two
    -1s) and onnx_ir then logs the traceback as a warning and leaves the shapes as they were, which the fusions
    tolerate: keep that traceback off the user's terminal."""
    log = logging.getLogger("onnx_ir.passes.common.shape_inference")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def fusion(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """Our pre-fusion rules, then `optimize_for_ort`'s fusions; details carry the rule counts and the attention verdict."""
    with _quiet_shape_inference(), single_output_rewrites():  # the library's fusions run its optimizer too
        return _fusion(model, context)


def _fusion(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    shapes = _io_shapes(model)
    ir.passes.common.ShapeInferencePass()(model)  # the flat-Gemm check reads the activations' shapes
    own = {}
    for rule in (FLAT_GEMM_TO_MATMUL, GELU_TANH_HALF_FIRST):
        own[rule.name] = pattern.RewriteRuleSet([rule], commute=True).apply_to_model(model)
    # GroupQueryAttention reads each row's cache from column 0 up to its position (onnxscript derives the
    # lengths from position_ids), so its engines take right-padded rows: the SLOT cache layout. A graph where
    # only some layers became GQA could follow neither layout; it is fused again without GQA.
    gqa = context.option("fusion", "gqa")
    backup = model.clone() if gqa else None  # clone(): onnx_ir shares the weights' data, not copied
    model, counts = _optimize_for_ort(model, rotary_cache=gqa)
    windows = context.facts.attention_windows if context.facts else ()
    if gqa and not windows and not any(n.op_type == "GroupQueryAttention" for n in _attention_nodes(model)):
        counts["mha_to_gqa"] = mha_to_gqa(model)  # absolute positions: no rotary for onnxscript's rule to form on
    attention = _attention_nodes(model)
    grouped = sum(n.op_type == "GroupQueryAttention" for n in attention)
    mixed = 0 < grouped < len(attention)
    if grouped and windows and grouped != len(windows):
        mixed = True  # which node is which layer is unknown: a sliding window could land on the wrong one
    elif grouped and not mixed:
        _set_windows(attention, windows)
        counts["packed_qkv"] = pack_qkv(model)
    if mixed:
        model, counts = _optimize_for_ort(backup, rotary_cache=False)
        attention = _attention_nodes(model)
    del backup
    _restore_io_shapes(model, shapes)
    counts["unread_outputs_dropped"] = drop_unread_outputs(model)
    # With a past input the op owns the cache update (no Concat outside it).
    with_cache = sum(
        1 for n in attention
        if len(n.inputs) > _PAST_INPUT[n.op_type] and n.inputs[_PAST_INPUT[n.op_type]] is not None
    )
    layers = context.facts.layers if context.facts else None
    unfused = unfused_attention(model)
    layout = SLOT if attention and not mixed and grouped == len(attention) else APPEND
    return model, {
        "cache_layout": layout,
        "manifest": {"cache_layout": SLOT} if layout == SLOT else {},  # the runtime then feeds it right-padded
        "gqa_undone": f"{grouped} of {len(attention)} attention layers formed GroupQueryAttention" if mixed else "",
        "rules": {**{k: v for k, v in own.items() if v}, **{k: v for k, v in counts.items() if v}},
        "attention_nodes": len(attention),
        "attention_with_cache": with_cache,
        "attention_fused": bool(layers) and len(attention) == layers,
        "attention_unfused": unfused,
        "attention_note": (context.family.fusion_note if context.family else "") or "; ".join(unfused),
    }


def _carry_scales(model: ir.Model, scales: list[float | None]) -> None:
    """onnxscript's GQA rule drops the SDPA's `scale` (its comment: "skipped optional attributes"); put each back
    (Gemma's query_pre_attn_scalar: without it, logits off by 0.54 on tiny-gemma3). Nodes keep layer order."""
    grouped = [n for n in model.graph.all_nodes() if n.op_type == "GroupQueryAttention"]
    if len(grouped) != len(scales):
        return  # not every SDPA became GQA: the caller undoes GQA for such a graph
    for node, scale in zip(grouped, scales):
        if scale is not None:
            node.attributes["scale"] = ir.AttrFloat32("scale", scale)


def _set_windows(attention: list[ir.Node], windows: tuple[int, ...]) -> None:
    """GroupQueryAttention's `local_window_size` per layer (nodes in layer order): onnxscript's rule matches a
    sliding-window mask as if it were causal only. The window is the config's `sliding_window` as it is (the
    setting onnxruntime-genai's builder writes; window - 1 fails verification on tiny-mistral)."""
    for node, window in zip(attention, windows):
        if window:
            node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", window)


def _attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph.all_nodes() if n.op_type in ATTENTION_OPS and n.domain == "com.microsoft"]


# What an op on the way from QK^T to the softmax means, where it is why no fused attention op fits.
_SCORE_OP_REASONS = {
    "Tanh": "soft-capping (tanh on the scores): MultiHeadAttention has no softcap (GroupQueryAttention's "
            "softcap attribute has; no rule forms it yet)",
    "Concat": "attention sinks (a logit column joined to the scores): MultiHeadAttention takes none "
              "(GroupQueryAttention's head_sink input does; no rule forms it yet)",
}


def unfused_attention(model: ir.Model) -> dict[str, int]:
    """Why each attention left unfused was left: its softmax, traced back to the scores' MatMul (QK^T), and
    the ops between them that no fused op expresses. Reason -> how many softmaxes it accounts for."""
    reasons: dict[str, int] = {}
    for node in model.graph.all_nodes():
        if node.op_type != "Softmax":
            continue
        path = _score_path(node)
        if path is None:
            continue  # no QK^T behind it: a router's softmax
        known = [_SCORE_OP_REASONS[op] for op in dict.fromkeys(path) if op in _SCORE_OP_REASONS]
        reason = "; ".join(known) or (f"the scores pass {' -> '.join(path) or 'straight'} to the softmax, "
                                      "a form onnxscript's attention rules do not match")
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


# Ops found between attention scores and their softmax (scale, mask, soft-capping, sinks, dtype casts);
# the trace stops at any other, so a router's softmax (behind a Gemm or TopK) finds no QK^T.
_SCORE_OPS = {"Mul", "Div", "Add", "Sub", "Tanh", "Where", "Cast", "Concat", "Slice", "Max", "Min", "Neg",
              "Expand", "Unsqueeze", "Reshape", "Identity", "ReduceMax"}


def _score_path(softmax: ir.Node, depth: int = 12) -> list[str] | None:
    """Op types from the nearest (Fused)MatMul of two computed inputs (QK^T) up to `softmax`, or None."""
    frontier = [(softmax.inputs[0], [])]
    for _ in range(depth):
        following = []
        for value, path in frontier:
            node = value.producer() if value is not None else None
            if node is None:
                continue
            if node.op_type in ("MatMul", "FusedMatMul") and all(i is not None and i.const_value is None for i in node.inputs):
                return path[::-1]
            if node.op_type in _SCORE_OPS:
                following += [(i, [*path, node.op_type]) for i in node.inputs if i is not None and i.const_value is None]
        frontier = following
    return None


FUSION = Pass(
    "fusion", fusion, "ONNX Runtime fused ops: attention, skip/RMS norms, GELU (onnxscript ort_fusions)",
    options=(
        PassOption("gqa", bool, True, "form GroupQueryAttention (rotary and cache inside); its engines take "
                   "right-padded batches (cache layout 'slot')"),
    ),
    creates=(
        "com.microsoft::MultiHeadAttention", "com.microsoft::GroupQueryAttention", "com.microsoft::Attention",
        "com.microsoft::SkipLayerNormalization", "com.microsoft::SkipSimplifiedLayerNormalization",
        "com.microsoft::SimplifiedLayerNormalization", "SimplifiedLayerNormalization",
        "com.microsoft::RotaryEmbedding", "com.microsoft::FastGelu", "com.microsoft::BiasGelu", "com.microsoft::Gelu",
        "com.microsoft::FusedMatMul",
    ),
)


def _io_shapes(model: ir.Model) -> dict[str, ir.Shape | None]:
    return {v.name: v.shape for v in [*model.graph.inputs, *model.graph.outputs]}


def _restore_io_shapes(model: ir.Model, shapes: dict[str, ir.Shape | None]) -> None:
    """Shape inference renames IO dims (`total_sequence` -> `past_sequence + sequence`): put the contract's back."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        old = shapes.get(value.name)
        if old is not None and (value.shape is None or len(value.shape) == len(old)):
            value.shape = old
