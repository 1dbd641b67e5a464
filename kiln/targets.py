"""Targets as data: which backend builds each one's engines, where they run, and which precisions it offers."""
from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import KilnError


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # a kiln.backends record: how the engine is captured, optimized, built and run
    device: str  # "cpu" or "cuda" (ROCm builds of torch call AMD GPUs "cuda" too); recorded in the manifest
    precisions: tuple[str, ...]  # those implemented so far; the first is the default
    description: str
    providers: tuple[str, ...] = ()  # ONNX Runtime execution providers, in priority order
    recipe: str | None = None  # which optimizers.RECIPES row applies; None: cleanup only (the engine fuses itself)
    gpu: str | None = None  # "nvidia" (CUDA) or "amd" (ROCm): the GPU torch must be built for


TARGETS = {
    t.name: t
    for t in (
        Target("cpu", "onnxruntime", "cpu", ("fp32", "int8", "int8-static", "int4"), "ONNX Runtime on the CPU",
               providers=("CPUExecutionProvider",), recipe="cpu"),
        Target("cuda", "onnxruntime", "cuda", ("fp16", "fp32", "int8", "int4"), "ONNX Runtime's CUDA provider on an NVIDIA GPU",
               providers=("CUDAExecutionProvider", "CPUExecutionProvider"), recipe="cuda", gpu="nvidia"),
        Target("rocm", "onnxruntime", "cuda", ("fp16", "fp32"), "ONNX Runtime's MIGraphX provider on an AMD GPU",
               providers=("MIGraphXExecutionProvider", "CPUExecutionProvider"), recipe="cuda", gpu="amd"),
        Target("ort-tensorrt", "onnxruntime", "cuda", ("fp32",),
               "ONNX Runtime's TensorRT provider: TensorRT fuses at session start, no plan to manage",
               providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), gpu="nvidia"),
        Target("tensorrt", "tensorrt", "cuda", ("fp16", "fp32", "bf16"), "TensorRT plan (engine.plan) on an NVIDIA GPU",
               recipe="tensorrt", gpu="nvidia"),
        Target("aoti-cpu", "aoti", "cpu", ("fp32",), "AOTInductor package (model.pt2) on the CPU"),
        Target("aoti-cuda", "aoti", "cuda", ("fp32",), "AOTInductor package on an NVIDIA GPU", gpu="nvidia"),
        Target("aoti-rocm", "aoti", "cuda", ("fp32",), "AOTInductor package on an AMD GPU (ROCm build of torch)", gpu="amd"),
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


def missing_on_host(target: Target) -> str | None:
    """Why this machine cannot build and verify `target`'s engines, or None when it can."""
    from kiln.backends import backend_of

    backend = backend_of(target)
    missing = backend.missing_on_host(target)
    if missing or target.gpu is None or not backend.runs_on_torch:
        return missing  # an ONNX Runtime GPU engine needs its provider, not a GPU build of torch
    import torch

    platform = "ROCm (HIP)" if target.gpu == "amd" else "CUDA"
    if not torch.cuda.is_available():
        return f"needs a {platform} build of torch and a GPU; this torch is {torch.__version__} and sees no GPU"
    if (target.gpu == "amd") != (torch.version.hip is not None):
        return f"needs a {platform} build of torch; this one is {torch.__version__}"
    return None
