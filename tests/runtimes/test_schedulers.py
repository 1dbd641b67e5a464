"""The numpy schedulers follow diffusers' own step for step: same timesteps, same samples from the same model outputs."""
import numpy as np
import pytest

from runtimes import FeedError
from runtimes.schedulers import DIFFUSERS_NAMES, SCHEDULERS, scheduler_for

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

# Stable Diffusion 1.x's schedule (tiny-sd's), and diffusers' defaults; with the spacings and predictions configs use.
# (skip_prk_steps is PNDM's; the others ignore it.)
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
          steps_offset=1, timestep_spacing="leading", skip_prk_steps=True)
CONFIGS = {
    "sd": SD,
    "linear-trailing-v": dict(beta_schedule="linear", timestep_spacing="trailing", prediction_type="v_prediction",
                              skip_prk_steps=True),
    "cosine-linspace": dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", clip_sample=False,
                            skip_prk_steps=True),
}


def fake_unet(sample: np.ndarray, timestep) -> np.ndarray:
    """A deterministic stand-in for the UNet: depends on the sample and the timestep, as a real one does."""
    return (np.tanh(sample * 0.7) + np.float32(float(timestep) / 1000.0)).astype(np.float32)


def run_diffusers(scheduler, latents: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    scheduler.set_timesteps(steps)
    sample = torch.from_numpy(latents) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        output = torch.from_numpy(fake_unet(model_input.numpy(), t))
        sample = scheduler.step(output, t, sample, return_dict=False)[0]
    return scheduler.timesteps.numpy(), sample.numpy()


def run_numpy(loop, latents: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    loop.set_timesteps(steps)
    sample = latents * loop.init_noise_sigma
    for index, t in enumerate(loop.timesteps):
        output = fake_unet(loop.scale_model_input(sample, index), t)
        sample = loop.step(output, index, sample)
    return loop.timesteps, sample


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("diffusers_class, name", list(DIFFUSERS_NAMES.items()))
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_a_loop_matches_diffusers(diffusers_class, name, config_name, steps):
    source = getattr(diffusers, diffusers_class).from_config(CONFIGS[config_name])
    latents = np.random.default_rng(steps).standard_normal((2, 4, 8, 8), dtype=np.float32)
    want_t, want = run_diffusers(source, latents, steps)
    got_t, got = run_numpy(scheduler_for(dict(source.config), name), latents, steps)
    np.testing.assert_array_equal(got_t, want_t)
    assert got.dtype == np.float32
    # torch.linspace rounds a few betas one float32 step apart from ours: the error stays ~1e-6 of the samples'
    # range, up to 3e-5 where one step divides by the last cumulative alpha (4e-5 on a linear schedule).
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_a_config_of_one_scheduler_drives_another_as_from_config_does():
    ddim_config = dict(diffusers.DDIMScheduler.from_config(SD).config, skip_prk_steps=True)
    for diffusers_class, name in DIFFUSERS_NAMES.items():
        source = getattr(diffusers, diffusers_class).from_config(ddim_config)
        latents = np.ones((1, 4, 4, 4), np.float32)
        want_t, want = run_diffusers(source, latents, 5)
        got_t, got = run_numpy(scheduler_for(ddim_config, name), latents, 5)
        np.testing.assert_array_equal(got_t, want_t)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_config_s_class_is_the_default_and_others_are_named():
    config = dict(diffusers.EulerDiscreteScheduler.from_config(SD).config, _class_name="EulerDiscreteScheduler")
    assert scheduler_for(config).name == "euler"
    with pytest.raises(FeedError, match="LMSDiscreteScheduler.*pass scheduler= one of ddim, euler, dpm\\+\\+2m, pndm"):
        scheduler_for(dict(config, _class_name="LMSDiscreteScheduler"))
    with pytest.raises(FeedError, match="scheduler 'lms': expected one of " + ", ".join(SCHEDULERS).replace("+", "\\+")):
        scheduler_for(config, "lms")


@pytest.mark.parametrize("key, value, name", [("use_karras_sigmas", True, "euler"), ("thresholding", True, "ddim"),
                                              ("beta_schedule", "sigmoid", "ddim"), ("timestep_spacing", "odd", "euler"),
                                              ("skip_prk_steps", False, "pndm")])
def test_an_option_not_implemented_is_refused_naming_it(key, value, name):
    with pytest.raises(FeedError, match=key):
        loop = scheduler_for({key: value}, name, source="scheduler/scheduler_config.json")
        loop.set_timesteps(4)
