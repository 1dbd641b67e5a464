"""The one interface every engine is run through: `predict` one forward pass over a signature.

Adapters (ONNX Runtime, TensorRT, AOTInductor, PyTorch eager) each run one graph as a Predictor; a model
kind's Predictor (`runtimes.generate.DecoderLMPredictor`) holds an engine's graphs by role and adds what
that kind does on top (`generate`, `stream`).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from runtimes.signature import Signature


class Predictor:
    """Base of every adapter: `predict` checks feeds against `signature`, then hands them to `forward`.

    `predict` (and a kind's `generate` / `stream`) may be called from several threads at once: the
    adapters keep no per-call state on the instance. `close` must not race with them.
    """

    signature: Signature
    tokenizer = None  # a `tokenizers.Tokenizer` when the engine carries one: prompts may then be text
    # What of an engine this adapter runs as native code when it opens it (None: nothing); loading such an
    # engine needs a pinned digest, a signature or explicit trust (runtimes.trust).
    native_code: str | None = None
    # True when the runtime compiles the graph once per distinct input shape (MIGraphX): the kind's Predictor
    # then pads its feeds to a few bucketed shapes instead of presenting a new one every decode step.
    shape_buckets: bool = False

    def predict(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass. `feeds` maps every input name to an array; returns every output by name."""
        self.signature.validate(feeds)
        return self.forward(feeds)

    def forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass without checks: for feeds built by torchkiln itself (the decode loop)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
