"""Reading an engine directory: its manifest and the integrity of every file it lists.

kiln writes the directory; this module is the one place that reads it, so a service that only runs
engines needs nothing beyond `runtimes`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from runtimes.errors import EngineError

MANIFEST = "manifest.json"
# An engine's signature covers every file, the manifest included, so no manifest can list it (runtimes.trust).
SIGNATURE = "kiln.sig"
# A graph's weights go to `<graph file>.data` above this, at capture and after every pass. Protobuf cannot
# hold 2 GiB, and well before that, saving weights inside the .onnx builds the whole message in memory
# (gpt2's 497 MB: peak RSS 2.37 GB inline, 0.95 GB external); external data is written tensor by tensor.
EXTERNAL_DATA_BYTES = 64 * 1024**2
# 2: `kind`, `device` and `graphs` (role -> file and signature) replace `model_file` and `signature`.
SCHEMA_VERSION = 2


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest: a hand edit changes it."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def engine_digest(manifest: dict) -> str:
    """The engine's identity: sha256 of its manifest, which lists the sha256 of every file."""
    return "sha256:" + manifest_digest(manifest)


def read_manifest(engine_dir: Path) -> dict:
    """The parsed manifest of `engine_dir`; EngineError if it is absent, unreadable or too new."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineError(f"{engine_dir}: no such engine directory")
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise EngineError(f"{engine_dir}: not an engine directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise EngineError(f"{path}: field 'schema_version' is missing or not an integer")
    if version > SCHEMA_VERSION:
        raise EngineError(
            f"{path}: schema_version {version} is newer than this torchkiln reads ({SCHEMA_VERSION}); upgrade torchkiln"
        )
    for field in ("backend", "target", "files", "graphs" if version >= 2 else "signature", "manifest_sha256"):
        if field not in manifest:
            raise EngineError(f"{path}: field {field!r} is missing")
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise EngineError(f"{path}: edited after the engine was built (its manifest_sha256 does not match); refusing it")
    return manifest


@dataclass(frozen=True)
class GenerationFacts:
    """What decoding needs of an engine beyond its graphs."""

    digest: str | None  # None for a folder torchkiln did not build
    max_positions: int | None  # the model's context; None when its config declares none
    eos_token_ids: tuple[int, ...]
    tokenizer_folder: str | None


def max_positions(manifest: dict) -> int | None:
    source = manifest["source"]
    if "max_positions" in source:
        return source["max_positions"]
    return _config_positions(source["config"])  # engines of schema 1


def engine_facts(engine_dir: Path) -> GenerationFacts:
    """GenerationFacts from the manifest, or from the config.json of a folder without one (Optimum, genai)."""
    engine_dir = Path(engine_dir)
    if (engine_dir / MANIFEST).is_file():
        manifest = read_manifest(engine_dir)
        config, digest, positions = manifest["source"]["config"], engine_digest(manifest), max_positions(manifest)
        tokenizer = manifest.get("tokenizer")
    else:
        path = engine_dir / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        digest, positions, tokenizer = None, _config_positions(config), "."
    eos = config.get("eos_token_id")
    eos = () if eos is None else tuple(int(t) for t in (eos if isinstance(eos, list) else [eos]))
    return GenerationFacts(digest, positions, eos, tokenizer)


def _config_positions(config: dict) -> int | None:
    return config.get("n_positions") or config.get("max_position_embeddings")


def graph_entries(manifest: dict) -> dict[str, dict]:
    """The engine's graphs by role -> {"file": name in the engine dir, "signature": Signature JSON}."""
    if "graphs" in manifest:
        return manifest["graphs"]
    # Schema 1 had one graph.
    return {"model": {"file": manifest.get("model_file"), "signature": manifest["signature"]}}


def engine_kind(manifest: dict) -> str:
    return manifest.get("kind", "decoder-lm")  # schema 1 engines were all decoder LMs


def engine_device(manifest: dict) -> str:
    """Where the engine runs: "cpu" or "cuda" (AMD GPUs too, as ROCm builds of torch call them)."""
    return manifest.get("device", "cpu")  # schema 1 engines were opened on the CPU unless told otherwise


def check_files(engine_dir: Path, manifest: dict) -> None:
    """Refuse the directory unless its files are exactly those listed, each with its sha256."""
    engine_dir = Path(engine_dir).resolve()
    listed = manifest["files"]
    present = {p.relative_to(engine_dir).as_posix() for p in engine_dir.rglob("*") if p.is_file()} - {MANIFEST, SIGNATURE}
    for name, entry in listed.items():
        path = (engine_dir / name).resolve()
        if not path.is_relative_to(engine_dir):
            raise EngineError(f"{engine_dir / MANIFEST}: file entry {name!r} points outside the engine directory")
        if name not in present:
            raise EngineError(f"{engine_dir}: file {name!r} listed in the manifest is missing")
        if sha256_file(path) != entry["sha256"]:
            raise EngineError(f"{engine_dir}: file {name!r} does not match its sha256 in the manifest; refusing to load")
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise EngineError(f"{engine_dir}: file {unlisted[0]!r} is not listed in the manifest; refusing to load")
