"""The decoder-LM kind on the export side: the class that loads it, its one graph, and its eager reference.

The IO contract itself (names, dims, feeds) is `runtimes.decoder_lm`, shared with everything that runs engines.
"""
from __future__ import annotations

import torch

from exporter.graphs import GraphExport
from runtimes.decoder_lm import ModelFacts, contract_signature

AUTO_CLASS = "AutoModelForCausalLM"


class DecoderWithCache(torch.nn.Module):
    """A transformers causal LM with flat tensors in and out, the shape an exporter can capture."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        from transformers import DynamicCache

        # No config given: every layer keeps its full cache, local-attention layers mask instead of
        # trimming, so all caches share one `past_sequence` length.
        cache = DynamicCache([(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.layers)])
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)

    def flat_forward(self, *tensors):
        """Tensors in `io_names` input order -> outputs in `io_names` output order."""
        return self.forward(tensors[0], tensors[1], tensors[2], list(tensors[3:]))


def example_inputs(facts: ModelFacts, batch: int = 2, sequence: int = 3, past: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Random inputs in `io_names` order: `sequence` new tokens after `past` cached ones."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, facts.vocab_size, (batch, sequence), generator=generator)
    attention_mask = torch.ones(batch, past + sequence, dtype=torch.int64)
    position_ids = torch.arange(past, past + sequence).expand(batch, sequence).contiguous()
    cache_shape = (batch, facts.kv_heads, past, facts.head_dim)
    caches = [torch.randn(cache_shape, generator=generator) for _ in range(2 * facts.layers)]
    return [input_ids, attention_mask, position_ids, *caches]


def dynamic_shapes(layers: int, dim) -> dict:
    """torch.export dynamic shapes for `DecoderWithCache.forward`; `dim(name)` makes one per contract axis."""
    batch, sequence, past, total = (dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    return {
        "input_ids": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: sequence},
        "past_key_values": [{0: batch, 2: past}] * (2 * layers),
    }


def graphs(loaded) -> dict[str, GraphExport]:
    """The kind's one graph, role `model`: the causal LM with its KV cache as flat tensors."""
    facts = loaded.facts
    args = example_inputs(facts)
    return {
        "model": GraphExport(
            module=DecoderWithCache(loaded.module, facts.layers).eval(),
            args=(args[0], args[1], args[2], args[3:]),
            dynamic_shapes=lambda dim: dynamic_shapes(facts.layers, dim),
            signature=contract_signature(facts),
        )
    }


def eager_functions(loaded) -> dict:
    """The source model in PyTorch eager per graph role: tensors in the signature's input order -> outputs."""
    return {"model": DecoderWithCache(loaded.module, loaded.facts.layers).flat_forward}
