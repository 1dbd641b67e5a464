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
from optimizers import PassContext, recipe_for, run_recipe
from optimizers.quantize import outer_products
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
        out, fused = tmp_path / f"{precision}.onnx", tmp_path / f"{precision}-before-quantizing.onnx"
        context = PassContext(precision=precision, facts=loaded.facts, family=loaded.family)
        run_recipe(path, context, passes=recipe_for("cpu", precision)[:-1], output=fused)  # what the quantizer gets
        _, reports = run_recipe(path, context, output=out)
        # The rotary angles' MatMul (positions x inverse frequencies, K = 1) is no projection: it stays fp32.
        outer = outer_products(ir.load(fused))
        assert len(outer) == 1 and outer[0] in {n.name for n in ir.load(out).graph.all_nodes() if n.op_type == "MatMul"}
        assert reports[-1].quantized.get(op) == constant_weight_products(fused, op_types) - 1, reports[-1].quantized
        if precision == "int4":
            left = reports[-1].details["matmuls_left_in_fp32"]
            assert len(left) == constant_weight_products(fused, ("Gemm",)) + 1 and outer[0] in left
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


def dequantized(blocks: list[np.ndarray], bits: int, rows: int) -> np.ndarray:
    """The [K, N] weight MatMulNBits' blocks stand for, by numpy: [N, blocks, bytes] uint8 (4 bits: two a byte,
    low nibble first), scales [N, blocks], zero points (packed like the blocks) or 2^(bits-1)."""
    packed, scales, *zero_points = blocks
    unpack = (lambda a: np.stack([a & 15, a >> 4], -1).reshape(len(a), -1)) if bits == 4 else (lambda a: a.reshape(len(a), -1))
    cols, count = scales.shape
    levels = unpack(packed).reshape(cols, count, -1).astype(np.float32)
    zero = unpack(zero_points[0])[:, :count] if zero_points else np.full((cols, count), 2 ** (bits - 1))
    return ((levels - zero[..., None]) * scales[..., None]).reshape(cols, -1)[:, :rows].T


def nbits_session(nodes, inputs, outputs, initializers):
    import onnxruntime
    from onnx import helper, numpy_helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_nbits_blocks_are_the_layout_matmulnbits_reads(bits, symmetric):
    """The writer's blocks dequantize (numpy) to within half a step of each weight, and onnxruntime's
    MatMulNBits (accuracy_level 0: fp32 math) multiplies by exactly that weight; K = 80 pads to 3 blocks of 32."""
    from onnx import TensorProto, helper

    from optimizers.quantize import nbits_blocks

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((80, 24)).astype(np.float32)
    blocks = nbits_blocks(weight, bits, 32, symmetric)
    assert blocks[0].shape == (24, 3, 32 * bits // 8) and blocks[0].dtype == np.uint8 and len(blocks) == 3 - symmetric
    got = dequantized(blocks, bits, rows=80)
    steps = np.abs(np.repeat(blocks[1].T, 32, axis=0)[:80])  # each weight's block scale (its sign is free), [K, N]
    # Half a step, but symmetric 4 bits map a block's largest magnitude to -8: values near the opposite end clip at +7.
    assert np.all(np.abs(got - weight) <= (1.0 if bits == 4 and symmetric else 0.5) * steps + 1e-6)
    assert np.abs(got - weight).max() > 0

    names = ["x", "B", "scales"] + ([] if symmetric else ["zero_points"])
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=80, N=24, bits=bits, block_size=32)
    session = nbits_session([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 80])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])], dict(zip(names[1:], blocks)))
    x = rng.standard_normal((3, 80)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ got, rtol=1e-5, atol=1e-4)


