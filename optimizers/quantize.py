"""Precision passes, through onnxruntime's tools: int8 dynamic, int8 static (calibrated), int4 weight-only, fp16.

These tools take a ModelProto or a file, so each pass serializes the onnx_ir model, runs the tool in a
temporary folder and reads the result back.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from optimizers.recipe import PassContext, load_external_weights

# Contrib ops (MultiHeadAttention, SkipLayerNormalization...) hide their output types from ONNX shape
# inference; the quantizers then need a default to assume.
_CONTRIB_TYPE_HINT = {"DefaultTensorType": onnx.TensorProto.FLOAT}


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs advice ("consider pre-processing") on the root logger at WARNING, and
    its matmul_nbits_quantizer calls `logging.basicConfig(level=INFO)` on import: undo both afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def int8_dynamic(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """Weights of MatMul/Gemm to int8, activations quantized per call: MatMul -> DynamicQuantizeMatMul
    (ORT fuses DynamicQuantizeLinear + MatMulInteger). Option `per_channel` (default True)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    per_channel = context.option("int8_dynamic", "per_channel", True)
    with tempfile.TemporaryDirectory(prefix="kiln-int8-") as tmp, _quiet_quantizer():
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(
            _to_proto(model), out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
            weight_type=QuantType.QInt8, use_external_data_format=True,
            extra_options=dict(_CONTRIB_TYPE_HINT, MatMulConstBOnly=True),
        )
        quantized = ir.load(str(out))
        load_external_weights(quantized)
    return quantized, {"per_channel": per_channel}


def int8_static(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """QDQ int8 of MatMul weights and inputs, activation ranges from `context.calibration` (feed dicts).

    Without calibration feeds, prefills of random token ids are used: say so in the report.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds = context.calibration or _random_prefills(model, context)
    with tempfile.TemporaryDirectory(prefix="kiln-int8s-") as tmp, _quiet_quantizer():
        out = Path(tmp) / "model.onnx"
        quantize_static(
            _to_proto(model), out, _FeedReader(feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], per_channel=context.option("int8_static", "per_channel", True),
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=dict(_CONTRIB_TYPE_HINT, ActivationSymmetric=True, MatMulConstBOnly=True),
        )
        quantized = ir.load(str(out))
        load_external_weights(quantized)
    return quantized, {"calibration_feeds": len(feeds), "calibration_source": "given" if context.calibration else "random"}


def int4(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """Weight-only int4 blocks (`MatMulNBits`) for every MatMul with a constant weight, LM head included.

    Options: `block_size` (default 32), `accuracy_level` (default 4: int8 compute on CPU), `symmetric`.
    """
    with _quiet_quantizer():
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    block_size = context.option("int4", "block_size", 32)
    accuracy_level = context.option("int4", "accuracy_level", 4)
    symmetric = context.option("int4", "symmetric", True)
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",)
    )
    quantizer = nbits.MatMulNBitsQuantizer(_to_proto(model), algo_config=config)
    with _quiet_quantizer():
        quantizer.process()
    quantized = ir.from_proto(quantizer.model.model)
    skipped = [
        n.name for n in quantized.graph.all_nodes()
        if n.op_type == "MatMul" and n.inputs[1] is not None and n.inputs[1].is_initializer()
    ]
    return quantized, {"block_size": block_size, "accuracy_level": accuracy_level, "symmetric": symmetric,
                       "matmuls_left_in_fp32": skipped}


def fp16(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """Weights and math to fp16 for GPU targets; IO stays fp32 when `context.keep_io_types`.

    Numerically sensitive ops stay fp32 (onnxruntime's default block list plus the op types in option
    `keep_fp32`, default: the normalizations and Softmax).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    kept = context.option("fp16", "keep_fp32", ["LayerNormalization", "SimplifiedLayerNormalization", "Softmax"])
    proto = convert_float_to_float16(
        _to_proto(model), keep_io_types=context.keep_io_types, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(kept),
        disable_shape_infer=True,
    )
    return ir.from_proto(proto), {"keep_io_types": context.keep_io_types, "kept_fp32": kept}


def _to_proto(model: ir.Model) -> onnx.ModelProto:
    """A ModelProto with every weight inside: the tools cannot resolve external data paths relative to a
    file they were not given."""
    load_external_weights(model)
    return ir.to_proto(model)


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):
        pass


def calibration_prefills(token_ids: np.ndarray, layers: int, kv_heads: int, head_dim: int) -> list[dict]:
    """Feeds for static calibration: one prefill per row of `token_ids [rows, sequence]`, empty caches."""
    feeds = []
    for row in np.asarray(token_ids, dtype=np.int64):
        ids = row[None, :]
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :],
        }
        for i in range(layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        feeds.append(feed)
    return feeds


def _random_prefills(model: ir.Model, context: PassContext) -> list[dict]:
    if context.facts is None:
        raise ValueError("int8_static needs calibration feeds or the model's sizes (context.facts)")
    f = context.facts
    rng = np.random.default_rng(0)
    return calibration_prefills(rng.integers(0, max(f.vocab_size, 2), size=(8, 16)), f.layers, f.kv_heads, f.head_dim)
