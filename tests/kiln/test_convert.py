import json
import subprocess

import numpy as np
import pytest

import kiln
from kiln.errors import KilnError, VerificationFailed
from kiln.verify import logits_fidelity
from runtimes.signature import Signature
from tests.conftest import TINY_PRESETS


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_family_converts_and_verifies(engine_dir, preset):
    manifest = json.loads((engine_dir(preset) / "manifest.json").read_text())
    verification = manifest["verification"]
    assert verification["passed"] is True
    logits = verification["logits"]
    assert logits["relative"] <= 1e-3
    assert logits["top1_agreement"] == 1.0 and logits["decisive_positions"] > 0
    assert logits["positions"] == 4 * (32 + 8)  # batch 4: a prefill of 32 then 8 decode steps
    assert set(verification["outputs"]) == {"logits"} | {f"present.{i}.{k}" for i in range(2) for k in ("key", "value")}
    assert manifest["source"]["spec"] == preset and manifest["target"] == "cpu" and manifest["precision"] == "fp32"
    assert [s["name"] for s in manifest["steps"]] == ["load", "export", "reference", "optimize", "verify"]
    assert [p["name"] for p in manifest["passes"]] == ["cleanup", "tied_head_layout", "fusion", "split_skip_layer_norm",
                                                       "winograd", "logits_to_keep"]
    assert (manifest["kind"], manifest["device"], list(manifest["graphs"])) == ("decoder-lm", "cpu", ["model"])
    signature = {t["name"]: t["shape"] for t in manifest["graphs"]["model"]["signature"]["inputs"]}
    assert signature["input_ids"] == ["batch", "sequence"]


def test_manifest_lists_every_file_with_its_sha256(engine_dir):
    engine = engine_dir("tiny-gpt2")
    manifest = json.loads((engine / "manifest.json").read_text())
    on_disk = sorted(p.name for p in engine.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk == ["config.json", "genai_config.json", "generation_config.json", "model.onnx", "report.json"]
    for name, entry in manifest["files"].items():
        printed = subprocess.run(["sha256sum", name], cwd=engine, capture_output=True, text=True, check=True).stdout
        assert printed.split()[0] == entry["sha256"], name
        assert (engine / name).stat().st_size == entry["bytes"]


def test_existing_output_is_refused_before_any_work(engine_dir):
    engine = engine_dir("tiny-gpt2")
    before = (engine / "manifest.json").read_bytes()
    with pytest.raises(KilnError, match="already exists .*--force"):
        kiln.convert("tiny-gpt2", output=engine)
    assert (engine / "manifest.json").read_bytes() == before


def test_force_replaces_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "stale.txt").write_text("old engine")
    (tmp_path / ".engine.kiln-tmp-999999999").mkdir()  # left by a convert that was SIGKILLed
    result = kiln.convert("tests.factories:tiny_gpt2", output=out, force=True, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    assert not (out / "stale.txt").exists()
    assert result.manifest["verification"] == {"skipped": True, "passed": None}
    assert [s["name"] for s in result.manifest["steps"]] == ["load", "export", "optimize"]


def test_failed_verification_names_the_figure_and_writes_nothing(tmp_path, monkeypatch):
    from kiln import verify

    monkeypatch.setitem(verify.TOLERANCES, "fp32", verify.Tolerance(relative=0.0, top1=1.0))
    with pytest.raises(VerificationFailed, match=r"logits: max abs error .* of the reference range, above 0") as info:
        kiln.convert("tests.factories:tiny_gpt2", output=tmp_path / "engine")
    assert info.value.exit_code == 3 and info.value.report["passed"] is False
    assert list(tmp_path.iterdir()) == []


def test_unknown_target_and_precision_are_user_errors(tmp_path):
    with pytest.raises(KilnError, match="unknown target 'tpu'"):
        kiln.convert("tiny-gpt2", target="tpu", output=tmp_path / "e")
    with pytest.raises(KilnError, match="precision 'fp8' is not supported for target 'cpu'"):
        kiln.convert("tiny-gpt2", precision="fp8", output=tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def test_near_ties_are_counted_not_held_against_the_engine():
    want = np.array([[1.0, 0.99995, 0.0], [3.0, 0.0, 0.0]])
    got = np.array([[0.9999, 1.0, 0.0], [3.0, 0.0, 0.5]])  # row 0 flips within its error: a near-tie
    figures = logits_fidelity(got, want)
    assert (figures["near_ties"], figures["decisive_positions"]) == (1, 1)
    assert figures["top1_agreement"] == 1.0 and figures["top1_agreement_all"] == 0.5
    flipped = logits_fidelity(np.array([[0.0, 5.0, 0.0]]), np.array([[3.0, 0.0, 0.0]]))
    assert flipped["decisive_positions"] == 0  # error 5 exceeds the margin 3: not decisive either


def test_a_failed_gate_names_the_pass_that_made_the_error_grow(tmp_path, monkeypatch):
    from kiln import verify

    monkeypatch.setitem(verify.TOLERANCES, "int8", verify.Tolerance(relative=1e-3, top1=0.98))
    with pytest.raises(VerificationFailed, match="the error grew most in pass 'int8_dynamic'") as info:
        kiln.convert("tests.factories:tiny_gpt2", precision="int8", output=tmp_path / "engine")
    by_pass = info.value.report["error_by_pass"]
    assert [e["after"] for e in by_pass] == ["export", "cleanup", "fold_weight_transposes", "fusion",
                                                 "split_skip_layer_norm", "winograd", "logits_to_keep", "int8_dynamic"]
    assert by_pass[-1]["max_abs"] > 100 * by_pass[-2]["max_abs"]
    assert list(tmp_path.iterdir()) == []


def test_an_error_already_in_the_export_is_not_blamed_on_a_pass():
    from kiln.pipeline import _blame

    exported_wrong = [{"after": "export", "max_abs": 0.16, "growth": 1.0}, {"after": "fusion", "max_abs": 0.16, "growth": 1.0}]
    assert _blame(exported_wrong) == "the exported graph already differs (max abs error 0.16), before any pass"
    pass_wrong = [{"after": "export", "max_abs": 1e-6, "growth": 1.0}, {"after": "int4", "max_abs": 0.2, "growth": 2e5}]
    assert _blame(pass_wrong) == "the error grew most in pass 'int4' (x2e+05)"


def test_a_capture_that_fixes_a_free_dim_is_refused_naming_it(tmp_path):
    from exporter.errors import ExportError

    with pytest.raises(ExportError, match="CpmAntForCausalLM cannot be captured with a free sequence: its forward "
                                          "fixes 'input_ids' axis 1 to the example's"):
        kiln.convert("tests.factories:tiny_cpmant", output=tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def test_layers_with_caches_of_different_widths_convert(tmp_path):
    result = kiln.convert("tests.factories:tiny_gemma4", output=tmp_path / "e")
    signature = Signature.from_json(result.manifest["graphs"]["model"]["signature"])
    widths = [signature.input(f"past_key_values.{layer}.key").shape[3] for layer in (0, 1)]
    assert widths == [16, 32]
    assert result.manifest["verification"]["passed"]


def test_a_pass_only_other_backends_run_is_refused_before_any_work(tmp_path):
    with pytest.raises(KilnError, match="pass 'kiln_attention' makes nodes that only aoti, tensorrt engines run; "
                                        "backend 'onnxruntime' has no kernel for them"):
        kiln.convert("tiny-gpt2", passes=["cleanup", "kiln_attention"], output=tmp_path / "e")
    assert list(tmp_path.iterdir()) == []
