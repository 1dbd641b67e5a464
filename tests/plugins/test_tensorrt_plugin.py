"""kiln::CausalAttention's TensorRT plugin: shape, launch and attribute logic with stand-ins for TensorRT."""

import inspect
import re
import struct
import sys
import types
import typing
from dataclasses import dataclass, replace

import numpy as np
import pytest

from plugins import AttentionInputError, PluginBuildError
from plugins import tensorrt_plugin as trt_plugin
from plugins.build import KERNEL_SOURCE


class SymDim:
    """Stand-in for a TensorRT shape expression: a dynamic dim with only +, -, * and //, kept as text."""

    is_fake = False
    is_constant = False

    def __init__(self, text):
        self.text = text

    def _op(self, symbol, other):
        return SymDim(f"({self.text} {symbol} {getattr(other, 'text', other)})")

    __add__ = lambda self, other: self._op("+", other)
    __sub__ = lambda self, other: self._op("-", other)
    __mul__ = lambda self, other: self._op("*", other)
    __floordiv__ = lambda self, other: self._op("//", other)
    __rmul__ = __mul__


class ConstDim(SymDim):
    """Stand-in for a shape expression that is a build-time constant."""

    is_constant = True

    def __init__(self, value):
        super().__init__(str(value))
        self.value = value

    def constant_value(self):
        return self.value


@dataclass
class TensorDescStandIn:
    shape_expr: tuple
    dtype: str

    def like(self):
        return replace(self)


def test_constants_mirror_the_kernel_source():
    source = KERNEL_SOURCE.read_text()
    defines = dict(re.findall(r"#define (KILN_\w+) (\d+)", source))
    assert int(defines["KILN_ROWS_PER_BLOCK"]) == trt_plugin.ROWS_PER_BLOCK
    # launch_geometry's shared memory is this many floats
    assert "#define KILN_SHARED_FLOATS(head_dim) (2 * KILN_ROWS_PER_BLOCK * (head_dim) + 2 * KILN_ROWS_PER_BLOCK)" in source
    assert int(defines["KILN_MAX_HEAD_DIM"]) == trt_plugin.MAX_HEAD_DIM
    for name in trt_plugin.KERNEL_NAMES.values():
        assert f"KILN_ATTENTION_ENTRY({name}," in source


def test_plugin_is_addressed_like_the_onnx_node():
    assert (trt_plugin.PLUGIN_NAMESPACE, trt_plugin.PLUGIN_NAME, trt_plugin.PLUGIN_VERSION) == ("kiln", "CausalAttention", "1")
    assert trt_plugin.PLUGIN_ID == "kiln::CausalAttention"


@pytest.mark.parametrize(
    "query_shape, grid, shared_mem",
    [((2, 8, 5, 64), (16, 1), 4160), ((1, 32, 9, 128), (32, 2), 8256), ((3, 4, 8, 17), (12, 1), 1152)],
)
def test_launch_geometry_with_static_shapes(query_shape, grid, shared_mem):
    geometry = trt_plugin.launch_geometry(query_shape)
    assert (geometry.grid_x, geometry.grid_y) == grid
    assert (geometry.block_x, geometry.block_y) == (32, 8)
    assert geometry.shared_mem == shared_mem


def test_launch_geometry_with_dynamic_shapes_uses_only_shape_expression_ops():
    query = (SymDim("batch"), ConstDim(32), SymDim("seq"), ConstDim(128))
    geometry = trt_plugin.launch_geometry(query)
    assert geometry.grid_x.text == "(batch * 32)"
    assert geometry.grid_y.text == "((seq + 7) // 8)"
    assert geometry.shared_mem.text == "((128 * 64) + 64)"


def test_kernel_args_derive_past_len_from_the_cache_and_carry_scale_bits():
    args = trt_plugin.kernel_args((2, 8, 3, 64), (2, 2, 10, 64), 0.0)
    assert args == [8, 2, 3, 10, 7, 64, 0]  # scale 0 asks the kernel for 1/sqrt(head_dim)
    (bits,) = trt_plugin.kernel_args((1, 4, 1, 16), (1, 4, 5, 16), 0.125)[-1:]
    assert bits == 0x3E000000 and struct.unpack("<f", struct.pack("<i", bits))[0] == 0.125
    dynamic = trt_plugin.kernel_args((SymDim("b"), 8, SymDim("q"), 64), (SymDim("b"), 2, SymDim("s"), 64), 0.5)
    assert dynamic[4].text == "(s - q)"


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_bad_scale_attribute_is_rejected(scale):
    with pytest.raises(AttentionInputError, match="scale"):
        trt_plugin.kernel_args((1, 1, 1, 8), (1, 1, 1, 8), scale)


