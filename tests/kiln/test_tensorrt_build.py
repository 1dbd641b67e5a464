"""The TensorRT builder's arithmetic: profiles, cache keys, precision flags, graph checks; no TensorRT needed."""
import dataclasses
import importlib.util

import onnx
import pytest

import kiln.tensorrt_build
import plugins.tensorrt_plugin
from kiln.backends import backend_of
from kiln.errors import KilnError
from kiln.targets import TARGETS
from kiln.tensorrt_build import (
    NOT_INSTALLED,
    HostFacts,
    ParserProblem,
    build_or_reuse_plan,
    build_plan,
    check_int8_graph,
    engine_cache_key,
    onnx_sha256,
    onnx_signature,
    parser_failure,
    precision_flags,
)
from kiln.tensorrt_profile import DEFAULT_PROFILE, DimRange, parse_profile, profile_shapes
from plugins.onnx_node import tag_plugin_nodes
from tests.kiln.tensorrt_graphs import HEAD_DIM, KV_HEADS, attention_node, contract_graph
from tests.kiln.tensorrt_standin import stand_in_tensorrt

HOST = HostFacts("NVIDIA H100 80GB HBM3", "9.0", "10.13.0")
tensorrt_absent = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")


@pytest.fixture
def contract_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(contract_graph(), path)
    return path


def test_profile_from_the_cli_string():
    profile = parse_profile("batch=1:4:8,sequence=1:128:512,past=0:512:2048")
    assert profile.batch == DimRange(1, 4, 8)
    assert profile.sequence == DimRange(1, 128, 512)
    assert profile.past_sequence == DimRange(0, 512, 2048)
    assert profile.total_sequence == DimRange(1, 640, 2560)


def test_fields_left_out_keep_the_defaults_and_one_number_fixes_a_dim():
    profile = parse_profile("batch=2")
    assert profile.batch == DimRange(2, 2, 2)
    assert (profile.sequence, profile.past_sequence) == (DEFAULT_PROFILE.sequence, DEFAULT_PROFILE.past_sequence)
    assert parse_profile(None) == parse_profile("") == DEFAULT_PROFILE
    assert parse_profile("past_sequence=0:8:16").past_sequence == DimRange(0, 8, 16)


def test_defaults_shrink_to_the_model_positions():
    profile = parse_profile(None, max_positions=256)
    assert profile.sequence == DimRange(1, 1, 256)
    assert profile.past_sequence == DimRange(0, 255, 255)
    assert profile.batch == DEFAULT_PROFILE.batch


def test_past_and_sequence_together_stay_within_the_model_positions():
    """The mask's range (total_sequence) is capped: a long prompt after a long past is beyond the model."""
    assert parse_profile(None, max_positions=256).total_sequence == DimRange(1, 256, 256)
    assert parse_profile(None, max_positions=1024).total_sequence == DimRange(1, 513, 1024)
    assert parse_profile("sequence=1:64:128,past=0:64:200", max_positions=256).total_sequence == DimRange(1, 128, 256)
    assert parse_profile(None).total_sequence == DimRange(1, 513, 2048)  # no model: past max + sequence max


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch=8:4:1", r"field 'batch': expected min:opt:max integers .* 1 <= min <= opt <= max, got '8:4:1'"),
        ("batch=0:1:4", r"field 'batch': expected .* 1 <= min .* got '0:1:4'"),
        ("sequence=0:1:4", r"field 'sequence': expected .* 1 <= min .* got '0:1:4'"),
        ("past=-1:0:4", r"field 'past': expected .* 0 <= min .* got '-1:0:4'"),
        ("past=1:2", r"field 'past': expected min:opt:max .* got '1:2'"),
        ("sequence=a:b:c", r"field 'sequence': expected .* got 'a:b:c'"),
        ("heads=1:2:4", r"expected fields batch=, sequence=, past= .* got 'heads=1:2:4'"),
        ("batch", r"expected fields batch=, sequence=, past= .* got 'batch'"),
        ("batch=1,batch=2", r"field 'batch' is given twice"),
    ],
)
def test_bad_profiles_name_the_field_and_what_was_expected(text, message):
    with pytest.raises(KilnError, match=message):
        parse_profile(text)


