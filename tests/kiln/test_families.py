"""The family matrix: every tiny preset's engine (one per family of `kiln families`) generates the tokens
transformers' own `generate` does, at batch 1 and on a left-padded batch, and quantizes to int4.
(`test_convert.py` converts and verifies each; this file reuses those engines.)"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import kiln
from exporter import load_model
from tests.conftest import TINY_PRESETS

PROMPTS = [[5, 17, 300, 42, 8, 99, 1000], [7, 7, 7], [64, 2, 901, 33, 12]]
NEW_TOKENS = 10


def transformers_tokens(module, prompts) -> np.ndarray:
    """transformers' greedy tokens for `prompts`, left-padded as kiln pads them, no early stop."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        out = module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, width:].numpy()


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_tokens_equal_transformers_generate(engine_dir, preset):
    module = load_model(preset).module
    with kiln.load(engine_dir(preset)) as engine:
        for prompts in ([PROMPTS[0]], PROMPTS):
            np.testing.assert_array_equal(engine.generate(prompts, NEW_TOKENS), transformers_tokens(module, prompts),
                                          err_msg=f"{preset}, batch {len(prompts)}")


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_int4_quantizes_every_family(engine_dir, preset, tmp_path):
    from optimizers import PassContext, run_recipe
    from runtimes.decoder_lm import prefill_feeds
    from runtimes.onnxruntime_adapter import OnnxRuntimePredictor

    engine = engine_dir(preset)
    loaded = load_model(preset)
    context = PassContext(target="cpu", recipe="cpu", precision="int4", facts=loaded.facts, family=loaded.family)
    _, reports = run_recipe(engine / "model.onnx", context, passes=["fold_weight_transposes", "int4"],
                            output=tmp_path / "model.onnx")
    quantized = reports[-1].quantized.get("com.microsoft::MatMulNBits", 0)
    assert quantized >= 2 * loaded.facts.layers, f"{preset}: {reports[-1].details}"
    assert sum(n.op_type == "MatMulNBits" for n in ir.load(str(tmp_path / "model.onnx")).graph) == quantized
    # Every family gathers its token embedding from `input_ids`: no fp32 table stays.
    embedding = reports[-1].details["embedding"]
    assert embedding is not None and embedding["shape"][0] == loaded.facts.vocab_size, f"{preset}: {embedding}"
    predictor = OnnxRuntimePredictor(tmp_path / "model.onnx")
    logits = predictor.predict(prefill_feeds(predictor.signature, np.array([PROMPTS[0]])))["logits"]
    assert logits.shape == (1, len(PROMPTS[0]), loaded.facts.vocab_size) and np.isfinite(logits).all()
