"""split_skip_layer_norm: SkipLayerNormalization back into Add + LayerNormalization, logits unchanged."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from optimizers import PassContext, run_recipe, save
from tests.optimizers.conftest import prefill_feeds

SLN = "com.microsoft::SkipLayerNormalization"


def test_split_skip_layer_norm_keeps_the_logits(exported, tmp_path):
    path, loaded = exported("tiny-gpt2")
    context = PassContext(facts=loaded.facts, family=loaded.family)
    fused, _ = run_recipe(path, context, passes=["cleanup", "fusion"])
    save(fused, tmp_path / "fused.onnx")
    split, reports = run_recipe(tmp_path / "fused.onnx", context, passes=["split_skip_layer_norm"])
    save(split, tmp_path / "split.onnx")
    report = reports[0]
    assert report.ops_before[SLN] == 5 and SLN not in report.ops_after
    assert report.details["split"] == 5
    assert report.ops_after["LayerNormalization"] == 5
    feeds = prefill_feeds(np.random.default_rng(0).integers(0, loaded.facts.vocab_size, (2, 7)), loaded.facts)
    sessions = [ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
                for name in ("fused.onnx", "split.onnx")]
    want, got = (session.run(["logits"], feeds)[0] for session in sessions)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
