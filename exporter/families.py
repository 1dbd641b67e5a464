"""Decoder-LM families: every per-architecture fact that capture, the passes and the plugin need, one record each.

A family is a small record, not a class: Hugging Face configs already expose the standard attribute
names (`num_hidden_layers`, `num_attention_heads`, `hidden_size`) through their attribute maps. Passes
receive the record through their context (`PassContext.family`).
"""
from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import ModelSourceError
from runtimes.decoder_lm import ModelFacts


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.model_type in transformers
    positions: str  # "learned" | "rotary" | "alibi" (the kiln_attention pass rebuilds ALiBi's bias)
    max_positions: str | None  # the config attribute bounding positions; None: unbounded (ALiBi)
    # Layers call transformers' AttentionInterface registry, so kiln_attention can route them to the
    # plugin op at capture (AOTInductor); the others compute attention inline.
    attention_registry: bool
    plugin_biases: str | None  # the biases kiln::CausalAttention rebuilds for this family; None: not replaceable
    plugin_refusal: str = ""  # why the plugin cannot replace this family's attention
    fusion_note: str = ""  # what ONNX Runtime's fusions give this family's export, and why not more

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
    )
}
FAMILIES_BY_NAME = {f.name: f for f in FAMILIES.values()}


def family_of(config, where: str = "config") -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelSourceError(
            f"{where}: model_type {model_type!r} is not a supported family "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def facts_of(config) -> ModelFacts:
    heads = config.num_attention_heads
    hidden = config.hidden_size
    return ModelFacts(
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        hidden_size=hidden,
        vocab_size=config.vocab_size,
    )
