"""The Makefile's GPU targets install an ONNX Runtime with their provider, or stop saying why; the prepared
GPU check lists what it would run."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_cuda_and_rocm_install_a_gpu_onnxruntime_or_say_they_cannot():
    planned = subprocess.run(["make", "-n", "cuda", "rocm"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    # CUDA's and cuDNN's libraries come with onnxruntime-gpu's extras (the adapter preloads them).
    assert "pip install -q -c .venv/constraints.txt 'onnxruntime-gpu[cuda,cudnn]'" in planned
    assert "pip install -q -c .venv/constraints.txt onnxruntime-migraphx" in planned
    for provider in ("CUDAExecutionProvider", "MIGraphXExecutionProvider"):
        assert f"get_available_providers())\" {provider} ||" in planned
        assert f"the onnxruntime installed lists no {provider}" in planned
    assert planned.count("onnxruntime (CPU) is back") == 2  # a failed install leaves the CPU build, not none


def test_the_gpu_check_lists_its_steps_without_running_them(tmp_path):
    """benchmarks/gpu_check.sh is what a lent GPU machine runs; --dry-run is its CPU-side check."""
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    steps = [line.split()[0] for line in done.stdout.splitlines()[1:]]
    assert steps == ["facts", "plugin-build", "gpu-tests", "aoti-cuda-tiny", "attention-bench", "onnxruntime-cuda",
                     "tensorrt", "gpt2-aoti-cuda"]
    assert f"writing {tmp_path / 'out'}/gpu_check.json" in done.stdout
    assert not (tmp_path / "out").exists()  # nothing ran
