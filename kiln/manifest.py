"""Writing the engine manifest: what was built, from what, how, how faithful, and every file's hash.

`runtimes.engine_dir` reads it back; the schema version lives there.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from runtimes.engine_dir import MANIFEST, SCHEMA_VERSION, manifest_digest, sha256_file


def torchkiln_version() -> str:
    try:
        return version("torchkiln")
    except PackageNotFoundError:
        return "0+unknown"


def file_entries(engine_dir: Path) -> dict[str, dict]:
    """Every file under `engine_dir` but the manifest: relative path -> sha256 and size."""
    engine_dir = Path(engine_dir)
    return {
        p.relative_to(engine_dir).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(engine_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(engine_dir: Path, fields: dict) -> dict:
    """Write `manifest.json` with `fields`, the versions and the file table; returns what was written."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "torchkiln_version": torchkiln_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
        "files": file_entries(engine_dir),
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json(Path(engine_dir) / MANIFEST, manifest)
    return manifest


def write_json(path: Path, document: dict) -> None:
    """Write through a temporary file and rename, so a reader never sees half a document."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        json.dump(document, f, indent=2, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
