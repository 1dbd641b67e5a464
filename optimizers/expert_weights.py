"""Weight-only int8/int4 of gathered expert weights: the mixture-of-experts tensors no MatMul reads directly.

A mixture-of-experts layer exported through transformers' `batched_mm` gathers each token's experts'
weights (`GatherND(W [experts, out, in], ids)`) and multiplies the gathered copies. onnxruntime's
quantizers take a MatMul's constant weight only, so these tensors, most of an MoE model's bytes, would
stay fp32. Here the stored tensor is quantized and each gather dequantizes what it gathers, in plain ONNX
ops (Gather, BitShift, Cast, Mul) that every backend runs: int8 with one scale per output row, int4 in
symmetric blocks along the input dim, two per byte. It saves memory, not time (the dequantization costs
about what the gathered matmul does); onnxruntime's fused MoE/QMoE ops would also compute only the chosen
experts' rows, and forming them is not done yet.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from optimizers.pass_types import add_initializer

_GATHERS = ("Gather", "GatherND")


def quantize_gathered_weights(model: ir.Model, bits: int, block_size: int = 32) -> list[str]:
    """Quantize every 3-D fp32 initializer read only by gathers along its first (expert) axis; returns their names."""
    done = []
    for value in list(model.graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 3 or not _gathered(value):
            continue
        weights = tensor.numpy()
        if bits == 4 and weights.shape[2] % block_size:
            continue  # blocks must tile the input dim; such a weight stays fp32 (none seen in a family yet)
        stored = _int8(weights) if bits == 8 else _int4(weights, block_size)
        stored = [add_initializer(model, f"{value.name}_{suffix}", array) for suffix, array in zip(("q", "scales"), stored)]
        for use in list(value.uses()):
            _dequantizing_gather(model, use.node, *stored, bits, block_size)
        del model.graph.initializers[value.name]
        done.append(value.name)
    return done


def _gathered(value: ir.Value) -> bool:
    uses = value.uses()
    return bool(uses) and all(
        use.node.op_type in _GATHERS and use.node.domain in ("", "ai.onnx") and use.idx == 0
        and use.node.attributes.get_int("axis", 0) == 0 and use.node.attributes.get_int("batch_dims", 0) == 0
        for use in uses
    )


def _int8(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 [E, N, K] and fp32 scales [E, N, 1]: symmetric, one scale per output row of each expert."""
    scales = np.maximum(np.abs(weights).max(axis=2, keepdims=True), 1e-12) / 127.0
    return np.clip(np.rint(weights / scales), -127, 127).astype(np.int8), scales.astype(np.float32)


def _int4(weights: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [E, N, K/2] (two 4-bit values a byte, offset by 8) and fp32 scales [E, N, K/block_size]."""
    experts, rows, cols = weights.shape
    blocks = weights.reshape(experts, rows, cols // block_size, block_size)
    scales = np.maximum(np.abs(blocks).max(axis=3, keepdims=True), 1e-12) / 7.0
    q = (np.clip(np.rint(blocks / scales), -8, 7) + 8).astype(np.uint8).reshape(experts, rows, cols)
    return q[..., 0::2] | (q[..., 1::2] << 4), scales[..., 0].astype(np.float32)


def _dequantizing_gather(model: ir.Model, gather: ir.Node, quantized: ir.Value, scales: ir.Value, bits: int,
                         block_size: int) -> None:
    """Put `gather` of the fp32 weight by: the same gather of the quantized weight and its scales, dequantized."""
    t = tape.Tape()
    op, domain = gather.op_type, gather.domain
    indices = gather.inputs[1]
    picked = t.op(op, [quantized, indices], domain=domain)
    picked_scales = t.op(op, [scales, indices], domain=domain)
    if bits == 8:
        out = t.op("Mul", [t.op("Cast", [picked], {"to": ir.DataType.FLOAT}), picked_scales])
    else:
        low = t.op("BitwiseAnd", [picked, _constant(t, np.uint8(15))])
        high = t.op("BitShift", [picked, _constant(t, np.uint8(4))], {"direction": "RIGHT"})
        last = _constant(t, np.array([-1], np.int64))
        pairs = t.op("Concat", [t.op("Unsqueeze", [low, last]), t.op("Unsqueeze", [high, last])], {"axis": -1})
        leading = t.op("Shape", [picked], {"end": -1})
        blocked = t.op("Reshape", [pairs, t.op("Concat", [leading, _constant(t, np.array([-1, block_size], np.int64))], {"axis": 0})])
        centered = t.op("Sub", [t.op("Cast", [blocked], {"to": ir.DataType.FLOAT}), _constant(t, np.float32(8))])
        scaled = t.op("Mul", [centered, t.op("Unsqueeze", [picked_scales, last])])
        out = t.op("Reshape", [scaled, t.op("Concat", [leading, last], {"axis": 0})])
    ir.convenience.replace_nodes_and_values(model.graph, gather, [gather], t.nodes, gather.outputs, [out])


def _constant(t: tape.Tape, array) -> ir.Value:
    return t.op("Constant", [], {"value": ir.tensor(np.asarray(array))})
