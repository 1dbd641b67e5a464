"""ONNX Runtime adapter: an InferenceSession behind the Predictor interface."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from runtimes.errors import EngineError
from runtimes.predictor import Predictor
from runtimes.signature import Signature, TensorSpec

_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
               "tensor(float16)": "float16", "tensor(bool)": "bool"}

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxRuntimePredictor(Predictor):
    def __init__(
        self,
        model_path: Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        optimization_level: str = "all",
        allow_spinning: bool = True,
    ):
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise EngineError(
                f"ONNX Runtime here lacks {', '.join(missing)} (available: {', '.join(ort.get_available_providers())})"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[optimization_level]
        if threads:
            options.intra_op_num_threads = threads
        if not allow_spinning:  # idle pools then sleep instead of stealing cores from other work
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), options, providers=list(providers))
        self.signature = Signature(
            tuple(_spec(v) for v in self.session.get_inputs()), tuple(_spec(v) for v in self.session.get_outputs())
        )
        self._output_names = [t.name for t in self.signature.outputs]

    @classmethod
    def from_engine_dir(cls, engine_dir: Path, manifest: dict, graph: dict, device: str = "cpu",
                        **options) -> OnnxRuntimePredictor:
        """`graph` is the manifest's entry for one graph: its file and signature."""
        providers = options.pop("providers", None) or manifest.get("providers") or ["CPUExecutionProvider"]
        model_path = engine_dir / graph["file"]
        refuse_escaping_external_data(model_path, engine_dir)
        try:
            return cls(model_path, providers=providers, **options)
        except EngineError as e:
            raise EngineError(f"{engine_dir}: engine target {manifest['target']!r}: {e}") from None

    def forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self.session.run(self._output_names, dict(feeds))))


def _spec(value) -> TensorSpec:
    shape = tuple(d if isinstance(d, (int, str)) else "?" for d in value.shape)
    return TensorSpec(value.name, _ORT_DTYPES.get(value.type, value.type), shape)


def refuse_escaping_external_data(model_path: Path, engine_dir: Path) -> None:
    """ONNX Runtime opens external-data paths as written: refuse any that leave the engine directory."""
    import onnx

    root = engine_dir.resolve()
    graph = onnx.load(model_path, load_external_data=False).graph
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not (model_path.parent / location).resolve().is_relative_to(root):
            raise EngineError(
                f"{model_path}: tensor {tensor.name!r} reads external data from {location!r}, outside the engine directory"
            )
