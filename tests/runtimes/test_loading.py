import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import kiln
from runtimes import EngineError
from runtimes.decoder_lm import past_inputs


@pytest.fixture
def engine_copy(engine_dir, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir("tiny-gpt2"), copy)
    return copy


def _files(engine):
    return sorted(json.loads((engine / "manifest.json").read_text())["files"])


def test_a_flipped_byte_in_any_file_is_refused(engine_copy):
    assert _files(engine_copy) == ["config.json", "genai_config.json", "generation_config.json", "model.onnx", "report.json"]
    for name in _files(engine_copy):
        path = engine_copy / name
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(EngineError, match=f"file '{name}' does not match its sha256"):
            kiln.load(engine_copy)
        path.write_bytes(original)
    kiln.load(engine_copy).close()


def test_added_and_removed_files_are_refused(engine_copy):
    (engine_copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(EngineError, match="file 'extra.bin' is not listed"):
        kiln.load(engine_copy)
    (engine_copy / "extra.bin").unlink()
    (engine_copy / "report.json").unlink()
    with pytest.raises(EngineError, match="file 'report.json' listed in the manifest is missing"):
        kiln.load(engine_copy)


def test_newer_schema_is_refused(engine_copy):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="schema_version 99 is newer"):
        kiln.load(engine_copy)


def _write_signed(engine, manifest):
    """Write a changed manifest with a matching digest, as a tool that rebuilt it would."""
    from runtimes.engine_dir import manifest_digest

    manifest["manifest_sha256"] = manifest_digest(manifest)
    (engine / "manifest.json").write_text(json.dumps(manifest))


def test_a_hand_edited_manifest_is_refused(engine_copy):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["verification"]["passed"] = True
    manifest["precision"] = "int4"
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="manifest.json: edited after the engine was built"):
        kiln.load(engine_copy)


def test_external_data_outside_the_engine_is_refused(engine_copy, tmp_path):
    import onnx

    from kiln.manifest import file_entries

    model = onnx.load(engine_copy / "model.onnx")
    onnx.save(model, engine_copy / "model.onnx", save_as_external_data=True, location="weights.data")
    (engine_copy / "weights.data").rename(tmp_path / "outside.data")
    model = onnx.load(engine_copy / "model.onnx", load_external_data=False)
    for tensor in model.graph.initializer:  # what a crafted engine would hold; onnx.save itself refuses it
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save(model, engine_copy / "model.onnx")
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["files"] = file_entries(engine_copy)
    _write_signed(engine_copy, manifest)
    assert (tmp_path / "outside.data").exists()
    with pytest.raises(EngineError, match="reads external data from '../outside.data', outside the engine directory"):
        kiln.load(engine_copy)


def test_engine_for_a_missing_provider_is_refused(engine_copy):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest.update(target="cuda", device="cuda", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    _write_signed(engine_copy, manifest)
    with pytest.raises(EngineError, match="engine target 'cuda': ONNX Runtime here lacks CUDAExecutionProvider"):
        kiln.load(engine_copy)
    with pytest.raises(EngineError, match="engine target 'cuda' runs on cuda, not device='cpu'"):
        kiln.load(engine_copy, device="cpu")


def test_predict_from_threads_matches_serial(engine_dir):
    engine = kiln.load(engine_dir("tiny-gpt2"))
    rng = np.random.default_rng(0)
    empty = {s.name: np.zeros((1, 4, 0, 16), np.float32) for s in past_inputs(engine.signature)}

    def feeds(i):
        length = 1 + i % 7
        ids = rng.integers(0, 1024, size=(1, length))
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(length)[None], **empty}

    all_feeds = [feeds(i) for i in range(400)]
    serial = [engine.predict(f)["logits"] for f in all_feeds]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda f: engine.predict(f)["logits"], all_feeds))
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a, b)
