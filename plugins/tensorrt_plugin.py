"""kiln::CausalAttention as a TensorRT plugin (tensorrt.plugin, ahead-of-time with the kernel's PTX).

The AOT route embeds the PTX and its launch recipe in the engine, so the engine runs without Python.
tensorrt is imported inside register() only: the shape, launch and attribute arithmetic below works on
plain ints as well as on TensorRT's symbolic shape expressions, and is tested where TensorRT is absent.

ONNX node the parser maps to this plugin: domain "kiln", op_type "CausalAttention", plugin_version "1",
inputs (query [b, h, q, d], key [b, kv_h, s, d], value [b, kv_h, s, d], key_mask [b, s] int32 (0 hides a
padding key; ones when there is none), alibi_slopes [h] float32 (zeros when the model has no ALiBi)),
attribute scale: float (0.0 means 1/sqrt(d)), output [b, h, q, d]. The cache holds the new keys, so
past_len = s - q.

tensorrt.plugin hands each attribute to the registered functions converted through its annotation from
`PluginField.data`, a one-element array for the parser's float: `float(array)` fails on NumPy >= 2.4, so
`scale` is declared `npt.NDArray[np.float32]` and its element 0 is read (`attribute_scale`).
"""

import math
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from plugins.errors import AttentionInputError, PluginBuildError

PLUGIN_NAMESPACE = "kiln"
PLUGIN_NAME = "CausalAttention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_VERSION = "1"

# These mirror the #defines of plugins/attention/causal_attention.cu (a test checks they agree).
ROWS_PER_BLOCK = 8
MAX_HEAD_DIM = 256
CUDA_WARP_SIZE = 32
FLOAT_BYTES = 4

KERNEL_NAMES = {"float32": "kiln_causal_attention_f32", "float16": "kiln_causal_attention_f16"}
# query, key, value and output share FP32 or FP16; the key mask is INT32 and the slopes stay FP32.
IO_TYPES = "FP32|FP16, FP32|FP16, FP32|FP16, INT32|INT32, FP32|FP32, FP32|FP16"
PTX_ARCH = "compute_80"
# tensorrt.plugin's ahead-of-time API (aot_impl, KernelLaunchParams, SymIntExprs) came with TensorRT 10.8.
MIN_TENSORRT = (10, 8)


@dataclass
class LaunchGeometry:
    grid_x: object
    grid_y: object
    block_x: int
    block_y: int
    shared_mem: object


def cdiv(numerator, denominator: int):
    """Ceiling division with only + and //, which TensorRT's shape expressions support."""
    return (numerator + (denominator - 1)) // denominator


def launch_geometry(query_shape, warp_size: int = CUDA_WARP_SIZE) -> LaunchGeometry:
    """Grid, block and shared memory for query [batch, heads, q_len, head_dim] (ints or shape exprs)."""
    batch, heads, q_len, head_dim = query_shape
    return LaunchGeometry(
        grid_x=batch * heads,
        grid_y=cdiv(q_len, ROWS_PER_BLOCK),
        block_x=warp_size,
        block_y=ROWS_PER_BLOCK,
        # KILN_SHARED_FLOATS: query rows and per-warp accumulators in float, plus a (max, sum) per warp
        shared_mem=head_dim * (2 * ROWS_PER_BLOCK * FLOAT_BYTES) + 2 * ROWS_PER_BLOCK * FLOAT_BYTES,
    )


def scale_bits(scale: float) -> int:
    """The int32 carrying the float scale's bits: AOT plugins pass extra kernel arguments as int32 only."""
    return struct.unpack("<i", struct.pack("<f", scale))[0]


def attribute_scale(scale) -> float:
    """The scale attribute as TensorRT passes it (a one-element float32 array) or as a plain number."""
    values = np.asarray(scale, dtype=np.float32).reshape(-1)
    if values.size != 1:
        raise AttentionInputError(f"{PLUGIN_ID} attribute scale must hold one float; got {values.size} values")
    return float(values[0])


def check_tensorrt_version(version: str) -> None:
    """PluginBuildError unless `version` ("10.13.0.35") has tensorrt.plugin's ahead-of-time API."""
    parts = version.split(".")[:2]
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        raise PluginBuildError(f"TensorRT version: expected 'major.minor...', got {version!r}")
    if tuple(int(p) for p in parts) < MIN_TENSORRT:
        raise PluginBuildError(
            f"{PLUGIN_ID} is built with tensorrt.plugin's ahead-of-time API, which needs TensorRT >= "
            f"{'.'.join(map(str, MIN_TENSORRT))}; this is TensorRT {version}: upgrade it (pip install -U tensorrt)"
        )


def check_scale(scale: float) -> None:
    if not math.isfinite(scale) or scale < 0:
        raise AttentionInputError(f"{PLUGIN_ID} attribute scale must be a finite float >= 0 (0 = 1/sqrt(head_dim)); got {scale}")


