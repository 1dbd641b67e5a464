"""The TensorRT backend: the ONNX capture, cleaned up (TensorRT fuses by itself), built into `engine.plan`
for the `--profile` shape ranges; kiln_attention puts the plugin's node in place of each layer's attention."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from kiln.backends.onnxruntime import capture_onnx, recipe
from kiln.backends.record import Backend, BuildRequest


def build_plan(captured: dict, workdir: Path, loaded, request: BuildRequest) -> dict:
    """engine.plan from the optimized ONNX; the ONNX files are then dropped: the plan is the engine."""
    from kiln.tensorrt_build import build_engine_files

    graph = captured["model"]
    fields = build_engine_files(graph.path, workdir, request.precision, profile=request.profile,
                                max_positions=loaded.family.max_positions_of(loaded.config))
    for path in (graph.path, graph.path.with_name(graph.path.name + ".data")):
        path.unlink(missing_ok=True)
    return {"graphs": {"model": fields["graph"]}, "tensorrt": fields["tensorrt"], "profile": fields["profile"]}


def missing_tensorrt(target) -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "needs TensorRT (the `tensorrt` Python package) and an NVIDIA GPU"
    return None


BACKEND = Backend(
    name="tensorrt",
    adapter="runtimes.tensorrt_adapter:TensorRTPredictor",
    capture=capture_onnx,
    recipe=recipe,  # the target's row: cleanup, and fp16 casts the graph (TensorRT 11 builds strongly typed)
    optional_passes=("kiln_attention",),
    build=build_plan,
    missing_on_host=missing_tensorrt,
    runs_on_torch=True,  # torch holds the engine's device buffers and stream
)
