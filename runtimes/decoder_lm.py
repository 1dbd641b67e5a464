"""The decoder-LM kind: its IO contract, signature and feed builders, in numpy only.

IO names are those Optimum and ONNX Runtime GenAI use: `input_ids [batch, sequence]`,
`attention_mask [batch, total_sequence]`, `position_ids [batch, sequence]`,
`past_key_values.{i}.key|value [batch, kv_heads, past_sequence, head_dim]` -> `logits [batch, sequence,
vocab]`, `present.{i}.key|value [batch, kv_heads, total_sequence, head_dim]`. One graph, role `model`,
serves prefill (past_sequence 0) and decode.

The exporter, the optimizers, verification, bench, the reference and the decode loop all build their
feeds here. The kind's Predictor (`generate`, `stream`) is `runtimes.generate.DecoderLMPredictor`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from runtimes.errors import FeedError
from runtimes.signature import Signature, TensorSpec

KIND = "decoder-lm"
GRAPHS = ("model",)
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
# Dims that follow from others: a step's caches hold the past and the new tokens.
DERIVED_DIMS = {"total_sequence": ("past_sequence", "sequence")}

# Where a row's tokens sit in its cache columns; an engine's manifest records its `cache_layout`.
# APPEND: a step's tokens join every row as new last columns (a Concat in the graph); prompts are left-padded,
#   so every row's last token is in the last column. Every graph of this kind can run so.
# SLOT: row i's tokens fill its columns 0..n-1 and a step writes each token at the column of its position
#   (GroupQueryAttention, which reads positions and ignores the mask); prompts are right-padded, and the mask
#   is each row's ones followed by zeros.
APPEND, SLOT = "append", "slot"
# An optional scalar input (optimizers/logits_to_keep.py): logits of that many last positions only; 0 or absent: all.
LOGITS_TO_KEEP = "logits_to_keep"


@dataclass(frozen=True)
class ModelFacts:
    """Sizes of one decoder LM: what the KV-cache contract is built from.

    `kv_heads` and the head dims are those of the caches the model writes (1 KV head for multi-query
    attention); values may be narrower or wider than keys (multi-head latent attention).
    """

    layers: int
    heads: int
    kv_heads: int
    head_dim: int  # of the keys
    hidden_size: int
    vocab_size: int
    value_head_dim: int | None = None  # None: the keys' head_dim
    # (kv_heads, key dim, value dim) of each layer, where layers differ (Gemma 4's global layers have wider
    # heads than its sliding ones); empty when every layer has the sizes above.
    layer_caches: tuple[tuple[int, int, int], ...] = ()
    # Each layer's sliding window (the keys a query sees, itself included; 0: all), where any layer slides.
    attention_windows: tuple[int, ...] = ()

    @property
    def value_dim(self) -> int:
        return self.value_head_dim or self.head_dim

    def cache_dims(self, layer: int) -> tuple[int, int, int]:
        """(kv_heads, key dim, value dim) of `layer`'s cache."""
        return self.layer_caches[layer] if self.layer_caches else (self.kv_heads, self.head_dim, self.value_dim)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) in the order every graph of this kind takes and gives them."""
    cache = [(i, kind) for i in range(layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"{PAST_PREFIX}{i}.{k}" for i, k in cache]
    outputs = ["logits"] + [f"{PRESENT_PREFIX}{i}.{k}" for i, k in cache]
    return inputs, outputs


def contract_signature(facts: ModelFacts, dtype: str = "float32") -> Signature:
    """The signature every engine of this kind has, its caches and logits in `dtype`."""
    inputs, outputs = io_names(facts.layers)
    tokens = {"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "total_sequence"),
              "position_ids": ("batch", "sequence")}

    def cache(name: str, length: str) -> TensorSpec:
        layer, kind = name.split(".")[-2:]
        kv_heads, key_dim, value_dim = facts.cache_dims(int(layer))
        return TensorSpec(name, dtype, ("batch", kv_heads, length, value_dim if kind == "value" else key_dim))

    return Signature(
        tuple(TensorSpec(n, "int64", tokens[n]) if n in tokens else cache(n, "past_sequence") for n in inputs),
        tuple(TensorSpec(n, dtype, ("batch", "sequence", facts.vocab_size)) if n == "logits" else cache(n, "total_sequence")
              for n in outputs),
    )


def vocab_size(signature: Signature) -> int:
    """The logits' last axis; the exporter fixes it, so it is a number in every engine's signature."""
    logits = next(t for t in signature.outputs if t.name == "logits")
    return int(logits.shape[-1])


def past_inputs(signature: Signature) -> tuple[TensorSpec, ...]:
    """The cache inputs, `past_key_values.{i}.key|value`, in order."""
    return tuple(t for t in signature.inputs if t.name.startswith(PAST_PREFIX))


def empty_cache(signature: Signature, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past arrays for a prefill step, `[batch, kv_heads, 0, head_dim]`."""
    cache = {}
    for spec in past_inputs(signature):
        shape = [batch if i == 0 else (0 if isinstance(d, str) else d) for i, d in enumerate(spec.shape)]
        cache[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return cache


def carried_cache(signature: Signature, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The next step's `past_key_values.*` feeds: this step's `present.*` outputs, not copied."""
    return {spec.name: outputs[PRESENT_PREFIX + spec.name[len(PAST_PREFIX):]] for spec in past_inputs(signature)}


def positions_of(mask: np.ndarray) -> np.ndarray:
    """Each token's position from `attention_mask [batch, total]`: the count of real tokens before it
    (left padding gets 0)."""
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)


def prefill_feeds(signature: Signature, ids: np.ndarray, mask: np.ndarray | None = None,
                  last_logits_only: bool = False) -> dict[str, np.ndarray]:
    """A prefill of `ids [batch, sequence]` (padded where `mask` is 0) with empty caches; `last_logits_only`
    (for a graph that takes `logits_to_keep`) asks for the last columns that hold every row's last token."""
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, dtype=np.int64)
    keep = {LOGITS_TO_KEEP: np.array(logits_needed(mask))} if last_logits_only else {}
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions_of(mask),
            **empty_cache(signature, ids.shape[0]), **keep}


