"""Precision passes on the confident preset: quantized op counts, size, and the fidelity gates.

Fidelity is teacher-forced on held-out synthetic sequences against PyTorch eager, counted at positions
where the reference's top-1 margin exceeds the engine's error (kiln.verify.logits_fidelity).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from exporter.trained import heldout_sequences
from kiln.verify import TOLERANCES, logits_fidelity
from optimizers import PassContext, run_recipe
from runtimes.decoder_lm import calibration_prefills, contract_signature
from runtimes.onnxruntime_adapter import OnnxRuntimePredictor
from tests.optimizers.conftest import prefill_feeds

# precision -> (target, recipe precision, top-1 gate, quantized op, nodes, max size after / before)
CASES = {
    "int8": ("cpu", "int8", 0.98, "MatMulInteger", 9, 0.35),
    "int8-static": ("cpu", "int8-static", 0.98, "QuantizeLinear", 18, 0.35),
    "int4": ("cpu", "int4", 0.95, "com.microsoft::MatMulNBits", 9, 0.25),
    "fp16": ("cuda", "fp16", 0.995, None, 0, 0.51),
}


def trained_case(exported, preset: str):
    """(plain export path, loaded model, held-out ids [16, 48], PyTorch logits [16*48, vocab]) of a trained preset."""
    import torch

    path, loaded = exported(preset)
    ids = heldout_sequences(16)
    with torch.no_grad():
        logits = loaded.module(input_ids=torch.from_numpy(ids)).logits.numpy()
    return path, loaded, ids, logits.reshape(-1, loaded.facts.vocab_size)


@pytest.fixture(scope="module")
def trained(exported):
    return trained_case(exported, "tiny-trained")


def engine_logits(path, loaded, ids) -> np.ndarray:
    outputs = OnnxRuntimePredictor(path).predict(prefill_feeds(ids, loaded.facts))
    return outputs["logits"].reshape(-1, loaded.facts.vocab_size)


def test_the_trained_preset_is_confident(trained):
    _, loaded, ids, logits = trained
    # Skip BOS and the first number: those are random draws of the corpus, nothing to be sure of.
    predicted = logits.reshape(ids.shape + (-1,)).argmax(-1)[:, 2:-1]
    assert (predicted == ids[:, 3:]).mean() > 0.99
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert np.median(top2[:, 1] - top2[:, 0]) > 4.0


@pytest.mark.parametrize("case", list(CASES))
def test_precision_passes_fidelity_gate(case, trained, tmp_path):
    target, precision, gate, op, nodes, size_ratio = CASES[case]
    path, loaded, ids, want = trained
    calibration, source = None, None
    if case == "int8-static":
        calibration = calibration_prefills(contract_signature(loaded.facts), heldout_sequences(8, seed=1)[:, :32])
        source = "held-out sequences, 8 x 32 tokens"
    context = PassContext(target=target, precision=precision, facts=loaded.facts, family=loaded.family,
                          calibration=calibration, calibration_source=source)
    out = tmp_path / "model.onnx"
    _, reports = run_recipe(path, context, output=out)
    last = reports[-1]
    if op:
        assert last.quantized.get(op) == nodes, last.quantized
    if source:
        assert last.details["calibration_source"] == source and last.details["calibration_feeds"] == 8
    assert last.bytes_after / last.bytes_before < size_ratio
    fidelity = logits_fidelity(engine_logits(out, loaded, ids), want)
    print(f"{case}: {fidelity}")
    assert fidelity["decisive_positions"] > 0.9 * fidelity["positions"]
    assert fidelity["top1_agreement"] >= gate
    assert fidelity["kl_mean"] < 0.01


def constant_weight_products(path, op_types) -> int:
    return sum(1 for n in ir.load(path).graph.all_nodes() if n.op_type in op_types and n.inputs[1].const_value is not None)


@pytest.mark.parametrize("preset", ["tiny-trained-llama", "tiny-trained-moe"])
def test_trained_llama_and_moe_pass_the_int8_and_int4_gates(preset, exported, tmp_path):
    path, loaded, ids, want = trained_case(exported, preset)
    # int8 takes every projection with a constant weight; int4 the MatMuls, leaving a (router) Gemm named.
    for precision, op, op_types in (("int8", "MatMulInteger", ("MatMul", "Gemm")), ("int4", "com.microsoft::MatMulNBits", ("MatMul",))):
        out = tmp_path / f"{precision}.onnx"
        _, reports = run_recipe(path, PassContext(precision=precision, facts=loaded.facts, family=loaded.family), output=out)
        assert reports[-1].quantized.get(op) == constant_weight_products(path, op_types), reports[-1].quantized
        if precision == "int4":
            assert len(reports[-1].details["matmuls_left_in_fp32"]) == constant_weight_products(path, ("Gemm",))
        # Expert weights (gathered, not a MatMul's constant): up/gate and down of each MoE layer.
        assert len(reports[-1].details["expert_weights"]) == (2 * loaded.facts.layers if "moe" in preset else 0)
        size_ratio = reports[-1].bytes_after / reports[-1].bytes_before
        fidelity = logits_fidelity(engine_logits(out, loaded, ids), want)
        print(f"{preset} {precision}: size x{size_ratio:.3f} {fidelity}")
        assert size_ratio < {"int8": 0.35, "int4": 0.25}[precision]
        assert fidelity["decisive_positions"] > 0.9 * fidelity["positions"]
        assert fidelity["top1_agreement"] >= TOLERANCES[precision].top1  # the gate `kiln convert` applies
        assert fidelity["kl_mean"] < 0.05  # measured 0.013 (llama int8): a bound on drift the top-1 would hide


def test_fp16_keeps_io_in_fp32_and_weights_in_fp16(trained, tmp_path):
    path, loaded, _, _ = trained
    model, _ = run_recipe(path, PassContext(target="cuda", precision="fp16", facts=loaded.facts))
    assert {v.dtype for v in [*model.graph.inputs, *model.graph.outputs]} == {ir.DataType.INT64, ir.DataType.FLOAT}
    weights = [v for v in model.graph.initializers.values() if v.const_value.size > 1000]
    assert weights and all(v.dtype == ir.DataType.FLOAT16 for v in weights)
    model, _ = run_recipe(path, PassContext(target="cuda", precision="fp16", facts=loaded.facts, keep_io_types=False))
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT16


def test_int4_block_size_and_accuracy_level_reach_the_nodes(trained):
    path, loaded, _, _ = trained
    context = PassContext(precision="int4", facts=loaded.facts, options={"int4": {"block_size": 64, "accuracy_level": 1}})
    model, reports = run_recipe(path, context)
    nbits = [n for n in model.graph.all_nodes() if n.op_type == "MatMulNBits"]
    assert {n.attributes.get_int("block_size") for n in nbits} == {64}
    assert {n.attributes.get_int("accuracy_level") for n in nbits} == {1}
    # The LM head ([hidden, vocab] = [128, 128]) is among them, and nothing stays in fp32.
    assert any(n.attributes.get_int("N") == loaded.facts.vocab_size for n in nbits)
    assert reports[-1].details["matmuls_left_in_fp32"] == []


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-bloom"])
def test_int4_and_int8_run_on_other_families(preset, exported, tmp_path):
    path, loaded = exported(preset)
    ids = np.random.default_rng(0).integers(3, loaded.facts.vocab_size, size=(2, 8))
    plain = engine_logits(path, loaded, ids)
    for precision in ("int8", "int4"):
        out = tmp_path / f"{precision}.onnx"
        _, reports = run_recipe(path, PassContext(precision=precision, facts=loaded.facts), output=out)
        assert sum(reports[-1].quantized.values()) >= 2 * loaded.facts.layers
        got = engine_logits(out, loaded, ids)
        assert got.shape == plain.shape and np.isfinite(got).all()


def test_int8_static_without_calibration_says_it_used_random_tokens(exported):
    path, loaded = exported("tiny-gpt2")
    _, reports = run_recipe(path, PassContext(precision="int8-static", facts=loaded.facts), passes=["int8_static"])
    assert reports[-1].details["calibration_source"] == "random token ids, 8 prefills of 16"
    assert reports[-1].quantized["QuantizeLinear"] > 0


def test_int4_quantizes_a_weight_shared_by_two_matmuls_once():
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["b"])],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 64])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    quantized, _ = run_recipe(model, PassContext(), passes=["int4"])
    nodes = [n for n in quantized.graph if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and nodes[0].inputs[1] is nodes[1].inputs[1]
    assert "w" not in quantized.graph.initializers
    # The same numbers as onnxruntime's own MatMulNBitsQuantizer, whose block quantizer the pass calls.
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    config = nbits.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4)
    tool = nbits.MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), algo_config=config)
    tool.process()
    x = rng.standard_normal((2, 64)).astype(np.float32)
    run = lambda proto: onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(run(ir.to_proto(quantized)), run(tool.model.model))


@pytest.mark.parametrize("bits, error", [(8, 0.5 / 127), (4, 0.5 / 7)])
def test_gathered_expert_weights_dequantize_to_within_half_a_step(bits, error):
    """A GatherND of a [experts, out, in] weight, as batched_mm exports it: quantized, it gives back each
    gathered expert's weights within half a quantization step of its row's (int8) or block's (int4) range."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    from optimizers.expert_weights import quantize_gathered_weights

    weights = np.random.default_rng(0).standard_normal((4, 8, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GatherND", ["w", "ids"], ["picked"])], "experts",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["s", 1])],
        [helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["s", 8, 64])],
        [onnx.numpy_helper.from_array(weights, "w")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    assert quantize_gathered_weights(model, bits, block_size=32) == ["w"]
    assert "w" not in model.graph.initializers
    ids = np.array([[3], [0], [3]], np.int64)
    session = onnxruntime.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got, want = session.run(None, {"ids": ids})[0], weights[ids[:, 0]]
    spans = np.abs(want).max(axis=2, keepdims=True) if bits == 8 else \
        np.repeat(np.abs(want.reshape(3, 8, 2, 32)).max(axis=3), 32, axis=2)
    assert np.all(np.abs(got - want) <= error * spans + 1e-6)
    assert np.abs(got - want).max() > 0  # quantized, not passed through
