"""The CUDA/HIP kernel source itself, run on the CPU through a thread-per-GPU-thread emulation.

No GPU is needed: tests/plugins/gpu_emulation/compat.h replaces the real compat header, so the
kernel's tiling, online softmax, causal and ALiBi masking, GQA indexing and launch contract are checked
against the NumPy reference. Warp-level timing and memory-model issues are beyond what this can see.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from plugins import attention_reference
from plugins import tensorrt_plugin as trt_plugin
from plugins.build import KERNEL_SOURCE
from tests.plugins.cases import key_mask_for, random_attention_cases

EMULATION_DIR = Path(__file__).parent / "gpu_emulation"
# Few and small: every GPU thread is an OS thread here.
CASES = [c for c in random_attention_cases(60, seed=11) if c["batch"] * c["heads"] * (c["q_len"] + 7) // 8 <= 16][:24] + [
    # Long caches under short query blocks: the warps of a block split the keys and merge their states.
    dict(batch=1, heads=2, kv_heads=1, q_len=1, past_len=150, spare=2, head_dim=24, alibi=True, masked=True, scale=None, seed=101),
    dict(batch=2, heads=1, kv_heads=1, q_len=3, past_len=70, spare=0, head_dim=5, alibi=False, masked=True, scale=0.3, seed=102),
    dict(batch=1, heads=4, kv_heads=2, q_len=2, past_len=40, spare=1, head_dim=64, alibi=False, masked=False, scale=None, seed=103),
]


@pytest.fixture(scope="module")
def emulated_kernel(tmp_path_factory):
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (c++) on PATH to build the kernel emulation")
    work = tmp_path_factory.mktemp("gpu_emulation")
    shutil.copy(KERNEL_SOURCE, work)
    shutil.copy(EMULATION_DIR / "compat.h", work)
    shutil.copy(EMULATION_DIR / "launch.cpp", work)
    library = work / "emulated_attention.so"
    result = subprocess.run(
        [compiler, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-o", str(library), str(work / "launch.cpp")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


def run_kernel(lib, dtype, q, k, v, slopes, past_len, scale, mask=None):
    out = np.full_like(q, np.nan)
    batch, heads, q_len, head_dim = q.shape
    _, kv_heads, kv_capacity, _ = k.shape
    pointer = lambda array: None if array is None else array.ctypes.data_as(ctypes.c_void_p)
    entry = lib.emulate_f32 if dtype == np.float32 else lib.emulate_f16
    ints = [batch, heads, kv_heads, q_len, kv_capacity, past_len, head_dim, trt_plugin.scale_bits(scale or 0.0)]
    entry(pointer(q), pointer(k), pointer(v), pointer(mask), pointer(slopes), *map(ctypes.c_int, ints), pointer(out))
    return out


def random_inputs(case, dtype):
    rng = np.random.default_rng(case["seed"])
    capacity = case["past_len"] + case["q_len"] + case["spare"]
    q = rng.standard_normal((case["batch"], case["heads"], case["q_len"], case["head_dim"])).astype(dtype)
    k, v = (rng.standard_normal((case["batch"], case["kv_heads"], capacity, case["head_dim"])).astype(dtype) for _ in "kv")
    slopes = rng.uniform(0.01, 0.5, case["heads"]).astype(np.float32) if case["alibi"] else None
    return q, k, v, slopes


def test_cases_cross_tiles_and_blocks():
    assert len(CASES) >= 12
    # more keys than a warp scores at once, more rows than a block holds, and rows whose keys are split
    assert any(c["past_len"] + c["q_len"] > trt_plugin.CUDA_WARP_SIZE for c in CASES)
    assert any(c["q_len"] > trt_plugin.ROWS_PER_BLOCK for c in CASES)
    assert any(c["q_len"] < trt_plugin.ROWS_PER_BLOCK // 2 and c["past_len"] + c["q_len"] > trt_plugin.CUDA_WARP_SIZE for c in CASES)
    assert any(c["heads"] != c["kv_heads"] and c["alibi"] for c in CASES)
    assert any(c["masked"] and c["past_len"] + c["q_len"] > trt_plugin.CUDA_WARP_SIZE for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{batch}h{heads}kv{kv_heads}q{q_len}p{past_len}d{head_dim}".format(**c))
def test_fp32_kernel_matches_reference(case, emulated_kernel):
    q, k, v, slopes = random_inputs(case, np.float32)
    mask = key_mask_for(case)
    got = run_kernel(emulated_kernel, np.float32, q, k, v, slopes, case["past_len"], case["scale"], mask)
    expected = attention_reference(q, k, v, case["past_len"], slopes, case["scale"], mask)
    assert np.abs(got - expected).max() <= 1e-5


def test_fp16_kernel_matches_reference(emulated_kernel):
    case = dict(batch=2, heads=4, kv_heads=2, q_len=6, past_len=13, spare=2, head_dim=40, alibi=True, scale=None, seed=5)
    q, k, v, slopes = random_inputs(case, np.float16)
    got = run_kernel(emulated_kernel, np.float16, q, k, v, slopes, case["past_len"], None)
    expected = attention_reference(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), 13, slopes)
    assert np.abs(got.astype(np.float32) - expected).max() <= 2e-3


def test_kernel_handles_the_largest_head_dim(emulated_kernel):
    case = dict(batch=1, heads=2, kv_heads=1, q_len=3, past_len=18, spare=0, head_dim=trt_plugin.MAX_HEAD_DIM, alibi=False, scale=None, seed=6)
    q, k, v, _ = random_inputs(case, np.float32)
    got = run_kernel(emulated_kernel, np.float32, q, k, v, None, 18, None)
    assert np.abs(got - attention_reference(q, k, v, 18)).max() <= 1e-5
