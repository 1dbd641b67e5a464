"""The one interface every engine is run through: `predict` one forward pass, `generate` on top."""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from runtimes import generate as generation
from runtimes.signature import Signature
from runtimes.tokenizer import encode_prompts


class Predictor:
    """Base of every adapter: `predict` checks feeds against `signature`, then hands them to `forward`.

    `predict`, `generate` and `stream` may be called from several threads at once: the adapters keep
    no per-call state on the instance. `close` must not race with them.
    """

    signature: Signature
    tokenizer = None  # a `tokenizers.Tokenizer` when the engine carries one: prompts may then be text

    def predict(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass. `feeds` maps every input name to an array; returns every output by name."""
        self.signature.validate(feeds)
        return self.forward(feeds)

    def forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass without checks: for feeds built by torchkiln itself (the decode loop)."""
        raise NotImplementedError

    def generate(self, prompts, max_new_tokens: int = 32, **options) -> np.ndarray:
        """New tokens for each prompt, `[batch, new_tokens]`; see `runtimes.generate.stream`.

        `prompts`: token ids (`[batch, seq]` array or lists of ids), or text when the engine has a tokenizer.
        """
        return generation.generate(self, encode_prompts(self.tokenizer, prompts), max_new_tokens, **options)

    def stream(self, prompts, max_new_tokens: int = 32, **options) -> Iterator[np.ndarray]:
        """Yield the next token of every prompt, `[batch]`, as each decode step finishes."""
        return generation.stream(self, encode_prompts(self.tokenizer, prompts), max_new_tokens, **options)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