@pytest.mark.parametrize(
    "query_shape, key_shape, message",
    [
        ((1, 8, 4, 512), (1, 8, 4, 512), "head_dim 1..256"),
        ((1, ConstDim(6), SymDim("q"), 64), (1, ConstDim(4), SymDim("s"), 64), "multiple of kv_heads"),
        ((1, 8, 4, 64), (1, 8, 4, 32), "differs"),
        ((8, 4, 64), (1, 8, 4, 64), "4-d"),
    ],
)
def test_shapes_the_kernel_cannot_run_are_rejected(query_shape, key_shape, message):
    with pytest.raises(AttentionInputError, match=message):
        trt_plugin.check_shapes(query_shape, key_shape)


def test_unknown_dims_pass_the_build_time_check():
    trt_plugin.check_shapes((SymDim("b"), SymDim("h"), SymDim("q"), ConstDim(64)), (SymDim("b"), 2, SymDim("s"), 64))


def test_output_is_described_like_the_query_and_kernel_follows_dtype():
    query = TensorDescStandIn((SymDim("b"), 8, SymDim("q"), 64), "float16")
    trt_plugin.check_dtypes("float16", "float16", "float16", "int32", "float32")
    out = query.like()
    assert out.shape_expr == query.shape_expr and out.dtype == "float16"
    assert trt_plugin.kernel_name("float16") == "kiln_causal_attention_f16"
    assert trt_plugin.kernel_name("float32") == "kiln_causal_attention_f32"


@pytest.mark.parametrize(
    "dtypes, message",
    [
        (("float16", "float32", "float16", "int32", "float32"), "all float32 or all float16"),
        (("float32",) * 3 + ("int32", "float16"), "float32 alibi_slopes"),
        (("float32",) * 3 + ("int64", "float32"), "int32 key_mask"),
        (("bfloat16",) * 3 + ("int32", "float32"), "all float32"),
    ],
)
def test_mixed_dtypes_are_rejected(dtypes, message):
    with pytest.raises(AttentionInputError, match=message):
        trt_plugin.check_dtypes(*dtypes)


def test_type_combinations_cover_every_io():
    positions = [p.strip() for p in trt_plugin.IO_TYPES.split(",")]
    # q, k, v, key_mask, slopes, out: every position lists the same number of alternatives
    assert positions == ["FP32|FP16", "FP32|FP16", "FP32|FP16", "INT32|INT32", "FP32|FP32", "FP32|FP16"]


def test_aot_ptx_exports_the_kernel_names(cuda_binaries):
    ptx = cuda_binaries[trt_plugin.PTX_ARCH].path.read_text()
    for name in trt_plugin.KERNEL_NAMES.values():
        # The AOT ABI: input pointers, then int32 scalars, then the output pointer.
        params = re.search(rf"\.entry {name}\((.*?)\)", ptx, re.S).group(1)
        kinds = re.findall(r"\.param \.(u64|u32)", params)
        assert kinds == ["u64"] * 5 + ["u32"] * 7 + ["u64"]


def stand_in_tensorrt(monkeypatch, version="10.13.0.35"):
    """Stand-ins for tensorrt and tensorrt.plugin that record the functions register() decorates."""
    trt = types.ModuleType("tensorrt")
    trtp = types.ModuleType("tensorrt.plugin")
    trt.plugin, trt.float32, trt.float16, trt.int32 = trtp, "trt.float32", "trt.float16", "trt.int32"
    trt.__version__ = version

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
        shared_mem = 0

    class SymIntExprs(list):
        from_tuple = classmethod(lambda cls, items: cls(items))

    @dataclass
    class AutoTuneCombination:
        io_types: str
        layouts: str

    functions = {}
    recorder = lambda kind: lambda plugin_id: lambda fn: functions.setdefault((plugin_id, kind), fn)
    trtp.TensorDesc, trtp.KernelLaunchParams, trtp.SymIntExprs = TensorDescStandIn, KernelLaunchParams, SymIntExprs
    trtp.AutoTuneCombination, trtp.SymInt32 = AutoTuneCombination, lambda value: value
    trtp.register, trtp.autotune, trtp.aot_impl = recorder("register"), recorder("autotune"), recorder("aot_impl")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(trt_plugin, "_registered", False)
    return functions


@pytest.fixture
def registered(monkeypatch):
    """register() run against the stand-in tensorrt.plugin."""
    functions = stand_in_tensorrt(monkeypatch)
    trt_plugin.register(ptx=b"// ptx")
    return {kind: fn for (plugin_id, kind), fn in functions.items() if plugin_id == trt_plugin.PLUGIN_ID}


def attribute_as_tensorrt_passes_it(function, name: str, field_data: np.ndarray):
    """What tensorrt.plugin's plugin creator hands `function` for attribute `name`: the parser's PluginField
    data (a one-element array for an ONNX float) converted through the parameter's annotation, as
    `_TemplatePluginCreator.create_plugin` does: `.astype(dtype)` for `npt.NDArray[dtype]`, else `annotation(data)`."""
    annotation = inspect.signature(function).parameters[name].annotation
    if typing.get_origin(annotation) is np.ndarray:
        (dtype,) = typing.get_args(typing.get_args(annotation)[1])
        return field_data.astype(dtype)
    return annotation(field_data)


