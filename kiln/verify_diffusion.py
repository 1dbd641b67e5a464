"""Verification of a diffusion engine: each graph against its PyTorch module at two shapes (the guidance batch at
the default size, and one image at a non-square size), then the whole pipeline against diffusers' own from
the same latents (DDIM, 4 steps, guidance 7.5), compared in the uint8 pixels users get.

fp32 is gated on the graphs' error and the pixels; int8 on PSNR and SSIM against diffusers' fp32 images
(its graphs' raw error is reported). The int8 thresholds come from a measurement on tiny-sd (random weights,
MatMul weights and activations in int8, 4 and 25 DDIM steps): 45.8-46.3 dB and SSIM >= 0.9993 (max 6/255);
the gate (35 dB, SSIM 0.98) leaves about 11 dB and some 30 times the measured SSIM loss. Random weights are not
a trained model: a trained preset may move these figures.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.verify import output_error
from runtimes.diffusion import random_feeds, to_uint8_images


@dataclass(frozen=True)
class DiffusionTolerance:
    """The gates of one precision; None: the figure is reported, not gated."""

    component: float | None  # max |engine - PyTorch| of each graph's outputs, relative to the PyTorch output's range
    pixels: int | None  # max difference of the end-to-end image from diffusers', in uint8 steps (1 = 1/255)
    psnr: float | None = None  # min PSNR (dB) of the end-to-end images against diffusers'
    ssim: float | None = None  # min mean SSIM of the end-to-end images against diffusers'


TOLERANCES = {
    "fp32": DiffusionTolerance(component=1e-4, pixels=1),
    "int8": DiffusionTolerance(component=None, pixels=None, psnr=35.0, ssim=0.98),
}
PRECISIONS = tuple(TOLERANCES)


@dataclass(frozen=True)
class EndToEnd:
    """The end-to-end gate: one run of the pipeline from fixed latents."""

    prompts: tuple[str, ...] = ("a red square", "a blue circle")
    steps: int = 4
    guidance: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0


def verification_shapes(facts) -> list[dict[str, int]]:
    """The guidance batch (2) at the default latent size, and one image at a non-square size."""
    side, multiple = facts.sample_size, facts.latent_multiple
    narrow = max(multiple, side // 2 // multiple * multiple)
    return [{"batch": 2, "latent_height": side, "latent_width": side},
            {"batch": 1, "latent_height": narrow, "latent_width": side + multiple}]


def verify(engine, loaded, precision: str, gate: EndToEnd = EndToEnd(), profile: dict | None = None,
           recorded: None = None) -> dict:
    """Run every graph and the pipeline against PyTorch; returns the report (passed, failures, per-graph errors).

    `profile` (a TensorRT shape range) does not apply: no diffusion target builds a profiled engine yet. Nothing
    is `recorded` ahead (the kind has no `record`): the pipeline runs here, beside the engine."""
    from exporter.graphs import export_kind
    from runtimes.torch_adapter import TorchPredictor

    tolerance = TOLERANCES[precision]
    facts = loaded.facts
    functions = export_kind(loaded.kind, loaded.spec).load().eager_functions(loaded)
    vocab = loaded.module.text_encoder.config.vocab_size
    shapes = verification_shapes(facts)
    components = {}
    for role, graph in engine.components.items():
        reference = TorchPredictor(functions[role], graph.signature)
        got, want = [], []
        for seed, sizes in enumerate(shapes):
            feeds = random_feeds(graph.signature, {**sizes, "vocab": vocab}, seed=seed)
            got.append(graph.predict(feeds))
            want.append(reference.predict(feeds))
        components[role] = {name: output_error([g[name] for g in got], [w[name] for w in want]) for name in got[0]}
    end_to_end = end_to_end_error(engine, loaded, gate)
    failures = [
        f"{role}.{name}: max abs error {e['max_abs']:.3g} is {e['relative']:.3g} of the reference range, above "
        f"{tolerance.component:g}"
        for role, outputs in components.items() for name, e in outputs.items()
        if tolerance.component is not None and not e["relative"] <= tolerance.component
    ]
    if tolerance.pixels is not None and not end_to_end["max_pixel_error"] <= tolerance.pixels:
        failures.append(f"end to end: images differ from diffusers' by up to {end_to_end['max_pixel_error']}/255 "
                        f"(tolerance {tolerance.pixels}/255)")
    if tolerance.psnr is not None and not end_to_end["psnr"] >= tolerance.psnr:
        failures.append(f"end to end: PSNR {end_to_end['psnr']:.1f} dB against diffusers' images, below {tolerance.psnr:g}")
    if tolerance.ssim is not None and not end_to_end["ssim"] >= tolerance.ssim:
        failures.append(f"end to end: SSIM {end_to_end['ssim']:.4f} against diffusers' images, below {tolerance.ssim:g}")
    return {
        "passed": not failures,
        "failures": failures,
        "precision": precision,
        "tolerance": {"component_relative": tolerance.component, "pixels": tolerance.pixels, "psnr": tolerance.psnr,
                      "ssim": tolerance.ssim},
        "shapes": shapes,
        "components": components,
        "end_to_end": end_to_end,
    }


def end_to_end_error(engine, loaded, gate: EndToEnd) -> dict:
    """The engine's images and diffusers' from the same latents, compared in [0, 1] and in uint8 pixels."""
    facts = loaded.facts
    side = facts.sample_size
    shape = (len(gate.prompts), facts.latent_channels, side, side)
    latents = np.random.default_rng(gate.seed).standard_normal(shape, dtype=np.float32)
    pixels = engine.generate_decoded(list(gate.prompts), steps=gate.steps, guidance=gate.guidance,
                                    scheduler=gate.scheduler, latents=latents)
    got = np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    want = diffusers_images(loaded.module, gate, latents)
    got_uint8, want_uint8 = to_uint8_images(pixels), (want * 255).round().astype(np.uint8)
    return {
        "prompts": list(gate.prompts), "steps": gate.steps, "guidance": gate.guidance, "scheduler": gate.scheduler,
        "size": [side * facts.vae_scale_factor] * 2,
        "max_abs": float(np.abs(got - want).max()),
        "max_pixel_error": int(np.abs(got_uint8.astype(np.int16) - want_uint8.astype(np.int16)).max()),
        "psnr": psnr(got_uint8, want_uint8),
        "ssim": min(ssim(a, b) for a, b in zip(got_uint8, want_uint8)),
    }


# PSNR of equal images is infinite, which JSON cannot carry: report this ceiling instead.
PSNR_OF_EQUAL_IMAGES = 100.0


def psnr(got: np.ndarray, want: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 images in dB (`PSNR_OF_EQUAL_IMAGES` when they are equal)."""
    mse = float(np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2))
    return PSNR_OF_EQUAL_IMAGES if mse == 0 else min(PSNR_OF_EQUAL_IMAGES, float(10 * np.log10(255.0 ** 2 / mse)))