def next_feeds(signature: Signature, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
               new_ids: np.ndarray, new_mask: np.ndarray | None = None, layout: str = APPEND) -> dict[str, np.ndarray]:
    """The step after `feeds`: `new_ids [batch, n]` behind the cache `outputs` returned, in the engine's `layout`.

    `new_mask [batch, n]` marks which new tokens are real (default: all; APPEND only: a SLOT row has no column
    to leave empty); positions continue each row's count.
    """
    return {**step_inputs(feeds["attention_mask"], new_ids, new_mask, layout), **carried_cache(signature, outputs)}


def step_inputs(mask: np.ndarray, new_ids: np.ndarray, new_mask: np.ndarray | None = None,
                layout: str = APPEND) -> dict[str, np.ndarray]:
    """`input_ids`, `attention_mask` and `position_ids` of the step that puts `new_ids` behind a cache whose
    columns `mask` describes; `next_feeds` without the cache."""
    new_ids = np.asarray(new_ids, dtype=np.int64)
    if layout == SLOT:
        if new_mask is not None and not np.all(new_mask):
            raise FeedError("new_mask: an engine whose cache layout is 'slot' takes real tokens only")
        positions = mask.sum(axis=1)[:, None] + np.arange(new_ids.shape[1])
        width = int(positions.max(initial=-1)) + 1
        mask = (np.arange(width)[None, :] <= positions[:, -1:]).astype(np.int64)
        return {"input_ids": new_ids, "attention_mask": mask, "position_ids": positions.astype(np.int64)}
    new_mask = np.ones_like(new_ids) if new_mask is None else np.asarray(new_mask, dtype=np.int64)
    mask = np.concatenate([mask, new_mask], axis=1)
    return {"input_ids": new_ids, "attention_mask": mask, "position_ids": positions_of(mask)[:, -new_ids.shape[1]:]}


