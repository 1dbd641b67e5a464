"""The kiln_attention pass: exported attention -> kiln::CausalAttention, checked against the unreplaced graph."""
from dataclasses import replace

import numpy as np
import onnx_ir as ir
import pytest

import optimizers.plugin_attention as plugin_attention
from optimizers import PassContext, PassFailed, run_recipe
from plugins.onnx_node import tag_plugin_nodes


def replaced(exported, preset, family=None):
    path, loaded = exported(preset)
    context = PassContext(target="tensorrt", facts=loaded.facts, family=family or loaded.family)
    model, reports = run_recipe(path, context, passes=["cleanup", "kiln_attention"])
    return path, loaded, context, model, reports[-1]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-bloom", "tiny-gpt2"])
def test_every_layer_gets_the_plugin_node(preset, exported):
    _, loaded, _, model, report = replaced(exported, preset)
    nodes = [n for n in model.graph if n.domain == "kiln"]
    assert len(nodes) == loaded.facts.layers == report.details["replaced"]
    assert report.fused == {"kiln::CausalAttention": loaded.facts.layers}
    assert not [n for n in model.graph if n.op_type == "Softmax"]
    assert report.details["parity_max_abs_error"] <= 1e-4
    assert report.details["biases"] == loaded.family.plugin_biases
    slopes = nodes[0].inputs[4].const_value.numpy()
    assert (slopes > 0).all() if preset == "tiny-bloom" else not slopes.any()
    # What TensorRT's parser is given: the same nodes, tagged with the plugin's namespace and version.
    proto = ir.to_proto(model)
    assert tag_plugin_nodes(proto) == loaded.facts.layers
    tagged = [{a.name for a in n.attribute} for n in proto.graph.node if n.domain == "kiln"]
    assert all({"scale", "plugin_namespace", "plugin_version", "aot"} == names for names in tagged)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-bloom"])
@pytest.mark.parametrize("implementation", ["numpy", "torch"])
def test_replaced_graph_matches_the_export_with_the_cpu_implementation(preset, implementation, exported, torch_op):
    path, loaded, context, model, _ = replaced(exported, preset)
    # Other sizes than the pass's own check: 3 rows, one unpadded, a longer cache, prefill and decode.
    original = ir.to_proto(ir.load(str(path))).SerializeToString()
    for new, past, padding in ((4, 5, (3, 0, 6)), (1, 9, (0, 4, 9)), (6, 0, (0, 2, 5))):
        feeds = plugin_attention.parity_feeds(model, loaded.facts, padding, new, past, seed=new)
        error = plugin_attention.parity_error(original, model, context, feeds, implementation)
        assert error <= 1e-4, (new, past, padding)


def test_the_parity_check_catches_a_wrong_bias(exported, monkeypatch):
    monkeypatch.setattr(plugin_attention, "alibi_slopes", lambda heads: np.zeros(heads, np.float32))
    with pytest.raises(PassFailed, match="differs from the exported one by"):
        replaced(exported, "tiny-bloom")


def test_gpt_neo_is_left_as_exported_with_the_reason(exported):
    _, _, _, model, report = replaced(exported, "tiny-gptneo")
    assert report.details["replaced"] == 0
    assert "sliding window" in report.details["skipped"]["*"]
    assert not [n for n in model.graph if n.domain == "kiln"]


def test_without_a_family_record_the_graph_is_left_as_exported(exported):
    path, loaded = exported("tiny-llama")
    context = PassContext(target="tensorrt", facts=loaded.facts, family=None)
    model, reports = run_recipe(path, context, passes=["cleanup", "kiln_attention"])
    assert reports[-1].details["replaced"] == 0
    assert "no family record" in reports[-1].details["skipped"]["*"]
    assert not [n for n in model.graph if n.domain == "kiln"]


def test_a_family_record_from_elsewhere_is_enough(exported):
    """The pass reads facts, not names: a record this repository does not know carries it end to end."""
    _, loaded = exported("tiny-bloom")
    own = replace(loaded.family, name="my-alibi-lm")
    *_, report = replaced(exported, "tiny-bloom", family=own)
    assert report.details["replaced"] == loaded.facts.layers
    refused = replace(own, plugin_biases=None, plugin_refusal="my-alibi-lm masks a window")
    *_, report = replaced(exported, "tiny-bloom", family=refused)
    assert report.details == {"replaced": 0, "skipped": {"*": "my-alibi-lm masks a window"}}


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 16, 24])
def test_alibi_slopes_are_blooms(heads):
    import torch
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)  # [heads, 1, 2]: slope * position 1
    np.testing.assert_allclose(plugin_attention.alibi_slopes(heads), alibi[:, 0, 1].numpy(), rtol=1e-6)


def test_without_the_check_the_report_says_so(exported):
    path, loaded = exported("tiny-llama")
    context = PassContext(target="tensorrt", facts=loaded.facts, family=loaded.family,
                          options={"kiln_attention": {"check": False}})
    _, reports = run_recipe(path, context, passes=["cleanup", "kiln_attention"])
    assert reports[-1].details["parity_check"].startswith("skipped")
    assert "parity_max_abs_error" not in reports[-1].details
