"""NumPy reference of the kiln causal attention contract (the same as plugins/attention/*.cu)."""

import math

import numpy as np

from plugins.errors import AttentionInputError


def check_attention_shapes(q_shape, k_shape, v_shape, past_len, slopes_shape=None):
    """Check query [batch, heads, q_len, head_dim] against key/value [batch, kv_heads, kv_capacity, head_dim]."""
    if len(q_shape) != 4 or len(k_shape) != 4:
        raise AttentionInputError(
            f"attention expects [batch, heads, seq, head_dim] tensors; got query {tuple(q_shape)}, key {tuple(k_shape)}"
        )
    if tuple(k_shape) != tuple(v_shape):
        raise AttentionInputError(f"key {tuple(k_shape)} and value {tuple(v_shape)} must have the same shape")
    batch, heads, q_len, head_dim = q_shape
    if k_shape[0] != batch or k_shape[3] != head_dim:
        raise AttentionInputError(f"key {tuple(k_shape)} does not match query {tuple(q_shape)} in batch or head_dim")
    kv_heads, kv_capacity = k_shape[1], k_shape[2]
    if kv_heads <= 0 or heads % kv_heads:
        raise AttentionInputError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if past_len < 0 or past_len + q_len > kv_capacity:
        raise AttentionInputError(
            f"past_len ({past_len}) + q_len ({q_len}) must fit in the cache length {kv_capacity}"
        )
    if slopes_shape is not None and tuple(slopes_shape) != (heads,):
        raise AttentionInputError(f"alibi_slopes must be [heads] = [{heads}]; got {tuple(slopes_shape)}")


def attention_reference(q, k, v, past_len, alibi_slopes=None, scale=None):
    """Causal attention over a KV cache, computed in float64 and returned in q's dtype.

    q: [batch, heads, q_len, head_dim]; k, v: [batch, kv_heads, kv_capacity, head_dim] with
    kv_capacity >= past_len + q_len (entries beyond are ignored); alibi_slopes: [heads] or None.
    Query i is at position past_len + i and sees keys 0 .. past_len + i. scale defaults to 1/sqrt(head_dim).
    Returns [batch, heads, q_len, head_dim].
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    check_attention_shapes(q.shape, k.shape, v.shape, past_len, None if alibi_slopes is None else np.shape(alibi_slopes))
    batch, heads, q_len, head_dim = q.shape
    total = past_len + q_len
    group = heads // k.shape[1]
    # Grouped-query heads: query head h reads kv head h // group.
    k64 = np.repeat(k[:, :, :total].astype(np.float64), group, axis=1)
    v64 = np.repeat(v[:, :, :total].astype(np.float64), group, axis=1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k64) * scale
    q_pos = past_len + np.arange(q_len)[:, None]
    k_pos = np.arange(total)[None, :]
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=np.float64)
        scores = scores + slopes[None, :, None, None] * (k_pos - q_pos)[None, None]
    scores = np.where(k_pos <= q_pos, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", weights, v64).astype(q.dtype)
