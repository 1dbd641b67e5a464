"""`winograd`: 3x3 convolutions as Winograd minimal filtering, transforms around one batched MatMul (CPU).

ONNX Runtime's CPU Conv already runs a wide 3x3 convolution near the cores' fp32 peak (SD 1.5's UNet: 197-231
GFLOP/s on 2 Zen 4 cores), so only fewer multiplications make it faster. Winograd's F(m x m, 3 x 3) (Lavin and
Gray, 2015) makes each m x m output tile from an (m+2) x (m+2) input tile with (m+2)^2 products per channel pair
instead of 9 m^2: 2.25x fewer for m = 2, 4x for m = 4. ONNX Runtime has no such kernel on the CPU (MLAS has
none), so the pass writes it with standard ops, per convolution:

    x -> Pad -> SpaceToDepth(m)           the m x m phases of the padded input, [N, m*m*C, tiles+1, tiles+1]
      -> 4 Slices (tile offset 0 or 1)    the (m+2)^2 elements of every tile, [N, P, C, T]   (P = (m+2)^2)
      -> MatMul(B)                        input transform, one [P, P] matrix
      -> MatMul(U)                        U = G w G^T [P, Cout, C], precomputed: the P products as P GEMMs
      -> MatMul(A)                        output transform to the m*m outputs of each tile
      -> DepthToSpace(m), Slice           tiles back to [N, Cout, H, W], any H and W (padded to whole tiles)

Measured one 3x3 convolution at a time against ONNX Runtime's Conv (2 cores, batch 2, min of 11 interleaved
runs): 320 -> 320 channels at 64x64: 0.78x (m = 2) / 0.59x (m = 4); 640 at 32x32: 0.60x / 0.53x; 1280 at 16x16:
0.65x / 0.47x; 1280 at 8x8: 0.80x / 1.24x; 128 channels at 64x64: 1.37x / 1.41x (the transforms cost more
than they save there). Relative error against the direct Conv: ~5e-7 for m = 2, ~1e-5 for m = 4.

The transformed weight is (m+2)^2 / 9 times the original: 1.8x for m = 2, 4x for m = 4, so 4x4 tiles go only to
convolutions whose weight is small (`big_tile_mb`); in UNets those are the narrow ones at high resolution,
where bigger tiles also pay most. GPUs' libraries (cuDNN, MIOpen) choose Winograd themselves: CPU recipes only.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optimizers.pass_types import Pass, PassContext, PassOption, add_initializer, replace_value

# Transform matrices (input B^T, filter G, output A^T) of F(2x2, 3x3) and F(4x4, 3x3), Lavin and Gray's.
TRANSFORMS = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])),
}


def winograd(model: ir.Model, context: PassContext) -> tuple[ir.Model, dict]:
    min_channels = context.option("winograd", "min_channels")
    big_tile_bytes = context.option("winograd", "big_tile_mb") * 2**20
    rewritten = {2: 0, 4: 0}
    for node in list(model.graph):
        weight = _eligible(node, min_channels)
        if weight is None:
            continue
        tile = 4 if weight.nbytes <= big_tile_bytes else 2
        _rewrite(model, node, weight, tile, f"winograd{sum(rewritten.values())}")
        rewritten[tile] += 1
    return model, {"convs_rewritten": sum(rewritten.values()), "tiles_2x2": rewritten[2], "tiles_4x4": rewritten[4]}


def _eligible(node: ir.Node, min_channels: int) -> ir.TensorProtocol | None:
    """The fp32 weight `[Cout, C, 3, 3]` of a 3x3 convolution this pass rewrites (stride 1, padding 1, no dilation
    or groups, at least `min_channels` in and out), else None."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    if (attributes.get("group", 1) != 1 or list(attributes.get("strides", [1, 1])) != [1, 1]
            or list(attributes.get("dilations", [1, 1])) != [1, 1] or list(attributes.get("pads", [])) != [1, 1, 1, 1]
            or attributes.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET")):
        return None
    weight, bias = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    if weight is None or weight.const_value is None or (bias is not None and bias.const_value is None):
        return None
    if weight.const_value.dtype != ir.DataType.FLOAT:
        return None
    shape = tuple(weight.const_value.shape)
    if len(shape) != 4 or shape[2:] != (3, 3) or min(shape[:2]) < min_channels:
        return None
    return weight.const_value


