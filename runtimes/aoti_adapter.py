"""AOTInductor adapter: a compiled `model.pt2` package behind the Predictor interface."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from runtimes.errors import EngineError
from runtimes.predictor import Predictor
from runtimes.signature import Signature


class AotiPredictor(Predictor):
    def __init__(self, package_path: Path, signature: Signature, device: str = "cpu"):
        import torch  # the package runs inside torch's C++ runtime

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"device {device!r} needs a CUDA build of torch and a GPU; this torch is {torch.__version__}")
        self._torch = torch
        self.device = device
        self.runner = torch._inductor.aoti_load_package(str(package_path))
        self.signature = signature

    @classmethod
    def from_engine_dir(cls, engine_dir: Path, manifest: dict, device: str = "cpu", **options) -> AotiPredictor:
        needs = "cuda" if manifest["target"] in ("aoti-cuda", "aoti-rocm") else "cpu"
        if device.split(":")[0] != needs:
            raise EngineError(f"{engine_dir}: engine target {manifest['target']!r} runs on {needs}, not device={device!r}")
        signature = Signature.from_json(manifest["signature"])
        if manifest.get("torch_ops"):
            # The package calls these custom ops by name: they must be registered before it loads.
            from plugins import load_torch_op

            load_torch_op()
        return cls(engine_dir / manifest.get("model_file", "model.pt2"), signature, device=device, **options)

    def forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device) for t in self.signature.inputs]
        with torch.inference_mode():
            outputs = self.runner(tensors[0], tensors[1], tensors[2], tensors[3:])
        return {spec.name: out.cpu().numpy() for spec, out in zip(self.signature.outputs, outputs)}
