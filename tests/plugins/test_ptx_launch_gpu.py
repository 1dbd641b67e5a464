"""The PTX the TensorRT plugin embeds, launched the way TensorRT's ahead-of-time plugin launches it: the kernel
name, grid, block, shared memory and int32 arguments come from plugins.tensorrt_plugin, the pointers in the
ABI order (query, key, value, key_mask, alibi_slopes, the scalars, output). TensorRT cannot be installed
here or on the lent GPU machines; CuPy loads the PTX instead (the driver JIT-compiles it)."""
import numpy as np
import pytest

from plugins import tensorrt_plugin as trt_plugin
from plugins.reference import attention_reference

pytestmark = pytest.mark.gpu
SHAPES = [(2, 8, 2, 5, 7, 64), (1, 4, 4, 1, 30, 128), (1, 32, 8, 17, 0, 128), (3, 2, 1, 9, 3, 17)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("batch, heads, kv_heads, q_len, past, head_dim", SHAPES)
def test_the_ptx_computes_attention_with_the_plugins_launch(cuda_binaries, dtype, batch, heads, kv_heads, q_len, past,
                                                            head_dim):
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(batch * 1000 + q_len)
    capacity = past + q_len  # the plugin's cache holds the new keys: past_len = capacity - q_len
    q = rng.standard_normal((batch, heads, q_len, head_dim)).astype(dtype)
    k, v = (rng.standard_normal((batch, kv_heads, capacity, head_dim)).astype(dtype) for _ in range(2))
    mask = np.ones((batch, capacity), np.int32)
    mask[0, : capacity // 3] = 0  # left padding in the first row
    slopes = np.array([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], np.float32)
    scale = 0.0  # the kernel's 1/sqrt(head_dim)

    module = cupy.RawModule(path=str(cuda_binaries[trt_plugin.PTX_ARCH].path))
    kernel = module.get_function(trt_plugin.kernel_name(dtype))
    geometry = trt_plugin.launch_geometry(q.shape)
    scalars = [np.int32(a) for a in trt_plugin.kernel_args(q.shape, k.shape, scale)]
    on_gpu = [cupy.asarray(a) for a in (q, k, v, mask, slopes)]
    out = cupy.empty_like(on_gpu[0])
    kernel((geometry.grid_x, geometry.grid_y), (geometry.block_x, geometry.block_y), (*on_gpu, *scalars, out),
           shared_mem=geometry.shared_mem)
    cupy.cuda.runtime.deviceSynchronize()

    expected = attention_reference(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), past, slopes,
                                   None, mask)
    got = cupy.asnumpy(out).astype(np.float64)
    error = np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)
    assert error <= (1e-6 if dtype == "float32" else 2e-3)
