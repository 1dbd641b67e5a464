"""Graphs exported once per session from the tiny presets, and the confident (trained) preset's data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtimes import decoder_lm


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """`exported(preset)` -> (path of its plain ONNX export, LoadedModel), captured once per session."""
    from exporter import load_model
    from exporter.capture import capture

    built: dict[str, tuple[Path, object]] = {}
    root = tmp_path_factory.mktemp("exports")

    def get(preset: str):
        if preset not in built:
            loaded = load_model(preset)
            folder = root / preset
            folder.mkdir()
            built[preset] = (capture(loaded, folder)["model"].path, loaded)
        return built[preset]

    return get


def prefill_feeds(ids: np.ndarray, facts) -> dict[str, np.ndarray]:
    """A prefill of `ids [batch, sequence]` with empty caches, in the IO contract's names."""
    return decoder_lm.prefill_feeds(decoder_lm.contract_signature(facts), ids)
