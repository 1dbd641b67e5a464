"""Verification of a diffusion engine: each graph against its PyTorch module at two shapes (the guidance batch at
the default size, and one image at a non-square size), then the whole pipeline against diffusers' own from
the same latents (DDIM, 4 steps, guidance 7.5), compared in the uint8 pixels users get.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.verify import output_error
from runtimes.diffusion import random_feeds, to_uint8_images


@dataclass(frozen=True)
class DiffusionTolerance:
    component: float  # max |engine - PyTorch| of each graph's outputs, relative to the PyTorch output's range
    pixels: int  # max difference of the end-to-end image from diffusers', in uint8 steps (1 = 1/255)


TOLERANCES = {"fp32": DiffusionTolerance(component=1e-4, pixels=1)}
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


def verify(engine, loaded, precision: str, gate: EndToEnd = EndToEnd()) -> dict:
    """Run every graph and the pipeline against PyTorch; returns the report (passed, failures, per-graph errors)."""
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
        if not e["relative"] <= tolerance.component
    ]
    if not end_to_end["max_pixel_error"] <= tolerance.pixels:
        failures.append(f"end to end: images differ from diffusers' by up to {end_to_end['max_pixel_error']}/255 "
                        f"(tolerance {tolerance.pixels}/255)")
    return {
        "passed": not failures,
        "failures": failures,
        "precision": precision,
        "tolerance": {"component_relative": tolerance.component, "pixels": tolerance.pixels},
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
    return {
        "prompts": list(gate.prompts), "steps": gate.steps, "guidance": gate.guidance, "scheduler": gate.scheduler,
        "size": [side * facts.vae_scale_factor] * 2,
        "max_abs": float(np.abs(got - want).max()),
        "max_pixel_error": int(np.abs(to_uint8_images(pixels).astype(np.int16)
                                      - (want * 255).round().astype(np.int16)).max()),
    }


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
            f"{e2e['guidance']:g}) max error {e2e['max_abs']:.2e}, {e2e['max_pixel_error']}/255 in pixels vs diffusers")
