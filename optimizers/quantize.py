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

from optimizers.expert_weights import quantize_gathered_weights
from optimizers.onnx_io import load_external_weights
from optimizers.pass_types import OpTypes, Pass, PassContext, PassOption, add_initializer
from runtimes.decoder_lm import calibration_prefills, contract_signature

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
    (ORT fuses DynamicQuantizeLinear + MatMulInteger); gathered expert weights to int8, weight-only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    per_channel = context.option("int8_dynamic", "per_channel")
    with tempfile.TemporaryDirectory(prefix="kiln-int8-") as tmp, _quiet_quantizer():
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(
            _to_proto(model), out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
            weight_type=QuantType.QInt8, use_external_data_format=True,
            extra_options=dict(_CONTRIB_TYPE_HINT, MatMulConstBOnly=True),
        )
        quantized = ir.load(str(out))
        load_external_weights(quantized)
    return quantized, {"per_channel": per_channel, "expert_weights": quantize_gathered_weights(quantized, bits=8)}


INT8_DYNAMIC = Pass(
    "int8_dynamic", int8_dynamic, "int8 weights, dynamic activation quantization (onnxruntime)",
    options=(PassOption("per_channel", bool, True, "one scale per output column of each weight"),),
    creates=("DynamicQuantizeLinear", "MatMulInteger", "com.microsoft::DynamicQuantizeMatMul",
             "com.microsoft::MatMulIntegerToFloat"),
    counts_as="quantized",
)


