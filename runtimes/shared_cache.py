"""Decode steps over one preallocated cache per layer on ONNX Runtime: past and present bound to one buffer.

For engines whose attention writes each token into its row's slot (cache layout SLOT: GroupQueryAttention),
binding `past_key_values.*` and `present.*` to the same buffer with I/O binding puts the op in its
shared-buffer mode: a step writes its keys and values in place, where carrying the cache copies all of it into
a present one column longer (and a numpy round trip) every step.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtimes.decoder_lm import PAST_PREFIX, PRESENT_PREFIX, SLOT, past_inputs, positions_of, step_inputs
from runtimes.errors import FeedError


class SharedCache:
    """`prefill(ids, mask)` then `step(new_ids)` of a SLOT engine's session, its caches `capacity` columns wide."""

    def __init__(self, session: ort.InferenceSession, signature, batch: int, capacity: int):
        self.session, self.capacity = session, capacity
        self.binding = session.io_binding()
        self.binding.bind_output("logits")  # first, so it is output 0 of every run
        self.buffers = []  # the OrtValues stay referenced while bound
        for spec in past_inputs(signature):
            _, heads, _, dim = spec.shape
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, heads, capacity, dim), dtype=spec.dtype))
            self.binding.bind_ortvalue_input(spec.name, buffer)
            self.binding.bind_ortvalue_output(PRESENT_PREFIX + spec.name[len(PAST_PREFIX):], buffer)
            self.buffers.append(buffer)
        self.mask = np.zeros((batch, 0), np.int64)

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The right-padded prompt's logits `[batch, sequence, vocab]`."""
        return self._run({"input_ids": ids, "attention_mask": mask, "position_ids": positions_of(mask)})

    def step(self, new_ids: np.ndarray) -> np.ndarray:
        """The logits of `new_ids [batch, n]`, each row's written at its next slot."""
        return self._run(step_inputs(self.mask, new_ids, layout=SLOT))

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        width = inputs["attention_mask"].shape[1]
        if width > self.capacity:
            raise FeedError(f"the cache holds {self.capacity} tokens per row; this step needs {width}")
        for name, array in inputs.items():
            self.binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        self.binding.bind_output("logits")  # again: once run, a binding keeps the last shape
        self.session.run_with_iobinding(self.binding)
        self.mask = inputs["attention_mask"]
        return self.binding.get_outputs()[0].numpy()
