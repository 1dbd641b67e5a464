"""The decoder-LM kind on the export side: the class that loads it, its one graph, and its eager reference.

The IO contract itself (names, dims, feeds) is `runtimes.decoder_lm`, shared with everything that runs engines.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from exporter.errors import ModelSourceError
from exporter.graphs import GraphExport, RepeatedLayers
from exporter.layer_stamping import EXPORTED
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
        presents = [t for layer in self_attention_cache(out.cache).layers for t in (layer.keys, layer.values)]
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
    caches = [torch.randn((batch, kv_heads, past, width), generator=generator)
              for kv_heads, key_dim, value_dim in map(facts.cache_dims, range(facts.layers))
              for width in (key_dim, value_dim)]
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
    graph = _graph(loaded, loaded.facts, lambda: exportable_experts(loaded.module))
    return {"model": dataclasses.replace(graph, repeated=repeated_layers(loaded))}


def _graph(loaded, facts: ModelFacts, capturing) -> GraphExport:
    args = example_inputs(facts)
    return GraphExport(
        module=DecoderWithCache(loaded.module, facts.layers).eval(),
        args=(args[0], args[1], args[2], args[3:]),
        dynamic_shapes=lambda dim: dynamic_shapes(facts.layers, dim),
        signature=contract_signature(facts),
        capturing=capturing,
    )


def repeated_layers(loaded) -> RepeatedLayers | None:
    """The model's decoder layers as one repeated block, with the graph of its first EXPORTED layers to stamp
    from; None when the model has few layers or layers 1.. differ (Gemma's sliding and global layers)."""
    facts = loaded.facts
    found = _layer_list(loaded.module, facts.layers)
    if facts.layers <= EXPORTED or facts.layer_caches or found is None:
        return None
    path, layers = found
    if not _alike(layers, loaded.module.config.get_text_config(decoder=True), facts):
        return None
    short = dataclasses.replace(facts, layers=EXPORTED, attention_windows=facts.attention_windows[:EXPORTED])

    @contextlib.contextmanager
    def capturing():
        with exportable_experts(loaded.module), first_layers(loaded.module, path, EXPORTED):
            yield

    return RepeatedLayers(f"model.{path}", facts.layers, _graph(loaded, short, capturing))


def _layer_list(module, count: int) -> tuple[str, torch.nn.ModuleList] | None:
    """The model's one ModuleList of `count` modules (Llama's `model.layers`, GPT-2's `transformer.h`)."""
    lists = [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return lists[0] if len(lists) == 1 else None


def _alike(layers: torch.nn.ModuleList, config, facts: ModelFacts) -> bool:
    """Whether layers 1.. share their classes, weight names, shapes and dtypes, their settings (attributes
    but each layer's own index) and the config's per-layer entries (`layer_types`) and sliding windows."""
    per_layer = [v for v in vars(config).values() if isinstance(v, (list, tuple)) and len(v) == len(layers)]
    if any(len({repr(entry) for entry in entries[1:]}) > 1 for entries in [*per_layer, facts.attention_windows]):
        return False
    settings = [_settings(layer) for layer in layers]
    own_index = {key for key in settings[1] if all(s.get(key) == i for i, s in enumerate(settings) if i)}
    shown = [{k: v for k, v in s.items() if k not in own_index} for s in settings]
    return all(s == shown[1] for s in shown[2:])


def _settings(layer: torch.nn.Module) -> dict:
    """(submodule, name) -> what a layer's graph may depend on: classes, weight shapes and dtypes, attributes
    (plain values and partial functions by value, other objects by identity: a shared config)."""
    settings = {}
    for name, module in layer.named_modules():
        settings[(name, "class")] = type(module)
        for key, tensor in {**module._parameters, **module._buffers}.items():
            settings[(name, key)] = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
        for key, value in vars(module).items():
            if not key.startswith("_"):
                settings[(name, key)] = _setting(value)
    return settings


def _setting(value):
    if isinstance(value, (int, float, str, bool, type(None), tuple, list)):
        return value
    if isinstance(value, functools.partial):  # an activation's `partial(gelu, approximate="tanh")`, made per layer
        return value.func, value.args, tuple(sorted(value.keywords.items()))
    return id(value)


@contextlib.contextmanager
def first_layers(module: torch.nn.Module, path: str, count: int):
    """The model with only its first `count` layers (the ModuleList at `path` cut) while the context holds."""
    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path)
    full = getattr(parent, name)
    setattr(parent, name, torch.nn.ModuleList(list(full)[:count]))
    try:
        yield
    finally:
        setattr(parent, name, full)


@contextlib.contextmanager
def exportable_experts(module):
    """Mixture-of-experts layers run their experts as batched matmuls while captured.

    transformers' default (`grouped_mm`) calls a custom op that ONNX cannot express, and its `eager` loop
    indexes tokens by expert, a data-dependent shape torch.export refuses; `batched_mm` gathers each token's
    experts' weights and is plain tensor math (and the form ONNX Runtime's MoE fusion takes). The eager
    reference keeps the model's own implementation, so verification compares the two.
    """
    if not getattr(module, "_can_set_experts_implementation", lambda: False)():
        yield
        return
    original = module.get_experts_implementation()
    module.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        module.set_experts_implementation(original)


def self_attention_cache(cache):
    """The keys and values a decoder keeps: an encoder-decoder cache's self-attention half (BERT-like
    decoders run alone write one, its cross-attention half empty), or the cache itself."""
    inner = getattr(cache, "self_attention_cache", None)
    return cache if inner is None else inner


# Cache layers that hold plain keys and values, `[batch, kv_heads, length, head_dim]`, as the contract does.
_KV_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def model_facts(module, where: str) -> ModelFacts:
    """The model's sizes, its cache's read from the cache it writes on a 2-token prefill (so multi-query,
    grouped-query and latent attention all come out as they are); ModelSourceError naming the reason
    when that cache is not a key/value cache the contract can carry."""
    config = module.config.get_text_config(decoder=True)
    vocab = config.vocab_size
    ids = torch.tensor([[1, 2]]) % vocab
    try:
        with torch.no_grad():
            out = module(input_ids=ids, use_cache=True)
    except Exception as e:  # the model's own error: a config the model cannot run
        raise ModelSourceError(f"{where}: the model does not run a prefill of 2 tokens: {type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise ModelSourceError(f"{where}: {type(module).__name__} returns no KV cache, which the decoder engine "
                               "contract needs (each step feeds the last one's keys and values back)")
    cross = getattr(cache, "cross_attention_cache", None)
    if cross is not None and cross.get_seq_length() > 0:
        raise ModelSourceError(f"{where}: {type(module).__name__} attends to an encoder's output, which the "
                               "decoder engine contract does not carry")
    kept = self_attention_cache(cache)
    layers = getattr(kept, "layers", None)
    # A cache class of the model's own (MiniMax's keeps linear-attention state beside its layers) holds
    # more than the layers the contract carries, and the model refuses a plain DynamicCache back.
    if not layers or not type(kept).__module__.startswith("transformers.cache_utils"):
        raise ModelSourceError(f"{where}: {type(module).__name__} keeps its own cache class "
                               f"({type(kept).__name__}), not transformers' DynamicCache")
    kinds = sorted({type(layer).__name__ for layer in layers} - set(_KV_LAYERS))
    if kinds:
        raise ModelSourceError(f"{where}: {type(module).__name__} keeps a cache that is not plain keys and values "
                               f"({', '.join(kinds)}: recurrent, state-space or compressed), which the engine "
                               "contract cannot carry between steps")
    # (kv_heads, key dim, value dim) per layer; keys and values share the head count.
    dims = tuple((layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]) for layer in layers)
    kv_heads, key_dim, value_dim = dims[0]
    windows = [getattr(layer, "sliding_window", None) or 0 for layer in layers]  # DynamicSlidingWindowLayer's
    heads = getattr(config, "num_attention_heads", None) or kv_heads
    return ModelFacts(
        layers=len(layers), heads=heads, kv_heads=kv_heads, head_dim=key_dim,
        hidden_size=getattr(config, "hidden_size", 0), vocab_size=out.logits.shape[-1],
        value_head_dim=value_dim if value_dim != key_dim else None,
        layer_caches=dims if len(set(dims)) > 1 else (),
        attention_windows=tuple(windows) if any(windows) else (),
    )


def eager_functions(loaded) -> dict:
    """The source model in PyTorch eager per graph role: tensors in the signature's input order -> outputs."""
    return {"model": DecoderWithCache(loaded.module, loaded.facts.layers).flat_forward}


def manifest_fields(loaded) -> dict:
    """Nothing beyond the graphs: a decoder's sizes are in its signature and source config."""
    return {}