def ssim(got: np.ndarray, want: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity of two uint8 `[H, W, 3]` images, as scikit-image computes it by default: a
    7 x 7 uniform window, sample (co)variances, K1 0.01, K2 0.03, averaged over the channels."""
    from numpy.lib.stride_tricks import sliding_window_view

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    correction = window * window / (window * window - 1)
    means = []
    for channel in range(got.shape[-1]):
        x = sliding_window_view(got[..., channel].astype(np.float64), (window, window))
        y = sliding_window_view(want[..., channel].astype(np.float64), (window, window))
        mx, my = x.mean(axis=(-2, -1)), y.mean(axis=(-2, -1))
        vx = (x * x).mean(axis=(-2, -1)) - mx * mx
        vy = (y * y).mean(axis=(-2, -1)) - my * my
        cov = (x * y).mean(axis=(-2, -1)) - mx * my
        vx, vy, cov = vx * correction, vy * correction, cov * correction
        s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        means.append(s.mean())
    return float(np.mean(means))


def diffusers_images(pipeline, gate: EndToEnd, latents: np.ndarray) -> np.ndarray:
    """diffusers' own pipeline on `latents` with the gate's scheduler: float32 `[batch, H, W, 3]` in [0, 1]."""
    import diffusers
    import torch

    from runtimes.schedulers import DIFFUSERS_NAMES

    class_name = next(name for name, short in DIFFUSERS_NAMES.items() if short == gate.scheduler)
    original = pipeline.scheduler
    pipeline.scheduler = getattr(diffusers, class_name).from_config(original.config)
    try:
        with torch.inference_mode():
            return pipeline(list(gate.prompts), num_inference_steps=gate.steps, guidance_scale=gate.guidance,
                            latents=torch.from_numpy(latents), output_type="np").images
    finally:
        pipeline.scheduler = original


def summary(report: dict) -> str:
    """A report in one line: the worst graph error and the end-to-end pixel error."""
    worst = max(((f"{role}.{name}", e) for role, outputs in report["components"].items() for name, e in outputs.items()),
                key=lambda item: item[1]["relative"])
    e2e = report["end_to_end"]
    return (f"{'passed' if report['passed'] else 'FAILED'}; graphs within {worst[1]['relative']:.2e} of the range "
            f"(worst {worst[0]}, 2 shapes); end to end ({e2e['scheduler']}, {e2e['steps']} steps, guidance "
            f"{e2e['guidance']:g}) max error {e2e['max_abs']:.2e}, {e2e['max_pixel_error']}/255 in pixels, "
            f"PSNR {e2e['psnr']:.1f} dB, SSIM {e2e['ssim']:.4f} vs diffusers")
