"""The diffusion Predictor on the one tiny-sd engine of the run: its graphs, tokenizer, schedulers and size rules,
against diffusers' own pipeline."""
import json
import subprocess
import sys

import numpy as np
import pytest

import kiln
from runtimes import FeedError
from runtimes.text_to_image import DiffusionPredictor

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def engine(sd_engine):
    with kiln.load(sd_engine) as predictor:
        yield predictor


def diffusers_pixels(pipeline, engine_dir, scheduler_class: str, prompts, latents, steps, **options):
    """diffusers' pipeline with the scheduler a diffusers user would build from the engine's scheduler_config.json."""
    import diffusers
    import torch

    config = json.loads((engine_dir / "scheduler" / "scheduler_config.json").read_text())
    original = pipeline.scheduler
    pipeline.scheduler = getattr(diffusers, scheduler_class).from_config(config)
    try:
        with torch.inference_mode():
            return pipeline(prompts, num_inference_steps=steps, latents=torch.from_numpy(latents), output_type="np",
                            **options).images
    finally:
        pipeline.scheduler = original


def test_load_gives_the_kind_s_predictor_with_a_graph_per_role(engine):
    assert isinstance(engine, DiffusionPredictor)
    assert set(engine.components) == {"text_encoder", "unet", "vae_decoder"}
    unet = engine.components["unet"].signature
    assert [(t.name, t.shape) for t in unet.inputs] == [
        ("sample", ("batch", 4, "latent_height", "latent_width")), ("timestep", ()),
        ("encoder_hidden_states", ("batch", 77, 32))]
    out = engine.components["unet"].predict({"sample": np.zeros((3, 4, 6, 10), np.float32),
                                            "timestep": np.array(10.0, np.float32),
                                            "encoder_hidden_states": np.zeros((3, 77, 32), np.float32)})
    assert out["out_sample"].shape == (3, 4, 6, 10)


def test_prompts_tokenize_as_the_source_tokenizer_pads_and_cuts_them(engine, sd_source):
    prompts = ["a red square", "A  Green CIRCLE, photo!", "cat " * 100, "ünïcode ✓"]
    want = sd_source.module.tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(engine.encode_prompts(prompts), np.array(want))


@pytest.mark.parametrize("scheduler, diffusers_class, steps", [("euler", "EulerDiscreteScheduler", 3),
                                                               ("dpm++2m", "DPMSolverMultistepScheduler", 5)])
def test_images_match_diffusers_from_the_same_latents(engine, sd_engine, sd_source, scheduler, diffusers_class, steps):
    prompts = ["a green circle", "a cat"]
    latents = np.random.default_rng(3).standard_normal((2, 4, 12, 20), dtype=np.float32)  # 24 x 40 pixels
    got = engine.generate_image(prompts, negative_prompt="blue", steps=steps, guidance=5.0, scheduler=scheduler,
                                latents=latents)
    assert got.dtype == np.uint8 and got.shape == (2, 24, 40, 3)
    want = diffusers_pixels(sd_source.module, sd_engine, diffusers_class, prompts, latents, steps, guidance_scale=5.0,
                            negative_prompt=["blue"] * 2)
    assert np.abs(got.astype(int) - (want * 255).round()).max() <= 1
    unguided = diffusers_pixels(sd_source.module, sd_engine, diffusers_class, prompts, latents, steps, guidance_scale=5.0)
    assert np.abs(got.astype(int) - (unguided * 255).round()).max() > 1  # the negative prompt changed the image


def test_seeded_runs_repeat_and_guidance_one_skips_the_unconditional_pass(engine):
    first = engine.generate_image("a red square", steps=2, seed=5)
    np.testing.assert_array_equal(first, engine.generate_image("a red square", steps=2, seed=5))
    assert first.shape == (1, 32, 32, 3)
    assert not np.array_equal(first, engine.generate_image("a red square", steps=2, seed=6))
    unguided = engine.generate_image(["a red square"] * 40, steps=1, guidance=1.0)  # 40 > 31: allowed without guidance
    assert unguided.shape == (40, 32, 32, 3)


@pytest.mark.parametrize("options, message", [
    (dict(height=30), "height 30: expected a multiple of 4 pixels from 4 to 1024"),
    (dict(width=2048), "width 2048: expected a multiple of 4 pixels"),
    (dict(steps=0), "steps 0: expected an integer from 1 to 1000"),
    (dict(scheduler="lms"), "scheduler 'lms': expected one of ddim, euler, dpm\\+\\+2m"),
    (dict(latents=np.zeros((1, 4, 9, 8), np.float32)), "height 18: expected a multiple of 4"),
    (dict(latents=np.zeros((1, 3, 8, 8), np.float32)), r"latents: expected shape \[batch, 4, latent_height"),
])
def test_a_bad_size_or_option_is_refused_naming_what_is_allowed(engine, options, message):
    with pytest.raises(FeedError, match=message):
        engine.generate_image("a red square", **options)


def test_a_batch_beyond_the_captured_range_is_refused(engine):
    with pytest.raises(FeedError, match="batch 32: expected 1 to 31 prompts with guidance"):
        engine.generate_image(["a cat"] * 32, steps=1)


def test_running_an_engine_needs_neither_torch_nor_diffusers(sd_engine):
    script = (
        "import sys, numpy as np, runtimes\n"
        f"p = runtimes.load({str(sd_engine)!r})\n"
        "image = p.generate_image('a red square', steps=2, scheduler='dpm++2m')\n"
        "assert image.shape == (1, 32, 32, 3) and image.dtype == np.uint8\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
