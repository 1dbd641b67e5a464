"""NumPy reference of the kiln causal attention contract (the same as plugins/attention/*.cu)."""

import math

import numpy as np

from plugins.errors import AttentionInputError


def check_attention_shapes(q_shape, k_shape, v_shape, past_len, slopes_shape=None, mask_shape=None):
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
    if mask_shape is not None and tuple(mask_shape) != (batch, kv_capacity):
        raise AttentionInputError(f"key_mask must be [batch, kv_capacity] = [{batch}, {kv_capacity}]; got {tuple(mask_shape)}")


def attention_reference(q, k, v, past_len, alibi_slopes=None, scale=None, key_mask=None):
    """Causal attention over a KV cache, computed in float64 and returned in q's dtype.

    q: [batch, heads, q_len, head_dim]; k, v: [batch, kv_heads, kv_capacity, head_dim] with
    kv_capacity >= past_len + q_len (entries beyond are ignored); alibi_slopes: [heads] or None.
    Query i is at position past_len + i and sees keys 0 .. past_len + i. scale defaults to 1/sqrt(head_dim).
    key_mask: [batch, kv_capacity] or None; 0 hides a key from every query, and a query that sees no key
    at all gets zeros. Returns [batch, heads, q_len, head_dim].
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    check_attention_shapes(
        q.shape, k.shape, v.shape, past_len,
        None if alibi_slopes is None else np.shape(alibi_slopes), None if key_mask is None else np.shape(key_mask),
    )
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
    visible = np.broadcast_to(k_pos <= q_pos, scores.shape)
    if key_mask is not None:
        visible = visible & (np.asarray(key_mask)[:, None, None, :total] != 0)
    scores = np.where(visible, scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    weights = np.where(visible, np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
    sums = weights.sum(axis=-1, keepdims=True)
    weights = np.divide(weights, sums, out=np.zeros_like(weights), where=sums > 0)
    return np.einsum("bhqk,bhkd->bhqd", weights, v64).astype(q.dtype)


def sdpa_reference(q, k, v, past_len, alibi_slopes=None, scale=None, key_mask=None):
    """The same contract through torch's scaled_dot_product_attention, on q's device and dtype.

    Causal, padding and ALiBi terms go in as one explicit bias; grouped-query heads through enable_gqa.
    SDPA gives NaN to a query that sees no key; the contract (like the exported graphs) gives zeros.
    """
    import torch
    import torch.nn.functional as F

    total = past_len + q.shape[2]
    q_pos = past_len + torch.arange(q.shape[2], device=q.device)[:, None]
    k_pos = torch.arange(total, device=q.device)[None, :]
    bias = torch.zeros(q.shape[0], q.shape[1], q.shape[2], total, dtype=q.dtype, device=q.device)
    if alibi_slopes is not None:
        bias = bias + alibi_slopes[:, None, None].to(q) * (k_pos - q_pos).to(q)
    hidden = (k_pos > q_pos)[None, None]
    if key_mask is not None:
        hidden = hidden | (torch.as_tensor(key_mask, device=q.device)[:, None, None, :total] == 0)
    out = F.scaled_dot_product_attention(
        q, k[:, :, :total], v[:, :, :total], attn_mask=bias.masked_fill(hidden, -math.inf), scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.masked_fill(hidden.all(dim=-1, keepdim=True), 0.0)
