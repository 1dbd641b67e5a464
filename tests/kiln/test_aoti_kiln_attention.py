"""kiln_attention on AOTInductor targets: the attention layers call kiln::causal_attention in the package."""
import json
import subprocess
import sys

import numpy as np
import pytest

import kiln
from kiln.errors import KilnError
from tests.conftest import build_once


@pytest.fixture(scope="module")
def plugin_engine(shared_dir):
    return build_once(shared_dir / "aoti-kiln" / "tiny-llama",
                      lambda out: kiln.convert("tiny-llama", target="aoti-cpu", output=out, passes=["kiln_attention"]))


def test_every_layer_calls_the_plugin_and_the_package_verifies(plugin_engine):
    manifest = json.loads((plugin_engine / "manifest.json").read_text())
    layers = manifest["source"]["config"]["num_hidden_layers"]
    assert manifest["torch_ops"] == ["kiln.causal_attention.default"]
    assert manifest["passes"][0]["name"] == "kiln_attention"
    assert manifest["passes"][0]["fused"] == {"kiln.causal_attention": layers}
    assert manifest["verification"]["passed"] is True
    assert manifest["verification"]["logits"]["relative"] <= 1e-5


def test_a_fresh_process_generates_the_reference_tokens_from_padded_prompts(plugin_engine, engine_dir, reference):
    # A new interpreter: the engine must load the op itself before the package.
    script = (
        "import sys, json, kiln; "
        "print(json.dumps(kiln.load(sys.argv[1], trust_native_code=True).generate([[5, 17, 300, 42, 9], [7, 7]], max_new_tokens=12).tolist()))"
    )
    run = subprocess.run([sys.executable, "-c", script, str(plugin_engine)], capture_output=True, text=True, check=True)
    got = np.array(json.loads(run.stdout.strip().splitlines()[-1]))
    expected = reference(engine_dir("tiny-llama")).generate([[5, 17, 300, 42, 9], [7, 7]], max_new_tokens=12)
    np.testing.assert_array_equal(got, expected)


def test_families_with_inline_attention_are_refused(tmp_path):
    with pytest.raises(KilnError, match="bloom computes its attention inline"):
        kiln.convert("tiny-bloom", target="aoti-cpu", output=tmp_path / "e", passes=["kiln_attention"])
    assert not (tmp_path / "e").exists()


def test_onnx_passes_are_refused_on_aoti_targets(tmp_path):
    with pytest.raises(KilnError, match="its only pass is kiln_attention"):
        kiln.convert("tiny-llama", target="aoti-cpu", output=tmp_path / "e", passes=["cleanup", "fusion"])


def test_passes_list_offers_the_plugin_where_a_runtime_hosts_it():
    from click.testing import CliRunner

    from kiln.cli import cli

    listed = {}
    for target in ("aoti-cpu", "tensorrt", "cpu"):
        result = CliRunner().invoke(cli, ["convert", "tiny-llama", "--target", target, "--passes", "list", "--json"])
        assert result.exit_code == 0, result.output
        listed[target] = json.loads(result.output)
    assert (listed["aoti-cpu"]["passes"], listed["aoti-cpu"]["optional"]) == ([], ["kiln_attention"])
    assert (listed["tensorrt"]["passes"], listed["tensorrt"]["optional"]) == (["cleanup"], ["kiln_attention"])
    assert listed["cpu"]["optional"] == []
