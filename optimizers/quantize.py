"""Precision passes, with onnxruntime's tools and arithmetic: int8 dynamic, int8 static (calibrated), int4
weight-only, fp16.

int8 dynamic and the weight-only blocks are written weight by weight on the onnx_ir graph. int8 static and fp16
run the tools themselves, which take a ModelProto or a file: those passes serialize the model, run the tool in a
temporary folder and read the result back.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import tape

from optimizers.expert_weights import quantize_gathered_weights
from optimizers.int8_projections import projection_weight, quantize_projections
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


# A MatMul whose constant weight has fewer rows (K) than this is an outer product, not a projection: in the families
# seen, the rotary angles, positions [..., 1] x inverse frequencies [1, head_dim / 2]. Quantizing it saves no bytes
# and turns positions into position errors (int8's dynamic scale spans every position of the call: 0..2047 in
# steps of 8); the quantizers leave it in fp32.
_MIN_PROJECTION_ROWS = 16


def outer_products(model: ir.Model) -> list[str]:
    """Names of the MatMuls with a constant 2-D weight of fewer than `_MIN_PROJECTION_ROWS` rows."""
    return [node.name for node in model.graph.all_nodes() if _is_outer_product(node)]


def _is_outer_product(node: ir.Node) -> bool:
    weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
    shape = weight.const_value.shape if weight is not None and weight.const_value is not None else ()
    return len(shape) == 2 and shape[0] < _MIN_PROJECTION_ROWS


def int8_dynamic(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """Weights of MatMul/Gemm to int8, activations quantized per call: MatMul -> DynamicQuantizeMatMul
    (optimizers/int8_projections.py: onnxruntime's nodes and arithmetic, weight by weight); the token embedding
    to 8-bit blocks of its own (GatherBlockQuantized cannot read MatMulInteger's int8 [K, N], so a tied head does
    not share them); gathered expert weights to int8, weight-only."""
    per_channel = context.option("int8_dynamic", "per_channel")
    embedding_blocks = context.option("int8_dynamic", "quantize_embedding")
    left = quantize_projections(model, per_channel, exclude=set(outer_products(model)))
    embedding = _token_embedding(model) if embedding_blocks else None
    if embedding is not None:
        embedding = _quantize_embedding(model, embedding, None, bits=8, block_size=_EMBEDDING_BLOCK, symmetric=True)
        model.opset_imports.setdefault("com.microsoft", 1)
    return model, {"per_channel": per_channel, "embedding": embedding, "matmuls_left_in_fp32": left,
                   "expert_weights": quantize_gathered_weights(model, bits=8)}


_EMBEDDING_BLOCK = 32  # int8_dynamic's embedding rows: 8-bit blocks of 32, a scale each (int4's default block)
INT8_DYNAMIC = Pass(
    "int8_dynamic", int8_dynamic, "int8 weights, dynamic activation quantization (onnxruntime)",
    options=(
        PassOption("per_channel", bool, True, "one scale per output column of each weight"),
        PassOption("quantize_embedding", bool, True, "token embedding to 8-bit GatherBlockQuantized blocks of 32"),
    ),
    creates=("DynamicQuantizeLinear", "MatMulInteger", "com.microsoft::DynamicQuantizeMatMul",
             "com.microsoft::MatMulIntegerToFloat", "com.microsoft::GatherBlockQuantized"),
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
            op_types_to_quantize=["MatMul"], per_channel=per_channel, nodes_to_exclude=outer_products(model),
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
    the token embedding to `GatherBlockQuantized`; gathered expert weights in int4 blocks too
    (optimizers/expert_weights.py). See `weight_only_blocks`."""
    return weight_only_blocks(model, context, "int4", bits=4)


def int8_weight_only(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    """The same as `int4` with 8-bit blocks, one byte a weight; with accuracy_level 4 each MatMulNBits
    quantizes its input per block of 32 (int8_dynamic: per tensor), about 5x less logits error.

    Not the int8 recipe's pass: on an AVX2 CPU without VNNI its kernel was slower than int8_dynamic's
    DynamicQuantizeMatMul at every row count, 3-5x at prefill, and accuracy_level 0 (fp32 math) 20x slower
    still (benchmarks/int8_kernels.py, benchmarks/decode-results.md)."""
    return weight_only_blocks(model, context, "int8_weight_only", bits=8)


def weight_only_blocks(model: ir.Model, context: PassContext, pass_name: str, bits: int) -> tuple[ir.Model, dict]:
    """Weight-only `bits`-bit blocks along K (`com.microsoft::MatMulNBits`) for every MatMul with a constant
    2-D fp32 weight [K, N], LM head included, and the token embedding (`Gather(E [vocab, hidden], input_ids)`)
    to `com.microsoft::GatherBlockQuantized`: tied to the LM head, it reads the head's blocks, so the engine
    keeps no fp32 copy of it; untied, it gets blocks of its own.

    Written weight by weight on the onnx_ir graph with the block quantizer onnxruntime's
    MatMulNBitsQuantizer calls, and the node that tool makes: the tool itself wants the whole model as one
    ModelProto, two more copies of the weights in memory (gpt2: peak 2.5 GB against 1.25 GB this way).
    """
    block_size = context.option(pass_name, "block_size")
    accuracy_level = context.option(pass_name, "accuracy_level")
    symmetric = context.option(pass_name, "symmetric")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{pass_name} block_size must be a power of two >= 16; got {block_size}")
    embedding = _token_embedding(model) if context.option(pass_name, "quantize_embedding") else None
    head = _tied_head_weight(model, embedding) if embedding is not None else None
    skipped, blocks_of = [], {}  # weight name -> its quantized initializers (a weight may feed several MatMuls)
    for node in list(model.graph.all_nodes()):
        if node.op_type == "Gemm" and node.inputs[1].const_value is not None:
            # A Gemm left after fusion is a transposed projection: in the families seen, a mixture-of-experts
            # router, whose top-k choice is the one place a small weight error flips a decision. Kept, and named.
            skipped.append(node.name)
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        found = projection_weight(node)
        if found is None:
            weight = node.inputs[1]
            if weight is not None and weight.is_initializer() and weight.const_value is not None:
                skipped.append(node.name)  # a constant weight of another rank or type
            continue
        if _is_outer_product(node):
            skipped.append(node.name)
            continue
        weight, _ = found
        tensor = weight.const_value
        rows, cols = tensor.shape  # K, N
        if weight.name not in blocks_of:
            blocks_of[weight.name] = _weight_blocks(model, weight.name, tensor, bits, block_size, symmetric)
        inputs = [node.inputs[0], *blocks_of[weight.name]]
        attributes = {"K": rows, "N": cols, "bits": bits, "block_size": block_size}
        if accuracy_level:
            attributes["accuracy_level"] = accuracy_level
        quantized = ir.node("MatMulNBits", inputs, attributes, domain="com.microsoft",
                            name=f"{node.name}_Q{bits}" if node.name else None)
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], [quantized], node.outputs, quantized.outputs)
        if not weight.uses() and weight.name in model.graph.initializers:
            del model.graph.initializers[weight.name]  # frees the fp32 weight
    embedding_done = None
    if embedding is not None:
        embedding_done = _quantize_embedding(model, embedding, blocks_of.get(head), bits, block_size, symmetric)
    model.opset_imports.setdefault("com.microsoft", 1)
    return model, {"bits": bits, "block_size": block_size, "accuracy_level": accuracy_level, "symmetric": symmetric,
                   "embedding": embedding_done, "matmuls_left_in_fp32": skipped,
                   "expert_weights": quantize_gathered_weights(model, bits=bits, block_size=block_size)}


