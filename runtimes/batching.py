"""Continuous batching for the decoder-LM kind: sequences join and leave one running batch between steps.

Rows of different lengths share the batch by left padding, zeros in `attention_mask` and in the caches, the
way a left-padded `generate` already runs on every engine: no other graph is needed, so it works on every
backend. (A fused attention with per-row sequence lengths would skip the padded columns; that is the
shared-buffer GQA path, not yet the decoder graphs' contract.) Padding columns that no row needs any more are
dropped when rows leave, so a batch is never wider than its longest live row.

Each row decodes as it would alone: its positions come from its own mask, its sampler from its own seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtimes.decoder_lm import PRESENT_PREFIX, next_feeds, prefill_feeds
from runtimes.generate import choose_next, left_pad


@dataclass
class Sampling:
    """How one sequence picks its tokens: greedy unless `do_sample`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass(eq=False)
class Sequence:
    """One request's prompt and what it has produced; `finish_reason` is set when it leaves the batch."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    eos_token_ids: tuple[int, ...] = ()
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop" (an EOS token) or why it was cancelled

    def __post_init__(self):
        self.rng = np.random.default_rng(self.sampling.seed) if self.sampling.do_sample else None

    def pick(self, logits: np.ndarray) -> int:
        """The next token from this row's last logits `[vocab]`, with its own sampler."""
        s = self.sampling
        history = np.asarray([self.prompt + self.tokens], dtype=np.int64)
        return int(choose_next(logits[None, :], history, np.ones_like(history), self.rng,
                               s.temperature, s.top_k, s.top_p, s.repetition_penalty)[0])

    def take(self, token: int) -> None:
        """Record `token`; finish on an EOS token (not kept) or at `max_new_tokens`."""
        if token in self.eos_token_ids:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        if len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"


class ContinuousBatch:
    """The running batch of one engine: `step(joining)` decodes every live row once and prefills newcomers.

    Not thread-safe: one scheduler thread drives it.
    """

    def __init__(self, predictor, pad_token_id: int = 0):
        self.predictor = predictor
        self.signature = predictor.signature
        self.pad_token_id = pad_token_id
        self.rows: list[Sequence] = []
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [rows, cached columns]
        self.cache: dict[str, np.ndarray] = {}  # present.* -> [rows, kv_heads, columns, dim]
        self.pending = np.zeros((0, 1), dtype=np.int64)  # each row's last token, not yet in the cache

    def __len__(self) -> int:
        return len(self.rows)

    def step(self, joining: list[Sequence] = ()) -> list[Sequence]:
        """Decode one token for every live row, then prefill `joining` (their first token); returns the
        sequences that got a token this step. Finished ones have left the batch when it returns."""
        stepped = self._decode() if self.rows else []
        if joining:
            stepped += self._prefill(list(joining))
        self.leave([row for row in self.rows if row.finish_reason])
        return stepped

    def leave(self, sequences: list[Sequence]) -> None:
        """Take `sequences` out of the batch (between steps)."""
        gone = {id(s) for s in sequences}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        mask = self.mask[keep]
        # Columns that are padding in every remaining row are dropped: the batch narrows as long rows leave.
        first = int(np.argmax(mask.any(axis=0))) if mask.any() else mask.shape[1]
        self.mask = mask[:, first:]
        self.cache = {name: array[keep][:, :, first:] for name, array in self.cache.items()}
        self.pending = self.pending[keep]

    def _decode(self) -> list[Sequence]:
        feeds = next_feeds(self.signature, {"attention_mask": self.mask}, self.cache, self.pending)
        outputs = self.predictor.forward(feeds)
        self.mask = feeds["attention_mask"]
        self.cache = {name: outputs[name] for name in self.cache}
        self.pending = self._choose(self.rows, outputs["logits"][:, -1, :])
        return list(self.rows)

    def _prefill(self, joining: list[Sequence]) -> list[Sequence]:
        ids, mask = left_pad([s.prompt for s in joining], self.pad_token_id)
        outputs = self.predictor.forward(prefill_feeds(self.signature, ids, mask))
        pending = self._choose(joining, outputs["logits"][:, -1, :])
        cache = {name: array for name, array in outputs.items() if name.startswith(PRESENT_PREFIX)}
        if not self.rows:
            self.mask, self.cache, self.pending, self.rows = mask, cache, pending, list(joining)
            return joining
        # Join the running batch, left-padding whichever side is shorter.
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = np.concatenate([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.cache = {name: np.concatenate([_pad_left(self.cache[name], width, 2), _pad_left(array, width, 2)])
                      for name, array in cache.items()}
        self.pending = np.concatenate([self.pending, pending])
        self.rows += joining
        return joining

    @staticmethod
    def _choose(rows: list[Sequence], logits: np.ndarray) -> np.ndarray:
        """Each row's next token from its last logits, recorded on its Sequence; returned as `[rows, 1]`."""
        greedy = [row.rng is None and row.sampling.repetition_penalty == 1.0 for row in rows]
        picked = logits.argmax(axis=-1).astype(np.int64)  # one argmax for every greedy row, the common case
        for i, row in enumerate(rows):
            if not greedy[i]:
                picked[i] = row.pick(logits[i])
            row.take(int(picked[i]))
        return picked[:, None]


def _pad_left(array: np.ndarray, width: int, axis: int) -> np.ndarray:
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (missing, 0)
    return np.pad(array, pad)
