"""Decoder-LM families: every per-architecture fact that capture, the passes and the plugin need, one record each.

A record is optional: any transformers causal LM with a key/value cache converts, and a family without
one gets a record derived from its config (`family_of`), marked untested. The records here add what
cannot be derived (what the attention plugin rebuilds, fusion notes) and list the families the CI
matrix converts and checks token for token (`kiln families`). Passes receive the record through their
context (`PassContext.family`).
"""
from __future__ import annotations

from dataclasses import dataclass



@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.model_type in transformers
    positions: str = "rotary"  # "learned" | "rotary" | "alibi" (the kiln_attention pass rebuilds ALiBi's bias)
    max_positions: str | None = "max_position_embeddings"  # the config attribute bounding positions; None: unbounded
    # Layers call transformers' AttentionInterface registry, so kiln_attention can route them to the
    # plugin op at capture (AOTInductor); the others compute attention inline.
    attention_registry: bool = True
    plugin_biases: str | None = None  # the biases kiln::CausalAttention rebuilds for this family; None: not replaceable
    plugin_refusal: str = "no recipe for this family's attention biases yet"  # why the plugin cannot replace it
    fusion_note: str = ""  # what ONNX Runtime's fusions give this family's export, and why not more
    notes: str = ""  # what is particular about it (window, soft-capping, experts, ...), for `kiln families`
    tested: bool = True  # in the CI matrix: converts, and generates the tokens transformers does

    def max_positions_of(self, config) -> int | None:
        """The model's position limit from its config (an object or the manifest's dict)."""
        if self.max_positions is None:
            return None
        return config.get(self.max_positions) if isinstance(config, dict) else getattr(config, self.max_positions, None)


FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            "gpt2", "gpt2", positions="learned", max_positions="n_positions", attention_registry=True,
            plugin_biases="causal + padding",
            fusion_note="MultiHeadAttention with past/present per layer (cache concatenated inside the op)",
        ),
        Family(
            "gpt-neo", "gpt_neo", positions="learned", max_positions="max_position_embeddings", attention_registry=False,
            plugin_biases=None,
            plugin_refusal="GPT-Neo's local layers mask a sliding window, which the plugin does not take",
            fusion_note=(
                "not fused: GPT-Neo scales no attention scores and masks local layers with a window, a graph "
                "onnxscript's SDPA patterns do not match"
            ),
        ),
        Family(
            "bloom", "bloom", positions="alibi", max_positions=None, attention_registry=False,
            plugin_biases="causal + padding + ALiBi",
            fusion_note=(
                "not fused: BLOOM adds ALiBi position bias to the scores through baddbmm, which onnxscript's SDPA "
                "patterns do not match (MultiHeadAttention could take it as attention_bias; no rule written yet)"
            ),
        ),
        Family(
            "llama", "llama", positions="rotary", max_positions="max_position_embeddings", attention_registry=True,
            plugin_biases="causal + padding",
            fusion_note=(
                "MultiHeadAttention per layer without past (rotary, cache concat and KV-head expansion stay outside the "
                "op). Option fusion.gqa=True forms GroupQueryAttention with rotary and cache inside, through our "
                "cos/sin-cache rule; it is off by default because GQA derives positions from the mask's count of ones, "
                "which is wrong for left-padded batches"
            ),
        ),
        # No plugin facts yet: these families convert through the ONNX and AOTInductor targets as exported.
        Family("mistral", "mistral", notes="sliding window (masked; every cache keeps the full past)"),
        Family("qwen2", "qwen2", notes="biased q/k/v projections"),
        Family("qwen3", "qwen3", notes="QK-norm"),
        Family("phi3", "phi3", notes="fused qkv and gate-up projections"),
        Family("gemma2", "gemma2", notes="attention and final logit soft-capping; sliding and global layers"),
        Family("gemma3", "gemma3_text", notes="QK-norm; sliding and global layers with two rotary bases"),
        Family("opt", "opt", positions="learned", attention_registry=True, notes="learned positions offset by 2"),
        Family("gpt-neox", "gpt_neox", notes="partial rotary, parallel residual"),
        Family("falcon", "falcon", notes="multi-query attention (one KV head); parallel attention and MLP"),
        Family("gpt-bigcode", "gpt_bigcode", positions="learned", max_positions="n_positions",
               notes="multi-query attention (one KV head)"),
        Family("starcoder2", "starcoder2", notes="sliding window, biases"),
        Family("mixtral", "mixtral", notes="mixture of experts, exported as batched expert matmuls"),
        Family("qwen3-moe", "qwen3_moe", notes="mixture of experts, exported as batched expert matmuls; QK-norm"),
        Family("gpt-oss", "gpt_oss", notes="mixture of experts; attention sinks; sliding and global layers"),
        Family("olmo2", "olmo2", notes="QK-norm; norms after attention and MLP"),
    )
}


# Config attributes that bound positions, in the order families name them.
_MAX_POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def family_of(config, model_class=None) -> Family:
    """The record of `config.model_type`, or one derived from the config for a family without a record
    (converted all the same, and reported as untested)."""
    model_type = getattr(config, "model_type", None) or "unknown"
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    alibi = bool(getattr(text, "alibi", False)) or getattr(text, "position_embedding_type", None) == "alibi"
    rotary = any(hasattr(text, a) for a in ("rope_theta", "rope_parameters", "rotary_dim", "rotary_pct"))
    return Family(
        name=model_type, model_type=model_type,
        positions="alibi" if alibi else "rotary" if rotary else "learned",
        max_positions=next((a for a in _MAX_POSITION_ATTRIBUTES if getattr(text, a, None)), None),
        attention_registry=bool(getattr(model_class, "_supports_attention_backend", False)),
        tested=False,
    )


