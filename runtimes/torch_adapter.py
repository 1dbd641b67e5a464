"""PyTorch eager adapter: the reference every engine is compared against.

It is handed a callable (kiln builds it from the source model): tensors in the signature's input
order -> tensors in its output order.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from runtimes.predictor import Predictor
from runtimes.signature import Signature


class TorchPredictor(Predictor):
    def __init__(self, function: Callable, signature: Signature):
        self.function = function
        self.signature = signature

    def forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch  # only this adapter needs torch

        with torch.inference_mode():
            outputs = self.function(*(torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in self.signature.inputs))
        return {spec.name: out.numpy() for spec, out in zip(self.signature.outputs, outputs)}
