import json

import numpy as np
import pytest

import kiln
from kiln.errors import KilnError
from kiln.targets import TARGETS, missing_on_host


def test_aoti_cpu_engine_verifies(aoti_engine):
    manifest = json.loads((aoti_engine / "manifest.json").read_text())
    assert manifest["backend"] == "aoti" and manifest["graphs"]["model"]["file"] == "model.pt2"
    assert manifest["device"] == "cpu" and manifest["kind"] == "decoder-lm"
    assert sorted(manifest["files"]) == ["config.json", "generation_config.json", "model.pt2", "report.json"]
    assert manifest["interop"]["onnxruntime_genai"] is None  # and says why:
    assert manifest["interop"]["onnxruntime_genai_reason"] == "onnxruntime-genai runs ONNX graphs; this engine's graph is model.pt2"
    assert manifest["verification"]["passed"] is True
    assert manifest["verification"]["logits"]["relative"] <= 1e-3


def test_aoti_cpu_generates_the_reference_tokens(aoti_engine, engine_dir, reference):
    prompts = [[5, 17, 300, 42], [7, 7]]
    got = kiln.load(aoti_engine, trust_native_code=True).generate(prompts, max_new_tokens=16)
    np.testing.assert_array_equal(got, reference(engine_dir("tiny-gpt2")).generate(prompts, max_new_tokens=16))


@pytest.mark.parametrize("name", [n for n in TARGETS if missing_on_host(TARGETS[n])])
def test_targets_without_their_hardware_fail_fast(name, tmp_path):
    with pytest.raises(KilnError, match=f"target '{name}' cannot be built on this machine: .*(needs|lacks)"):
        kiln.convert("tiny-gpt2", target=name, output=tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_aoti_cuda_engine_verifies(tmp_path):
    result = kiln.convert("tiny-gpt2", target="aoti-cuda", output=tmp_path / "e")
    assert result.manifest["verification"]["passed"] is True
