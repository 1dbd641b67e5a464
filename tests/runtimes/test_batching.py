"""Continuous batching: rows that join and leave a running batch get exactly the tokens they get alone."""
from __future__ import annotations

import numpy as np
import pytest

import runtimes
from runtimes.batching import PREFILL_SLACK, ContinuousBatch, Sampling, Sequence, prefill_groups


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])  # learned positions; rotary with GQA
def test_rows_joining_and_leaving_decode_as_they_would_alone(engine_dir, preset):
    with runtimes.load(engine_dir(preset), threads=1) as engine:
        vocab = engine.signature.outputs[0].shape[-1]
        rng = np.random.default_rng(0)
        jobs = []
        for i, length in enumerate((3, 11, 1, 7, 16, 5)):
            sampling = Sampling(do_sample=True, temperature=0.8, top_k=20, seed=i) if i % 2 else Sampling()
            jobs.append((rng.integers(0, vocab, size=length).tolist(), 3 + 2 * i, sampling))
        alone = [engine.generate([p], n, do_sample=s.do_sample, temperature=s.temperature, top_k=s.top_k,
                                 seed=s.seed)[0].tolist() for p, n, s in jobs]

        batch = ContinuousBatch(engine)
        sequences = [Sequence(p, n, s) for p, n, s in jobs]
        arrivals = {0: sequences[:2], 2: sequences[2:3], 3: sequences[3:5], 7: sequences[5:]}
        widths = []
        for step in range(40):
            batch.step(arrivals.get(step, []))
            widths.append(batch.mask.shape[1])
        assert len(batch) == 0 and batch.mask.shape == (0, 0)  # everyone finished and left
        for sequence, expected in zip(sequences, alone):
            assert sequence.finish_reason == "length"
            assert sequence.tokens == expected
        # The batch narrows when its longest rows leave (padding columns no row needs are dropped).
        assert any(later < earlier for earlier, later in zip(widths, widths[1:]) if later)


def test_an_eos_token_finishes_a_row_without_being_kept(engine_dir):
    with runtimes.load(engine_dir("tiny-gpt2"), threads=1) as engine:
        first = engine.generate([[5, 6, 7]], 4)[0].tolist()
        eos = first[2]
        sequence = Sequence([5, 6, 7], 10, eos_token_ids=(eos,))
        batch = ContinuousBatch(engine)
        batch.step([sequence])
        while len(batch):
            batch.step()
        assert sequence.finish_reason == "stop" and sequence.tokens == first[: first.index(eos)]


def test_a_slot_engine_decodes_in_place_and_grows_its_cache(engine_dir):
    # tiny-llama attends with GroupQueryAttention: the batch binds its caches as past and present at once.
    with runtimes.load(engine_dir("tiny-llama"), threads=1) as engine:
        prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
        alone = [engine.generate([p], 40)[0].tolist() for p in prompts]
        batch = ContinuousBatch(engine)
        sequences = [Sequence(p, 40) for p in prompts]
        batch.step(sequences)
        capacities = set()
        while len(batch):
            capacities.add(batch.steps.capacity)
            assert batch.in_place.shape[1] == batch.steps.capacity >= batch.mask.shape[1]
            batch.step()
        assert [s.tokens for s in sequences] == alone
        assert len(capacities) >= 2  # 6 + 16 columns at first, rebuilt wider when full


class _NoHostBuffers:
    """The engine on an adapter that binds no host buffers, as a GPU session's: `shared_steps` gives None."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def shared_steps(self, *args, **kwargs):
        return None


def test_a_slot_engine_without_host_buffers_carries_its_caches(engine_dir):
    with runtimes.load(engine_dir("tiny-llama"), threads=1) as engine:
        prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [3]]
        alone = [engine.generate([p], 6 + i)[0].tolist() for i, p in enumerate(prompts)]
        batch = ContinuousBatch(_NoHostBuffers(engine))
        sequences = [Sequence(p, 6 + i) for i, p in enumerate(prompts)]
        batch.step(sequences[:2])
        batch.step(sequences[2:])
        while len(batch):
            batch.step()
        assert batch.in_place is None and batch.steps is None  # it fell back to carrying, right-padded
        assert [s.tokens for s in sequences] == alone


class _CountingForward:
    """The engine, counting its `forward` calls (the prefills, on a batch that has no rows yet)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def forward(self, feeds):
        self.calls += 1
        return self.engine.forward(feeds)


def test_prefill_groups_hold_prompts_of_similar_length():
    lengths = [5, 40, 12, 9, 40 - PREFILL_SLACK, 300, 301]
    groups = prefill_groups([Sequence([1] * n, 1) for n in lengths])
    assert [[len(s.prompt) for s in group] for group in groups] == [[301, 300], [40, 40 - PREFILL_SLACK], [12, 9, 5]]
    many = prefill_groups([Sequence([1] * 200, 1) for _ in range(7)])  # at most PREFILL_TOKENS (1024) a call
    assert [len(group) for group in many] == [5, 2]


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])  # padded on the left; on the right (GQA)
def test_newcomers_prefilled_together_decode_as_they_would_alone(engine_dir, preset):
    with runtimes.load(engine_dir(preset), threads=1) as engine:
        prompts = [[5, 6, 7, 8, 9], [3] * 40, list(range(10, 22)), list(range(30, 39))]
        alone = [engine.generate([p], 8)[0].tolist() for p in prompts]
        counting = _CountingForward(engine)
        batch = ContinuousBatch(counting)
        sequences = [Sequence(p, 8) for p in prompts]
        batch.step(sequences)
        assert counting.calls == 2  # the 40-token prompt alone, the three of 5 to 12 tokens in one call
        while len(batch):
            batch.step()
        assert [s.tokens for s in sequences] == alone
