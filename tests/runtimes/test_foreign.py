"""Folders not built by torchkiln (onnxruntime-genai's builder output, an engine without its manifest)
open with `kiln.load`, say so, and verify against a PyTorch model with `kiln verify --against`."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import transformers
from click.testing import CliRunner

import kiln
from kiln.cli import cli
from runtimes import EngineError
from runtimes.foreign import NOT_BUILT_BY_KILN
from tests.conftest import build_once

PROMPTS = [[5, 17, 30, 42, 11], [7, 8], [9, 10, 11]]


def transformers_greedy(model, prompt, new_tokens=8) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def genai_folder(shared_dir):
    """A tiny Llama folder (with a tokenizer, which the builder needs; head size 16, which its GroupQueryAttention
    needs) and onnxruntime-genai's build of it."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is installed by `make install`")
    from tokenizers import Tokenizer, models, pre_tokenizers

    def build(out):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
        source = out / "source"
        transformers.LlamaForCausalLM(config).save_pretrained(source)
        tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="t2").save_pretrained(source)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(source), "-o", str(out / "genai"),
                        "-p", "fp32", "-e", "cpu", "-c", str(out / "cache")], check=True, capture_output=True)

    return build_once(shared_dir / "foreign" / "genai-llama", build)


def test_a_genai_builder_folder_generates_transformers_tokens(genai_folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(genai_folder / "source").eval()
    with kiln.load(genai_folder / "genai") as engine:
        assert engine.provenance == NOT_BUILT_BY_KILN
        assert "position_ids" not in [t.name for t in engine.signature.inputs]  # GroupQueryAttention positions itself
        for prompt in PROMPTS:  # one at a time: its attention counts positions from the mask, as if right-padded
            assert engine.generate([prompt], 8)[0].tolist() == transformers_greedy(model, prompt)


def test_verify_against_checks_a_foreign_folder_and_without_it_says_what_to_pass(genai_folder):
    folder = str(genai_folder / "genai")
    result = CliRunner().invoke(cli, ["verify", folder, "--against", str(genai_folder / "source"), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["provenance"] == NOT_BUILT_BY_KILN and document["verification"]["logits"]["top1_agreement"] == 1.0
    result = CliRunner().invoke(cli, ["verify", folder])
    assert result.exit_code == 2 and "no manifest.json (not built by torchkiln): pass --against SOURCE" in result.output


def test_an_engine_without_its_manifest_opens_as_foreign(engine_dir, tmp_path):
    engine = engine_dir("tiny-llama")
    copy = shutil.copytree(engine, tmp_path / "copy")
    (copy / "manifest.json").unlink()
    with kiln.load(engine) as built, kiln.load(copy) as foreign:
        assert foreign.provenance == NOT_BUILT_BY_KILN != built.provenance
        np.testing.assert_array_equal(foreign.generate(PROMPTS, 6), built.generate(PROMPTS, 6))


def test_a_folder_whose_graph_is_no_decoder_is_refused_naming_what_is_missing(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), tmp_path / "model.onnx")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2, "hidden_size": 8}))
    with pytest.raises(EngineError, match=r"not a decoder graph with a KV cache .*\(no input_ids, attention_mask, logits"):
        kiln.load(tmp_path)


def test_bench_takes_a_foreign_folder_beside_kiln_engines(genai_folder):
    from kiln.bench import engine_candidate

    candidate = engine_candidate(genai_folder / "genai", threads=1)
    files = sum(p.stat().st_size for p in (genai_folder / "genai").iterdir())
    assert candidate.label == "genai (not built by torchkiln)"
    assert (candidate.vocab_size, candidate.size_bytes, candidate.max_positions) == (128, files, 2048)
    assert 0 < candidate.weight_bytes < files  # the embedding table is only gathered from: not read per token
    candidate.predictor.close()
