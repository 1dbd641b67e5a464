"""AOTInductor adapter: a compiled `model.pt2` package behind the Predictor interface."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from runtimes.errors import EngineError
from runtimes.predictor import Predictor
from runtimes.signature import Signature


class AotiPredictor(Predictor):
    native_code = "an AOTInductor package (compiled code)"

    def __init__(self, package_path: Path, signature: Signature, device: str = "cpu"):
        import torch  # the package runs inside torch's C++ runtime

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"device {device!r} needs a GPU and a CUDA or ROCm build of torch; this torch is "
                              f"{torch.__version__} and sees no GPU")
        self._torch = torch
        self.device = device
        from torch.utils import _pytree

        self.runner = torch._inductor.aoti_load_package(str(package_path))
        self._pytree = _pytree
        self._in_spec = _pytree.treespec_loads(self.runner.loader.get_call_spec()[0])
        self.signature = signature

    @classmethod
    def from_engine_dir(cls, engine_dir: Path, manifest: dict, graph: dict, device: str = "cpu", **options) -> AotiPredictor:
        if manifest.get("torch_ops"):
            # The package calls these custom ops by name: they must be registered before it loads.
            from plugins import load_torch_op

            load_torch_op()
        try:
            return cls(engine_dir / graph["file"], Signature.from_json(graph["signature"]), device=device, **options)
        except EngineError as e:
            raise EngineError(f"{engine_dir}: engine target {manifest['target']!r}: {e}") from None

    def forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device) for t in self.signature.inputs]
        # The package takes its inputs in the structure they were exported with (e.g. a list of caches):
        # its call spec rebuilds that from the signature's flat order.
        args, kwargs = self._pytree.tree_unflatten(tensors, self._in_spec)
        with torch.inference_mode():
            outputs = self._pytree.tree_leaves(self.runner(*args, **kwargs))
        return {spec.name: out.cpu().numpy() for spec, out in zip(self.signature.outputs, outputs)}