def test_explicit_ranges_beyond_the_model_positions_are_refused():
    with pytest.raises(KilnError, match=r"field 'past': max 2048 exceeds the model's 1024 positions \(expected at most 1023\)"):
        parse_profile("past=0:512:2048", max_positions=1024)
    with pytest.raises(KilnError, match=r"field 'sequence': max 512 exceeds the model's 256 positions"):
        parse_profile("sequence=1:64:512", max_positions=256)


def test_every_input_gets_shapes_from_its_symbolic_dims(contract_onnx):
    profile = parse_profile("batch=1:2:4,sequence=1:1:64,past=0:32:192")
    shapes = profile_shapes(onnx_signature(contract_onnx), profile)
    assert shapes == {
        "input_ids": ((1, 1), (2, 1), (4, 64)),
        "attention_mask": ((1, 1), (2, 33), (4, 256)),
        "position_ids": ((1, 1), (2, 1), (4, 64)),
        "past_key_values.0.key": ((1, KV_HEADS, 0, HEAD_DIM), (2, KV_HEADS, 32, HEAD_DIM), (4, KV_HEADS, 192, HEAD_DIM)),
        "past_key_values.0.value": ((1, KV_HEADS, 0, HEAD_DIM), (2, KV_HEADS, 32, HEAD_DIM), (4, KV_HEADS, 192, HEAD_DIM)),
    }


def test_an_input_dim_outside_the_contract_is_refused(tmp_path):
    model = contract_graph()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "tokens"
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(KilnError, match=r"input 'input_ids': axis 1 is 'tokens'; a TensorRT profile covers batch, sequence"):
        profile_shapes(onnx_signature(tmp_path / "model.onnx"), DEFAULT_PROFILE)


