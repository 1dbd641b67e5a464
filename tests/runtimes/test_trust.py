"""A service runs only the engine its CI built: pinned digests, signatures, and consent to native code."""
import json
import shutil

import pytest
from click.testing import CliRunner

import kiln
from kiln.cli import cli
from runtimes import EngineError
from runtimes.engine_dir import manifest_digest, sha256_file
from runtimes.trust import engine_digest, sign_directory

pytest.importorskip("model_signing", reason="model-signing is installed by `make install`")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """(private, public) PEM paths of a fresh P-256 key, and of a second, unrelated one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("keys")
    paths = []
    for name in ("ci", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        private, public = folder / f"{name}.pem", folder / f"{name}.pub"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
        paths.append((private, public))
    return paths


@pytest.fixture
def signed(engine_dir, keys, tmp_path):
    """A copy of the tiny-gpt2 engine, signed with the CI key."""
    engine = shutil.copytree(engine_dir("tiny-gpt2"), tmp_path / "signed")
    sign_directory(engine, keys[0][0])
    return engine


def craft(engine):
    """What someone with write access can do: add a file, list it, re-digest the manifest."""
    (engine / "extra.bin").write_bytes(b"\x7fELF payload")
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["files"]["extra.bin"] = {"sha256": sha256_file(engine / "extra.bin"), "bytes": 12}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (engine / "manifest.json").write_text(json.dumps(manifest))


def test_a_crafted_engine_passes_the_self_check_but_not_a_pin_or_a_signature(signed, keys):
    pinned = engine_digest(json.loads((signed / "manifest.json").read_text()))
    with kiln.load(signed, expect_digest=pinned, public_key=keys[0][1]):
        pass  # the untouched engine passes both
    craft(signed)
    kiln.load(signed).close()  # the manifest's own digest cannot tell
    with pytest.raises(EngineError, match=f"engine digest sha256:[0-9a-f]{{64}} is not the pinned {pinned}"):
        kiln.load(signed, expect_digest=pinned)
    with pytest.raises(EngineError, match=r"signature check failed: .*not signed: extra\.bin"):
        kiln.load(signed, public_key=keys[0][1])


def test_a_signed_engine_verifies_anywhere_and_names_what_changed(signed, keys, engine_dir, tmp_path):
    moved = shutil.copytree(signed, tmp_path / "elsewhere" / "engine")
    kiln.load(moved, public_key=keys[0][1]).close()
    with pytest.raises(EngineError, match="signature check failed"):
        kiln.load(moved, public_key=keys[1][1])  # another key
    flipped = shutil.copytree(signed, tmp_path / "flipped")
    data = bytearray((flipped / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (flipped / "model.onnx").write_bytes(data)
    with pytest.raises(EngineError, match=r"signature check failed: changed since signing: model\.onnx$"):
        kiln.load(flipped, public_key=keys[0][1])
    added = shutil.copytree(signed, tmp_path / "added")
    (added / "notes.txt").write_text("hello")
    with pytest.raises(EngineError, match=r"signature check failed: not signed: notes\.txt$"):
        kiln.load(added, public_key=keys[0][1])
    swapped = shutil.copytree(engine_dir("tiny-llama"), tmp_path / "swapped")  # signed by the same key, other engine
    sign_directory(swapped, keys[0][0])
    shutil.copy(swapped / "kiln.sig", added / "kiln.sig")
    (added / "notes.txt").unlink()
    with pytest.raises(EngineError, match=r"signature check failed: changed since signing: .*manifest\.json"):
        kiln.load(added, public_key=keys[0][1])


def test_an_unsigned_engine_is_refused_when_a_key_is_required(engine_dir, keys):
    with pytest.raises(EngineError, match=r"unsigned \(no kiln\.sig\), but a signature is required"):
        kiln.load(engine_dir("tiny-gpt2"), public_key=keys[0][1])


def test_the_cli_signs_pins_and_checks(engine_dir, keys, tmp_path):
    engine = shutil.copytree(engine_dir("tiny-gpt2"), tmp_path / "engine")
    done = CliRunner().invoke(cli, ["sign", str(engine), "--key", str(keys[0][0]), "--json"])
    assert done.exit_code == 0, done.output
    digest = json.loads(done.output)["digest"]
    ok = CliRunner().invoke(cli, ["verify", str(engine), "--expect-digest", digest, "--public-key", str(keys[0][1])])
    assert ok.exit_code == 0, ok.output
    other = "sha256:" + "0" * 64
    wrong = CliRunner().invoke(cli, ["verify", str(engine), "--expect-digest", other])
    assert wrong.exit_code == 2 and f"engine digest {digest} is not the pinned {other}" in wrong.output
    foreign = CliRunner().invoke(cli, ["verify", str(engine), "--public-key", str(keys[1][1])])
    assert foreign.exit_code == 2 and "signature check failed" in foreign.output


def test_native_code_loads_with_a_pin_a_signature_or_explicit_trust(aoti_engine, keys, tmp_path):
    with pytest.raises(EngineError, match=r"carries native code \(an AOTInductor package.*pin its digest "
                                          r"\(expect_digest.*check its signature \(public_key.*trust_native_code=True"):
        kiln.load(aoti_engine)
    digest = engine_digest(json.loads((aoti_engine / "manifest.json").read_text()))
    signed = shutil.copytree(aoti_engine, tmp_path / "signed")
    sign_directory(signed, keys[0][0])
    for engine, trust in ((aoti_engine, {"trust_native_code": True}), (aoti_engine, {"expect_digest": digest}),
                          (signed, {"public_key": keys[0][1]})):
        with kiln.load(engine, **trust) as predictor:
            assert predictor.generate([[5, 17, 30]], 2).shape == (1, 2)