def _block_options(bits: int) -> tuple[PassOption, ...]:
    return (
        PassOption("block_size", int, 32, "weights per scale along K; a power of two >= 16"),
        PassOption("accuracy_level", int, 4, "MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8"),
        PassOption("symmetric", bool, True, "no zero points"),
        PassOption("quantize_embedding", bool, True,
                   f"token embedding to {bits}-bit GatherBlockQuantized (tied: sharing the LM head's blocks)"),
    )


_BLOCK_OPS = ("com.microsoft::MatMulNBits", "com.microsoft::GatherBlockQuantized")
INT4 = Pass(
    "int4", int4, "int4 weight-only MatMulNBits blocks, LM head and token embedding included (onnxruntime)",
    options=_block_options(4), creates=_BLOCK_OPS, counts_as="quantized",
)
INT8_WEIGHT_ONLY = Pass(
    "int8_weight_only", int8_weight_only,
    "int8 weight-only MatMulNBits blocks, LM head and token embedding included (onnxruntime)",
    options=_block_options(8), creates=_BLOCK_OPS, counts_as="quantized",
)


def _weight_blocks(model: ir.Model, name: str, tensor: ir.TensorProtocol, bits: int, block_size: int,
                   symmetric: bool) -> list[ir.Value]:
    """MatMulNBits' inputs for a [K, N] fp32 weight, registered as initializers: see `nbits_blocks`."""
    arrays = nbits_blocks(tensor.numpy(), bits, block_size, symmetric)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()  # unmaps the weight's pages of the .data file
    suffixes = (f"Q{bits}", "scales", "zero_points")
    return [add_initializer(model, f"{name}_{suffix}", array) for suffix, array in zip(suffixes, arrays)]


