"""transformers attention through kiln::causal_attention, for engines that run PyTorch ops (AOTInductor).

transformers 5 picks a layer's attention function by `config._attn_implementation` from its
AttentionInterface registry: registering "kiln" there routes the layers of families that use the
registry (`Family.attention_registry`: GPT-2, LLaMA) to the plugin op, which torch.export then keeps as
one node. BLOOM and GPT-Neo compute attention inline and cannot be routed this way.
"""
from __future__ import annotations

import contextlib

import torch

IMPLEMENTATION = "kiln"


def kiln_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: query [b, h, q, d], key/value [b, kv_h, s, d] with the
    new keys already in the cache, attention_mask the 4-D boolean mask of `sdpa_mask` (True = attend) or
    None; returns ([b, q, h, d], no weights)."""
    from plugins import load_torch_op

    key_mask = None
    if attention_mask is not None:
        # The newest query sees every key that is not padding: its row of the mask is the key mask.
        last_row = attention_mask[:, 0, -1, :]
        key_mask = (last_row if last_row.dtype == torch.bool else last_row == 0).to(torch.int32)
    past_len = key.shape[2] - query.shape[2]
    out = load_torch_op()(query, key, value, past_len, None, scaling, key_mask)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def kiln_attention(module: torch.nn.Module):
    """Within the block, `module`'s attention layers call kiln::causal_attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, kiln_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    configs = [m.config for m in module.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    previous = [c._attn_implementation for c in configs]
    for config in configs:
        config._attn_implementation = IMPLEMENTATION
    try:
        yield module
    finally:
        for config, implementation in zip(configs, previous):
            config._attn_implementation = implementation
