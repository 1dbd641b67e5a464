"""`logits_to_keep`: an optional input; left out, every position's logits as before; set, only the last ones."""
from __future__ import annotations

import numpy as np
import pytest

from optimizers import PassContext, run_recipe
from optimizers.onnx_io import io_contract
from runtimes.decoder_lm import contract_signature, prefill_feeds
from runtimes.onnxruntime_adapter import OnnxRuntimePredictor


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma2", "tiny-gpt2"])  # plain head; soft-capped; tied
def test_the_last_positions_logits_equal_those_of_the_whole_prefill(preset, exported, tmp_path):
    path, loaded = exported(preset)
    out = tmp_path / "model.onnx"
    model, reports = run_recipe(path, PassContext(facts=loaded.facts, family=loaded.family),
                                passes=["cleanup", "logits_to_keep"], output=out)
    assert reports[-1].details["manifest"] == {"logits_to_keep": True}
    assert io_contract(model) == io_contract(run_recipe(path, PassContext(), passes=["cleanup"])[0])
    predictor = OnnxRuntimePredictor(out)
    ids = np.random.default_rng(0).integers(0, loaded.facts.vocab_size, size=(2, 9))
    feeds = prefill_feeds(contract_signature(loaded.facts), ids)
    every = predictor.forward(feeds)["logits"]
    assert every.shape[1] == 9
    np.testing.assert_allclose(every, OnnxRuntimePredictor(path).forward(feeds)["logits"], atol=1e-5)
    for keep in (1, 3):
        kept = predictor.forward({**feeds, "logits_to_keep": np.array(keep)})["logits"]
        np.testing.assert_allclose(kept, every[:, -keep:], atol=1e-5)


def test_engines_take_logits_to_keep_through_predict(engine_dir):
    import kiln
    from runtimes.errors import FeedError

    with kiln.load(engine_dir("tiny-llama")) as engine:
        assert engine.keeps_logits
        feeds = prefill_feeds(engine.signature, np.array([[5, 6, 7, 8]]))
        assert engine.predict({**feeds, "logits_to_keep": np.array(1)})["logits"].shape[1] == 1
        assert engine.predict(feeds)["logits"].shape[1] == 4
        engine.keeps_logits = False  # as an engine converted before the input existed
        with pytest.raises(FeedError, match="input 'logits_to_keep'"):
            engine.predict({**feeds, "logits_to_keep": np.array(1)})