def test_onnx_signature_reads_names_dtypes_and_dim_names(contract_onnx):
    signature = onnx_signature(contract_onnx)
    assert [t.name for t in signature.inputs][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert signature.input("attention_mask").shape == ("batch", "total_sequence")
    assert signature.input("past_key_values.0.key").dtype == "float32"
    assert signature.outputs[0].shape == ("batch", "sequence", 16)


def _key(**changes):
    parts = dict(onnx_digest="a" * 64, precision="fp16", profiles=[{"input_ids": ((1, 1), (1, 1), (8, 512))}],
                 host=HOST, plugin_digest=None)
    parts.update(changes)
    return engine_cache_key(**parts)


def test_cache_key_is_stable_and_sensitive_to_each_component():
    assert _key() == _key()
    assert len(_key()) == 64
    variants = {
        "onnx": _key(onnx_digest="b" * 64),
        "precision": _key(precision="int8"),
        "profile": _key(profiles=[{"input_ids": ((1, 1), (1, 1), (8, 256))}]),
        "gpu name": _key(host=dataclasses.replace(HOST, gpu_name="NVIDIA H200")),
        "compute capability": _key(host=dataclasses.replace(HOST, compute_capability="8.0")),
        "tensorrt version": _key(host=dataclasses.replace(HOST, tensorrt_version="10.14.1")),
        "plugin": _key(plugin_digest="c" * 64),
    }
    assert len(set(variants.values()) | {_key()}) == len(variants) + 1


def test_cache_key_does_not_depend_on_the_order_of_inputs():
    first = {"input_ids": ((1, 1), (1, 1), (8, 8)), "position_ids": ((1, 1), (1, 1), (8, 8))}
    assert _key(profiles=[first]) == _key(profiles=[dict(reversed(first.items()))])


def test_onnx_digest_covers_external_weights(contract_onnx):
    before = onnx_sha256(contract_onnx)
    contract_onnx.with_name("model.onnx.data").write_bytes(b"weights")
    assert onnx_sha256(contract_onnx) != before


@pytest.mark.parametrize(
    "precision, flags",
    [("fp32", ()), ("fp16", ("FP16",)), ("bf16", ("BF16",)), ("int8", ("INT8", "FP16"))],
)
def test_precision_flags_on_tensorrt_10(precision, flags):
    result = precision_flags(precision, "10.13.0.35")
    assert result.builder_flags == flags
    assert result.strongly_typed is False


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_11_builds_strongly_typed_without_precision_flags(precision):
    result = precision_flags(precision, "11.4.0")
    assert result.builder_flags == ()
    assert result.strongly_typed is True


def fp16_graph():
    """The contract graph with an fp16 cast in it, as the fp16 pass leaves a graph (IO kept fp32)."""
    cast = onnx.helper.make_node("Cast", ["past_key_values.0.key"], ["key16"], name="to_fp16", to=onnx.TensorProto.FLOAT16)
    return contract_graph([cast])


def test_tensorrt_11_builds_fp16_only_from_a_graph_cast_to_fp16(monkeypatch, tmp_path):
    """TensorRT 11 has no FP16 flag: an fp32 graph would build an fp32 plan labelled fp16."""
    trt = stand_in_tensorrt(monkeypatch, "11.4.0")
    target = TARGETS["tensorrt"]
    assert backend_of(target).recipe(target, "fp16") == ["cleanup", "fp16"]  # the graph is cast before parsing
    onnx.save(contract_graph(), tmp_path / "fp32.onnx")
    with pytest.raises(KilnError, match=r"precision 'fp16' on a strongly typed TensorRT build: .* no fp16 weights or casts"):
        build_plan(tmp_path / "fp32.onnx", tmp_path / "engine.plan", [], "fp16", None)
    assert trt.builds == [] and not (tmp_path / "engine.plan").exists()
    onnx.save(fp16_graph(), tmp_path / "fp16.onnx")
    build_plan(tmp_path / "fp16.onnx", tmp_path / "engine.plan", [], "fp16", None)
    (build,) = trt.builds
    assert build.network_flags == 1 << 5 and build.flags_set == []  # strongly typed; no precision flags exist
    with pytest.raises(KilnError, match=r"precision 'bf16' on TensorRT 11.4.0: .* no torchkiln pass casts to bf16"):
        build_plan(tmp_path / "fp16.onnx", tmp_path / "engine.plan", [], "bf16", None)


@pytest.mark.parametrize("version", ["10.13.0.35", "11.4.0"])
def test_fp32_plans_are_built_without_tf32(monkeypatch, tmp_path, contract_onnx, version):
    """TF32 (on by default) rounds fp32 matmul inputs to 10 mantissa bits, beyond the fp32 tolerance."""
    trt = stand_in_tensorrt(monkeypatch, version)
    build_plan(contract_onnx, tmp_path / "fp32.plan", [], "fp32", None)
    assert trt.builds[-1].flags_cleared == ["TF32"]
    onnx.save(fp16_graph(), tmp_path / "fp16.onnx")
    build_plan(tmp_path / "fp16.onnx", tmp_path / "fp16.plan", [], "fp16", None)
    assert trt.builds[-1].flags_cleared == []
    monkeypatch.setattr(kiln.tensorrt_build, "host_facts", lambda: dataclasses.replace(HOST, tensorrt_version=version))
    report = build_or_reuse_plan(contract_onnx, tmp_path / "engine.plan", [], "fp32", cache_dir=tmp_path / "cache")
    assert report.to_json()["tf32"] is False  # the manifest says so


def test_an_edited_kernel_gets_a_new_plan(monkeypatch, tmp_path):
    """The cache key hashes the PTX the plan embeds, also when the kernel is compiled by the build itself."""
    stand_in_tensorrt(monkeypatch)
    monkeypatch.setattr(kiln.tensorrt_build, "host_facts", lambda: HOST)
    kernel = {"ptx": b"// kernel v1"}
    embedded = []
    monkeypatch.setattr(plugins.tensorrt_plugin, "default_ptx", lambda: kernel["ptx"])
    monkeypatch.setattr(plugins.tensorrt_plugin, "register", embedded.append)
    onnx.save(contract_graph([attention_node()]), tmp_path / "model.onnx")

    def build():
        return build_or_reuse_plan(tmp_path / "model.onnx", tmp_path / "engine.plan", [], "fp32", cache_dir=tmp_path / "cache")

    first = build()
    assert build().cache_hit is True  # the same kernel: the plan is reused
    kernel["ptx"] = b"// kernel v2"  # the kernel source was edited
    edited = build()
    assert edited.cache_hit is False and edited.cache_key != first.cache_key
    assert embedded == [b"// kernel v1", b"// kernel v2"]
    assert edited.plugin_nodes == 1


def test_the_timing_cache_is_kept_per_gpu_tensorrt_and_tf32(monkeypatch, tmp_path, contract_onnx):
    trt = stand_in_tensorrt(monkeypatch)
    hosts = [HOST, dataclasses.replace(HOST, compute_capability="8.0"), dataclasses.replace(HOST, tensorrt_version="10.14.1")]
    for host in hosts:
        monkeypatch.setattr(kiln.tensorrt_build, "host_facts", lambda host=host: host)
        build_or_reuse_plan(contract_onnx, tmp_path / "engine.plan", [], "fp32", cache_dir=tmp_path / "cache")
    names = sorted(p.name for p in (tmp_path / "cache").glob("timing-*"))
    assert names == ["timing-sm80-trt10.13.0-notf32.cache", "timing-sm90-trt10.13.0-notf32.cache",
                     "timing-sm90-trt10.14.1-notf32.cache"]
    assert [b.timing_cache_in for b in trt.builds] == [b"", b"", b""]  # none read another GPU's timings


def test_unknown_precision_and_version_are_named():
    with pytest.raises(KilnError, match=r"TensorRT precision 'int4' is unknown \(expected one of fp32, fp16, bf16, int8\)"):
        precision_flags("int4", "10.13.0")
    with pytest.raises(KilnError, match=r"TensorRT version: expected 'major.minor.patch', got 'dev'"):
        precision_flags("fp16", "dev")


def test_attention_nodes_are_tagged_for_the_parser_and_others_left_alone():
    model = contract_graph([attention_node("attn0"), attention_node("attn1", plugin_version="1")])
    assert tag_plugin_nodes(model) == 2
    for node in model.graph.node:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "CausalAttention":
            assert attributes["plugin_namespace"] == b"kiln"
            assert attributes["plugin_version"] == b"1"
            assert attributes["aot"] == 1
            assert attributes["scale"] == 0.0
        else:
            assert "plugin_namespace" not in attributes
    assert tag_plugin_nodes(contract_graph()) == 0


def test_int8_needs_an_explicitly_quantized_graph():
    with pytest.raises(KilnError, match="expected a graph with QuantizeLinear/DequantizeLinear nodes"):
        check_int8_graph(contract_graph())
    quantized = contract_graph([
        onnx.helper.make_node("QuantizeLinear", ["x", "s"], ["xq"]),
        onnx.helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"]),
    ])
    check_int8_graph(quantized)


def test_parser_failures_name_every_node_and_operator(contract_onnx):
    message = parser_failure(contract_onnx, [
        ParserProblem("/model/attn/CausalAttention", "CausalAttention", "Plugin not found"),
        ParserProblem("", "", "Unsupported ONNX data type"),
    ])
    assert "refused 2 node(s)" in message
    assert "node '/model/attn/CausalAttention' (CausalAttention): Plugin not found" in message
    assert "node '?' (?): Unsupported ONNX data type" in message


@tensorrt_absent
def test_building_without_tensorrt_says_how_to_install_it(contract_onnx, tmp_path):
    with pytest.raises(KilnError) as error:
        build_plan(contract_onnx, tmp_path / "engine.plan", [], "fp16", tmp_path / "timing.cache")
    assert str(error.value) == NOT_INSTALLED == "TensorRT is not installed: pip install tensorrt on a machine with an NVIDIA GPU"
    with pytest.raises(KilnError, match="TensorRT is not installed"):
        build_or_reuse_plan(contract_onnx, tmp_path / "engine.plan", [], "fp16", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "engine.plan").exists() and not (tmp_path / "cache").exists()
