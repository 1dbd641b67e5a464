"""`module:factory` specs used by the tests."""
import torch
import transformers


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config)


def not_a_model():
    return {"weights": [1, 2, 3]}


def tiny_mamba():
    """A state-space model: its cache is no key/value cache."""
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)
    return transformers.MambaForCausalLM(config)


def tiny_biogpt():
    """A family without a record in `kiln families`: converts all the same, reported as untested."""
    torch.manual_seed(0)
    config = transformers.BioGptConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64)
    return transformers.BioGptForCausalLM(config)


def tiny_cpmant():
    """A forward that prepends its own prompt tokens: torch.export fixes the sequence length to the example's."""
    torch.manual_seed(0)
    config = transformers.CpmAntConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       dim_head=16, dim_ff=64, prompt_length=4)
    return transformers.CpmAntForCausalLM(config)


def tiny_gemma4():
    """Layers with caches of different widths: the global layer's heads are twice the sliding layer's."""
    torch.manual_seed(0)
    config = transformers.Gemma4TextConfig(
        vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, hidden_size_per_layer_input=16,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        layer_types=["sliding_attention", "full_attention"], per_layer_config={"01": {"head_dim": 32}},
        sliding_window=8, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def tiny_sd():
    """A diffusers pipeline: a factory spec of the diffusion kind."""
    from exporter import load_model

    return load_model("tiny-sd").module


_SHARED = {}


def shared_tiny_gpt2():
    """The same model object on every call, as a service's factory that hands out the model it serves."""
    if "model" not in _SHARED:
        _SHARED["model"] = tiny_gpt2()
    return _SHARED["model"]