def nbits_blocks(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> list[np.ndarray]:
    """A [K, N] fp32 weight in MatMulNBits' layout, by onnxruntime's block quantizer: uint8 blocks
    [N, ceil(K / block_size), block_size * bits / 8] (4 bits: two a byte, low nibble first), fp32 scales
    [N, blocks], and when not `symmetric` uint8 zero points [N, blocks] (4 bits: [N, ceil(blocks / 2)], two
    a byte). Symmetric blocks have the implicit zero point 2^(bits-1). K is padded with zeros to whole blocks.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits blocks of {bits} bits: expected 4 or 8")
    rows, cols = weight.shape
    blocks = -(-rows // block_size)
    if blocks * block_size != rows:
        weight = np.pad(weight, ((0, blocks * block_size - rows), (0, 0)))
    packed = np.zeros((cols, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((cols, blocks), np.float32)
    zero_points = np.zeros((cols, (blocks + 1) // 2 if bits == 4 else blocks), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, np.ascontiguousarray(weight), scales, zero_points, block_size, cols, rows, symmetric)
    return [packed, scales] if symmetric else [packed, scales, zero_points]


def _token_embedding(model: ir.Model) -> ir.Node | None:
    """The Gather of an fp32 [vocab, hidden] initializer by the graph input `input_ids` (reshaped or cast on
    the way, as gpt2's `view` does), if there is one.

    Other gathers of weights (learned positions, gathered experts) are left alone: by the IO contract only
    the token ids are named `input_ids`."""
    for node in model.graph:
        data = node.inputs[0] if node.op_type == "Gather" and node.domain in ("", "ai.onnx") else None
        if (
            data is not None and data.is_initializer() and data.const_value is not None
            and data.const_value.dtype == ir.DataType.FLOAT and len(data.const_value.shape) == 2
            and node.attributes.get_int("axis", 0) == 0 and _token_ids(node.inputs[1])
        ):
            return node
    return None


def _token_ids(value: ir.Value) -> bool:
    """Whether `value` is the graph input `input_ids`, or it reshaped or cast."""
    while (producer := value.producer()) is not None and producer.op_type in _ID_VIEWS:
        value = producer.inputs[0]
    return value.is_graph_input() and value.name == "input_ids"


_ID_VIEWS = ("Reshape", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def _tied_head_weight(model: ir.Model, embedding: ir.Node) -> str | None:
    """The name of a MatMul weight [hidden, vocab] holding the embedding's [vocab, hidden] transposed: the LM
    head of tied embeddings (fold_weight_transposes stores the head as its own transposed copy)."""
    table = embedding.inputs[0].const_value
    vocab, hidden = table.shape
    for node in model.graph:
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        tensor = weight.const_value if weight is not None and weight.is_initializer() else None
        if tensor is not None and tensor.dtype == ir.DataType.FLOAT and tuple(tensor.shape) == (hidden, vocab):
            if np.array_equal(tensor.numpy().T, table.numpy()):
                return weight.name
    return None


def _quantize_embedding(model: ir.Model, gather: ir.Node, head_blocks: list[ir.Value] | None, bits: int,
                        block_size: int, symmetric: bool) -> dict:
    """Put the token embedding's Gather by GatherBlockQuantized over the LM head's blocks (`head_blocks`,
    those of the table transposed: MatMulNBits' [vocab, blocks, bytes] are the rows of the table) or, untied,
    over blocks of its own; returns what the report says of it."""
    table = gather.inputs[0]
    vocab, hidden = table.const_value.shape
    t = tape.Tape()
    if head_blocks is not None:
        packed, *scales_and_zeros = head_blocks
        rows = t.op("Reshape", [packed, _int64s(t, [vocab, -1])])  # [vocab, blocks, bytes] -> [vocab, blocks * bytes]
    else:
        packed, *scales_and_zeros = nbits_blocks(table.const_value.numpy().T, bits, block_size, symmetric)
        rows = add_initializer(model, f"{table.name}_Q{bits}", packed.reshape(vocab, -1))
        suffixes = ("scales", "zero_points")
        scales_and_zeros = [add_initializer(model, f"{table.name}_{suffix}", array)
                            for suffix, array in zip(suffixes, scales_and_zeros)]
    gathered = t.op("GatherBlockQuantized", [rows, gather.inputs[1], *scales_and_zeros],
                    {"bits": bits, "block_size": block_size, "gather_axis": 0, "quantize_axis": 1}, domain="com.microsoft")
    if hidden % block_size:  # the blocks pad each row to whole blocks: gather the padded rows, slice the padding off
        gathered = t.op("Slice", [gathered, _int64s(t, [0]), _int64s(t, [hidden]), _int64s(t, [-1])])
    ir.convenience.replace_nodes_and_values(model.graph, gather, [gather], t.nodes, gather.outputs, [gathered])
    if not table.uses():
        del model.graph.initializers[table.name]
    return {"table": table.name, "shape": [vocab, hidden], "tied_to": head_blocks[0].name if head_blocks else None}


def _int64s(t: tape.Tape, values: list[int]) -> ir.Value:
    return t.op("Constant", [], {"value": ir.tensor(np.array(values, np.int64))})


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
