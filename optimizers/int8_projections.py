"""int8 dynamic quantization of the projections (MatMul and Gemm with a constant 2-D fp32 weight), weight by
weight on the onnx_ir graph.

The nodes are those onnxruntime's `quantize_dynamic` makes: DynamicQuantizeLinear of the input (shared by every
projection that reads it), MatMulInteger against the int8 weight, Cast, Mul by the two scales (ONNX Runtime
fuses them into DynamicQuantizeMatMul at load); a Gemm becomes the same plus the Add of its bias. The weight
arithmetic is its `quant_utils.quantize_data` (symmetric int8 in [-127, 127], one scale per output column),
vectorized. Written here because the tool wants the whole model as one ModelProto, which it re-saves for shape
inference and quantizes column by column in Python: at its peak it held 8x the weights (SmolLM-135M shape:
4.3 GB for 538 MB of weights).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from optimizers.pass_types import add_initializer


def int8_columns(weight: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [K, N] fp32 weight as onnxruntime's dynamic quantizer stores it: int8 values, fp32 scales and int8 zero
    points (all 0), one per column [N] when `per_channel`, else one for the whole weight."""
    axis = 0 if per_channel else None
    absmax = np.maximum(-np.minimum(weight.min(axis=axis), 0), np.maximum(weight.max(axis=axis), 0))
    scale = 2 * absmax.astype(np.float64) / 254  # (rmax - rmin) / (qmax - qmin), in float64 as onnxruntime has it
    scale = np.where(scale < np.finfo(np.float32).tiny, 1.0, scale).astype(np.float32)  # an all-zero column
    values = weight / scale
    np.round(values, out=values)
    np.clip(values, -128, 127, out=values)
    return values.astype(np.int8), scale, np.zeros(scale.shape, np.int8)


def projection_weight(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """(weight, transposed) of a MatMul, or a Gemm onnxruntime's quantizer would rewrite as one (alpha = beta = 1,
    no transA), whose second input is a 2-D fp32 initializer; None for anything else."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    tensor = weight.const_value if weight is not None and weight.is_initializer() else None
    if tensor is None or len(tensor.shape) != 2 or tensor.dtype != ir.DataType.FLOAT:
        return None
    if node.op_type == "MatMul":
        return weight, False
    attributes = node.attributes
    if attributes.get_float("alpha", 1.0) != 1.0 or attributes.get_float("beta", 1.0) != 1.0 or attributes.get_int("transA", 0):
        return None
    return weight, bool(attributes.get_int("transB", 0))


def quantize_projections(model: ir.Model, per_channel: bool, exclude: set[str]) -> list[str]:
    """Rewrite every projection of the main graph whose node is not in `exclude`; returns the names of the
    projections left in fp32 (the excluded, and Gemms of another form)."""
    activations: dict[ir.Value, tuple[ir.Value, ...]] = {}  # input -> DynamicQuantizeLinear's outputs
    weights: dict[tuple[str, bool], list[ir.Value]] = {}  # (weight name, transposed) -> int8, scale, zero point
    left = []
    for node in list(model.graph):
        found = projection_weight(node)
        if found is None or node.name in exclude:
            if found is not None or (node.op_type == "Gemm" and node.inputs[1].const_value is not None):
                left.append(node.name)
            continue
        weight, transposed = found
        t = tape.Tape()
        x = node.inputs[0]
        if x not in activations:
            activations[x] = t.op_multi_out("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{x.name}_QuantizeLinear")
            for value, suffix in zip(activations[x], ("quantized", "scale", "zero_point")):
                value.name = f"{x.name}_{suffix}"
        x_values, x_scale, x_zero = activations[x]
        if (weight.name, transposed) not in weights:
            weights[weight.name, transposed] = _int8_weight(model, weight, transposed, per_channel)
        w_values, w_scale, w_zero = weights[weight.name, transposed]
        scales = t.op("Mul", [x_scale, w_scale], name=f"{node.name}_quant_scales_mul")
        product = t.op("MatMulInteger", [x_values, w_values, x_zero, w_zero], name=f"{node.name}_quant")
        output = t.op("Mul", [t.op("Cast", [product], {"to": int(ir.DataType.FLOAT)}), scales],
                      name=f"{node.name}_quant_output_scale_mul")
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            output = t.op("Add", [output, node.inputs[2]], name=f"{node.name}_Add")
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], t.nodes, node.outputs, [output])
        if not weight.uses() and weight.name in model.graph.initializers:
            del model.graph.initializers[weight.name]  # frees the fp32 weight
    return left


def _int8_weight(model: ir.Model, weight: ir.Value, transposed: bool, per_channel: bool) -> list[ir.Value]:
    tensor = weight.const_value
    array = tensor.numpy()
    arrays = int8_columns(np.ascontiguousarray(array.T) if transposed else array, per_channel)
    del array  # a view of the mapped file: the mapping cannot close while it lives
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()  # unmaps the weight's pages of the .data file
    stem = f"{weight.name}_Transposed" if transposed else weight.name
    return [add_initializer(model, f"{stem}_{suffix}", a) for suffix, a in zip(("quantized", "scale", "zero_point"), arrays)]