def pad_prompts(prompts, pad_token_id: int = 0, layout: str = APPEND) -> tuple[np.ndarray, np.ndarray]:
    """Prompts (a `[batch, seq]` array or a list of token lists) -> (input_ids, attention_mask), the shorter
    ones padded on the left for APPEND (every row's last token in the last column), on the right for SLOT."""
    if isinstance(prompts, np.ndarray):
        if prompts.ndim != 2:
            raise FeedError(f"prompts: expected token ids [batch, sequence], got shape {list(prompts.shape)}")
        prompts = prompts.tolist()
    rows = [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise FeedError("prompts: every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        columns = slice(0, len(row)) if layout == SLOT else slice(width - len(row), width)
        ids[i, columns] = row
        mask[i, columns] = 1
    return ids, mask


def _last_columns(mask: np.ndarray) -> np.ndarray:
    """Each row's last column holding a real token (1 in `mask [batch, n]`)."""
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1] != 0, axis=1)


def last_token_logits(logits: np.ndarray, new_mask: np.ndarray) -> np.ndarray:
    """`logits [batch, n, vocab]` of each row's last real new token (`new_mask [batch, n]`), `[batch, vocab]`."""
    return logits[np.arange(logits.shape[0]), _last_columns(new_mask)]


def logits_needed(mask: np.ndarray) -> int:
    """How many last columns of a prefill hold every row's last real token (1 for left padding): the
    `logits_to_keep` that still gives each row its next-token logits."""
    return int(mask.shape[1] - _last_columns(mask).min()) if mask.size else 1


def check_layout(layout: str, mask: np.ndarray) -> None:
    """A SLOT engine reads each row's tokens from column 0: refuse a left-padded mask, which it would misread."""
    if layout == SLOT and mask.size and not mask[:, 0].all():
        raise FeedError("attention_mask: this engine's attention (GroupQueryAttention) reads each row's tokens from "
                        "column 0, so rows must be padded on the right (ones, then zeros); a row here starts with "
                        "padding. Pad on the right, or convert with --pass-option fusion.gqa=false for left padding")


def bucket(length: int) -> int:
    """The smallest power of two >= `length`; 0 stays 0 (a prefill has no past)."""
    return 0 if length <= 0 else 1 << (length - 1).bit_length()


@dataclass(frozen=True)
class BucketPadding:
    """What `pad_to_buckets` added: columns before the past and before the new tokens."""

    past: int  # the real past length
    before_past: int
    before_new: int


def pad_to_buckets(signature: Signature, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], BucketPadding]:
    """Feeds padded on the left to bucketed lengths, the padding masked out (`attention_mask` 0).

    The past grows to a power of two, and so do the new tokens when there are several (a prefill), so a
    runtime that compiles per input shape (MIGraphX) compiles about log2(context) graphs, not one per step.
    Positions are given explicitly, so padding moves no token; `strip_buckets` takes it off the outputs.
    """
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    batch, new = ids.shape
    past = mask.shape[1] - new
    padding = BucketPadding(past, bucket(past) - past, bucket(new) - new if new > 1 else 0)

    def left(array: np.ndarray, width: int, axis: int) -> np.ndarray:
        if not width:
            return array
        pad = [(0, 0)] * array.ndim
        pad[axis] = (width, 0)
        return np.pad(array, pad)

    padded = dict(feeds)
    padded["input_ids"] = left(ids, padding.before_new, 1)
    padded["position_ids"] = left(feeds["position_ids"], padding.before_new, 1)
    padded["attention_mask"] = np.concatenate(
        [left(mask[:, :past], padding.before_past, 1), left(mask[:, past:], padding.before_new, 1)], axis=1)
    for spec in past_inputs(signature):
        padded[spec.name] = left(feeds[spec.name], padding.before_past, 2)
    return padded, padding


def strip_buckets(outputs: Mapping[str, np.ndarray], padding: BucketPadding) -> dict[str, np.ndarray]:
    """The outputs of padded feeds without the padding: `logits` of the new tokens, `present.*` of the real
    past followed by the new tokens."""
    past_end = padding.before_past + padding.past
    stripped = {}
    for name, array in outputs.items():
        if name.startswith(PRESENT_PREFIX):
            array = np.concatenate([array[:, :, padding.before_past:past_end], array[:, :, past_end + padding.before_new:]], axis=2)
        elif padding.before_new:
            array = array[:, padding.before_new:]
        stripped[name] = array
    return stripped


def calibration_prefills(signature: Signature, token_ids: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One prefill per row of `token_ids [rows, sequence]`: feeds for static quantization's calibration."""
    return [prefill_feeds(signature, row[None, :]) for row in np.asarray(token_ids, dtype=np.int64)]
