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
    assert {c["precision"] for c in auto["candidates"]} == {"fp32", "int8-static", "int8"}
    fastest = min(measured, key=lambda c: c["request_seconds"])
    assert auto["chosen"] == fastest["precision"] and "rejected" not in fastest
    assert all("rejected" in c for c in auto["candidates"] if c is not fastest)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == auto["chosen"] and manifest["auto"] == auto
    assert json.loads((out / "report.json").read_text())["auto"] == auto
    kiln.load(out).close()  # the re-written files still match their hashes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


@pytest.mark.parametrize("shape", ["batch=1,prompt=8", "batch=0,prompt=8,new=4", "nonsense"])
def test_auto_rejects_a_bad_shape(tmp_path, shape):
    from kiln.auto import convert_auto

    with pytest.raises(KilnError, match="--shape: expected batch=N,prompt=N,new=N"):
        convert_auto("tiny-gpt2", output=tmp_path / "e", shape=shape)
