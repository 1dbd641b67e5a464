"""`module:factory` specs used by the tests."""
import torch
import transformers


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config)


def not_a_model():
    return {"weights": [1, 2, 3]}
