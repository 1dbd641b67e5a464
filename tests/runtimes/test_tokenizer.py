import json

import numpy as np
import pytest
from click.testing import CliRunner

import kiln
from exporter import load_model
from kiln.cli import cli
from runtimes.decoder_lm import past_inputs
from tests.conftest import build_once


@pytest.fixture(scope="module")
def engine_with_tokenizer(shared_dir):
    """A tiny-gpt2 folder saved with a word-level tokenizer built offline, converted once per run."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def build(engine):
        folder = engine.with_name("with-tokenizer-source")
        load_model("tiny-gpt2").module.save_pretrained(folder)
        tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        corpus = ["the kiln fires the clay", "a model goes in and an engine comes out", "hello world"]
        tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
        tokenizer.save(str(folder / "tokenizer.json"))
        kiln.convert(str(folder), output=engine)

    engine = build_once(shared_dir / "with-tokenizer" / "engine", build)
    return engine, Tokenizer.from_file(str(engine / "tokenizer.json"))


def test_engine_carries_the_tokenizer_and_takes_text(engine_with_tokenizer):
    engine_dir, tokenizer = engine_with_tokenizer
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    # Beside the graph, where transformers, Optimum and onnxruntime-genai look for it.
    assert manifest["tokenizer"] == "." and "tokenizer.json" in manifest["files"]
    engine = kiln.load(engine_dir)
    ids = tokenizer.encode("hello world").ids
    np.testing.assert_array_equal(engine.generate("hello world", 6), engine.generate([ids], 6))


def test_a_changed_tokenizer_is_refused(engine_with_tokenizer, tmp_path):
    import shutil

    from runtimes import EngineError

    copy = shutil.copytree(engine_with_tokenizer[0], tmp_path / "engine")
    path = copy / "tokenizer.json"
    path.write_text(path.read_text().replace("kiln", "kilm"))
    with pytest.raises(EngineError, match="file 'tokenizer.json' does not match its sha256"):
        kiln.load(copy)


def test_kiln_generate_streams_text(engine_with_tokenizer):
    engine_dir, tokenizer = engine_with_tokenizer
    result = CliRunner().invoke(cli, ["generate", str(engine_dir), "--prompt", "the kiln", "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert len(document["tokens"]) == 5 and document["text"] == tokenizer.decode(document["tokens"])
    streamed = CliRunner().invoke(cli, ["generate", str(engine_dir), "--prompt", "the kiln", "--max-new-tokens", "5"])
    assert streamed.stdout.strip() == document["text"].strip()


def test_kiln_generate_with_token_ids(engine_dir):
    result = CliRunner().invoke(cli, ["generate", str(engine_dir("tiny-gpt2")), "--prompt-ids", "5,17,300", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    expected = kiln.load(engine_dir("tiny-gpt2")).generate([[5, 17, 300]], 4)[0]
    assert result.stdout.split() == [str(t) for t in expected]
    text = CliRunner().invoke(cli, ["generate", str(engine_dir("tiny-gpt2")), "--prompt", "hello"])
    assert text.exit_code == 2 and "carries no tokenizer" in text.output


def test_kiln_predict_round_trips_npz(engine_dir, tmp_path):
    engine = kiln.load(engine_dir("tiny-gpt2"))
    feeds = {"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.ones((1, 3), np.int64), "position_ids": np.arange(3)[None]}
    feeds.update({s.name: np.zeros((1, 4, 0, 16), np.float32) for s in past_inputs(engine.signature)})
    np.savez(tmp_path / "in.npz", **feeds)
    result = CliRunner().invoke(cli, ["predict", str(engine_dir("tiny-gpt2")), "--inputs", str(tmp_path / "in.npz"),
                                      "-o", str(tmp_path / "out.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as outputs:
        np.testing.assert_array_equal(outputs["logits"], engine.predict(feeds)["logits"])
    del feeds["attention_mask"]
    np.savez(tmp_path / "bad.npz", **feeds)
    bad = CliRunner().invoke(cli, ["predict", str(engine_dir("tiny-gpt2")), "--inputs", str(tmp_path / "bad.npz")])
    assert bad.exit_code == 2 and "missing input 'attention_mask'" in bad.output
