"""Fusion per family: which ORT ops each tiny preset's export gets, and that outputs and IO do not move."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from kiln.verify import VerificationInputs, output_error, run_steps
from optimizers import PassContext, parse_pass_options, run_recipe
from runtimes.decoder_lm import APPEND, SLOT, last_token_logits, next_feeds, pad_prompts, prefill_feeds
from runtimes.onnxruntime_adapter import OnnxRuntimePredictor

MHA, SLN = "com.microsoft::MultiHeadAttention", "com.microsoft::SkipLayerNormalization"
SSLN, FAST_GELU = "com.microsoft::SkipSimplifiedLayerNormalization", "com.microsoft::FastGelu"
GQA = "com.microsoft::GroupQueryAttention"

# Fused nodes per 2-layer tiny preset. Attention: gpt2 and llama (GroupQueryAttention, llama's rotary inside) with
# their KV caches inside the op, gpt-neo and bloom not at all: see each family record's fusion_note.
EXPECTED = {
    "tiny-gpt2": ({GQA: 2, SLN: 5, FAST_GELU: 2}, 2),
    "tiny-llama": ({GQA: 2, SSLN: 4, "SimplifiedLayerNormalization": 1}, 2),
    "tiny-gptneo": ({SLN: 3, FAST_GELU: 2}, 0),
    "tiny-bloom": ({SLN: 4}, 0),
}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_fusion_per_family(preset, exported, tmp_path):
    path, loaded = exported(preset)
    out = tmp_path / "fused.onnx"
    context = PassContext(facts=loaded.facts, family=loaded.family)
    _, reports = run_recipe(path, context, passes=["cleanup", "fusion"], output=out)
    fusion = reports[-1]
    fused, with_cache = EXPECTED[preset]
    assert {op: n for op, n in fusion.fused.items() if op != "com.microsoft::FusedMatMul"} == fused
    assert fusion.details["attention_with_cache"] == with_cache
    assert fusion.details["attention_fused"] == ((fused.get(MHA) or fused.get(GQA)) == loaded.facts.layers)
    assert fusion.details["cache_layout"] == (SLOT if GQA in fused else APPEND)
    assert fusion.details["attention_note"] == loaded.family.fusion_note != ""
    # The fused norms' mean and inverse deviation are read by nothing: left unnamed, ONNX Runtime skips them.
    norms = [n for n in onnx.load(str(out)).graph.node if n.op_type.endswith("LayerNormalization")]
    assert norms and all(list(n.output[1:3]) in ([], [""], ["", ""]) for n in norms)
    assert fusion.details["rules"]["unread_outputs_dropped"] >= 2 * (fused.get(SLN, 0) + fused.get(SSLN, 0))
    plain, optimized = OnnxRuntimePredictor(path), OnnxRuntimePredictor(out)
    assert optimized.signature == plain.signature
    vocab = loaded.facts.vocab_size
    want, got = run_steps(plain, vocab, VerificationInputs()), run_steps(optimized, vocab, VerificationInputs())
    for name in want[0]:
        assert output_error([s[name] for s in got], [s[name] for s in want])["relative"] < 1e-5, name


@pytest.mark.parametrize("preset, reason", [
    ("tiny-gemma2", "soft-capping (tanh on the scores)"),
    ("tiny-gptoss", "attention sinks (a logit column joined to the scores)"),
    ("tiny-gpt2", None),
])
def test_the_fusion_report_says_why_attention_stayed_unfused(preset, reason, exported):
    path, loaded = exported(preset)
    _, reports = run_recipe(path, PassContext(facts=loaded.facts, family=loaded.family), passes=["cleanup", "fusion"])
    unfused = reports[-1].details["attention_unfused"]
    if reason is None:
        assert unfused == {} and reports[-1].details["attention_fused"]
    else:
        # One softmax per layer, each traced to its QK^T; the MoE routers' softmaxes are not counted.
        assert [(r.split(":")[0], n) for r, n in unfused.items()] == [(reason, loaded.facts.layers)]
        assert reports[-1].details["attention_note"].startswith(reason)


def padded_decode(predictor, layout: str = APPEND, steps: int = 3) -> np.ndarray:
    """Each row's last logits for a batch of two prompts of different lengths, padded as `layout` wants, over a
    prefill and greedy decode steps."""
    ids, mask = pad_prompts([[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]], layout=layout)
    feeds = prefill_feeds(predictor.signature, ids, mask)
    logits = []
    for step in range(steps):
        outputs = predictor.predict(feeds)
        logits.append(last_token_logits(outputs["logits"], mask) if step == 0 else outputs["logits"][:, -1])
        feeds = next_feeds(predictor.signature, feeds, outputs, logits[-1].argmax(-1)[:, None], layout=layout)
    return np.stack(logits)


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_fused_engines_handle_padded_batches(preset, exported, tmp_path):
    path, loaded = exported(preset)
    out = tmp_path / "fused.onnx"
    _, reports = run_recipe(path, PassContext(facts=loaded.facts, family=loaded.family), passes=["cleanup", "fusion"],
                            output=out)
    layout = reports[-1].details["cache_layout"]
    want, got = padded_decode(OnnxRuntimePredictor(path)), padded_decode(OnnxRuntimePredictor(out), layout)
    assert np.abs(got - want).max() < 1e-4


def test_llama_gqa_can_be_turned_off_for_left_padding(exported, tmp_path):
    path, loaded = exported("tiny-llama")
    out = tmp_path / "mha.onnx"
    context = PassContext(facts=loaded.facts, family=loaded.family, options=parse_pass_options(["fusion.gqa=false"]))
    _, reports = run_recipe(path, context, passes=["cleanup", "fusion"], output=out)
    assert reports[-1].fused.get(MHA) == loaded.facts.layers and GQA not in reports[-1].fused
    assert reports[-1].details["cache_layout"] == APPEND
    want, got = padded_decode(OnnxRuntimePredictor(path)), padded_decode(OnnxRuntimePredictor(out))
    assert np.abs(got - want).max() < 1e-4


def test_multi_head_attention_becomes_grouped_only_over_the_causal_padding_mask(exported, tmp_path):
    import onnx_ir as ir

    from optimizers.mha_to_gqa import mha_to_gqa

    path, loaded = exported("tiny-gpt2")
    out = tmp_path / "mha.onnx"
    context = PassContext(facts=loaded.facts, family=loaded.family, options=parse_pass_options(["fusion.gqa=false"]))
    run_recipe(path, context, passes=["cleanup", "fusion"], output=out)
    assert mha_to_gqa(ir.load(out)) == loaded.facts.layers
    # The same attention with a bias added to its mask (as ALiBi adds one): GroupQueryAttention has no such input.
    model = ir.load(out)
    attention = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    shift = ir.Value(name="shift", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]),
                     const_value=ir.tensor(np.array([-1.0], np.float32), name="shift"))
    model.graph.register_initializer(shift)
    biased = ir.node("Add", [attention[0].inputs[5], shift], name="biased")
    model.graph.insert_before(attention[0], [biased])
    for node in attention:
        node.replace_input_with(5, biased.outputs[0])
    assert mha_to_gqa(model) == 0
    assert sum(n.op_type == "MultiHeadAttention" for n in model.graph) == loaded.facts.layers


def test_only_unread_optional_outputs_lose_their_names():
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from optimizers.cleanup import drop_unread_outputs

    width = 4
    norm = helper.make_node("LayerNormalization", ["x", "gamma"], ["y", "mean", "inv_std"], axis=-1)
    split = helper.make_node("Split", ["y"], ["left", "right"], axis=-1, num_outputs=2)  # outputs not optional
    graph = helper.make_graph(
        [norm, split, helper.make_node("Add", ["left", "inv_std"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.ones(width, np.float32), "gamma")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert drop_unread_outputs(model) == 1
    nodes = {n.op_type: [v.name for v in n.outputs] for n in model.graph}
    assert nodes["LayerNormalization"] == ["y", "", "inv_std"] and nodes["Split"] == ["left", "right"]
    x = np.arange(2 * width, dtype=np.float32).reshape(2, width)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": x})[0].shape == (2, width // 2)
