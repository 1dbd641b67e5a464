"""Diffusion sources: the tiny-sd preset built offline, a diffusers folder, a factory; each to the same pipeline."""
import json

import pytest
import torch

from exporter import ModelSourceError, load_model

pytest.importorskip("diffusers")


def test_tiny_sd_is_seeded_small_and_stable_diffusion_shaped(sd_source):
    again = load_model("tiny-sd")
    assert again.weights_sha256 == sd_source.weights_sha256 and again.kind == "diffusion"
    pipeline, facts = sd_source.module, sd_source.facts
    assert sum(p.numel() for role in ("text_encoder", "unet", "vae") for p in getattr(pipeline, role).parameters()) < 500_000
    # One upsampler in the UNet (latent sides multiples of 2), 2 pixels per latent pixel, SD's VAE scaling factor.
    assert (facts.latent_multiple, facts.vae_scale_factor, facts.default_size) == (2, 2, 32)
    assert (facts.vae_scaling_factor, facts.text_length, facts.max_batch) == (0.18215, 77, 63)
    tokens = pipeline.tokenizer.convert_ids_to_tokens(pipeline.tokenizer("a red square!").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "square</w>", "!</w>", "<|endoftext|>"]


def test_a_saved_diffusers_folder_and_a_factory_load_the_same_pipeline(sd_source, tmp_path):
    sd_source.module.save_pretrained(tmp_path / "sd")
    folder = load_model(str(tmp_path / "sd"))
    factory = load_model("tests.factories:tiny_sd")
    assert (folder.kind, folder.origin, factory.kind, factory.origin) == ("diffusion", "folder", "diffusion", "factory")
    assert folder.facts == factory.facts == sd_source.facts
    for role in ("text_encoder", "unet", "vae"):
        saved, built = getattr(folder.module, role).state_dict(), getattr(sd_source.module, role).state_dict()
        assert saved.keys() == built.keys() and all(torch.equal(saved[k], built[k]) for k in saved)
    assert folder.config["scheduler"]["_class_name"] == "DDIMScheduler"


def test_a_folder_missing_a_component_names_it(sd_source, tmp_path):
    sd_source.module.save_pretrained(tmp_path / "sd")
    index = tmp_path / "sd" / "model_index.json"
    config = json.loads(index.read_text())
    index.write_text(json.dumps({k: v for k, v in config.items() if k != "unet"}))
    with pytest.raises(ModelSourceError, match=r"model_index.json: no unet \(a Stable-Diffusion-like pipeline has"):
        load_model(str(tmp_path / "sd"))
    index.write_text(json.dumps(config))
    (tmp_path / "sd" / "vae").rename(tmp_path / "sd" / "vae-gone")
    with pytest.raises(ModelSourceError, match="folder vae/ is missing"):
        load_model(str(tmp_path / "sd"))
