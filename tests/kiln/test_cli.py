import json
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner

from exporter import load_model
from kiln.cli import cli

KILN = [sys.executable, "-c", "from kiln.cli import main; main()"]


def run_kiln(*args, cwd=None):
    return subprocess.run([*KILN, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_convert_json_for_ci(tmp_path):
    done = run_kiln("convert", "tiny-gpt2", "--target", "cpu", "-o", tmp_path / "e1", "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)  # stdout holds the JSON document and nothing else
    assert document["ok"] is True and document["verification"]["passed"] is True
    assert document["engine_dir"] == str(tmp_path / "e1")
    assert "✓ export" in done.stderr  # progress goes to stderr
    # The digest a service pins: the manifest's, recomputed.
    manifest = json.loads((tmp_path / "e1" / "manifest.json").read_text())
    assert document["digest"] == "sha256:" + manifest["manifest_sha256"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/dir", "error: /no/such/dir: no such model folder"),
        ("BROKEN", "config.json: invalid JSON at line 1, column 2"),
        ("tiny-unknown", "error: 'tiny-unknown' is not a preset"),
        ("EXISTING", "already exists (pass --force to replace it)"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, spec, message):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    (broken / "model.safetensors").write_bytes(b"")
    existing = tmp_path / "existing"
    existing.mkdir()
    spec = {"BROKEN": broken, "EXISTING": "tiny-gpt2"}.get(spec, spec)
    out = existing if spec == "tiny-gpt2" else tmp_path / "out"
    done = run_kiln("convert", spec, "-o", out)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_json_error_document():
    done = run_kiln("convert", "/no/such/dir", "--json")
    assert done.returncode == 2
    assert json.loads(done.stdout) == {"ok": False, "exit_code": 2, "error": "/no/such/dir: no such model folder"}


def test_debug_shows_the_traceback():
    done = run_kiln("--debug", "convert", "tiny-unknown")
    assert "Traceback" in done.stderr and "ModelSourceError" in done.stderr


def test_convert_from_saved_folder(tmp_path):
    load_model("tiny-llama").module.save_pretrained(tmp_path / "folder")
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "folder"), "-o", str(tmp_path / "e"), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["source"]["origin"] == "folder" and document["kind"] == "decoder-lm" and document["source"]["family"] == "llama"
    assert document["verification"]["passed"] is True


def test_inspect_shows_ops_and_files(engine_dir):
    result = CliRunner().invoke(cli, ["inspect", str(engine_dir("tiny-gpt2")), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    nodes = onnx.load(engine_dir("tiny-gpt2") / "model.onnx", load_external_data=False).graph.node
    assert document["op_histogram"]["MatMul"] > 0 and sum(document["op_histogram"].values()) == len(nodes)
    assert set(document["files"]) == {"config.json", "genai_config.json", "generation_config.json", "model.onnx", "report.json"}
    text = CliRunner().invoke(cli, ["inspect", str(engine_dir("tiny-gpt2"))]).output
    assert "verified    passed" in text and "file        model.onnx" in text


def test_inspect_of_a_folder_that_is_not_an_engine(tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "not an engine directory (no manifest.json)" in result.output


def test_presets_lists_every_preset():
    from exporter import PRESETS

    document = json.loads(CliRunner().invoke(cli, ["presets", "--json"]).stdout)
    assert list(document) == list(PRESETS) and "gpt2" in document and "tiny-llama" in document


def test_help_documents_exit_codes():
    text = CliRunner().invoke(cli, ["--help"]).output
    for line in ("0  success", "2  user error", "3  verification failed", "1  internal error"):
        assert line in text


def test_verify_passes_on_a_fresh_engine_and_names_a_tampered_file(engine_dir, tmp_path):
    import shutil

    fresh = CliRunner().invoke(cli, ["verify", str(engine_dir("tiny-gpt2")), "--json"])
    assert fresh.exit_code == 0, fresh.output
    assert json.loads(fresh.stdout)["verification"]["passed"] is True
    copy = shutil.copytree(engine_dir("tiny-gpt2"), tmp_path / "engine")
    with open(copy / "report.json", "a") as f:
        f.write(" ")
    tampered = CliRunner().invoke(cli, ["verify", str(copy)])
    assert tampered.exit_code == 2 and "file 'report.json' does not match its sha256" in tampered.output


def test_inspect_writes_a_markdown_report_with_a_bench(engine_dir, tmp_path):
    report = tmp_path / "engine.md"
    result = CliRunner().invoke(cli, ["inspect", str(engine_dir("tiny-gpt2")), "--report", str(report), "--bench"])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    for heading in ("## Passes", "## Fidelity against PyTorch", "## Bench", "## Files", "![bench](engine.png)"):
        assert heading in text
    assert "| fusion |" in text and "| logits |" in text and "| pytorch eager |" in text
    assert (tmp_path / "engine.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plugin_build_failure_is_a_user_error_naming_the_compiler(tmp_path, monkeypatch):
    from kiln.errors import EXIT_USER, exit_code_of
    from plugins import PluginBuildError, build

    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(PluginBuildError, match="no-such-c\\+\\+ not found on PATH") as info:
        build("cpu", build_dir=tmp_path)
    assert exit_code_of(info.value) == EXIT_USER


def test_families_lists_the_tested_matrix():
    from exporter.families import FAMILIES
    from exporter.presets import PRESETS

    document = json.loads(CliRunner().invoke(cli, ["families", "--json"]).stdout)
    assert set(document) == {f.name for f in FAMILIES.values() if f.tested}
    assert {"mistral", "falcon", "mixtral", "gemma2"} <= set(document)
    tiny = {p.model_type for name, p in PRESETS.items() if name.startswith("tiny-")}
    assert {record["model_type"] for record in document.values()} <= tiny  # each has the preset the matrix runs
    assert "multi-query" in document["falcon"]["notes"]


def test_a_family_without_a_record_converts_and_says_it_is_untested(tmp_path):
    result = CliRunner().invoke(cli, ["convert", "tests.factories:tiny_biogpt", "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "note: family 'biogpt' is not in the tested matrix" in result.stderr
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["source"]["family_tested"] is False and manifest["verification"]["passed"] is True
