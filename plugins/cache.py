"""Where torchkiln keeps what it builds once and reuses: plugin builds, TensorRT plans, trained presets.

The user's cache folder, never the source tree (which may be read-only, or shared by several checkouts).
"""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """$KILN_CACHE_DIR, else $XDG_CACHE_HOME/torchkiln, else ~/.cache/torchkiln."""
    override = os.environ.get("KILN_CACHE_DIR")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torchkiln"
