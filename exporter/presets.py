"""Built-in presets: known architectures built from their config with seeded random weights.

Tiny presets convert in seconds and serve the tests; `gpt2` is the 124M configuration for benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    model_type: str
    config: dict = field(default_factory=dict)
    description: str = ""
    seed: int = 0
    trained: bool = False  # weights trained in-process on a synthetic corpus (exporter/trained.py), cached
    kind: str = "decoder-lm"


_TINY = dict(vocab_size=1024, bos_token_id=1, eos_token_id=2)

PRESETS = {
    "tiny-gpt2": Preset(
        "gpt2", dict(_TINY, n_layer=2, n_head=4, n_embd=64, n_positions=256), "GPT-2, 2 layers, hidden 64"
    ),
    "tiny-gptneo": Preset(
        "gpt_neo",
        dict(_TINY, num_layers=2, num_heads=4, hidden_size=64, max_position_embeddings=256,
             attention_types=[[["global", "local"], 1]], window_size=16),
        "GPT-Neo, 2 layers (global + local attention, window 16), hidden 64",
    ),
    "tiny-bloom": Preset(
        "bloom", dict(_TINY, n_layer=2, n_head=4, hidden_size=64), "BLOOM (ALiBi), 2 layers, hidden 64"
    ),
    "tiny-llama": Preset(
        "llama",
        dict(_TINY, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
             intermediate_size=128, max_position_embeddings=256),
        "LLaMA (rotary, RMSNorm, GQA 4 query / 2 KV heads), 2 layers, hidden 64",
    ),
    "tiny-trained": Preset(
        "gpt2",
        dict(vocab_size=128, bos_token_id=1, eos_token_id=2, n_layer=2, n_head=4, n_embd=128, n_positions=128),
        "GPT-2, 2 layers, hidden 128, trained on arithmetic sequences: confident logits for fidelity checks",
        trained=True,
    ),
    "gpt2": Preset(
        "gpt2",
        dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, n_positions=1024),
        "GPT-2 124M configuration, random weights (benchmarks)",
    ),
}
