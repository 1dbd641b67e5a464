"""Property tests: the feed validator and the decode loop over random lengths, padding and batches."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import kiln
from runtimes import FeedError, Signature, TensorSpec
from runtimes.decoder_lm import pad_prompts

SIGNATURE = Signature(
    inputs=(
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
        TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
        TensorSpec("past_key_values.0.key", "float32", ("batch", 2, "past_sequence", 4)),
    ),
    outputs=(),
)


def _feeds(batch, sequence, past):
    return {
        "input_ids": np.zeros((batch, sequence), np.int64),
        "attention_mask": np.ones((batch, past + sequence), np.int64),
        "past_key_values.0.key": np.zeros((batch, 2, past, 4), np.float32),
    }


sizes = st.integers(min_value=0, max_value=6)


@given(batch=sizes, sequence=sizes, past=sizes)
def test_consistent_feeds_always_pass(batch, sequence, past):
    SIGNATURE.validate(_feeds(batch, sequence, past))


@given(batch=sizes, sequence=sizes, past=sizes, other=st.integers(min_value=0, max_value=6),
       name=st.sampled_from(["attention_mask", "past_key_values.0.key"]))
def test_a_contradicting_batch_is_always_refused(batch, sequence, past, other, name):
    feeds = _feeds(batch, sequence, past)
    if other == batch:
        return
    feeds[name] = np.zeros((other, *feeds[name].shape[1:]), feeds[name].dtype)
    try:
        SIGNATURE.validate(feeds)
    except FeedError as error:
        assert f"input '{name}': axis 0 (batch) is {other}" in str(error)
    else:
        raise AssertionError("validate accepted a batch mismatch")


prompt = st.lists(st.integers(min_value=3, max_value=1023), min_size=1, max_size=9)


@given(prompts=st.lists(prompt, min_size=1, max_size=4))
def test_left_pad_keeps_every_prompt_right_aligned(prompts):
    ids, mask = pad_prompts(prompts, pad_token_id=0)
    assert ids.shape == mask.shape == (len(prompts), max(map(len, prompts)))
    for row, p in enumerate(prompts):
        assert list(ids[row][mask[row] == 1]) == p and mask[row, -len(p):].all() and not mask[row, : -len(p)].any()


@settings(max_examples=15, deadline=None)
@given(prompts=st.lists(prompt, min_size=1, max_size=4), new_tokens=st.integers(min_value=1, max_value=6))
def test_batched_generation_equals_each_prompt_alone(engine_dir, prompts, new_tokens):
    engine = kiln.load(engine_dir("tiny-llama"))
    batched = engine.generate(prompts, new_tokens)
    assert batched.shape == (len(prompts), new_tokens)
    for row, p in enumerate(prompts):
        np.testing.assert_array_equal(batched[row], engine.generate([p], new_tokens)[0])
