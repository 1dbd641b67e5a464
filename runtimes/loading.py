"""`load(dir)`: check an engine directory and open it with the adapter its manifest names."""
from __future__ import annotations

import importlib
from pathlib import Path

from runtimes.engine_dir import check_files, read_manifest
from runtimes.errors import EngineError
from runtimes.predictor import Predictor
from runtimes.tokenizer import load_tokenizer

# backend name in the manifest -> "module:class" of its adapter; new engines add a row here.
ADAPTERS = {
    "onnxruntime": "runtimes.onnxruntime_adapter:OnnxRuntimePredictor",
    "tensorrt": "runtimes.tensorrt_adapter:TensorRTPredictor",
    "aoti": "runtimes.aoti_adapter:AotiPredictor",
}


def load(engine_dir, device: str = "cpu", **backend_options) -> Predictor:
    """Open an engine directory as a Predictor after checking every file against the manifest.

    `backend_options` go to the adapter (for ONNX Runtime: `threads`, `optimization_level`, `providers`).
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    check_files(engine_dir, manifest)
    backend = manifest["backend"]
    if backend not in ADAPTERS:
        raise EngineError(f"{engine_dir}: backend {backend!r} is unknown (known: {', '.join(ADAPTERS)})")
    module_name, class_name = ADAPTERS[backend].split(":")
    adapter = getattr(importlib.import_module(module_name), class_name)
    predictor = adapter.from_engine_dir(engine_dir, manifest, device=device, **backend_options)
    predictor.tokenizer = load_tokenizer(engine_dir, manifest)
    return predictor
