"""Decode steps over one preallocated cache per layer on ONNX Runtime: past and present bound to one buffer.

For engines whose attention writes each token into its row's slot (cache layout SLOT: GroupQueryAttention),
binding `past_key_values.*` and `present.*` to the same buffer with I/O binding puts the op in its
shared-buffer mode: a step writes its keys and values in place, where carrying the cache copies all of it into
a present one column longer (and a numpy round trip) every step.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtimes.decoder_lm import (PAST_PREFIX, PRESENT_PREFIX, SLOT, past_inputs, prefill_feeds, step_inputs,
                                 vocab_size)
from runtimes.errors import FeedError


class SharedCache:
    """`prefill(ids, mask)` then `step(new_ids)` of a SLOT engine's session, its caches `capacity` columns wide.

    `buffers` (past name -> `[batch, kv_heads, capacity, dim]`, C-contiguous) are the caller's caches to decode
    over in place, each row's written columns those its `mask` row counts (continuous batching binds the live rows
    of its buffers again as rows come and go); without them the caches start empty and `prefill` fills them."""

    def __init__(self, session: ort.InferenceSession, signature, batch: int, capacity: int, keeps_logits: bool = False,
                 buffers: dict[str, np.ndarray] | None = None, mask: np.ndarray | None = None):
        self.session, self.signature, self.capacity, self.keeps_logits = session, signature, capacity, keeps_logits
        self.binding = session.io_binding()
        # One-token steps write their logits into this buffer: reading them back then wraps no output OrtValues
        # (one per cache: 0.3 ms of a 8-20 ms step here).
        logits = next(t for t in signature.outputs if t.name == "logits")
        self.logits = np.empty((batch, 1, vocab_size(signature)), dtype=logits.dtype)
        self.logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.binding.bind_ortvalue_output("logits", self.logits_value)  # first, so it is output 0 of every run
        # numpy arrays under the OrtValues (ortvalue_from_numpy shares their memory): the prefill writes them.
        self.buffers: dict[str, np.ndarray] = {}
        self.values = []  # the OrtValues stay referenced while bound
        for spec in past_inputs(signature):
            _, heads, _, dim = spec.shape
            buffer = np.zeros((batch, heads, capacity, dim), dtype=spec.dtype) if buffers is None else buffers[spec.name]
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            self.binding.bind_ortvalue_input(spec.name, value)
            self.binding.bind_ortvalue_output(PRESENT_PREFIX + spec.name[len(PAST_PREFIX):], value)
            self.buffers[spec.name] = buffer
            self.values.append(value)
        self.mask = np.zeros((batch, 0), np.int64) if mask is None else mask
        # One-token steps write their ids and positions into these, bound once, and bind only the mask again. With
        # `stream` reading the logits uncopied, a SmolLM-shaped int4 step spent 0.29 ms outside ONNX Runtime,
        # against 0.42 ms binding all three each step.
        self.ids, self.positions = np.zeros((batch, 1), np.int64), np.zeros((batch, 1), np.int64)
        self.ids_value = ort.OrtValue.ortvalue_from_numpy(self.ids)
        self.positions_value = ort.OrtValue.ortvalue_from_numpy(self.positions)
        self.bind_one_token_inputs()

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The right-padded prompt's logits `[batch, sequence, vocab]`, or only the last columns that hold every
        row's last token where the graph takes `logits_to_keep`. A plain run (I/O binding cannot bind an input
        that has a default, as `logits_to_keep` has), its caches then copied into the buffers."""
        self._check_width(mask.shape[1])
        feeds = prefill_feeds(self.signature, ids, mask, last_logits_only=self.keeps_logits)
        names = ["logits", *(PRESENT_PREFIX + name[len(PAST_PREFIX):] for name in self.buffers)]
        logits, *presents = self.session.run(names, feeds)
        for buffer, present in zip(self.buffers.values(), presents):
            buffer[:, :, :present.shape[2]] = present
        self.mask = mask
        return logits

    def step(self, new_ids: np.ndarray, keep: bool = True) -> np.ndarray:
        """The logits of `new_ids [batch, n]`, each row's written at its next slot. `keep=False`: one-token steps
        return the bound buffer itself, which the next step overwrites (a caller done with them by then saves
        copying them, 3 MB a step for 16 rows of gpt2)."""
        inputs = step_inputs(self.mask, new_ids, layout=SLOT)
        self._check_width(inputs["attention_mask"].shape[1])
        self.mask = inputs["attention_mask"]
        tokens = new_ids.shape[1]
        if tokens == 1:  # into the bound buffers; only the mask, whose width grows, is bound again
            self.ids[:], self.positions[:] = inputs["input_ids"], inputs["position_ids"]
            self.binding.bind_cpu_input("attention_mask", self.mask)
        else:  # ONNX Runtime allocates [batch, tokens, vocab]; bound by name each time, as a binding keeps its shape
            for name, array in inputs.items():
                self.binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
            self.binding.bind_output("logits")
        self.session.run_with_iobinding(self.binding)
        if tokens == 1:
            return self.logits.copy() if keep else self.logits
        logits = self.binding.get_outputs()[0].numpy()
        self.bind_one_token_inputs()
        return logits

    def bind_one_token_inputs(self) -> None:
        """Bind the buffers that one-token steps write their ids, positions and logits into."""
        self.binding.bind_ortvalue_input("input_ids", self.ids_value)
        self.binding.bind_ortvalue_input("position_ids", self.positions_value)
        self.binding.bind_ortvalue_output("logits", self.logits_value)

    def _check_width(self, width: int) -> None:
        if width > self.capacity:
            raise FeedError(f"the cache holds {self.capacity} tokens per row; this step needs {width}")
