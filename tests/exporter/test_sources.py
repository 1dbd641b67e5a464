import json

import pytest
import torch

from exporter import FAMILIES, PRESETS, ModelSourceError, load_model
from tests.conftest import TINY_PRESETS


def test_every_family_has_a_tiny_preset():
    covered = {PRESETS[name].model_type for name in TINY_PRESETS}
    assert covered == set(FAMILIES), "a family without a tiny preset has no conversion test"


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_preset_is_seeded_and_small(preset):
    first, second = load_model(preset), load_model(preset)
    assert first.weights_sha256 == second.weights_sha256
    assert sum(p.numel() for p in first.module.parameters()) < 500_000
    assert first.origin == "preset" and first.kind == "decoder-lm" and first.family.model_type == PRESETS[preset].model_type


def test_tiny_llama_has_grouped_query_attention():
    facts = load_model("tiny-llama").facts
    assert facts.kv_heads < facts.heads
    assert (facts.heads, facts.kv_heads, facts.head_dim) == (4, 2, 16)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_saved_folder_loads_the_same_weights(preset, tmp_path):
    original = load_model(preset)
    original.module.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.origin == "folder" and loaded.family == original.family
    for (name, a), (_, b) in zip(original.module.state_dict().items(), loaded.module.state_dict().items()):
        assert torch.equal(a, b), name


def test_factory_spec():
    loaded = load_model("tests.factories:tiny_gpt2")
    assert loaded.origin == "factory" and loaded.facts.vocab_size == 128


@pytest.fixture
def saved_folder(tmp_path):
    load_model("tiny-gpt2").module.save_pretrained(tmp_path)
    return tmp_path


def _break_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "make_spec, message",
    [
        (lambda tmp, folder: "/no/such/dir", "/no/such/dir: no such model folder"),
        (lambda tmp, folder: "tiny-nonsense", "'tiny-nonsense' is not a preset"),
        (lambda tmp, folder: str(tmp), "no config.json"),
        (lambda tmp, folder: (folder / "config.json").write_text("{not json") and str(folder), "invalid JSON at line 1"),
        (lambda tmp, folder: _break_config(folder, lambda c: c.pop("model_type")) or str(folder), "field 'model_type' is missing"),
        (lambda tmp, folder: _break_config(folder, lambda c: c.update(model_type="t5")) or str(folder),
         "model_type 't5' is not a model transformers' AutoModelForCausalLM builds (not a decoder-lm model)"),
        (lambda tmp, folder: _break_config(folder, lambda c: c.update(n_embd=96)) or str(folder),
         "cannot load the weights"),
        (lambda tmp, folder: _break_config(folder, lambda c: c.pop("n_layer")) or str(folder),
         "the weights do not match config.json"),
        (lambda tmp, folder: [p.unlink() for p in folder.glob("*.safetensors")] and str(folder), "no weights"),
        (lambda tmp, folder: "tests.factories:not_a_model", "the factory returned dict"),
        (lambda tmp, folder: "no_such_package.mod:factory", "cannot import module 'no_such_package.mod'"),
        (lambda tmp, folder: "tests.factories:tiny_mamba",
         "MambaForCausalLM keeps a cache that is not plain keys and values (LinearAttentionLayer: recurrent"),
    ],
    ids=["missing-dir", "unknown-preset", "no-config", "broken-json", "no-model-type", "unknown-family",
         "weights-mismatch", "missing-config-field", "no-weights", "factory-not-a-model", "factory-missing-module",
         "state-space-cache"],
)
def test_bad_sources_name_the_problem(make_spec, message, saved_folder, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ModelSourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(make_spec(empty, saved_folder))


def test_a_text_tower_saved_with_its_own_config_type_loads_by_its_architectures(tmp_path):
    import transformers

    # Emu3ForCausalLM saves an `emu3_text_model` config, which no auto mapping lists.
    config = transformers.Emu3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    transformers.Emu3ForCausalLM(config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "emu3_text_model"
    loaded = load_model(str(tmp_path))
    assert type(loaded.module).__name__ == "Emu3ForCausalLM" and loaded.facts.vocab_size == 128