def int8_static(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """QDQ int8 of MatMul weights and inputs, activation ranges from `context.calibration` (feed dicts).

    Without calibration feeds, prefills of random token ids are used; the report says which (`calibration_source`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds = context.calibration or _random_prefills(context)
    per_channel = context.option("int8_static", "per_channel")
    with tempfile.TemporaryDirectory(prefix="kiln-int8s-") as tmp, _quiet_quantizer():
        out = Path(tmp) / "model.onnx"
        quantize_static(
            _to_proto(model), out, _FeedReader(feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], per_channel=per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=dict(_CONTRIB_TYPE_HINT, ActivationSymmetric=True, MatMulConstBOnly=True),
        )
        quantized = ir.load(str(out))
        load_external_weights(quantized)
    if context.calibration:
        source = context.calibration_source or "given"
    else:
        source = f"random token ids, {_RANDOM_ROWS} prefills of {_RANDOM_TOKENS}"
    return quantized, {"calibration_feeds": len(feeds), "calibration_source": source, "per_channel": per_channel,
                       "expert_weights": quantize_gathered_weights(quantized, bits=8)}


INT8_STATIC = Pass(
    "int8_static", int8_static, "int8 QDQ with calibrated activation ranges (onnxruntime)",
    options=(PassOption("per_channel", bool, True, "one scale per output column of each weight"),),
    creates=("QuantizeLinear", "DequantizeLinear", "QLinearMatMul"),
    counts_as="quantized",
)


def int4(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """Weight-only int4 blocks (`MatMulNBits`) for every MatMul with a constant 2-D weight, LM head included;
    gathered expert weights in int4 blocks too (optimizers/expert_weights.py).

    Written weight by weight on the onnx_ir graph with the block quantizer onnxruntime's
    MatMulNBitsQuantizer calls, and the node that tool makes: the tool itself wants the whole model as one
    ModelProto, two more copies of the weights in memory (gpt2: peak 2.5 GB against 1.25 GB this way).
    """
    block_size = context.option("int4", "block_size")
    accuracy_level = context.option("int4", "accuracy_level")
    symmetric = context.option("int4", "symmetric")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"int4 block_size must be a power of two >= 16; got {block_size}")
    skipped, blocks_of = [], {}  # weight name -> its quantized initializers (a weight may feed several MatMuls)
    for node in list(model.graph.all_nodes()):
        if node.op_type == "Gemm" and node.inputs[1].const_value is not None:
            # A Gemm left after fusion is a transposed projection: in the families seen, a mixture-of-experts
            # router, whose top-k choice is the one place a small weight error flips a decision. Kept, and named.
            skipped.append(node.name)
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[1]
        tensor = weight.const_value if weight is not None and weight.is_initializer() else None
        if tensor is None or len(tensor.shape) != 2 or tensor.dtype != ir.DataType.FLOAT:
            if tensor is not None:
                skipped.append(node.name)
            continue
        rows, cols = tensor.shape  # K, N
        if weight.name not in blocks_of:
            blocks_of[weight.name] = _int4_blocks(model, weight, block_size, symmetric)
        inputs = [node.inputs[0], *blocks_of[weight.name]]
        attributes = {"K": rows, "N": cols, "bits": 4, "block_size": block_size}
        if accuracy_level:
            attributes["accuracy_level"] = accuracy_level
        quantized = ir.node("MatMulNBits", inputs, attributes, domain="com.microsoft", name=f"{node.name}_Q4" if node.name else None)
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], [quantized], node.outputs, quantized.outputs)
        if not weight.uses() and weight.name in model.graph.initializers:
            del model.graph.initializers[weight.name]  # frees the fp32 weight
    model.opset_imports.setdefault("com.microsoft", 1)
    return model, {"block_size": block_size, "accuracy_level": accuracy_level, "symmetric": symmetric,
                   "matmuls_left_in_fp32": skipped,
                   "expert_weights": quantize_gathered_weights(model, bits=4, block_size=block_size)}


INT4 = Pass(
    "int4", int4, "int4 weight-only MatMulNBits blocks, LM head included (onnxruntime)",
    options=(
        PassOption("block_size", int, 32, "weights per scale along K; a power of two >= 16"),
        PassOption("accuracy_level", int, 4, "MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8"),
        PassOption("symmetric", bool, True, "no zero points"),
    ),
    creates=("com.microsoft::MatMulNBits",),
    counts_as="quantized",
)


def _int4_blocks(model: ir.Model, weight: ir.Value, block_size: int, symmetric: bool) -> list[ir.Value]:
    """MatMulNBits' packed blocks, scales (and zero points when asymmetric) of a [K, N] fp32 weight."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    tensor = weight.const_value
    rows, cols = tensor.shape
    blocks = -(-rows // block_size)
    array = tensor.numpy()
    if blocks * block_size != rows:
        array = np.pad(array, ((0, blocks * block_size - rows), (0, 0)))
    packed = np.zeros((cols, blocks, block_size // 2), np.uint8)
    scales = np.zeros((cols, blocks), np.float32)
    zero_points = np.zeros((cols, (blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(array), scales, zero_points, block_size, cols, rows, symmetric)
    del array
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()  # unmaps the weight's pages of the .data file
    values = [add_initializer(model, f"{weight.name}_Q4", packed), add_initializer(model, f"{weight.name}_scales", scales)]
    if not symmetric:
        values.append(add_initializer(model, f"{weight.name}_zero_points", zero_points))
    return values


def fp16(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """Weights and math to fp16 for GPU targets; IO stays fp32 when `context.keep_io_types`.

    Numerically sensitive ops stay fp32: onnxruntime's default block list plus the op types of option `keep_fp32`.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    kept = list(context.option("fp16", "keep_fp32"))
    proto = convert_float_to_float16(
        _to_proto(model), keep_io_types=context.keep_io_types, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + kept,
        disable_shape_infer=True,
    )
    return ir.from_proto(proto), {"keep_io_types": context.keep_io_types, "kept_fp32": kept}


FP16 = Pass(
    "fp16", fp16, "weights and math to fp16, IO and sensitive ops kept fp32",
    options=(
        PassOption("keep_fp32", OpTypes, ("LayerNormalization", "SimplifiedLayerNormalization", "Softmax"),
                   "op types kept in fp32, besides onnxruntime's default list"),
    ),
)


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


# Random calibration when none is given: rows of tokens, each a prefill.
_RANDOM_ROWS, _RANDOM_TOKENS = 8, 16


def _random_prefills(context: PassContext) -> list[dict]:
    if context.facts is None:
        raise ValueError("int8_static needs calibration feeds or the model's sizes (context.facts)")
    tokens = np.random.default_rng(0).integers(0, max(context.facts.vocab_size, 2), size=(_RANDOM_ROWS, _RANDOM_TOKENS))
    return calibration_prefills(contract_signature(context.facts), tokens)
