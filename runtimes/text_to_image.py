"""The diffusion kind's driver: text -> embeddings -> denoising loop with classifier-free guidance -> image,
and its Predictor.

Everything between the graphs (tokenizer, guidance, scheduler, pixel conversion) is numpy and `tokenizers`:
a service running these engines needs neither torch nor diffusers. The loop is diffusers'
StableDiffusionPipeline's, step for step, so an engine and diffusers agree from the same latents.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from runtimes.diffusion import (
    GRAPHS, SCHEDULER_CONFIG, TOKENIZER_FOLDER, PipelineFacts, check_batch, check_latents, latent_size,
    to_uint8_images, unet_feeds,
)
from runtimes.errors import EngineError, FeedError
from runtimes.predictor import Predictor
from runtimes.schedulers import scheduler_for


class DiffusionPredictor(Predictor):
    """An engine of the diffusion kind: `components[role].predict(feeds)` runs one graph; `generate_image` the
    whole text-to-image pipeline."""

    provenance = "built by torchkiln: verified at conversion, hash-checked at load"

    def __init__(self, graphs: Mapping[str, Predictor], facts: PipelineFacts, scheduler_config: Mapping,
                 tokenizer=None):
        missing = [role for role in GRAPHS if role not in graphs]
        if missing:
            raise EngineError(f"a diffusion engine has graphs {', '.join(GRAPHS)}; {', '.join(missing)} missing "
                              f"(got {', '.join(graphs) or 'none'})")
        self.graphs = dict(graphs)
        self.components = self.graphs
        self.facts = facts
        self.scheduler_config = dict(scheduler_config)
        self.tokenizer = tokenizer
        self.signature = self.graphs["unet"].signature

    @classmethod
    def from_engine_dir(cls, graphs: Mapping[str, Predictor], engine_dir: Path, manifest: Mapping) -> DiffusionPredictor:
        """The Predictor over opened `graphs`, with the facts, scheduler config and tokenizer the engine carries."""
        engine_dir = Path(engine_dir)
        if "pipeline" not in manifest:
            raise EngineError(f"{engine_dir}/manifest.json: field 'pipeline' is missing (a diffusion engine records its "
                              "pipeline's sizes there)")
        facts = PipelineFacts.from_json(manifest["pipeline"], f"{engine_dir}/manifest.json")
        path = engine_dir / SCHEDULER_CONFIG
        try:
            scheduler_config = json.loads(path.read_text())
        except FileNotFoundError:
            raise EngineError(f"{path}: missing (a diffusion engine carries its scheduler's config)") from None
        except json.JSONDecodeError as e:
            raise EngineError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return cls(graphs, facts, scheduler_config, load_clip_tokenizer(engine_dir / TOKENIZER_FOLDER, facts))

    def predict(self, feeds):
        """One forward pass of the graph whose inputs are exactly `feeds`' names (`components[role]` names it)."""
        names = set(feeds)
        for graph in self.graphs.values():
            if names == {t.name for t in graph.signature.inputs}:
                return graph.predict(feeds)
        known = "; ".join(f"{role}: {', '.join(t.name for t in g.signature.inputs)}" for role, g in self.graphs.items())
        raise FeedError(f"inputs {', '.join(sorted(names)) or 'none'} match no graph of this engine ({known})")

    def forward(self, feeds):
        return self.predict(feeds)

    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> token ids `[batch, text_length]`, padded and cut as diffusers' pipeline does."""
        if self.tokenizer is None:
            raise FeedError("this engine carries no tokenizer: pass prompt_ids instead of text")
        return np.array([e.ids for e in self.tokenizer.encode_batch(list(prompts))], dtype=np.int64)

    def generate_image(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] = "",
                       steps: int = 25, guidance: float = 7.5, seed: int = 0, height: int | None = None,
                       width: int | None = None, scheduler: str | None = None, latents: np.ndarray | None = None,
                       **token_ids) -> np.ndarray:
        """Images for `prompt` (a string or a list), uint8 `[batch, height, width, 3]`; `generate_decoded` says
        what each option does."""
        return to_uint8_images(self.generate_decoded(
            prompt, negative_prompt, steps=steps, guidance=guidance, seed=seed, height=height, width=width,
            scheduler=scheduler, latents=latents, **token_ids))

    def generate_decoded(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] = "",
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        latents: np.ndarray | None = None,
        prompt_ids: np.ndarray | None = None,
        negative_prompt_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """The VAE's output for `prompt`, float32 `[batch, 3, height, width]` in [-1, 1] (`generate_image` rounds it).

        `guidance` > 1 runs classifier-free guidance against `negative_prompt`. `scheduler` is "ddim", "euler",
        "dpm++2m" or "pndm" (None: the one the engine's scheduler_config.json names). `latents [batch, channels,
        height / f, width / f]` (f = `facts.vae_scale_factor`) are the starting noise, scaled by the scheduler's
        initial sigma as diffusers does; without them they are drawn from `seed` (numpy's generator, so
        they are not torch's for the same seed). Token ids may replace the text (`prompt_ids`, `[batch, text_length]`).
        """
        facts = self.facts
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= 1000:
            raise FeedError(f"steps {steps!r}: expected an integer from 1 to 1000")
        ids = self._ids(prompt, prompt_ids, "prompt")
        batch = len(ids)
        guided = guidance > 1.0
        check_batch(facts, batch, guided)
        if latents is not None:
            latents = check_latents(facts, latents)
            if latents.shape[0] != batch:
                raise FeedError(f"latents: batch {latents.shape[0]} for {batch} prompt(s)")
            if (height, width) != (None, None) and (height, width) != tuple(s * facts.vae_scale_factor for s in latents.shape[2:]):
                raise FeedError(f"height/width {height}x{width} disagree with the latents' "
                                f"{latents.shape[2] * facts.vae_scale_factor}x{latents.shape[3] * facts.vae_scale_factor}")
        else:
            latent_height, latent_width = latent_size(facts, height, width)
            shape = (batch, facts.latent_channels, latent_height, latent_width)
            latents = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        loop = scheduler_for(self.scheduler_config, scheduler, source=SCHEDULER_CONFIG)
        loop.set_timesteps(int(steps))

        embeddings = self._embed(ids)
        if guided:
            if isinstance(negative_prompt, str) and negative_prompt_ids is None:
                negative_prompt = [negative_prompt] * batch
            negative = self._ids(negative_prompt, negative_prompt_ids, "negative_prompt")
            if len(negative) != batch:
                raise FeedError(f"negative_prompt: {len(negative)} for {batch} prompt(s)")
            embeddings = np.concatenate([self._embed(negative), embeddings])  # unconditional first, as diffusers
        latents = latents * loop.init_noise_sigma
        for index, timestep in enumerate(loop.timesteps):
            model_input = np.concatenate([latents, latents]) if guided else latents
            model_input = loop.scale_model_input(model_input, index)
            noise = self.graphs["unet"].forward(unet_feeds(model_input, timestep, embeddings))["out_sample"]
            if guided:
                unconditional, conditional = np.split(noise, 2)
                noise = unconditional + np.float32(guidance) * (conditional - unconditional)
            latents = loop.step(noise, index, latents)
        return self.graphs["vae_decoder"].forward(
            {"latent_sample": (latents / np.float32(facts.vae_scaling_factor)).astype(np.float32)})["sample"]

    def _ids(self, text, ids, name: str) -> np.ndarray:
        if ids is not None:
            ids = np.asarray(ids, dtype=np.int64)
            if ids.ndim != 2 or ids.shape[1] != self.facts.text_length:
                raise FeedError(f"{name}_ids: expected [batch, {self.facts.text_length}], got {list(ids.shape)}")
            return ids
        if text is None:
            raise FeedError(f"{name}: give text or {name}_ids")
        prompts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(p, str) for p in prompts):
            raise FeedError(f"{name}: expected a string or a list of strings")
        check_batch(self.facts, len(prompts), guided=False)
        return self.encode_prompts(prompts)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.graphs["text_encoder"].forward({"input_ids": ids})["last_hidden_state"]

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.close()


def load_clip_tokenizer(folder: Path, facts: PipelineFacts):
    """The engine's `tokenizer/tokenizer.json`, set to pad and cut to `text_length` with the pad id, as diffusers'
    pipeline calls its tokenizer (`padding="max_length", truncation=True`); None when the engine has none."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise EngineError(f"{folder}: the engine carries a tokenizer; install `tokenizers` to use it") from None
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(facts.text_length)
    tokenizer.enable_padding(length=facts.text_length, pad_id=facts.pad_token_id,
                             pad_token=tokenizer.id_to_token(facts.pad_token_id) or "")
    return tokenizer
