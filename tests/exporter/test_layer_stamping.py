"""Deep models captured from three exported layers, the rest stamped: the graph must equal PyTorch's."""
import dataclasses

import numpy as np
import pytest
import torch

from exporter import load_model
from exporter.capture import _export, capture
from exporter.decoder_lm import DecoderWithCache, example_inputs, graphs, repeated_layers
from exporter.layer_stamping import NotRepeated, layer_io_name, stamp_layers
from exporter.presets import PRESETS
from runtimes.decoder_lm import io_names
from runtimes.onnxruntime_adapter import OnnxRuntimePredictor

LAYERS = 5


def deep(monkeypatch, preset: str, **config) -> "LoadedModel":
    """`preset` with LAYERS layers (and `config` on top), loaded as a preset of its own."""
    name = f"{preset}-deep"
    tiny = PRESETS[preset]
    monkeypatch.setitem(PRESETS, name, dataclasses.replace(tiny, config={**tiny.config, "num_hidden_layers": LAYERS, **config}))
    loaded = load_model(name)
    assert loaded.facts.layers == LAYERS
    return loaded


def captured_error(loaded, folder) -> tuple[int, float]:
    """(layers stamped, largest difference from PyTorch over logits and presents) on a step with a past."""
    graph = capture(loaded, folder)["model"]
    args = example_inputs(loaded.facts, batch=2, sequence=3, past=4, seed=1)
    inputs, outputs = io_names(loaded.facts.layers)
    got = OnnxRuntimePredictor(graph.path).predict(dict(zip(inputs, (a.numpy() for a in args))))
    with torch.no_grad():
        want = DecoderWithCache(loaded.module, loaded.facts.layers).flat_forward(*args)
    assert list(got) == outputs
    return graph.stamped_layers, max(float(np.abs(got[n] - w.numpy()).max()) for n, w in zip(outputs, want))


# GPT-2's layers as `transformer.h`, LLaMA's rotary GQA, GPT-NeoX's parallel residual and partial rotary,
# Falcon's one KV head (and constants lifted per layer), Mixtral's experts (sizes computed in layer 0).
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-gptneox", "tiny-falcon", "tiny-mixtral"])
def test_repeated_layers_are_stamped_and_match_pytorch(monkeypatch, tmp_path, preset):
    stamped, error = captured_error(deep(monkeypatch, preset), tmp_path)
    assert stamped == LAYERS - 3
    assert error < 1e-4


@pytest.mark.parametrize("preset, config", [
    ("tiny-gemma2", {}),  # sliding and global layers alternate (`layer_types`)
    ("tiny-gptneo", {"attention_types": [[["global", "local"], 2], [["global"], 1]]}),  # local and global
    ("tiny-gpt2", {"scale_attn_by_inverse_layer_idx": True}),  # each layer's attention scale
])
def test_layers_that_differ_are_not_a_repeated_block(monkeypatch, preset, config):
    assert repeated_layers(deep(monkeypatch, preset, **config)) is None


def test_layers_that_export_differently_are_refused_and_left_as_exported(monkeypatch):
    loaded = deep(monkeypatch, "tiny-llama")
    graph = graphs(loaded)["model"]
    scope = graph.repeated.scope
    model = _export(graph.repeated.short).model
    # Layer 2 made to read layer 1's down projection: alike as modules, not as graphs.
    own, other = (model.graph.initializers[f"{scope}.{i}.mlp.down_proj.weight"] for i in (2, 1))
    for use in list(own.uses()):
        use.node.replace_input_with(use.idx, other)
    nodes, inputs = len(list(model.graph)), [v.name for v in model.graph.inputs]
    io_order = ([t.name for t in graph.signature.inputs], [t.name for t in graph.signature.outputs])
    with pytest.raises(NotRepeated, match="layers 1 and 2 export to different nodes"):
        stamp_layers(model, scope, LAYERS, graph.module.state_dict(keep_vars=True), io_order)
    assert len(list(model.graph)) == nodes and [v.name for v in model.graph.inputs] == inputs


def test_layer_io_names_move_the_one_layer_index():
    assert layer_io_name("past_key_values.2.key", 2, 7) == "past_key_values.7.key"
    assert layer_io_name("present.2.value", 2, "#") == "present.#.value"
    assert layer_io_name("attention_mask", 2, 7) is None
    assert layer_io_name("past_key_values.12.key", 2, 7) is None
