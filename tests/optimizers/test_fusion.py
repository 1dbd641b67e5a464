"""Fusion per family: which ORT ops each tiny preset's export gets, and that outputs and IO do not move."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.verify import VerificationInputs, output_error, run_steps
from optimizers import PassContext, parse_pass_options, run_recipe
from runtimes.decoder_lm import next_feeds, prefill_feeds
from runtimes.generate import left_pad
from runtimes.onnxruntime_adapter import OnnxRuntimePredictor

MHA, SLN = "com.microsoft::MultiHeadAttention", "com.microsoft::SkipLayerNormalization"
SSLN, FAST_GELU = "com.microsoft::SkipSimplifiedLayerNormalization", "com.microsoft::FastGelu"

# Fused nodes per 2-layer tiny preset. Attention: gpt2 with its KV cache inside the op, llama without
# (rotary and GQA not formed), gpt-neo and bloom not at all: see each family record's fusion_note.
EXPECTED = {
    "tiny-gpt2": ({MHA: 2, SLN: 5, FAST_GELU: 2}, 2),
    "tiny-llama": ({MHA: 2, SSLN: 4, "SimplifiedLayerNormalization": 1}, 0),
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
    assert fusion.details["attention_fused"] == (fused.get(MHA) == loaded.facts.layers)
    assert fusion.details["attention_note"] == loaded.family.fusion_note != ""
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


def left_padded_decode(predictor, steps: int = 3) -> np.ndarray:
    """Last-position logits of a left-padded batch of two prompts over a prefill and greedy decode steps."""
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]])
    feeds = prefill_feeds(predictor.signature, ids, mask)
    logits = []
    for _ in range(steps):
        outputs = predictor.predict(feeds)
        logits.append(outputs["logits"][:, -1])
        feeds = next_feeds(predictor.signature, feeds, outputs, outputs["logits"][:, -1].argmax(-1)[:, None])
    return np.stack(logits)


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_fused_engines_handle_left_padded_batches(preset, exported, tmp_path):
    path, loaded = exported(preset)
    out = tmp_path / "fused.onnx"
    run_recipe(path, PassContext(facts=loaded.facts, family=loaded.family), passes=["cleanup", "fusion"], output=out)
    want, got = left_padded_decode(OnnxRuntimePredictor(path)), left_padded_decode(OnnxRuntimePredictor(out))
    assert np.abs(got - want).max() < 1e-4


def test_llama_gqa_is_opt_in_and_matches_unpadded_batches(exported, tmp_path):
    path, loaded = exported("tiny-llama")
    out = tmp_path / "gqa.onnx"
    context = PassContext(facts=loaded.facts, family=loaded.family, options=parse_pass_options(["fusion.gqa=true"]))
    _, reports = run_recipe(path, context, passes=["cleanup", "fusion"], output=out)
    assert reports[-1].fused.get("com.microsoft::GroupQueryAttention") == loaded.facts.layers
    assert reports[-1].details["attention_with_cache"] == loaded.facts.layers
    assert reports[-1].details["rules"]["MulFreqsCosSinCache"] == 2 * loaded.facts.layers
    plain, fused = OnnxRuntimePredictor(path), OnnxRuntimePredictor(out)
    want, got = run_steps(plain, 1024, VerificationInputs()), run_steps(fused, 1024, VerificationInputs())
    for name in want[0]:
        assert output_error([s[name] for s in got], [s[name] for s in want])["relative"] < 1e-5, name
