import numpy as np
import pytest

import kiln
from runtimes import FeedError
from runtimes.decoder_lm import APPEND, SLOT, pad_prompts
from runtimes.generate import choose_next
from tests.conftest import TINY_PRESETS

PROMPTS = [[5, 17, 300, 42, 8, 99, 1000], [7, 7, 7], [64, 2, 901, 33, 12]]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_tokens_equal_the_pytorch_reference(engine_dir, reference, preset):
    engine = kiln.load(engine_dir(preset))
    torch_reference = reference(engine_dir(preset))
    for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1, then 3 prompts of different lengths
        got = engine.generate(prompts, max_new_tokens=32)
        want = torch_reference.generate(prompts, max_new_tokens=32)
        assert got.shape == (len(prompts), 32)
        np.testing.assert_array_equal(got, want)


def test_padding_does_not_change_a_prompt_s_tokens(engine_dir):
    engine = kiln.load(engine_dir("tiny-llama"))
    alone = engine.generate([PROMPTS[1]], max_new_tokens=12)
    batched = engine.generate(PROMPTS, max_new_tokens=12)
    np.testing.assert_array_equal(batched[1], alone[0])


def test_seeded_sampling_is_reproducible_and_backend_neutral(engine_dir, reference):
    engine = kiln.load(engine_dir("tiny-gpt2"))
    options = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    first, second = engine.generate(PROMPTS, **options), engine.generate(PROMPTS, **options)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, reference(engine_dir("tiny-gpt2")).generate(PROMPTS, **options))
    assert not np.array_equal(first, engine.generate(PROMPTS, **dict(options, seed=8)))


def test_stops_at_eos_and_pads_finished_rows(engine_dir):
    engine = kiln.load(engine_dir("tiny-gpt2"))
    greedy = engine.generate(PROMPTS, max_new_tokens=8)
    eos = int(greedy[0, 2])
    stopped = engine.generate(PROMPTS, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    row = list(stopped[0])
    assert row[: row.index(eos) + 1] == list(greedy[0, : row.index(eos) + 1])
    assert all(t == 0 for t in row[row.index(eos) + 1 :])


def test_stream_yields_each_step(engine_dir):
    engine = kiln.load(engine_dir("tiny-gpt2"))
    seen = []
    tokens = engine.generate(PROMPTS, max_new_tokens=5, on_token=seen.append)
    assert len(seen) == 5 and np.array_equal(np.stack(seen, axis=1), tokens)
    assert np.array_equal(np.stack(list(engine.stream(PROMPTS, max_new_tokens=5)), axis=1), tokens)


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = np.array([[2.0, 1.9, -1.0]])
    history, mask = np.array([[0]]), np.array([[1]])
    assert choose_next(logits, history, mask, rng=None)[0] == 0
    assert choose_next(logits, history, mask, rng=None, repetition_penalty=1.2)[0] == 1


def test_top_k_1_sampling_is_greedy():
    logits = np.random.default_rng(0).normal(size=(4, 50))
    picked = choose_next(logits, np.zeros((4, 1), np.int64), np.zeros((4, 1), np.int64), np.random.default_rng(1), top_k=1)
    np.testing.assert_array_equal(picked, logits.argmax(-1))


def test_pad_prompts_per_cache_layout():
    ids, mask = pad_prompts([[1, 2, 3], [4]], pad_token_id=9, layout=APPEND)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [9, 9, 4]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    ids, mask = pad_prompts([[1, 2, 3], [4]], pad_token_id=9, layout=SLOT)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [4, 9, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "prompts, options, message",
    [
        ([[]], {}, "every prompt needs at least one token"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
        ([[1, 2]], {"max_new_tokens": -3}, "max_new_tokens must be at least 1, got -3"),
        ([], {}, "every prompt needs at least one token"),
        ([[1, 5000]], {}, r"token id 5000 is outside the vocabulary \[0, 1024\)"),
    ],
)
def test_bad_generation_requests(engine_dir, prompts, options, message):
    engine = kiln.load(engine_dir("tiny-gpt2"))
    with pytest.raises(FeedError, match=message):
        engine.generate(prompts, **options)
