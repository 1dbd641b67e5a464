"""Is this the engine a service means to run? A pinned digest, a signature, consent to native code.

`manifest_sha256` catches a damaged engine, not a crafted one: whoever can write the directory can
re-digest its manifest. A digest the caller pins (the one `kiln convert --json` reported in CI), or a
signature by a key the caller trusts, says which engine this is. An engine that carries native code runs
that code as it loads, so it needs one of the two, or an explicit `trust_native_code=True`.

The signature (`kiln.sig`, OpenSSF model-signing, key-based) covers every file of the directory, the
manifest included; so it cannot be listed in the manifest itself, and it is the one name the file check
admits beside the listed ones.
"""
from __future__ import annotations

import re
from pathlib import Path

from runtimes.engine_dir import SIGNATURE, engine_digest
from runtimes.errors import EngineError

_WAYS = "pin its digest (expect_digest / --expect-digest), check its signature (public_key / --public-key), " \
        "or pass trust_native_code=True (--trust-native-code)"


def check_pinned_digest(engine_dir: Path, manifest: dict, expected: str) -> None:
    """Refuse unless the manifest (recomputed here, not as it describes itself) has the pinned digest."""
    actual = engine_digest(manifest)
    if actual.removeprefix("sha256:") != expected.lower().removeprefix("sha256:"):
        raise EngineError(f"{engine_dir}: engine digest {actual} is not the pinned {expected}; refusing it")


def check_signature(engine_dir: Path, public_key) -> None:
    """Refuse unless `kiln.sig` is a valid signature, by the key whose public half is `public_key`, over
    exactly the directory's files."""
    signature = Path(engine_dir) / SIGNATURE
    if not signature.is_file():
        raise EngineError(f"{engine_dir}: unsigned (no {SIGNATURE}), but a signature is required; refusing it")
    hashing, verifying = _model_signing("verifying")
    config = verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False))
    try:
        config.verify(engine_dir, signature)
    except (ValueError, OSError) as e:
        raise EngineError(f"{engine_dir}: signature check failed: {_mismatch(str(e))}") from None


def _mismatch(message: str) -> str:
    """The files model-signing names, out of its message (a list's repr, digests and all)."""
    found = [(what, re.findall(pattern, message)) for what, pattern in (
        ("changed since signing", r"Hash mismatch for \\*'([^'\\]+)"),
        ("not signed", r"Extra files found in model \\*'[^']*\\*': ([^'\"\]\\]+)"),
        ("missing", r"Missing files in model \\*'[^']*\\*': ([^'\"\]\\]+)"))]
    named = [f"{what}: {', '.join(files)}" for what, files in found if files]
    return "; ".join(named) if named else message.splitlines()[0][:300]


def sign_directory(engine_dir: Path, private_key) -> Path:
    """Write `kiln.sig` over the directory's files with an elliptic-curve private key (PEM)."""
    hashing, signing = _model_signing("signing")
    config = signing.Config().use_elliptic_key_signer(private_key=private_key)
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False))
    config.sign(engine_dir, Path(engine_dir) / SIGNATURE)
    return Path(engine_dir) / SIGNATURE


def native_code(manifest: dict, adapter) -> list[str]:
    """What of the engine runs as native code when `adapter` (the class its backend names) loads it."""
    carried = [adapter.native_code] if adapter.native_code else []
    if manifest.get("torch_ops"):
        carried.append("torch ops " + ", ".join(manifest["torch_ops"]))
    return carried


def refuse_untrusted_native_code(engine_dir: Path, manifest: dict, adapter, trusted: bool) -> None:
    carried = native_code(manifest, adapter)
    if carried and not trusted:
        raise EngineError(f"{engine_dir}: the engine carries native code ({'; '.join(carried)}), which runs as it "
                          f"loads; to load it, {_WAYS}")


def _model_signing(side: str):
    try:
        import importlib

        return importlib.import_module("model_signing.hashing"), importlib.import_module(f"model_signing.{side}")
    except ImportError:
        raise EngineError("signatures need the model-signing package: pip install 'torchkiln[trust]'") from None
