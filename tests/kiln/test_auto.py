import json

import pytest
from click.testing import CliRunner

import kiln
from kiln.cli import cli
from kiln.errors import KilnError


def test_auto_keeps_the_fastest_candidate_that_passed(tmp_path):
    out = tmp_path / "engine"
    result = CliRunner().invoke(cli, ["convert", "tests.factories:tiny_gpt2", "--auto", "--budget", "int8",
                                      "--shape", "batch=1,prompt=8,new=4", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    auto = json.loads(result.stdout)["auto"]
    measured = [c for c in auto["candidates"] if "request_seconds" in c]
    # int8 two ways: the recipe's dynamic MatMulInteger and weight-only MatMulNBits blocks.
    assert [(c["candidate"], c["precision"]) for c in auto["candidates"]] == [
        ("fp32", "fp32"), ("int8-static", "int8-static"), ("int8", "int8"), ("int8-weight-only", "int8")]
    fastest = min(measured, key=lambda c: c["request_seconds"])
    assert auto["chosen"] == fastest["candidate"] and "rejected" not in fastest
    assert all("rejected" in c for c in auto["candidates"] if c is not fastest)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == fastest["precision"] and manifest["auto"] == auto
    quantized = [p for p in manifest["passes"] if p["name"] in ("int8_dynamic", "int8_weight_only")]
    assert [p["name"] for p in quantized] == (["int8_weight_only"] if auto["chosen"] == "int8-weight-only" else
                                               ["int8_dynamic"] if auto["chosen"] == "int8" else [])
    assert json.loads((out / "report.json").read_text())["auto"] == auto
    kiln.load(out).close()  # the re-written files still match their hashes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


@pytest.mark.parametrize("shape", ["batch=1,prompt=8", "batch=0,prompt=8,new=4", "nonsense"])
def test_auto_rejects_a_bad_shape(tmp_path, shape):
    from kiln.auto import convert_auto

    with pytest.raises(KilnError, match="--shape: expected batch=N,prompt=N,new=N"):
        convert_auto("tiny-gpt2", output=tmp_path / "e", shape=shape)


def test_auto_tries_a_variant_only_where_the_user_left_its_choice_open():
    from kiln.auto import candidates

    names = lambda options: [name for name, _, _ in candidates("cpu", "int4", options)]
    assert names({}) == ["fp32", "int8-static", "int8", "int8-weight-only", "int4", "int4-block-128"]
    assert "int4-block-128" not in names({"pass_options": ["int4.block_size=64"]})  # the user's block size stands
    _, _, options = next(c for c in candidates("cpu", "int4", {"pass_options": ["int4.accuracy_level=1"]})
                         if c[0] == "int4-block-128")
    assert options["pass_options"] == {"int4": {"accuracy_level": 1, "block_size": 128}}
    assert "int8-weight-only" not in names({"passes": ["cleanup", "int8_dynamic"]})  # the user's passes stand
    assert "int8-weight-only" not in names({"pass_options": ["int8_dynamic.per_channel=true"]})
