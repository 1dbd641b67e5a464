"""Built-in presets: known architectures built from their config with seeded random weights.

Tiny presets convert in seconds and serve the tests; `gpt2` is the 124M configuration for benchmarks.
A preset of a kind that loads its own sources (`diffusion`) is built by that kind's `build_preset` from
`config`, one entry per component.
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
# The usual decoder sizes under transformers' standard names: 2 layers, hidden 64, 4 query / 2 KV heads of 16.
_DECODER = dict(_TINY, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=256)
# Windows short enough that the tests' prompts and 8 new tokens cross them.
_WINDOW = 8
# The trained presets' corpus has 64 numbers; positions cover its 48-token sequences.
_TRAINED = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, max_position_embeddings=128)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# A Stable-Diffusion-shaped pipeline small enough to export in seconds: the UNet keeps one downsampler, one
# upsampler (latent sides multiples of 2) and one cross-attention block, without mid block; the VAE decodes
# 2 pixels per latent pixel. Stable Diffusion's own scheduler settings, DDIM.
_TINY_SD = dict(
    text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77, projection_dim=32),
    unet=dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=0,
              down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              mid_block_type=None, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
    vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
             layers_per_block=0, mid_block_add_attention=False),
    scheduler=dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"),
    tokenizer=dict(words=["red", "green", "blue", "square", "circle", "photo", "cat"], model_max_length=77),
)

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
    # The families of the CI matrix: each converts and generates the tokens transformers does.
    "tiny-mistral": Preset("mistral", dict(_DECODER, sliding_window=_WINDOW), "Mistral, sliding window 8"),
    "tiny-qwen2": Preset("qwen2", dict(_DECODER), "Qwen2 (biased q/k/v projections)"),
    "tiny-qwen3": Preset("qwen3", dict(_DECODER, head_dim=16), "Qwen3 (QK-norm)"),
    "tiny-phi3": Preset("phi3", dict(_DECODER, pad_token_id=0), "Phi-3 (fused qkv and gate-up projections)"),
    "tiny-gemma2": Preset(
        "gemma2", dict(_DECODER, head_dim=16, sliding_window=_WINDOW, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0),
        "Gemma 2 (soft-capping, sliding and global layers)",
    ),
    "tiny-gemma3": Preset(
        "gemma3_text", dict(_DECODER, head_dim=16, sliding_window=_WINDOW, layer_types=["sliding_attention", "full_attention"]),
        "Gemma 3 text (QK-norm, sliding and global layers, two rotary bases)",
    ),
    "tiny-opt": Preset("opt", dict(_DECODER, ffn_dim=128, word_embed_proj_dim=64), "OPT (learned positions, offset 2)"),
    "tiny-gptneox": Preset("gpt_neox", dict(_DECODER, rotary_pct=0.25), "GPT-NeoX (partial rotary, parallel residual)"),
    "tiny-falcon": Preset("falcon", dict(_DECODER, multi_query=True, alibi=False), "Falcon (multi-query: one KV head)"),
    "tiny-gptbigcode": Preset("gpt_bigcode", dict(_DECODER, multi_query=True), "GPT-BigCode (multi-query: one KV head)"),
    "tiny-starcoder2": Preset("starcoder2", dict(_DECODER, sliding_window=_WINDOW), "StarCoder2 (sliding window, biases)"),
    "tiny-mixtral": Preset("mixtral", dict(_DECODER, **_MOE, num_local_experts=4), "Mixtral (mixture of 4 experts, top 2)"),
    "tiny-qwen3moe": Preset("qwen3_moe", dict(_DECODER, **_MOE, head_dim=16, num_experts=4), "Qwen3-MoE (4 experts, top 2)"),
    "tiny-gptoss": Preset(
        "gpt_oss", dict(_DECODER, **_MOE, head_dim=16, num_local_experts=4, sliding_window=_WINDOW),
        "GPT-OSS (4 experts, attention sinks, sliding and global layers)",
    ),
    "tiny-olmo2": Preset("olmo2", dict(_DECODER), "OLMo 2 (QK-norm, norms after attention and MLP)"),
    "tiny-trained": Preset(
        "gpt2",
        dict(vocab_size=128, bos_token_id=1, eos_token_id=2, n_layer=2, n_head=4, n_embd=128, n_positions=128),
        "GPT-2, 2 layers, hidden 128, trained on arithmetic sequences: confident logits for fidelity checks",
        trained=True,
    ),
    "tiny-trained-llama": Preset(
        "llama",
        dict(_TRAINED, num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=256),
        "LLaMA-shaped (rotary, RMSNorm, GQA), 2 layers, hidden 128, trained like tiny-trained",
        trained=True,
    ),
    "tiny-trained-moe": Preset(
        "mixtral",
        dict(_TRAINED, num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
        "Mixtral-shaped (4 experts, top 2), 2 layers, hidden 128, trained like tiny-trained",
        trained=True,
    ),
    "tiny-sd": Preset(
        "stable-diffusion", _TINY_SD,
        "Stable-Diffusion-shaped text-to-image pipeline (CLIP text encoder, UNet, VAE decoder, DDIM), 32x32 images",
        kind="diffusion",
    ),
    "gpt2": Preset(
        "gpt2",
        dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, n_positions=1024),
        "GPT-2 124M configuration, random weights (benchmarks)",
    ),
}
