"""Continuous batching for the decoder-LM kind: sequences join and leave one running batch between steps.

Rows of different lengths share the batch by padding, zeros in `attention_mask` and in the caches, the way a
padded `generate` runs on the engine: on the left for the APPEND cache layout, on the right for SLOT
(GroupQueryAttention, which then skips each row's padding). Padding columns that no row needs any more are
dropped when rows leave, so a batch is never wider than its longest live row.

Each row decodes as it would alone: its positions come from its own mask, its sampler from its own seed.
Where the engine decodes in place (SLOT, on an adapter that binds host buffers: runtimes/shared_cache.py), the
caches are rebuilt with room beyond the widest row and every step writes into them, instead of copying the
whole cache into a present one column longer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtimes.decoder_lm import (APPEND, LOGITS_TO_KEEP, PAST_PREFIX, PRESENT_PREFIX, SLOT, next_feeds, prefill_feeds,
                                 vocab_size)
from runtimes.generate import choose_next

# Columns a shared cache holds beyond the widest row when it is rebuilt (rows joining or leaving, or the cache
# full): at least HEADROOM, else as many as the rows are wide, so a batch that runs long is rebuilt log-many
# times. The steps write their keys and values there; until then those columns are never touched (the op
# reads a row's cache up to its own length), so their memory costs no copy and no page faults.
HEADROOM = 16


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


@dataclass
class Part:
    """Rows on their way into the batch: their sequences, mask `[rows, columns]`, caches, pending tokens."""

    rows: list[Sequence]
    mask: np.ndarray
    cache: dict[str, np.ndarray]
    pending: np.ndarray


class ContinuousBatch:
    """The running batch of one engine: `step(joining)` decodes every live row once and prefills newcomers.

    Rows leave and join in one rebuild of the arrays per step at most: finished rows and the padding columns
    no remaining row needs are dropped, and newcomers are appended, the shorter side left-padded.
    Not thread-safe: one scheduler thread drives it.
    """

    def __init__(self, predictor):
        self.predictor = predictor
        self.signature = predictor.signature
        self.layout = getattr(predictor, "cache_layout", APPEND)
        self.rows: list[Sequence] = []
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [rows, cached columns]
        self.cache: dict[str, np.ndarray] = {}  # present.* -> [rows, kv_heads, columns, dim]
        self.pending = np.zeros((0, 1), dtype=np.int64)  # each row's last token, not yet in the cache
        self.sharing = self.layout == SLOT and hasattr(predictor, "shared_steps")
        self.steps = None  # the SharedCache over self.cache while sharing

    def __len__(self) -> int:
        return len(self.rows)

    def step(self, joining: list[Sequence] = ()) -> list[Sequence]:
        """Decode one token for every row, then prefill `joining` (their first token); returns the sequences
        that got a token this step. Those that finished have left the batch when it returns."""
        stepped = self._decode() if self.rows else []
        newcomers = self._prefill(list(joining)) if joining else []
        if newcomers or any(row.finish_reason for row in self.rows):
            self._rebuild(newcomers)
        return stepped + list(joining)

    def leave(self, sequences: list[Sequence], reason: str = "cancelled") -> None:
        """Finish `sequences` (between steps) and drop their rows."""
        for sequence in sequences:
            if sequence.finish_reason is None:
                sequence.finish_reason = reason
        if any(row.finish_reason for row in self.rows):
            self._rebuild()

    def _decode(self) -> list[Sequence]:
        if self.steps is not None and self.mask.shape[1] >= self.steps.capacity:
            self._rebuild()  # the shared cache is full: again, with room
        if self.steps is not None:
            logits = self.steps.step(self.pending)  # the caches are written in place
            self.mask = self.steps.mask
        else:
            feeds = next_feeds(self.signature, {"attention_mask": self.mask}, self.cache, self.pending, layout=self.layout)
            outputs = self.predictor.forward(feeds)
            self.mask = feeds["attention_mask"]
            self.cache = {name: outputs[name] for name in self.cache}
            logits = outputs["logits"]
        self.pending = self._choose(self.rows, logits[:, -1, :])
        return list(self.rows)

    def _prefill(self, joining: list[Sequence]) -> list[Part]:
        """Prefill the newcomers, those of one prompt length together: a left-padded prefill of different
        lengths would spend compute on its padding (half of it, for prompts of 8 to 64 tokens)."""
        by_length: dict[int, list[Sequence]] = {}
        for sequence in joining:
            by_length.setdefault(len(sequence.prompt), []).append(sequence)
        parts = []
        for group in by_length.values():
            ids = np.asarray([s.prompt for s in group], dtype=np.int64)
            keep = {LOGITS_TO_KEEP: np.array(1)} if getattr(self.predictor, "keeps_logits", False) else {}
            outputs = self.predictor.forward({**prefill_feeds(self.signature, ids), **keep})
            pending = self._choose(group, outputs["logits"][:, -1, :])
            cache = {name: array for name, array in outputs.items() if name.startswith(PRESENT_PREFIX)}
            parts.append(Part(group, np.ones_like(ids), cache, pending))
        return parts

    def _rebuild(self, newcomers: list[Part] = ()) -> None:
        """One batch again from the unfinished rows, without the columns none of them needs, and the unfinished
        newcomers, each part padded to the widest."""
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        parts = []
        if keep:
            mask = self.mask[keep]
            used = np.flatnonzero(mask.any(axis=0))  # the padding columns outside serve no kept row
            columns = slice(used[0], used[-1] + 1) if used.size else slice(0, 0)
            cache = {name: np.take(array, keep, axis=0)[:, :, columns] for name, array in self.cache.items()}
            parts.append(Part([self.rows[i] for i in keep], mask[:, columns], cache, self.pending[keep]))
        for part in newcomers:
            live = [i for i, row in enumerate(part.rows) if row.finish_reason is None]
            if live:
                parts.append(Part([part.rows[i] for i in live], part.mask[live],
                                  {name: array[live] for name, array in part.cache.items()}, part.pending[live]))
        width = max((part.mask.shape[1] for part in parts), default=0)
        room = max(HEADROOM, width) if self.sharing else 0
        names = parts[0].cache if parts else {}
        self.rows = [row for part in parts for row in part.rows]
        left = self.layout != SLOT
        self.mask = _stack_padded([part.mask for part in parts], width, 1, left, np.int64)
        self.cache = {name: _stack_padded([part.cache[name] for part in parts], width, 2, left, room=room)
                      for name in names}
        self.pending = np.concatenate([part.pending for part in parts]) if parts else np.zeros((0, 1), np.int64)
        self.steps = None
        if self.sharing and self.rows:
            buffers = {PAST_PREFIX + name[len(PRESENT_PREFIX):]: array for name, array in self.cache.items()}
            self.steps = self.predictor.shared_steps(len(self.rows), width + room, buffers, self.mask)
            if self.steps is None:  # the adapter binds no host buffers (a GPU session): carry the caches
                self.sharing = False
                self.cache = {name: array[:, :, :width] for name, array in self.cache.items()}

    @staticmethod
    def _choose(rows: list[Sequence], logits: np.ndarray) -> np.ndarray:
        """Each row's next token from its last logits, recorded on its Sequence; returned as `[rows, 1]`."""
        picked = logits.argmax(axis=-1).astype(np.int64)  # one argmax for every greedy row, the common case
        for i, row in enumerate(rows):
            if row.rng is not None or row.sampling.repetition_penalty != 1.0:
                picked[i] = row.pick(logits[i])
            row.take(int(picked[i]))
        return picked[:, None]