def kernel_args(query_shape, key_shape, scale: float) -> list:
    """The kernel's int32 scalars, in its order: heads, kv_heads, q_len, kv_capacity, past_len, head_dim, scale."""
    check_scale(scale)
    _, heads, q_len, head_dim = query_shape
    _, kv_heads, kv_capacity, _ = key_shape
    return [heads, kv_heads, q_len, kv_capacity, kv_capacity - q_len, head_dim, scale_bits(scale)]


def known_value(dim):
    """An int for a dimension known at build time, None for a dynamic or not-yet-known one."""
    if isinstance(dim, int):
        return dim
    if getattr(dim, "is_fake", False) or not getattr(dim, "is_constant", False):
        return None
    return dim.constant_value()


def check_shapes(query_shape, key_shape) -> None:
    """Reject what the kernel cannot run, as far as the dimensions are known when the engine is built."""
    if len(query_shape) != 4 or len(key_shape) != 4:
        raise AttentionInputError(f"{PLUGIN_ID} expects 4-d [batch, heads, seq, head_dim] query and key")
    head_dim, key_dim = known_value(query_shape[3]), known_value(key_shape[3])
    if head_dim is not None and not 0 < head_dim <= MAX_HEAD_DIM:
        raise AttentionInputError(f"{PLUGIN_ID} supports head_dim 1..{MAX_HEAD_DIM}; got {head_dim}")
    if None not in (head_dim, key_dim) and head_dim != key_dim:
        raise AttentionInputError(f"{PLUGIN_ID}: query head_dim {head_dim} differs from key head_dim {key_dim}")
    heads, kv_heads = known_value(query_shape[1]), known_value(key_shape[1])
    if None not in (heads, kv_heads) and (kv_heads <= 0 or heads % kv_heads):
        raise AttentionInputError(f"{PLUGIN_ID}: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")


def check_dtypes(query: str, key: str, value: str, key_mask: str, alibi_slopes: str) -> None:
    """dtype names ("float32", "float16", ...) of the inputs."""
    if query not in KERNEL_NAMES or key != query or value != query:
        raise AttentionInputError(
            f"{PLUGIN_ID} expects query, key and value all float32 or all float16; got {query}, {key}, {value}"
        )
    if key_mask != "int32":
        raise AttentionInputError(f"{PLUGIN_ID} expects an int32 key_mask; got {key_mask}")
    if alibi_slopes != "float32":
        raise AttentionInputError(f"{PLUGIN_ID} expects float32 alibi_slopes; got {alibi_slopes}")


def kernel_name(dtype: str) -> str:
    if dtype not in KERNEL_NAMES:
        raise AttentionInputError(f"{PLUGIN_ID} has kernels for {', '.join(KERNEL_NAMES)}; got {dtype}")
    return KERNEL_NAMES[dtype]


def default_ptx() -> bytes:
    """The kernel compiled to PTX (cached by source hash); needs nvcc where the engine is built."""
    from plugins.build import build

    return build("cuda", [PTX_ARCH])[0].path.read_bytes()


_registered = False


def register(ptx: bytes | None = None) -> None:
    """Register kiln::CausalAttention with tensorrt.plugin (once per process); ptx defaults to default_ptx()."""
    global _registered
    if _registered:
        return
    import tensorrt as trt

    check_tensorrt_version(trt.__version__)  # before importing tensorrt.plugin, which older versions lack
    import tensorrt.plugin as trtp

    ptx = ptx if ptx is not None else default_ptx()
    dtype_names = {trt.float32: "float32", trt.float16: "float16", trt.int32: "int32"}

    def name_of(desc) -> str:
        return dtype_names.get(desc.dtype, str(desc.dtype))

    # tensorrt.plugin reads these signatures (names, order, annotations) as the plugin's schema.
    @trtp.register(PLUGIN_ID)
    def describe(
        query: trtp.TensorDesc,
        key: trtp.TensorDesc,
        value: trtp.TensorDesc,
        key_mask: trtp.TensorDesc,
        alibi_slopes: trtp.TensorDesc,
        scale: npt.NDArray[np.float32],
    ) -> trtp.TensorDesc:
        check_dtypes(name_of(query), name_of(key), name_of(value), name_of(key_mask), name_of(alibi_slopes))
        check_scale(attribute_scale(scale))
        return query.like()

    @trtp.autotune(PLUGIN_ID)
    def autotune(query, key, value, key_mask, alibi_slopes, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(IO_TYPES, "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def aot_impl(
        query: trtp.TensorDesc,
        key: trtp.TensorDesc,
        value: trtp.TensorDesc,
        key_mask: trtp.TensorDesc,
        alibi_slopes: trtp.TensorDesc,
        scale: npt.NDArray[np.float32],
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        check_shapes(query.shape_expr, key.shape_expr)
        geometry = launch_geometry(query.shape_expr)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y = geometry.grid_x, geometry.grid_y
        params.block_x, params.block_y = geometry.block_x, geometry.block_y
        params.shared_mem = geometry.shared_mem
        args = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(arg) for arg in kernel_args(query.shape_expr, key.shape_expr, attribute_scale(scale))]
        )
        return kernel_name(name_of(query)).encode(), ptx, params, args

    _registered = True
