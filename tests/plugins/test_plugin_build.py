"""Builds of the kernel source: CUDA (nvcc), HIP (hipcc), the plain CPU library, caching and errors."""

import ctypes
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from plugins import PluginBuildError, attention_reference, build
from plugins.build import main
from tests.plugins.cases import key_mask_for, random_attention_cases

# `plugins.build` is also the name of the function that plugins/__init__.py exports.
build_module = importlib.import_module("plugins.build")


def test_cuda_build_has_both_kernels_in_ptx_and_cubin(cuda_binaries):
    ptx = cuda_binaries["compute_80"].path.read_text()
    assert re.findall(r"\.visible \.entry (\w+)\(", ptx) == ["kiln_causal_attention_f32", "kiln_causal_attention_f16"]
    assert ".target sm_80" in ptx
    cubin = cuda_binaries["sm_80"]
    assert cubin.path.suffix == ".cubin" and len(cubin.sha256) == 64


def find_cuda_tool(name: str):
    """On PATH, or from the nvidia-cuda-* wheels (the machine's CUDA folder lacks cuobjdump and nvdisasm)."""
    found = shutil.which(name)
    if found is None and importlib.util.find_spec("nvidia") is not None:
        import nvidia

        found = next((str(p) for base in nvidia.__path__ for p in Path(base).glob(f"*/bin/{name}")), None)
    return found


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cubin_holds_sass_for_its_arch(arch, cuda_binaries):
    cuobjdump = find_cuda_tool("cuobjdump")
    if cuobjdump is None or find_cuda_tool("nvdisasm") is None:
        pytest.skip("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    # cuobjdump -sass runs nvdisasm, which it looks up on PATH.
    env = {**os.environ, "PATH": f"{Path(find_cuda_tool('nvdisasm')).parent}{os.pathsep}{os.environ['PATH']}"}
    listing = subprocess.run([cuobjdump, "-sass", str(cuda_binaries[arch].path)], capture_output=True, text=True, env=env)
    assert listing.returncode == 0, listing.stderr
    assert f"code for {arch}" in listing.stdout
    assert "Function : kiln_causal_attention_f16" in listing.stdout


def test_hip_build_for_gfx90a():
    if shutil.which("hipcc") is None:
        pytest.skip("hipcc is not on PATH (Debian: apt-get install hipcc libamdhip64-dev): HIP build not checked")
    (library,) = build("rocm", ["gfx90a"])
    blob = library.path.read_bytes()
    assert b"amdgcn-amd-amdhsa--gfx90a" in blob
    assert b"kiln_causal_attention_f32" in blob and b"kiln_causal_attention_f16" in blob


def test_cpu_library_runs_the_reference_without_torch(tmp_path):
    (library,) = build("cpu", build_dir=tmp_path)
    lib = ctypes.CDLL(str(library.path))
    entry = lib.kiln_causal_attention_cpu_f32
    entry.restype = ctypes.c_int
    for case in random_attention_cases(12, seed=7):
        rng = np.random.default_rng(case["seed"])
        capacity = case["past_len"] + case["q_len"] + case["spare"]
        q = rng.standard_normal((case["batch"], case["heads"], case["q_len"], case["head_dim"]), dtype=np.float32)
        k, v = (rng.standard_normal((case["batch"], case["kv_heads"], capacity, case["head_dim"]), dtype=np.float32) for _ in "kv")
        slopes = rng.uniform(0.01, 0.5, case["heads"]).astype(np.float32) if case["alibi"] else None
        mask = key_mask_for(case)
        out = np.empty_like(q)
        pointer = lambda array: None if array is None else array.ctypes.data_as(ctypes.c_void_p)
        sizes = [case[n] for n in ("batch", "heads", "kv_heads", "q_len")] + [capacity, case["past_len"], case["head_dim"]]
        status = entry(
            pointer(q), pointer(k), pointer(v), pointer(mask), pointer(slopes), *map(ctypes.c_int64, sizes),
            ctypes.c_float(case["scale"] or 0.0), pointer(out),
        )
        assert status == 0
        expected = attention_reference(q, k, v, case["past_len"], slopes, case["scale"], mask)
        assert np.abs(out - expected).max() <= 1e-5


def test_outputs_are_cached_by_source_hash(tmp_path):
    (first,) = build("cpu", build_dir=tmp_path)
    mtime = first.path.stat().st_mtime_ns
    started = time.perf_counter()
    (second,) = build("cpu", build_dir=tmp_path)
    assert second == first and second.path.stat().st_mtime_ns == mtime
    assert time.perf_counter() - started < 1.0
    assert [p.name for p in first.path.parent.iterdir()] == ["libkiln_attention_cpu.so"]


def test_a_missing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "kiln-no-such-compiler")
    with pytest.raises(PluginBuildError, match=r"kiln-no-such-compiler not found on PATH.*attention_cpu\.cpp"):
        build("cpu", build_dir=tmp_path)


def test_a_compile_failure_names_compiler_file_and_output(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(build_module, "CPU_SOURCES", (broken,))
    with pytest.raises(PluginBuildError, match=r"failed \(exit \d+\) building .*broken\.cpp for cpu .*expected libkiln_attention_cpu\.so") as error:
        build("cpu", build_dir=tmp_path / "out")
    assert "error" in str(error.value).split("\n", 2)[-1]  # the compiler's own output follows
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "out").rglob("*"))


@pytest.mark.parametrize(
    "target, archs, message",
    [("metal", None, "unknown plugin target 'metal'"), ("cuda", ["gfx90a"], "expected sm_XX"), ("rocm", ["sm_80"], "gfx name")],
)
def test_bad_targets_and_archs_are_rejected(target, archs, message, tmp_path):
    with pytest.raises(PluginBuildError, match=message):
        build(target, archs, build_dir=tmp_path)


def test_cli_lists_the_binaries(tmp_path, capsys):
    assert main(["cpu", "--build-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "libkiln_attention_cpu.so" in out and "sha256:" in out
    assert main(["cuda", "--arch", "sm_x", "--build-dir", str(tmp_path)]) == 1
    assert "expected sm_XX" in capsys.readouterr().err
