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

    Rows leave and join with one copy of the cache per step at most: finished rows and the padding columns no
    remaining row needs are dropped, and newcomers are appended, the shorter side left-padded.
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
        """Decode one token for every row, then prefill `joining` (their first token); returns the sequences
        that got a token this step. Those that finished have left the batch when it returns."""
        stepped = self._decode() if self.rows else []
        joined = self._prefill(list(joining)) if joining else None
        if joined or any(row.finish_reason for row in self.rows):
            self._rebuild(list(joining), *(joined or (None, None, None)))
        return stepped + list(joining)

    def leave(self, sequences: list[Sequence], reason: str = "cancelled") -> None:
        """Finish `sequences` (between steps) and drop their rows."""
        for sequence in sequences:
            if sequence.finish_reason is None:
                sequence.finish_reason = reason
        if any(row.finish_reason for row in self.rows):
            self._rebuild()

    def _decode(self) -> list[Sequence]:
        feeds = next_feeds(self.signature, {"attention_mask": self.mask}, self.cache, self.pending)
        outputs = self.predictor.forward(feeds)
        self.mask = feeds["attention_mask"]
        self.cache = {name: outputs[name] for name in self.cache}
        self.pending = self._choose(self.rows, outputs["logits"][:, -1, :])
        return list(self.rows)

    def _prefill(self, joining: list[Sequence]):
        """The newcomers' (mask, cache, pending token) after their prefill."""
        ids, mask = left_pad([s.prompt for s in joining], self.pad_token_id)
        outputs = self.predictor.forward(prefill_feeds(self.signature, ids, mask))
        pending = self._choose(joining, outputs["logits"][:, -1, :])
        return mask, {name: array for name, array in outputs.items() if name.startswith(PRESENT_PREFIX)}, pending

    def _rebuild(self, joining: list[Sequence] = (), mask=None, cache=None, pending=None) -> None:
        """One copy into fresh arrays: the unfinished rows without the columns none of them needs, then the
        unfinished of `joining` (rows of `mask`, `cache`, `pending`), the shorter side left-padded."""
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        added = [i for i, row in enumerate(joining) if row.finish_reason is None]
        kept_mask = self.mask[keep]
        first = int(np.argmax(kept_mask.any(axis=0))) if kept_mask.any() else kept_mask.shape[1]
        kept_width = kept_mask.shape[1] - first
        added_width = mask.shape[1] if added else 0
        width = max(kept_width, added_width)

        def merged(current: np.ndarray, new: np.ndarray | None, columns: int) -> np.ndarray:
            like = current if new is None else new
            shape = list(like.shape)
            shape[0], shape[columns] = len(keep) + len(added), width
            # np.empty, not np.zeros: calloc'd pages fault in on first write, which costs more than the copy.
            out = np.empty(shape, dtype=like.dtype)
            for rows, source, indices, start, used in ((out[: len(keep)], current, keep, first, kept_width),
                                                       (out[len(keep):], new, added, 0, added_width)):
                if indices:
                    rows[_padding(columns, width - used)] = 0
                    rows[_from_column(columns, width - used)] = np.take(source, indices, axis=0)[_from_column(columns, start)]
            return out

        self.mask = merged(self.mask, mask, 1)
        self.cache = {name: merged(self.cache.get(name), (cache or {}).get(name), 2) for name in (cache or self.cache)}
        self.pending = np.concatenate([self.pending[keep]] + ([pending[added]] if added else []))
        self.rows = [self.rows[i] for i in keep] + [joining[i] for i in added]

    @staticmethod
    def _choose(rows: list[Sequence], logits: np.ndarray) -> np.ndarray:
        """Each row's next token from its last logits, recorded on its Sequence; returned as `[rows, 1]`."""
        picked = logits.argmax(axis=-1).astype(np.int64)  # one argmax for every greedy row, the common case
        for i, row in enumerate(rows):
            if row.rng is not None or row.sampling.repetition_penalty != 1.0:
                picked[i] = row.pick(logits[i])
            row.take(int(picked[i]))
        return picked[:, None]


def _from_column(axis: int, start: int) -> tuple:
    """Index of the columns from `start` on in a batched array whose columns are `axis`."""
    return (slice(None),) * axis + (slice(start, None),)


def _padding(axis: int, width: int) -> tuple:
    """Index of the first `width` columns (the left padding) in a batched array whose columns are `axis`."""
    return (slice(None),) * axis + (slice(0, width),)