def _rewrite(model: ir.Model, conv: ir.Node, weight: ir.TensorProtocol, m: int, prefix: str) -> None:
    """Replace `conv` by F(m x m, 3 x 3) in standard ops (see the module's docstring for the layout)."""
    b_t, g, a_t = TRANSFORMS[m]
    side = m + 2
    products = side * side
    cout, cin = weight.shape[:2]
    nodes: list[ir.Node] = []

    def op(op_type, inputs, **attributes) -> ir.Value:
        made = ir.node(op_type, inputs, attributes=attributes, name=f"{prefix}_{len(nodes)}_{op_type}")
        nodes.append(made)
        return made.outputs[0]

    def const(name, array, scope=f"winograd_f{m}") -> ir.Value:  # shared by every convolution of this tile size
        full = f"{scope}_{name}"
        known = model.graph.initializers.get(full)
        return known if known is not None else add_initializer(model, full, np.asarray(array))

    def own(name, array) -> ir.Value:  # this convolution's: its channel counts, its bias
        return const(name, array, scope=prefix)

    def pair(value) -> np.ndarray:  # the same for H and W
        return np.array([value, value])

    x = conv.inputs[0]
    shape = op("Shape", [x])
    batch = op("Slice", [shape, const("at0", np.array([0])), const("at1", np.array([1]))])
    size = op("Slice", [shape, const("at2", np.array([2])), const("at4", np.array([4]))])  # H, W
    tiles = op("Div", [op("Add", [size, const("m_1", pair(m - 1))]), const("m", pair(m))])  # rounded up
    # Padding 1 before; after it, up to whole tiles plus the m - 1 more that the last tile's phases need.
    after = op("Add", [op("Sub", [op("Mul", [tiles, const("m", pair(m))]), size]), const("m_1", pair(m - 1))])
    pads = op("Concat", [const("pads_before", np.array([0, 0, 1, 1])), const("pads_batch", pair(0)), after], axis=0)
    phases = op("SpaceToDepth", [op("Pad", [x, pads])], blocksize=m)  # channel = (by * m + bx) * C + c
    grid = op("Add", [tiles, const("one", pair(1))])
    phases = op("Reshape", [phases, op("Concat", [batch, own("phase_dims", np.array([m, m, cin])), grid], axis=0)])
    # Tile element (i, j) = phase (i % m, j % m) at tile offset (i // m, j // m): per offset, the phases it needs.
    parts, order = [], []
    for oy in (0, 1):
        for ox in (0, 1):
            rows, cols = min(m, side - m * oy), min(m, side - m * ox)
            ends = op("Concat", [const(f"ends{oy}{ox}", np.array([rows, cols])),
                                 op("Add", [tiles, const(f"offset{oy}{ox}", np.array([oy, ox]))])], axis=0)
            part = op("Slice", [phases, const(f"starts{oy}{ox}", np.array([0, 0, oy, ox])), ends,
                                const("slice_axes", np.array([1, 2, 4, 5]))])
            parts.append(op("Reshape", [part, op("Concat", [batch, own(f"flat{oy}{ox}", np.array([rows * cols, cin])),
                                                            tiles], axis=0)]))
            order += [(m * oy + by, m * ox + bx) for by in range(rows) for bx in range(cols)]
    elements = op("Concat", parts, axis=1)  # [N, P, C, tiles_h, tiles_w], elements in `order`
    by_element = np.kron(b_t, b_t)[:, [i * side + j for i, j in order]].astype(np.float32)
    flat = op("Reshape", [elements, op("Concat", [batch, const("products_flat", np.array([products, -1]))], axis=0)])
    transformed = op("MatMul", [const("input_transform", by_element), flat])
    transformed = op("Reshape", [transformed, op("Concat", [batch, own("products_c", np.array([products, cin, -1]))],
                                                  axis=0)])
    multiplied = op("MatMul", [_transformed_weight(model, f"{prefix}_weight", weight, g), transformed])  # [N,P,Cout,T]
    multiplied = op("Reshape", [multiplied, op("Concat", [batch, const("products_flat", np.array([products, -1]))],
                                                axis=0)])
    outputs = op("MatMul", [const("output_transform", np.kron(a_t, a_t).astype(np.float32)), multiplied])
    outputs = op("Reshape", [outputs, op("Concat", [batch, own("tile_channels", np.array([m * m * cout])), tiles],
                                          axis=0)])  # [N, m*m*Cout, tiles_h, tiles_w]
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:  # bias per output channel, the same in every tile slot
        bias = np.tile(conv.inputs[2].const_value.numpy().astype(np.float32), m * m).reshape(-1, 1, 1)
        outputs = op("Add", [outputs, own("bias", bias)])
    image = op("DepthToSpace", [outputs], blocksize=m, mode="DCR")
    result = op("Slice", [image, const("crop_starts", np.array([0, 0])), size, const("crop_axes", np.array([2, 3]))])
    model.graph.insert_before(conv, nodes)
    replace_value(conv.outputs[0], result)
    parameters = [value for value in conv.inputs[1:] if value is not None]
    model.graph.remove(conv, safe=True)
    for value in parameters:  # the direct weights, unless another node reads them too
        if not value.uses() and value.name in model.graph.initializers:
            del model.graph.initializers[value.name]


def _transformed_weight(model: ir.Model, name: str, weight: ir.TensorProtocol, g: np.ndarray) -> ir.Value:
    """U = G w G^T as `[P, Cout, C]`, computed when the model is written: SD 1.5's come to 2.3 GB more than its
    convolutions' own weights, which should not all sit in memory at once."""
    cout, cin = weight.shape[:2]
    shape = ir.Shape([len(g) ** 2, cout, cin])

    def compute() -> ir.Tensor:
        u = np.einsum("ij,ocjk,lk->iloc", g, weight.numpy().astype(np.float64), g)
        return ir.tensor(u.reshape(shape.numpy()).astype(np.float32), name=name)

    value = ir.Value(name=name, shape=shape, type=ir.TensorType(ir.DataType.FLOAT))
    value.const_value = ir.LazyTensor(compute, ir.DataType.FLOAT, shape, name=name)
    model.graph.register_initializer(value)
    return value


WINOGRAD = Pass(
    "winograd", winograd,
    "3x3 convolutions (stride 1, padding 1) as Winograd F(2x2) or F(4x4) transforms around one batched MatMul: "
    "2.25-4x fewer multiplications, 1.8-4x the weight memory",
    options=(
        PassOption("min_channels", int, 320, "convolutions with fewer input or output channels stay direct: there "
                   "the transforms cost more than they save (128 channels: 1.4x slower)"),
        PassOption("big_tile_mb", float, 48.0, "convolutions whose fp32 weight is at most this large get 4x4 "
                   "output tiles (4x the weight memory), larger ones 2x2 tiles (1.8x)"),
    ),
)
