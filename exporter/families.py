"""Decoder-LM families: the few facts per architecture that export and verification need.

A family is a small record, not a class: Hugging Face configs already expose the standard attribute
names (`num_hidden_layers`, `num_attention_heads`, `hidden_size`) through their attribute maps.
"""
from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import ModelSourceError


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.model_type in transformers
    positions: str  # "learned" | "rotary" | "alibi"
    norm: str  # "layernorm" | "rmsnorm"


FAMILIES = {
    f.model_type: f
    for f in (
        Family("gpt2", "gpt2", positions="learned", norm="layernorm"),
        Family("gpt-neo", "gpt_neo", positions="learned", norm="layernorm"),
        Family("bloom", "bloom", positions="alibi", norm="layernorm"),
        Family("llama", "llama", positions="rotary", norm="rmsnorm"),
    )
}


@dataclass(frozen=True)
class ModelFacts:
    """Sizes of one model, read from its config: what the KV-cache IO contract is built from."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


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