def tied_lm(vocab: int, hidden: int, tied: bool = True) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """logits = Gather(E, input_ids) @ head, head = Transpose(E) (tied, as transformers exports it) or a weight of
    its own: (model, E [vocab, hidden], head [hidden, vocab])."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    head = table.T.copy() if tied else rng.standard_normal((hidden, vocab)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["hidden"])]
    weights = [onnx.numpy_helper.from_array(table, "embed")]
    if tied:
        nodes.append(helper.make_node("Transpose", ["embed"], ["head"], perm=[1, 0]))
    else:
        weights.append(onnx.numpy_helper.from_array(head, "head"))
    nodes.append(helper.make_node("MatMul", ["hidden", "head"], ["logits"]))
    graph = helper.make_graph(
        nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])], weights,
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])), table, head


@pytest.mark.parametrize("bits, name", [(4, "int4"), (8, "int8_weight_only")])
@pytest.mark.parametrize("hidden", [64, 48])  # 48: rows padded to 2 blocks of 32, the gathered padding sliced off
def test_tied_embedding_gathers_the_lm_heads_blocks(bits, name, hidden):
    """Tied: one set of blocks serves the LM head (MatMulNBits) and the embedding (GatherBlockQuantized), no
    fp32 table stays, and the logits are those of the dequantized weight, input and head alike."""
    import onnxruntime

    model, _, _ = tied_lm(vocab=256, hidden=hidden)
    context = PassContext(options={name: {"accuracy_level": 0}})
    model, reports = run_recipe(model, context, passes=["fold_weight_transposes", name])
    report = reports[-1]
    assert report.quantized == {"com.microsoft::MatMulNBits": 1, "com.microsoft::GatherBlockQuantized": 1}
    assert report.details["embedding"] == {"table": "embed", "shape": [256, hidden], "tied_to": f"embed.transposed_Q{bits}"}
    assert [v.dtype for v in model.graph.initializers.values()] == [ir.DataType.UINT8, ir.DataType.FLOAT]  # blocks, scales
    head = next(n for n in model.graph if n.op_type == "MatMulNBits")
    gather = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    assert gather.inputs[0].producer().inputs[0] is head.inputs[1] and gather.inputs[2] is head.inputs[2]

    weight = dequantized([head.inputs[1].const_value.numpy(), head.inputs[2].const_value.numpy()], bits, rows=hidden)
    ids = np.array([[0, 5, 255, 5], [17, 3, 1, 128]], np.int64)
    session = onnxruntime.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input_ids": ids})[0], weight.T[ids] @ weight, rtol=1e-5, atol=1e-3)


def test_untied_embedding_gets_blocks_of_its_own_and_the_option_turns_it_off():
    import onnxruntime

    model, table, _ = tied_lm(vocab=256, hidden=64, tied=False)
    quantized, reports = run_recipe(model, PassContext(options={"int4": {"accuracy_level": 0}}), passes=["int4"])
    assert reports[-1].details["embedding"] == {"table": "embed", "shape": [256, 64], "tied_to": None}
    assert {v.name for v in quantized.graph.initializers.values() if v.dtype == ir.DataType.FLOAT} == \
        {"head_scales", "embed_scales"}
    gather = next(n for n in quantized.graph if n.op_type == "GatherBlockQuantized")
    head = next(n for n in quantized.graph if n.op_type == "MatMulNBits")
    rows = gather.inputs[0].const_value.numpy()
    assert rows.shape == (256, 32)  # [vocab, hidden / 2]: two 4-bit values a byte
    scales = gather.inputs[2].const_value.numpy()  # [vocab, hidden / 32]
    table_back = dequantized([rows.reshape(256, 2, 16), scales], 4, rows=64).T
    assert np.all(np.abs(table_back - table) <= np.abs(np.repeat(scales, 32, axis=1)) + 1e-6)  # within a step
    head_back = dequantized([v.const_value.numpy() for v in head.inputs[1:]], 4, rows=64)
    ids = np.array([[3, 200]], np.int64)
    session = onnxruntime.InferenceSession(ir.to_proto(quantized).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input_ids": ids})[0], table_back[ids] @ head_back, rtol=1e-5, atol=1e-3)

    model, _, _ = tied_lm(vocab=256, hidden=64)
    kept, reports = run_recipe(model, PassContext(options={"int4": {"quantize_embedding": False}}),
                               passes=["fold_weight_transposes", "int4"])
    assert reports[-1].details["embedding"] is None and reports[-1].quantized == {"com.microsoft::MatMulNBits": 1}
    assert kept.graph.initializers["embed"].dtype == ir.DataType.FLOAT


@pytest.mark.parametrize("name, shared", [
    ("int4", "model.lm_head.weight.transposed_Q4"),
    ("int8_weight_only", "model.lm_head.weight.transposed_Q8"),
    ("int8_dynamic", None),  # MatMulInteger's int8 [K, N] is no layout GatherBlockQuantized reads: 8-bit blocks of its own
])
def test_tiny_gpt2_keeps_no_fp32_copy_of_its_tied_embedding(name, shared, exported):
    path, loaded = exported("tiny-gpt2")
    vocab, hidden = loaded.facts.vocab_size, loaded.facts.hidden_size
    model, reports = run_recipe(path, PassContext(facts=loaded.facts), passes=["cleanup", "fold_weight_transposes", "fusion", name])
    tables = [v.name for v in model.graph.initializers.values()
              if v.dtype == ir.DataType.FLOAT and tuple(v.shape) in ((vocab, hidden), (hidden, vocab))]
    assert tables == []
    assert reports[-1].details["embedding"] == {"table": "model.lm_head.weight", "shape": [vocab, hidden], "tied_to": shared}
    assert reports[-1].quantized["com.microsoft::GatherBlockQuantized"] == 1
