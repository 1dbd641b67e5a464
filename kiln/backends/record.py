"""The backend record: what a backend module declares about capturing, optimizing, building and running engines."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class BuildRequest:
    """What a convert asks of a backend beyond the model: the target and precision, and the user's options."""

    target: object  # kiln.targets.Target
    precision: str
    passes: list[str] | None = None  # instead of the recipe
    pass_options: dict = field(default_factory=dict)  # pass name -> option -> value
    calibration: object = None  # kiln.calibration.Calibration, for int8-static
    profile: str | None = None  # TensorRT shape ranges, as the CLI takes them
    external_data_threshold: int | None = None


def _file_bytes(path: Path) -> int:
    return Path(path).stat().st_size


@dataclass(frozen=True)
class Backend:
    name: str  # as manifests record it
    adapter: str  # "module:Class" of the runtimes adapter that runs one graph of its engines
    # (loaded model, work dir, request) -> {role: exporter.capture.CapturedGraph}
    capture: Callable
    # (target, precision) -> the passes run over each captured ONNX graph; None: the graph is not ONNX
    recipe: Callable[[object, str], list[str]] | None = None
    optional_passes: tuple[str, ...] = ()  # passes only this backend's engines can run; applied when asked
    # (captured graphs, work dir, loaded model, request) -> manifest fields, `graphs` included (the built files)
    build: Callable | None = None
    missing_on_host: Callable[[object], str | None] = lambda target: None  # (target) -> why not here, or None
    # (target) -> pass options its engines need unless the user sets them: pass name -> option -> value
    pass_defaults: Callable[[object], dict] = lambda target: {}
    # (request, captured graphs by role, loaded model) -> backend facts for the manifest (providers, options)
    manifest_fields: Callable[[BuildRequest, dict, object], dict] = lambda request, graphs, loaded: {}
    # Its engines run on torch's CUDA (or ROCm) runtime: a GPU target then needs a GPU build of torch too.
    runs_on_torch: bool = False
    bench_options: Callable[[int], dict] = lambda threads: {}  # (threads) -> load options for measuring
    verify_options: dict = field(default_factory=dict)  # load options for the session convert verifies with
    weight_bytes: Callable[[Path], int] = _file_bytes  # (graph file) -> bytes a decode step reads
    op_histogram: Callable[[Path], Counter] | None = None  # (graph file) -> op type counts, for inspect
    # (graph file, target) -> a Predictor over one intermediate graph: lets a failed verification say which
    # pass made the error grow; None when intermediate graphs cannot run here.
    open_graph: Callable | None = None
