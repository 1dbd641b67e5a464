"""The ONNX Runtime backend: `model.onnx` captured by torch.onnx, optimized by the target's recipe, run by
an InferenceSession with the target's execution providers."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from kiln.backends.record import Backend, BuildRequest


def capture_onnx(loaded, workdir: Path, request: BuildRequest) -> dict:
    from exporter.capture import capture

    if request.external_data_threshold is None:
        return capture(loaded, workdir)
    return capture(loaded, workdir, request.external_data_threshold)


def recipe(target, precision: str) -> list[str]:
    """The target's recipe row, or cleanup alone where the runtime fuses by itself (TensorRT provider)."""
    from optimizers import recipe_for

    return recipe_for(target.recipe, precision) if target.recipe else ["cleanup"]


def missing_providers(target) -> str | None:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    absent = [p for p in target.providers if p not in available]
    if absent:
        return f"ONNX Runtime here lacks {', '.join(absent)} (available: {', '.join(available)})"
    return None


def op_histogram(path: Path) -> Counter:
    """Op types of an ONNX graph (domain-prefixed outside the standard domain); its weights are not read."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return Counter(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}" for node in graph.node)


def bytes_read_per_token(onnx_path: Path) -> int:
    """Initializer bytes a decode step reads: every weight except tables only gathered from (embeddings)."""
    import onnx_ir as ir

    total = 0
    for value in ir.load(str(onnx_path)).graph.initializers.values():
        users = {use.node.op_type for use in value.uses()}
        if value.const_value is not None and users and users != {"Gather"}:
            total += value.const_value.nbytes
    return total


def open_graph(path: Path, target):
    from runtimes.onnxruntime_adapter import OnnxRuntimePredictor

    return OnnxRuntimePredictor(path, target.providers)


BACKEND = Backend(
    name="onnxruntime",
    adapter="runtimes.onnxruntime_adapter:OnnxRuntimePredictor",
    capture=capture_onnx,
    recipe=recipe,
    missing_on_host=missing_providers,
    manifest_fields=lambda target: {"providers": list(target.providers)},
    # Spinning idle pools of the engines not being timed would steal the cores of the one that is.
    bench_options=lambda threads: {"threads": threads, "allow_spinning": False},
    weight_bytes=bytes_read_per_token,
    op_histogram=op_histogram,
    open_graph=open_graph,
)
