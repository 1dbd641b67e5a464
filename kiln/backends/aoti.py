"""The AOTInductor backend: each graph compiled into a `model.pt2` package, run from torch's C++ runtime.

No ONNX graph, so no passes; kiln_attention acts at capture instead, routing the layers of families that
use transformers' attention registry to the kiln::causal_attention op.
"""
from __future__ import annotations

from pathlib import Path

from kiln.backends.record import Backend, BuildRequest
from kiln.errors import KilnError

KILN_ATTENTION = "kiln_attention"


def capture_aoti(loaded, workdir: Path, request: BuildRequest) -> dict:
    from exporter.aoti import capture_aoti as compile_packages

    return compile_packages(loaded, workdir, device=request.target.device,
                            kiln_attention=_wants_kiln_attention(loaded, request))


def _wants_kiln_attention(loaded, request: BuildRequest) -> bool:
    passes = request.passes
    if not passes:
        return False
    if set(passes) != {KILN_ATTENTION}:
        raise KilnError(f"target {request.target.name!r} builds no ONNX graph: its only pass is {KILN_ATTENTION} "
                        f"(got {', '.join(passes)})")
    if not loaded.family.attention_registry:
        raise KilnError(
            f"{KILN_ATTENTION} on {request.target.name!r} routes transformers' attention registry to the plugin op; "
            f"{loaded.family.name} computes its attention inline"
        )
    return True


def set_threads(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)  # the package runs on torch's intra-op pool
    return {}


BACKEND = Backend(
    name="aoti",
    adapter="runtimes.aoti_adapter:AotiPredictor",
    capture=capture_aoti,
    optional_passes=(KILN_ATTENTION,),
    bench_options=set_threads,
    runs_on_torch=True,
)
