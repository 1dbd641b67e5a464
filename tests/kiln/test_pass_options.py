"""`kiln convert --pass-option` and `--calibration` reach the passes; bad ones exit 2 naming what is allowed."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kiln.cli import cli


def _convert(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args), "--json"])


def _pass(document, name):
    return next(p for p in document["passes"] if p["name"] == name)


def test_a_pass_option_reaches_the_pass(tmp_path):
    done = _convert("tests.factories:tiny_gpt2", "--precision", "int4", "--pass-option", "int4.block_size=64",
                    "--no-verify", "-o", tmp_path / "e")
    assert done.exit_code == 0, done.output
    assert _pass(json.loads(done.stdout), "int4")["details"]["block_size"] == 64


@pytest.mark.parametrize("option, message", [
    ("int5.block_size=64", "unknown pass 'int5'"),
    ("int4.blocksize=64", "'blocksize'"),
    ("int4.block_size=big", "block_size"),
    ("int4", "expected PASS.OPTION=VALUE"),
])
def test_a_bad_pass_option_exits_2_naming_what_is_allowed(tmp_path, option, message):
    done = _convert("tiny-gpt2", "--precision", "int4", "--pass-option", option, "-o", tmp_path / "e")
    assert done.exit_code == 2, done.output
    assert message in done.output and "Traceback" not in done.output
    assert not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text the trained preset's tokenizer reads: held-out arithmetic sequences, one per line."""
    from exporter.trained import FIRST_NUMBER, heldout_sequences

    path = tmp_path_factory.mktemp("calibration") / "corpus.txt"
    rows = heldout_sequences(32)
    path.write_text("\n".join(" ".join(str(t - FIRST_NUMBER) for t in row[1:]) for row in rows) + "\n")
    return path, int(rows[:, 1:].size)


def test_int8_static_calibrates_on_the_given_text(tmp_path, corpus):
    path, tokens = corpus
    done = _convert("tiny-trained", "--precision", "int8-static", "--calibration", path, "-o", tmp_path / "e")
    assert done.exit_code == 0, done.output
    document = json.loads(done.stdout)
    details = _pass(document, "int8_static")["details"]
    # Rows are cut into prefills of 64 tokens: the tail that fills no row is left out.
    used = tokens // 64 * 64
    assert details["calibration_source"] == f"corpus.txt: {used} tokens in {used // 64} prefills"
    assert details["calibration_feeds"] == used // 64
    assert document["verification"]["passed"] is True


def test_calibration_from_token_ids(tmp_path):
    ids = np.random.default_rng(0).integers(3, 1000, size=(4, 16))
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    done = _convert("tiny-gpt2", "--precision", "int8-static", "--calibration", tmp_path / "ids.npz", "--no-verify",
                    "-o", tmp_path / "e")
    assert done.exit_code == 0, done.output
    assert _pass(json.loads(done.stdout), "int8_static")["details"]["calibration_source"] == "ids.npz: 64 tokens in 4 prefills"


@pytest.mark.parametrize("content, message", [
    (b"hello", "text needs the model's tokenizer"),
    (None, "no such file"),
])
def test_unusable_calibration_exits_2(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    done = _convert("tiny-gpt2", "--precision", "int8-static", "--calibration", path, "-o", tmp_path / "e")
    assert done.exit_code == 2, done.output
    assert f"--calibration {path}: {message}" in done.output
