"""Engines that other ONNX Runtime tools load as written: transformers' config files and onnxruntime-genai."""
import json

import numpy as np
import pytest
import transformers

import kiln

PROMPTS = [[5, 17, 30, 42, 11], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_the_engine_carries_the_source_config_listed_in_its_manifest(engine_dir, preset):
    engine = engine_dir(preset)
    manifest = json.loads((engine / "manifest.json").read_text())
    assert {"config.json", "generation_config.json", "genai_config.json"} <= set(manifest["files"])
    assert manifest["interop"] == {"config": ["config.json", "generation_config.json"],
                                   "onnxruntime_genai": "genai_config.json"}
    config = transformers.AutoConfig.from_pretrained(engine).to_dict()
    source = transformers.AutoConfig.for_model(**manifest["source"]["config"]).to_dict()
    assert {k: v for k, v in config.items() if k != "_name_or_path"} == {k: v for k, v in source.items() if k != "_name_or_path"}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_onnxruntime_genai_generates_the_engines_greedy_tokens(engine_dir, preset):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is installed by `make install`")
    engine = engine_dir(preset)
    model = og.Model(str(engine))
    with kiln.load(engine) as predictor:
        for prompt in PROMPTS:  # one at a time: genai 0.18 positions left-padded rows its own way
            want = predictor.generate([prompt], 8)[0].tolist()
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + 8, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(np.array([prompt], dtype=np.int32))
            got = []
            while not generator.is_done():
                generator.generate_next_token()
                got.append(int(generator.get_next_tokens()[0]))
            assert got == want, prompt


def test_genai_config_is_written_only_where_genai_can_run_the_graph():
    from pathlib import Path

    from kiln.interop import genai_support
    from kiln.targets import target_named

    # A TensorRT plan replaces the ONNX graph; MIGraphX is no provider genai_config is written for here.
    assert genai_support(None, target_named("tensorrt", "fp16"), Path("engine.plan")) == \
        "onnxruntime-genai runs ONNX graphs; this engine's graph is engine.plan"
    assert genai_support(None, target_named("rocm", "fp16"), Path("model.onnx")) == \
        "the engine runs on ONNX Runtime's MIGraphXExecutionProvider, which this genai_config does not set up"
