"""Fixtures of the plugin tests: the CUDA binaries, built once per session."""

import shutil

import pytest

from plugins.build import build


@pytest.fixture(scope="session")
def cuda_binaries():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernel cannot be compiled here")
    return {lib.arch: lib for lib in build("cuda", ["sm_80", "sm_90", "compute_80"])}
