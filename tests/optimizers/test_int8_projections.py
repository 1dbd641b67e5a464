"""int8_dynamic's own rewrite against onnxruntime's quantize_dynamic, whose nodes and arithmetic it reproduces."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.quant_utils import quantize_data

from optimizers import PassContext, recipe_for, run_recipe
from optimizers.expert_weights import quantize_gathered_weights
from optimizers.int8_projections import int8_columns
from optimizers.quantize import outer_products
from runtimes.onnxruntime_adapter import OnnxRuntimePredictor
from tests.optimizers.conftest import prefill_feeds


def test_int8_columns_are_onnxruntimes_arithmetic():
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((64, 40)) * rng.uniform(0.01, 3, size=40)).astype(np.float32)
    weight[:, 3] = 0  # no range: scale 1
    weight[:, 5] = np.abs(weight[:, 5])  # one-signed
    values, scales, zeros = int8_columns(weight, per_channel=True)
    for column in range(weight.shape[1]):
        zero, scale, want = quantize_data(weight[:, column], onnx.TensorProto.INT8, True)
        assert np.array_equal(values[:, column], want) and scales[column] == scale and zeros[column] == zero
    zero, scale, want = quantize_data(weight.ravel(), onnx.TensorProto.INT8, True)
    values, scales, zeros = int8_columns(weight, per_channel=False)
    assert np.array_equal(values.ravel(), want) and scales == scale and scales.shape == () and zeros == zero


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-mixtral"])
def test_the_pass_computes_what_quantize_dynamic_does(preset, exported, tmp_path):
    path, loaded = exported(preset)
    context = PassContext(precision="int8", facts=loaded.facts, family=loaded.family,
                          options={"int8_dynamic": {"quantize_embedding": False}})  # quantize_dynamic leaves it
    fused = tmp_path / "fused.onnx"
    run_recipe(path, context, passes=recipe_for("cpu", "int8")[:-1], output=fused)
    ours = tmp_path / "ours.onnx"
    _, reports = run_recipe(fused, context, passes=["int8_dynamic"], output=ours)
    tool = tmp_path / "tool.onnx"
    quantize_dynamic(fused, tool, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                     nodes_to_exclude=outer_products(ir.load(fused)), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})
    model = ir.load(tool)
    quantize_gathered_weights(model, bits=8)  # the pass's own step for the experts (none in gpt2)
    ir.save(model, tool)
    histogram = lambda p: sorted(n.op_type for n in onnx.load(p).graph.node)  # noqa: E731
    assert histogram(ours) == histogram(tool)
    assert reports[0].quantized["MatMulInteger"] > 0
    ids = np.random.default_rng(0).integers(0, loaded.facts.vocab_size, size=(2, 7))
    want = OnnxRuntimePredictor(tool).predict(prefill_feeds(ids, loaded.facts))
    got = OnnxRuntimePredictor(ours).predict(prefill_feeds(ids, loaded.facts))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_weights_in_external_data_are_quantized_and_released(tmp_path):
    # The pass unmaps each fp32 weight of the .data file once quantized; gpt2's tied embedding is read twice
    # (its Gather and the LM head's transposed MatMul).
    from kiln.pipeline import convert

    result = convert("tiny-gpt2", precision="int8", output=tmp_path / "engine", external_data_threshold=0)
    assert result.manifest["verification"]["passed"]
