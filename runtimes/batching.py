"""Continuous batching for the decoder-LM kind: sequences join and leave one running batch between steps.

Rows of different lengths share the batch by padding, zeros in `attention_mask` and in the caches, the way a
padded `generate` runs on the engine: on the left for the APPEND cache layout, on the right for SLOT
(GroupQueryAttention, which then skips each row's padding). Padding columns that no row needs any more are
dropped when rows leave, so a batch is never wider than its longest live row.

Each row decodes as it would alone: its positions come from its own mask, its sampler from its own seed.
Where the engine decodes in place (SLOT, on an adapter that binds host buffers: runtimes/shared_cache.py), every
step writes into one buffer per layer instead of copying the whole cache into a present one column longer, and
rows join and leave that buffer a row's copy at a time (`InPlaceCaches`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtimes.decoder_lm import (APPEND, PAST_PREFIX, PRESENT_PREFIX, SLOT, carried_cache, last_token_logits,
                                 next_feeds, pad_prompts, past_inputs, prefill_feeds, vocab_size)
from runtimes.generate import choose_next

# Columns an in-place cache holds beyond the widest row when it grows: at least HEADROOM, else as many as the
# rows are wide, so a batch that runs long grows log-many times. The steps write their keys and values there;
# until then those columns are never touched (the op reads a row's cache up to its own length), so their
# memory costs no copy and no page faults.
HEADROOM = 16

# Newcomers are prefilled together when their prompts are of similar length. A prefill call costs a fixed part
# (reading every weight) plus a part per token: gpt2 int8 on 2 cores, about 6 ms plus 0.28 ms a token, so a
# prompt padded by up to ~20 tokens costs less in its group than in a call of its own; 16 leaves a margin. The
# fixed part is a weight read and the per-token part a pass over the same weights, so the break-even length is
# about the machine's compute-to-bandwidth ratio, not the model's size.
PREFILL_SLACK = 16
# Padded tokens in one prefill call at most: attention's scores grow with rows x length^2, and beyond a few
# hundred tokens the fixed part no longer matters.
PREFILL_TOKENS = 1024


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

    Rows leave and join once per step at most: in place where the engine decodes so (`InPlaceCaches`), else by
    restacking the carried caches, finished rows and the padding columns no remaining row needs dropped and
    newcomers appended, the shorter side padded. Not thread-safe: one scheduler thread drives it.
    """

    def __init__(self, predictor):
        self.predictor = predictor
        self.signature = predictor.signature
        self.layout = getattr(predictor, "cache_layout", APPEND)
        self.rows: list[Sequence] = []
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [rows, cached columns]
        self.cache: dict[str, np.ndarray] = {}  # present.* -> [rows, kv_heads, columns, dim]
        self.pending = np.zeros((0, 1), dtype=np.int64)  # each row's last token, not yet in the cache
        in_place = self.layout == SLOT and hasattr(predictor, "shared_steps")
        self.in_place = InPlaceCaches(self.signature) if in_place else None
        self.steps = None  # the SharedCache over the in-place caches' live rows

    def __len__(self) -> int:
        return len(self.rows)

    def step(self, joining: list[Sequence] = ()) -> list[Sequence]:
        """Decode one token for every row, then prefill `joining` (their first token); returns the sequences
        that got a token this step. Those that finished have left the batch when it returns."""
        stepped = self._decode() if self.rows else []
        newcomers = self._prefill(list(joining)) if joining else []
        if newcomers or any(row.finish_reason for row in self.rows):
            self._regroup(newcomers)
        return stepped + list(joining)

    def leave(self, sequences: list[Sequence], reason: str = "cancelled") -> None:
        """Finish `sequences` (between steps) and drop their rows."""
        for sequence in sequences:
            if sequence.finish_reason is None:
                sequence.finish_reason = reason
        if any(row.finish_reason for row in self.rows):
            self._regroup()

    def _regroup(self, newcomers: list[Part] = ()) -> None:
        """Finished rows out, unfinished newcomers in: in place where the engine decodes so, else restacked."""
        newcomers = [_unfinished(part) for part in newcomers]
        newcomers = [part for part in newcomers if part.rows]
        if self.in_place is None:
            self._rebuild(newcomers)
            return
        self.rows, self.mask, self.pending = self.in_place.regroup(self.rows, self.mask, self.pending, newcomers)
        self._bind()
        if self.rows and self.steps is None:  # the adapter binds no host buffers (a GPU session): carry the caches
            self.cache = self.in_place.carried(self.mask.shape)
            self.in_place = None

    def _bind(self) -> None:
        """Decode steps over the in-place caches' live rows."""
        rows = len(self.rows)
        views = self.in_place.views(rows)
        self.steps = self.predictor.shared_steps(rows, self.in_place.shape[1], views, self.mask) if rows else None

    def _decode(self) -> list[Sequence]:
        if self.steps is not None:
            if self.in_place.reserve(len(self.rows), self.mask.shape[1] + 1, self.mask):  # it was full
                self._bind()
            logits = self.steps.step(self.pending, keep=False)  # the caches are written in place; read below
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
        """Prefill the newcomers, a call per group of similar prompt lengths (`prefill_groups`), each group
        padded as a padded `generate` pads it (left for APPEND, right for SLOT)."""
        keeps_logits = getattr(self.predictor, "keeps_logits", False)
        parts = []
        for group in prefill_groups(joining):
            ids, mask = pad_prompts([s.prompt for s in group], layout=self.layout)
            outputs = self.predictor.forward(prefill_feeds(self.signature, ids, mask, last_logits_only=keeps_logits))
            logits = outputs["logits"]
            pending = self._choose(group, last_token_logits(logits, mask[:, -logits.shape[1]:]))
            cache = {name: array for name, array in outputs.items() if name.startswith(PRESENT_PREFIX)}
            parts.append(Part(group, mask, cache, pending))
        return parts

    def _rebuild(self, newcomers: list[Part] = ()) -> None:
        """One batch again from the unfinished rows, without the columns none of them needs, and `newcomers`,
        each part padded to the widest (caches carried from step to step)."""
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        parts = []
        if keep:
            mask = self.mask[keep]
            used = np.flatnonzero(mask.any(axis=0))  # the padding columns outside serve no kept row
            columns = slice(used[0], used[-1] + 1) if used.size else slice(0, 0)
            cache = {name: array[keep][:, :, columns] for name, array in self.cache.items()}
            parts.append(Part([self.rows[i] for i in keep], mask[:, columns], cache, self.pending[keep]))
        parts += newcomers
        width = max((part.mask.shape[1] for part in parts), default=0)
        names = parts[0].cache if parts else {}
        self.rows = [row for part in parts for row in part.rows]
        left = self.layout != SLOT
        self.mask = _stack_padded([part.mask for part in parts], width, 1, left, np.int64)
        self.cache = {name: _stack_padded([part.cache[name] for part in parts], width, 2, left) for name in names}
        self.pending = np.concatenate([part.pending for part in parts]) if parts else np.zeros((0, 1), np.int64)

    @staticmethod
    def _choose(rows: list[Sequence], logits: np.ndarray) -> np.ndarray:
        """Each row's next token from its last logits, recorded on its Sequence; returned as `[rows, 1]`."""
        picked = logits.argmax(axis=-1).astype(np.int64)  # one argmax for every greedy row, the common case
        for i, row in enumerate(rows):
            if row.rng is not None or row.sampling.repetition_penalty != 1.0:
                picked[i] = row.pick(logits[i])
            row.take(int(picked[i]))
        return picked[:, None]


