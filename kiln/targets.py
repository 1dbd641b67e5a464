"""Targets as data: what engine each builds, how it runs, and which precisions it offers."""
from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import KilnError


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # the runtimes adapter that runs its engines
    device: str  # "cpu" or "cuda" (ROCm builds of torch call AMD GPUs "cuda" too)
    providers: tuple[str, ...]  # ONNX Runtime execution providers, in priority order
    precisions: tuple[str, ...]  # those implemented so far; the first is the default
    description: str
    recipe: str | None = None  # which optimizers.RECIPES row applies; None: cleanup only (the engine fuses itself)


TARGETS = {
    t.name: t
    for t in (
        Target("cpu", "onnxruntime", "cpu", ("CPUExecutionProvider",), ("fp32", "int8", "int8-static", "int4"),
               "ONNX Runtime on the CPU", recipe="cpu"),
        Target("cuda", "onnxruntime", "cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"),
               ("fp16", "fp32", "int8", "int4"), "ONNX Runtime's CUDA provider on an NVIDIA GPU", recipe="cuda"),
        Target("rocm", "onnxruntime", "cuda", ("MIGraphXExecutionProvider", "CPUExecutionProvider"), ("fp16", "fp32"),
               "ONNX Runtime's MIGraphX provider on an AMD GPU", recipe="cuda"),
        Target("ort-tensorrt", "onnxruntime", "cuda",
               ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), ("fp32",),
               "ONNX Runtime's TensorRT provider: TensorRT fuses at session start, no plan to manage"),
        Target("tensorrt", "tensorrt", "cuda", (), ("fp16", "fp32", "bf16"), "TensorRT plan (engine.plan) on an NVIDIA GPU"),
        Target("aoti-cpu", "aoti", "cpu", (), ("fp32",), "AOTInductor package (model.pt2) on the CPU"),
        Target("aoti-cuda", "aoti", "cuda", (), ("fp32",), "AOTInductor package on an NVIDIA GPU"),
        Target("aoti-rocm", "aoti", "cuda", (), ("fp32",), "AOTInductor package on an AMD GPU (ROCm build of torch)"),
    )
}


def target_named(name: str, precision: str) -> Target:
    if name not in TARGETS:
        raise KilnError(f"unknown target {name!r} (known: {', '.join(TARGETS)})")
    target = TARGETS[name]
    if precision not in target.precisions:
        raise KilnError(
            f"precision {precision!r} is not supported for target {name!r} (supported: {', '.join(target.precisions)})"
        )
    return target


def device_of(target_name: str) -> str:
    """Where an engine of that target runs: "cpu" or "cuda" (also for targets this version lacks)."""
    return TARGETS[target_name].device if target_name in TARGETS else "cpu"


def missing_on_host(target: Target) -> str | None:
    """Why this machine cannot build and verify `target`'s engines, or None when it can."""
    if target.backend == "onnxruntime":
        import onnxruntime

        available = onnxruntime.get_available_providers()
        absent = [p for p in target.providers if p not in available]
        if absent:
            return f"ONNX Runtime here lacks {', '.join(absent)} (available: {', '.join(available)})"
    if target.backend == "tensorrt":
        import importlib.util

        if importlib.util.find_spec("tensorrt") is None:
            return "needs TensorRT (the `tensorrt` Python package) and an NVIDIA GPU"
    if target.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            backend = "ROCm (HIP)" if target.name.endswith("rocm") else "CUDA"
            return f"needs a {backend} build of torch and a GPU; this torch is {torch.__version__} and sees no GPU"
        if target.name.endswith("rocm") != (torch.version.hip is not None):
            return f"needs a {'ROCm' if target.name.endswith('rocm') else 'CUDA'} build of torch; this one is {torch.__version__}"
    return None