def test_registered_signatures_follow_tensorrt_plugin_rules(registered):
    assert set(registered) == {"register", "autotune", "aot_impl"}
    describe = inspect.signature(registered["register"])
    assert list(describe.parameters) == ["query", "key", "value", "key_mask", "alibi_slopes", "scale"]
    # NumPy >= 2.4 refuses float(one-element array): a float attribute is declared as a float32 array.
    assert describe.parameters["scale"].annotation == np.typing.NDArray[np.float32]
    assert describe.parameters["scale"].default is inspect.Parameter.empty
    assert describe.return_annotation is TensorDescStandIn
    assert list(inspect.signature(registered["autotune"]).parameters) == ["query", "key", "value", "key_mask", "alibi_slopes", "outputs"]
    assert typing.get_origin(inspect.signature(registered["autotune"]).return_annotation) is list
    aot = inspect.signature(registered["aot_impl"])
    assert list(aot.parameters) == ["query", "key", "value", "key_mask", "alibi_slopes", "scale", "outputs", "tactic"]
    assert typing.get_origin(aot.parameters["outputs"].annotation) is tuple
    assert typing.get_origin(aot.return_annotation) is tuple and len(typing.get_args(aot.return_annotation)) == 4


def test_registered_functions_describe_tune_and_launch(registered):
    query = TensorDescStandIn((2, 8, 3, 64), "trt.float16")
    key = TensorDescStandIn((2, 2, 10, 64), "trt.float16")
    mask = TensorDescStandIn((2, 10), "trt.int32")
    slopes = TensorDescStandIn((8,), "trt.float32")
    out = registered["register"](query, key, key, mask, slopes, 0.0)
    assert out.shape_expr == query.shape_expr and out.dtype == "trt.float16"
    with pytest.raises(AttentionInputError, match="all float32 or all float16"):
        registered["register"](query, TensorDescStandIn((2, 2, 10, 64), "trt.float32"), key, mask, slopes, 0.0)
    (combination,) = registered["autotune"](query, key, key, mask, slopes, (out,))
    assert combination.io_types == trt_plugin.IO_TYPES

    name, ptx, params, args = registered["aot_impl"](query, key, key, mask, slopes, 0.0, (out,), 0)
    assert (name, ptx) == (b"kiln_causal_attention_f16", b"// ptx")
    assert (params.grid_x, params.grid_y, params.block_x, params.block_y, params.shared_mem) == (16, 1, 32, 8, 4160)
    assert list(args) == [8, 2, 3, 10, 7, 64, 0]


def test_the_scale_attribute_survives_tensorrts_conversion(registered):
    """The ONNX parser gives `scale` as PluginField data `array([0.125], float32)`; both functions take it."""
    query = TensorDescStandIn((1, 4, 1, 16), "trt.float32")
    key = TensorDescStandIn((1, 4, 5, 16), "trt.float32")
    mask, slopes = TensorDescStandIn((1, 5), "trt.int32"), TensorDescStandIn((4,), "trt.float32")
    field = np.array([0.125], dtype=np.float32)
    scale = attribute_as_tensorrt_passes_it(registered["register"], "scale", field)
    assert registered["register"](query, key, key, mask, slopes, scale).dtype == "trt.float32"
    scale = attribute_as_tensorrt_passes_it(registered["aot_impl"], "scale", field)
    *_, args = registered["aot_impl"](query, key, key, mask, slopes, scale, (query.like(),), 0)
    assert args[-1] == 0x3E000000  # 0.125's bits
    with pytest.raises(AttentionInputError, match="must hold one float; got 2 values"):
        registered["register"](query, key, key, mask, slopes, np.array([0.1, 0.2], dtype=np.float32))


@pytest.mark.parametrize("version", ["10.7.0.23", "8.6.1"])
def test_tensorrt_without_the_aot_plugin_api_is_refused_before_importing_it(monkeypatch, version):
    stand_in_tensorrt(monkeypatch, version)
    monkeypatch.delitem(sys.modules, "tensorrt.plugin")  # older TensorRT: absent, or without aot_impl
    with pytest.raises(PluginBuildError, match=rf"needs TensorRT >= 10\.8; this is TensorRT {re.escape(version)}"):
        trt_plugin.register(ptx=b"// ptx")


@pytest.mark.tensorrt
def test_registers_with_tensorrt():
    import tensorrt.plugin as trtp

    trt_plugin.register()
    trt_plugin.register()  # idempotent
    assert hasattr(trtp.op.kiln, "CausalAttention")