def warm_up(predictor, rows: int, prompt: int = 8, new_tokens: int = 3) -> None:
    """Run `rows` short sequences through one batch, joining and leaving: ONNX Runtime's first steps at a batch
    size a process has not run cost up to ~1 s more (gpt2 int8 in place, 31 rows joining: 1.07 s cold, 0.63 s
    after this warm-up of 0.18 s; the step after, one row joining: 0.98 s against 0.20 s)."""
    vocab = vocab_size(predictor.signature)
    batch = ContinuousBatch(predictor)
    batch.step([Sequence([i % vocab for i in range(prompt)], new_tokens) for _ in range(rows)])
    while len(batch):
        batch.step()


def _stack_padded(arrays: list[np.ndarray], width: int, axis: int, left: bool, dtype=None, room: int = 0) -> np.ndarray:
    """Stack `arrays` along rows, each padded with zeros to `width` on `axis` (the columns), on the `left` or right;
    `room` more columns after those, not written."""
    if not arrays:
        return np.zeros((0, 0), dtype)
    shape = list(arrays[0].shape)
    shape[0], shape[axis] = sum(a.shape[0] for a in arrays), width + room
    # np.empty, not np.zeros: calloc'd pages fault in on first write, which costs more than the copy.
    out = np.empty(shape, arrays[0].dtype)
    at = 0
    for array in arrays:
        block, pad = out[at: at + array.shape[0]], width - array.shape[axis]
        zeros, data = (slice(0, pad), slice(pad, width)) if left else (slice(width - pad, width), slice(0, width - pad))
        block[(slice(None),) * axis + (zeros,)] = 0
        block[(slice(None),) * axis + (data,)] = array
        at += array.shape[0]
    return out
