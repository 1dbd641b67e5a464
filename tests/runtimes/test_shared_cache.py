"""Decoding a GroupQueryAttention engine over one shared past/present buffer gives the carried cache's logits."""
from __future__ import annotations

import numpy as np
import pytest

import runtimes
from runtimes.decoder_lm import SLOT, last_token_logits, pad_prompts
from runtimes.errors import FeedError
from runtimes.generate import CarriedCache
from runtimes.shared_cache import SharedCache

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [300]]


def _decode(steps, ids, mask, count: int) -> np.ndarray:
    logits = [last_token_logits(steps.prefill(ids, mask), mask)]
    for _ in range(count - 1):
        logits.append(steps.step(logits[-1].argmax(-1)[:, None])[:, -1])
    return np.stack(logits)


def test_the_shared_buffer_decodes_as_the_carried_cache(engine_dir):
    with runtimes.load(engine_dir("tiny-llama"), threads=1) as engine:
        assert engine.cache_layout == SLOT  # GroupQueryAttention by default
        ids, mask = pad_prompts(PROMPTS, layout=SLOT)
        shared = engine.decode_steps(len(PROMPTS), ids.shape[1] + 6)
        assert isinstance(shared, SharedCache)
        got, want = _decode(shared, ids, mask, 6), _decode(CarriedCache(engine, SLOT), ids, mask, 6)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        with pytest.raises(FeedError, match="the cache holds 8 tokens per row; this step needs 9"):
            SharedCache(engine.model.session, engine.signature, 1, 8).prefill(np.zeros((1, 9), np.int64),
                                                                                np.ones((1, 9), np.int64))


def test_steps_of_several_tokens_and_then_one(engine_dir):
    with runtimes.load(engine_dir("tiny-llama"), threads=1) as engine:
        # One row: GroupQueryAttention takes several new tokens after a cache only at batch 1.
        ids, mask = pad_prompts(PROMPTS[:1], layout=SLOT)
        runs = []
        for steps in (engine.decode_steps(1, ids.shape[1] + 5), CarriedCache(engine, SLOT)):
            steps.prefill(ids, mask)
            two = steps.step(np.array([[40, 41]]))  # ONNX Runtime's own logits buffer
            ones = [steps.step(np.array([[token]])) for token in (42, 43)]  # the bound one
            runs.append((two, *ones))
        for got, want in zip(*runs):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert not np.shares_memory(runs[0][1], runs[0][2])  # each step's logits are the caller's to keep
        shared = engine.decode_steps(1, ids.shape[1] + 2)
        shared.prefill(ids, mask)
        first = shared.step(np.array([[40]]), keep=False)
        kept = first.copy()
        shared.step(np.array([[41]]), keep=False)  # keep=False: the bound buffer, which this step overwrites
        assert not np.array_equal(first, kept)


def test_a_slot_engine_refuses_left_padded_rows(engine_dir):
    from runtimes.decoder_lm import prefill_feeds

    with runtimes.load(engine_dir("tiny-llama"), threads=1) as engine:
        ids, mask = pad_prompts(PROMPTS)  # left-padded
        with pytest.raises(FeedError, match="rows must be padded on the right"):
            engine.predict(prefill_feeds(engine.signature, ids, mask))
