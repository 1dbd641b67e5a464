"""Graphs exported once per session from the tiny presets, and the confident (trained) preset's data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtimes import decoder_lm


@pytest.fixture(scope="session")
def exported(shared_dir):
    """`exported(preset)` -> (path of its plain ONNX export, LoadedModel), captured once per run."""
    from exporter import load_model
    from exporter.capture import capture
    from tests.conftest import build_once

    loaded: dict[str, object] = {}

    def get(preset: str):
        if preset not in loaded:
            loaded[preset] = load_model(preset)
        folder = build_once(shared_dir / "exports" / preset, lambda out: capture(loaded[preset], out))
        return folder / "model.onnx", loaded[preset]

    return get


def prefill_feeds(ids: np.ndarray, facts) -> dict[str, np.ndarray]:
    """A prefill of `ids [batch, sequence]` with empty caches, in the IO contract's names."""
    return decoder_lm.prefill_feeds(decoder_lm.contract_signature(facts), ids)
