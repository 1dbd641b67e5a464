"""`kiln bench` on diffusion engines: seconds per UNet step and per image, beside diffusers' pipeline in eager
PyTorch, interleaved round by round after a warm-up (as `kiln.bench` does for decoders)."""
from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from kiln.bench import _cpu_name, _memory_gib, _spread
from runtimes.diffusion import latent_size, unet_feeds

PROMPT = "a red square"


@dataclass(frozen=True)
class ImageBenchConfig:
    size: int | None = None  # square images of this many pixels; None: each engine's default size
    steps: int = 10
    batch: int = 1  # prompts per image call; with guidance the UNet runs twice as many
    guidance: float = 7.5
    rounds: int = 3
    threads: int = 2


class EngineRunner:
    """A diffusion engine: one UNet step, one whole image."""

    def __init__(self, engine):
        self.engine = engine
        self.facts = engine.facts

    def unet_step(self, sample: np.ndarray, embeddings: np.ndarray) -> None:
        self.engine.components["unet"].forward(unet_feeds(sample, 500.0, embeddings))

    def image(self, latents: np.ndarray, config: ImageBenchConfig) -> None:
        self.engine.generate_image([PROMPT] * config.batch, steps=config.steps, guidance=config.guidance, latents=latents)

    def close(self) -> None:
        self.engine.close()


class DiffusersRunner:
    """The engine's source pipeline in diffusers, eager PyTorch: the same two measurements."""

    def __init__(self, loaded, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.pipeline = loaded.module
        self.facts = loaded.facts

    def unet_step(self, sample: np.ndarray, embeddings: np.ndarray) -> None:
        torch = self.torch
        with torch.inference_mode():
            self.pipeline.unet(torch.from_numpy(sample), torch.tensor(500.0), torch.from_numpy(embeddings))

    def image(self, latents: np.ndarray, config: ImageBenchConfig) -> None:
        with self.torch.inference_mode():
            self.pipeline([PROMPT] * config.batch, num_inference_steps=config.steps, guidance_scale=config.guidance,
                          latents=self.torch.from_numpy(latents), output_type="np")

    def close(self) -> None:
        pass


@dataclass
class ImageCandidate:
    label: str
    runner: object
    engine_dir: str | None
    size_bytes: int


def engine_candidate(engine_dir: Path, threads: int, trust_native_code: bool = False) -> ImageCandidate:
    import runtimes
    from kiln.backends import backend_named
    from runtimes.engine_dir import read_manifest

    manifest = read_manifest(engine_dir)
    backend = backend_named(manifest["backend"])
    engine = runtimes.load(engine_dir, trust_native_code=trust_native_code, **backend.bench_options(threads))
    return ImageCandidate(f"{Path(engine_dir).name} ({manifest['target']}/{manifest['precision']})", EngineRunner(engine),
                          str(engine_dir), sum(entry["bytes"] for entry in manifest["files"].values()))


def reference_candidate(engine_dir: Path, threads: int) -> ImageCandidate:
    from kiln.reference import load_source

    return ImageCandidate("diffusers eager", DiffusersRunner(load_source(engine_dir), threads), None, 0)


def bench(engine_dirs: list[Path], reference: bool = False, threads: int = 2, rounds: int = 3, size: int | None = None,
          steps: int = 10, batch: int = 1, trust_native_code: bool = False,
          on_progress: Callable[[str], None] | None = None) -> dict:
    """`kiln bench` of diffusion engines (and with `reference` their source in diffusers, the baseline)."""
    config = ImageBenchConfig(size=size, steps=steps, batch=batch, rounds=rounds, threads=threads)
    candidates = [engine_candidate(path, threads, trust_native_code) for path in engine_dirs]
    if reference:
        candidates.insert(0, reference_candidate(engine_dirs[0], threads))
    try:
        return run_image_bench(candidates, config, on_progress)
    finally:
        for candidate in candidates:
            candidate.runner.close()


def run_image_bench(candidates: list[ImageCandidate], config: ImageBenchConfig,
                    on_progress: Callable[[str], None] | None = None) -> dict:
    """Median seconds per UNet step (the guidance batch) and per image for each candidate; the first is the baseline."""
    facts = candidates[0].runner.facts
    latent_height, latent_width = latent_size(facts, config.size, config.size)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((config.batch, facts.latent_channels, latent_height, latent_width), dtype=np.float32)
    unet_batch = config.batch * (2 if config.guidance > 1 else 1)
    sample = np.concatenate([latents] * (unet_batch // config.batch))
    embeddings = rng.standard_normal((unet_batch, facts.text_length, facts.hidden_size), dtype=np.float32)
    samples = {c.label: {"unet_step": [], "image": []} for c in candidates}
    for round_index in range(config.rounds + 1):  # round 0 warms up and is discarded
        for candidate in candidates:
            if on_progress:
                on_progress(f"round {round_index}/{config.rounds}: {candidate.label}")
            start = time.perf_counter()
            candidate.runner.unet_step(sample, embeddings)
            step = time.perf_counter() - start
            start = time.perf_counter()
            candidate.runner.image(latents, config)
            image = time.perf_counter() - start
            if round_index:
                samples[candidate.label]["unet_step"].append(step)
                samples[candidate.label]["image"].append(image)
    results = []
    for candidate in candidates:
        figures = samples[candidate.label]
        results.append({"label": candidate.label, "engine_dir": candidate.engine_dir, "size_bytes": candidate.size_bytes,
                        "unet_step_ms": _spread(figures["unet_step"], 1e3), "image_s": _spread(figures["image"])})
    base = results[0]
    for entry in results:
        entry["vs_first"] = {key: base[key]["median"] / entry[key]["median"] for key in ("unet_step_ms", "image_s")}
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "memory_gib": _memory_gib(), "python": platform.python_version()},
        "config": asdict(config),
        "image": {"height": latent_height * facts.vae_scale_factor, "width": latent_width * facts.vae_scale_factor,
                  "unet_batch": unet_batch},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "engines": results,
    }


def table(report: dict) -> list[str]:
    """The report as Markdown table lines."""
    image, config = report["image"], report["config"]
    header = ["engine", "MB", f"UNet step ms (batch {image['unet_batch']})", f"image s ({config['steps']} steps)",
              "vs first (step)", "vs first (image)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for entry in report["engines"]:
        lines.append("| " + " | ".join([
            entry["label"], f"{entry['size_bytes'] / 1e6:.1f}", f"{entry['unet_step_ms']['median']:.1f}",
            f"{entry['image_s']['median']:.3f}", f"{entry['vs_first']['unet_step_ms']:.2f}x",
            f"{entry['vs_first']['image_s']:.2f}x"]) + " |")
    return lines


def plot(report: dict, path: Path) -> None:
    """Median ms per UNet step and seconds per image, one bar per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = report["engines"]
    labels = [e["label"] for e in engines]
    fig, (step_ax, image_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    step_ax.bar(labels, [e["unet_step_ms"]["median"] for e in engines])
    step_ax.set_ylabel(f"ms per UNet step, batch {report['image']['unet_batch']} (median)")
    image_ax.bar(labels, [e["image_s"]["median"] for e in engines])
    image_ax.set_ylabel(f"seconds per image, {report['config']['steps']} steps (median)")
    for axis in (step_ax, image_ax):
        axis.tick_params(axis="x", rotation=15)
    fig.suptitle(f"kiln bench, {report['image']['height']}x{report['image']['width']} images, "
                 f"{report['machine']['cores']} cores, {report['config']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