class InPlaceCaches:
    """The caches of a batch that decodes in place: one buffer per layer, `[rows, kv_heads, capacity, dim]`, the
    live rows first and each right-padded (SLOT).

    A row joins by its prefill cache being copied into the next free row, and leaves by the last live row moving
    into its place, its written columns only: a row's copy each, where restacking the batch copies every row
    (on gpt2 int8 serving 16 clients, restacking took 26 % of the scheduler's time). The buffers grow, their live
    part copied once, only when rows or columns run out; the rest of them is never written until used."""

    def __init__(self, signature):
        self.signature = signature
        self.specs = past_inputs(signature)
        self.buffers: dict[str, np.ndarray] = {}  # past name -> [rows, kv_heads, capacity, dim]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) the buffers hold."""
        some = next(iter(self.buffers.values()), None)
        return (0, 0) if some is None else (some.shape[0], some.shape[2])

    def regroup(self, rows: list[Sequence], mask: np.ndarray, pending: np.ndarray,
                newcomers: list[Part]) -> tuple[list[Sequence], np.ndarray, np.ndarray]:
        """The batch's rows, mask and pending tokens once its finished rows left and `newcomers` joined."""
        rows, mask, pending = list(rows), mask.copy(), pending.copy()
        live = sum(row.finish_reason is None for row in rows)
        holes = [i for i in range(live) if rows[i].finish_reason is not None]
        movers = [i for i in range(live, len(rows)) if rows[i].finish_reason is None]
        for hole, mover in zip(holes, movers):  # as many of each: the finished rows among the first `live`
            written = int(mask[mover].sum())
            for buffer in self.buffers.values():
                buffer[hole, :, :written] = buffer[mover, :, :written]
            rows[hole], mask[hole], pending[hole] = rows[mover], mask[mover], pending[mover]
        rows, mask, pending = rows[:live], mask[:live], pending[:live]
        width = max([int(mask.sum(axis=1).max(initial=0))] + [part.mask.shape[1] for part in newcomers])
        total = live + sum(len(part.rows) for part in newcomers)
        if total:
            self.reserve(total, width + 1, mask)
        grown = np.zeros((total, width), np.int64)
        kept = min(width, mask.shape[1])
        grown[:live, :kept] = mask[:, :kept]
        at = live
        for part in newcomers:
            count, length = part.mask.shape
            for name, present in carried_cache(self.signature, part.cache).items():
                self.buffers[name][at: at + count, :, :length] = present
            grown[at: at + count, :length] = part.mask
            at += count
        rows += [row for part in newcomers for row in part.rows]
        pending = np.concatenate([pending, *(part.pending for part in newcomers)])
        return rows, grown, pending

    def reserve(self, rows: int, columns: int, mask: np.ndarray) -> bool:
        """Room for `rows` rows of `columns` columns; True when the buffers grew (the live rows, `mask`, copied
        over: bind them again)."""
        have_rows, have_columns = self.shape
        if rows <= have_rows and columns <= have_columns:
            return False
        live, written = mask.shape
        capacity = have_columns if columns <= have_columns else columns + max(HEADROOM, columns)
        # Twice the rows when they run out: a batch filling up one row at a time grows log-many times.
        height = max(rows, 2 * have_rows) if rows > have_rows else have_rows
        grown = {}
        for spec in self.specs:
            _, heads, _, dim = spec.shape
            # np.empty, not np.zeros: calloc'd pages fault in on first write, which costs more than the copy.
            buffer = np.empty((height, heads, capacity, dim), spec.dtype)
            if spec.name in self.buffers:
                buffer[:live, :, :written] = self.buffers[spec.name][:live, :, :written]
            grown[spec.name] = buffer
        self.buffers = grown
        return True

    def carried(self, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """The first `shape` (rows, columns) of the caches as present arrays, for a batch that carries them instead."""
        rows, columns = shape
        return {PRESENT_PREFIX + name[len(PAST_PREFIX):]: buffer[:rows, :, :columns].copy()
                for name, buffer in self.buffers.items()}

    def views(self, rows: int) -> dict[str, np.ndarray]:
        """The first `rows` rows of each buffer: C-contiguous, as binding needs."""
        return {name: buffer[:rows] for name, buffer in self.buffers.items()}


def _unfinished(part: Part) -> Part:
    """`part` without the rows that finished on their first token."""
    live = [i for i, row in enumerate(part.rows) if row.finish_reason is None]
    if len(live) == len(part.rows):
        return part
    return Part([part.rows[i] for i in live], part.mask[live], {name: array[live] for name, array in part.cache.items()},
                part.pending[live])


def prefill_groups(sequences: list[Sequence]) -> list[list[Sequence]]:
    """`sequences` in groups to prefill together: longest prompt first, each group's prompts at most
    PREFILL_SLACK tokens shorter than its longest, and at most PREFILL_TOKENS tokens in a group, padding included."""
    groups: list[list[Sequence]] = []
    for sequence in sorted(sequences, key=lambda s: len(s.prompt), reverse=True):
        group = groups[-1] if groups else []
        longest = len(group[0].prompt) if group else 0
        if group and longest - len(sequence.prompt) <= PREFILL_SLACK and (len(group) + 1) * longest <= PREFILL_TOKENS:
            group.append(sequence)
        else:
            groups.append([sequence])
    return groups


def warm_up(predictor, rows: int, prompt: int = 8, new_tokens: int = 3) -> None:
    """Run `rows` short sequences through one batch, joining and leaving: ONNX Runtime's first steps at a batch
    size a process has not run cost up to ~1 s more (gpt2 int8 in place, 31 rows joining: 1.07 s cold, 0.63 s
    after this warm-up of 0.18 s; the step after, one row joining: 0.98 s against 0.20 s)."""
    vocab = vocab_size(predictor.signature)
    batch = ContinuousBatch(predictor)
    batch.step([Sequence([i % vocab for i in range(prompt)], new_tokens) for _ in range(rows)])
    while len(batch):
        batch.step()


def _stack_padded(arrays: list[np.ndarray], width: int, axis: int, left: bool, dtype=None) -> np.ndarray:
    """Stack `arrays` along rows, each padded with zeros to `width` on `axis` (the columns), on the `left` or right."""
    if not arrays:
        return np.zeros((0, 0), dtype)
    shape = list(arrays[0].shape)
    shape[0], shape[axis] = sum(a.shape[0] for a in arrays), width
    out = np.empty(shape, arrays[0].dtype)
    at = 0
    for array in arrays:
        block, pad = out[at: at + array.shape[0]], width - array.shape[axis]
        zeros, data = (slice(0, pad), slice(pad, width)) if left else (slice(width - pad, width), slice(0, width - pad))
        block[(slice(None),) * axis + (zeros,)] = 0
        block[(slice(None),) * axis + (data,)] = array
        at += array.shape[0]
    return out
