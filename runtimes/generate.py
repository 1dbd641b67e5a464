"""The decoder-LM kind's driver: greedy or sampled decoding over its graph, and its Predictor.

Backend-neutral: each step feeds the previous step's `present.*` arrays back as `past_key_values.*` as
they are; no copy of the cache is made here.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from runtimes.decoder_lm import (APPEND, GRAPHS, LOGITS_TO_KEEP, SLOT, check_layout, last_token_logits, next_feeds,
                                 pad_prompts, pad_to_buckets, prefill_feeds, strip_buckets, vocab_size)
from runtimes.errors import EngineError, FeedError
from runtimes.predictor import Predictor
from runtimes.tokenizer import encode_prompts, load_tokenizer


class DecoderLMPredictor(Predictor):
    """An engine of the decoder-LM kind: `predict` runs its one graph (`model`); `generate` and `stream` decode."""

    provenance = "built by torchkiln: verified at conversion, hash-checked at load"

    def __init__(self, graphs: Mapping[str, Predictor], tokenizer=None, cache_layout: str = APPEND,
                 keeps_logits: bool = False):
        if set(graphs) != set(GRAPHS):
            raise EngineError(f"a decoder-lm engine has graphs {', '.join(GRAPHS)}; got {', '.join(graphs) or 'none'}")
        self.graphs = dict(graphs)
        self.model = self.graphs["model"]
        self.signature = self.model.signature
        self.tokenizer = tokenizer
        self.cache_layout = cache_layout  # runtimes.decoder_lm.APPEND or SLOT: how steps feed its caches
        self.keeps_logits = keeps_logits  # the graph takes `logits_to_keep` (a prefill skips unread logits)
        # Feeds padded to bucketed shapes (a provider that compiles per shape) are padded on the left; an engine
        # whose attention reads right-padded rows (SLOT) is fed its shapes as they are.
        self.buckets = self.model.shape_buckets and cache_layout != SLOT

    @classmethod
    def from_engine_dir(cls, graphs: Mapping[str, Predictor], engine_dir, manifest: Mapping) -> DecoderLMPredictor:
        """The Predictor over opened `graphs`, with the tokenizer the engine carries (if any)."""
        return cls(graphs, tokenizer=load_tokenizer(engine_dir, manifest),
                   cache_layout=manifest.get("cache_layout", APPEND),
                   keeps_logits=bool(manifest.get("logits_to_keep")))

    def predict(self, feeds):
        """One forward pass; `feeds` may add `logits_to_keep` (a scalar: logits of that many last positions
        only, 0 all) where the engine has that input (`keeps_logits`)."""
        if "attention_mask" in feeds:
            check_layout(self.cache_layout, np.asarray(feeds["attention_mask"]))
        extra = {LOGITS_TO_KEEP: np.asarray(feeds[LOGITS_TO_KEEP], np.int64)} if LOGITS_TO_KEEP in feeds else {}
        if extra and not self.keeps_logits:
            raise FeedError(f"input '{LOGITS_TO_KEEP}': this engine computes every position's logits (it has no such "
                            "input; engines converted since it was added do)")
        feeds = {name: array for name, array in feeds.items() if name != LOGITS_TO_KEEP}
        if not extra and not self.buckets:
            return self.model.predict(feeds)  # the graph's own checks (a foreign one drops feeds it does not take)
        self.signature.validate(feeds)
        return self.forward({**feeds, **extra})

    def forward(self, feeds):
        if not self.buckets:
            return self.model.forward(feeds)
        # Bucketed feeds: every position's logits, which strip_buckets cuts as it expects.
        feeds = {name: array for name, array in feeds.items() if name != LOGITS_TO_KEEP}
        padded, padding = pad_to_buckets(self.signature, feeds)
        return strip_buckets(self.model.forward(padded), padding)

    def generate(self, prompts, max_new_tokens: int = 32, **options) -> np.ndarray:
        """New tokens for each prompt, `[batch, new_tokens]`; see `stream` below for the options.

        `prompts`: token ids (`[batch, seq]` array or lists of ids), or text when the engine has a tokenizer.
        """
        return generate(self, encode_prompts(self.tokenizer, prompts), max_new_tokens, **options)

    def stream(self, prompts, max_new_tokens: int = 32, **options) -> Iterator[np.ndarray]:
        """Yield the next token of every prompt, `[batch]`, as each decode step finishes."""
        return stream(self, encode_prompts(self.tokenizer, prompts), max_new_tokens, **options)

    def decode_steps(self, batch: int, capacity: int):
        """What `stream` decodes with: `shared_steps`, else `CarriedCache`."""
        return self.shared_steps(batch, capacity) or CarriedCache(self, self.cache_layout)

    def shared_steps(self, batch: int, capacity: int, buffers: dict[str, np.ndarray] | None = None,
                     mask: np.ndarray | None = None):
        """Decode steps over one preallocated cache per layer shared by past and present (`SharedCache`, over
        `buffers` when given), where the graph's attention writes in place (SLOT layout) and the adapter binds
        host buffers; else None."""
        shared = getattr(self.model, "shared_cache", None)
        if self.cache_layout != SLOT or shared is None or self.model.shape_buckets:
            return None
        return shared(batch, capacity, self.keeps_logits, buffers=buffers, mask=mask)

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.close()


def choose_next(
    logits: np.ndarray,
    history: np.ndarray,
    history_mask: np.ndarray,
    rng: np.random.Generator | None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> np.ndarray:
    """Next token per row from `logits [batch, vocab]`: greedy when `rng` is None, else sampled.

    `history [batch, seen]` with `history_mask` are the tokens seen so far, for the repetition penalty.
    """
    if rng is None and repetition_penalty == 1.0:
        return logits.argmax(axis=-1).astype(np.int64)  # the common greedy case: no copy of the logits
    logits = logits.astype(np.float64)
    if repetition_penalty != 1.0:
        for row in range(logits.shape[0]):
            seen = np.unique(history[row][history_mask[row] == 1])
            scores = logits[row, seen]
            logits[row, seen] = np.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
    if rng is None:
        return logits.argmax(axis=-1).astype(np.int64)
    logits = logits / max(temperature, 1e-6)
    if 0 < top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    # Inverse-CDF sampling: one uniform draw per row keeps runs reproducible for a seed.
    draws = rng.random(probs.shape[0])[:, None]
    picked = (np.cumsum(probs, axis=-1) < draws).sum(axis=-1)
    return np.minimum(picked, probs.shape[-1] - 1).astype(np.int64)


def stream(
    predictor,
    prompts,
    max_new_tokens: int = 32,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    seed: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield the next token of each prompt, `[batch]`, step by step.

    Rows that produced an EOS token yield `pad_token_id` afterwards; the loop ends when every row has
    finished or after `max_new_tokens` steps.
    """
    if max_new_tokens < 1:
        raise FeedError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    layout = getattr(predictor, "cache_layout", APPEND)
    ids, mask = pad_prompts(prompts, pad_token_id, layout)
    vocab = vocab_size(predictor.signature)
    tokens = ids[mask == 1]
    outside = tokens[(tokens < 0) | (tokens >= vocab)]
    if outside.size:
        raise FeedError(f"prompts: token id {int(outside[0])} is outside the vocabulary [0, {vocab})")
    eos = np.array([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    rng = np.random.default_rng(seed) if do_sample else None
    batch = ids.shape[0]
    opener = getattr(predictor, "decode_steps", None)
    steps = opener(batch, ids.shape[1] + max_new_tokens) if opener else CarriedCache(predictor, layout)
    history, history_mask = ids, mask
    finished = np.zeros(batch, dtype=bool)
    for step in range(max_new_tokens):
        if step == 0:
            logits = steps.prefill(ids, mask)  # maybe only the last columns' (logits_to_keep)
            last = last_token_logits(logits, mask[:, -logits.shape[1]:])
        else:
            last = steps.step(column, keep=False)[:, -1, :]  # read before the next step overwrites it
        tokens = choose_next(last, history, history_mask, rng, temperature, top_k, top_p, repetition_penalty)
        if eos.size:  # rows that ended get padding; without EOS ids no row ends early
            tokens = np.where(finished, pad_token_id, tokens)
            finished |= np.isin(tokens, eos)
        yield tokens
        if finished.all() or step == max_new_tokens - 1:
            return
        column = tokens[:, None]
        if repetition_penalty != 1.0:  # the only reader of the history
            history = np.concatenate([history, column], axis=1)
            history_mask = np.concatenate([history_mask, (~finished[:, None]).astype(np.int64)], axis=1)


class CarriedCache:
    """Decode steps that feed each step's `present.*` arrays back as the next `past_key_values.*`, as they are:
    what every backend runs."""

    def __init__(self, predictor, layout: str = APPEND):
        self.predictor, self.layout = predictor, layout
        self.feeds: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The prompt's logits `[batch, sequence, vocab]`; the prompt is checked here, later steps are not."""
        self.feeds = prefill_feeds(self.predictor.signature, ids, mask,
                                   last_logits_only=getattr(self.predictor, "keeps_logits", False))
        self.outputs = self.predictor.predict(self.feeds)
        return self.outputs["logits"]

    def step(self, new_ids: np.ndarray, keep: bool = True) -> np.ndarray:
        """The logits of `new_ids [batch, n]` put behind the cache, a new array each step whatever `keep` says
        (`SharedCache.step`'s flag)."""
        self.feeds = next_feeds(self.predictor.signature, self.feeds, self.outputs, new_ids, layout=self.layout)
        self.outputs = self.predictor.forward(self.feeds)
        return self.outputs["logits"]


def generate(
    predictor, prompts, max_new_tokens: int = 32, on_token: Callable[[np.ndarray], None] | None = None, **options
) -> np.ndarray:
    """Run `stream` to the end; returns the new tokens `[batch, steps]`. `on_token` sees each step."""
    steps = []
    for tokens in stream(predictor, prompts, max_new_tokens, **options):
        if on_token is not None:
            on_token(tokens)
        steps.append(tokens)
    return np.stack(steps, axis=1)
