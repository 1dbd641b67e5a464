"""The diffusion kind: its IO contract, signatures, size rules and feed builders, in numpy only.

An engine of this kind is a text-to-image pipeline of graphs by role, in Optimum's layout (`<role>/model.onnx`):
- `text_encoder`: `input_ids [batch, text_length]` (int64) -> `last_hidden_state [batch, text_length, hidden]`,
  `pooler_output [batch, hidden]`
- `unet`: `sample [batch, channels, latent_height, latent_width]`, `timestep []` (a float32 scalar),
  `encoder_hidden_states [batch, text_length, hidden]` -> `out_sample [batch, channels, latent_height, latent_width]`
- `vae_decoder`: `latent_sample [batch, channels, latent_height, latent_width]` -> `sample [batch, 3, height, width]`

Latent sides must be multiples of `latent_multiple` (2 ** the UNet's upsamplers): the exported graph drops
diffusers' own check, so sizes are checked here, before any graph runs. Guidance, the scheduler and the
tokenizer run outside the graphs (`runtimes.text_to_image`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Mapping

import numpy as np

from runtimes.errors import EngineError, FeedError
from runtimes.signature import Signature, TensorSpec

KIND = "diffusion"
GRAPHS = ("text_encoder", "unet", "vae_decoder")
TOKENIZER_FOLDER = "tokenizer"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


@dataclass(frozen=True)
class PipelineFacts:
    """Sizes of one Stable-Diffusion-like pipeline: what its graphs' contract and the driver are built from."""

    latent_channels: int  # the UNet's in/out channels (4 for Stable Diffusion)
    latent_multiple: int  # latent sides must be multiples of this: 2 ** the UNet's upsamplers
    vae_scale_factor: int  # image pixels per latent pixel: 2 ** (VAE blocks - 1)
    vae_scaling_factor: float  # latents are divided by it before the VAE decodes them
    sample_size: int  # the UNet's default latent side
    text_length: int  # prompts are padded or cut to this many tokens
    hidden_size: int  # the text encoder's width, the UNet's cross-attention width
    pad_token_id: int
    max_batch: int | None = None  # graphs with an upsampler are captured for batches below 64 (diffusers branches there)
    max_latent_size: int = 1024  # the largest latent side the graphs were captured for

    @property
    def pixel_multiple(self) -> int:
        return self.latent_multiple * self.vae_scale_factor

    @property
    def default_size(self) -> int:
        """The image side the UNet was configured for, in pixels."""
        return self.sample_size * self.vae_scale_factor

    def to_json(self) -> dict:
        return {**asdict(self), "pixel_multiple": self.pixel_multiple, "default_size": self.default_size}

    @classmethod
    def from_json(cls, data: Mapping, where: str = "manifest") -> PipelineFacts:
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise EngineError(f"{where}: field 'pipeline' is incomplete ({e})") from None


def contract_signatures(facts: PipelineFacts) -> dict[str, Signature]:
    """The signature of each graph role of this kind."""
    channels, text, hidden = facts.latent_channels, facts.text_length, facts.hidden_size
    latent = ("batch", channels, "latent_height", "latent_width")
    return {
        "text_encoder": Signature(
            (TensorSpec("input_ids", "int64", ("batch", text)),),
            (TensorSpec("last_hidden_state", "float32", ("batch", text, hidden)),
             TensorSpec("pooler_output", "float32", ("batch", hidden))),
        ),
        "unet": Signature(
            (TensorSpec("sample", "float32", latent), TensorSpec("timestep", "float32", ()),
             TensorSpec("encoder_hidden_states", "float32", ("batch", text, hidden))),
            (TensorSpec("out_sample", "float32", latent),),
        ),
        "vae_decoder": Signature(
            (TensorSpec("latent_sample", "float32", latent),),
            (TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
        ),
    }


def latent_size(facts: PipelineFacts, height: int | None, width: int | None) -> tuple[int, int]:
    """(latent height, latent width) for an image of `height` x `width` pixels (None: the default size).

    FeedError naming the allowed values when a side is not a multiple of `pixel_multiple` or out of range.
    """
    sides = []
    step = facts.pixel_multiple
    largest = facts.max_latent_size // facts.latent_multiple * step
    for name, value in (("height", height), ("width", width)):
        value = facts.default_size if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not step <= value <= largest or value % step:
            raise FeedError(
                f"{name} {value!r}: expected a multiple of {step} pixels from {step} to {largest} (the UNet's latent "
                f"sides are multiples of {facts.latent_multiple}, the VAE decodes {facts.vae_scale_factor} pixels per "
                f"latent pixel); the default is {facts.default_size}"
            )
        sides.append(int(value) // facts.vae_scale_factor)
    return sides[0], sides[1]


def check_latents(facts: PipelineFacts, latents: np.ndarray) -> np.ndarray:
    """`latents [batch, channels, latent_height, latent_width]` as float32, or FeedError naming what is allowed."""
    latents = np.asarray(latents)
    if latents.ndim != 4 or latents.shape[1] != facts.latent_channels:
        raise FeedError(f"latents: expected shape [batch, {facts.latent_channels}, latent_height, latent_width], "
                        f"got {list(latents.shape)}")
    latent_size(facts, latents.shape[2] * facts.vae_scale_factor, latents.shape[3] * facts.vae_scale_factor)
    if not np.isfinite(latents).all():
        raise FeedError("latents: contains NaN or infinite values")
    return latents.astype(np.float32, copy=False)


def check_batch(facts: PipelineFacts, prompts: int, guided: bool) -> None:
    """FeedError when `prompts` images (twice that through the UNet with guidance) exceed what the graphs take."""
    if prompts < 1:
        raise FeedError("prompt: expected at least one prompt")
    if facts.max_batch is None:
        return
    per_prompt = 2 if guided else 1
    if prompts * per_prompt > facts.max_batch:
        raise FeedError(
            f"batch {prompts}: expected 1 to {facts.max_batch // per_prompt} prompts "
            f"{'with guidance (the UNet runs 2 per prompt' if guided else '(the UNet runs 1 per prompt'}, "
            f"at most {facts.max_batch}: the graphs were captured for batches below 64, where diffusers' upsampler branches)"
        )


def unet_feeds(sample: np.ndarray, timestep, embeddings: np.ndarray) -> dict[str, np.ndarray]:
    return {"sample": np.ascontiguousarray(sample, dtype=np.float32), "timestep": np.asarray(timestep, dtype=np.float32),
            "encoder_hidden_states": embeddings}


def random_feeds(signature: Signature, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for one graph with its symbolic dims set from `sizes`: for verification and bench."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in signature.inputs:
        shape = tuple(d if isinstance(d, int) else sizes[d] for d in spec.shape)
        if spec.dtype == "int64":
            feeds[spec.name] = rng.integers(0, sizes.get("vocab", 100), size=shape, dtype=np.int64)
        elif spec.name == "timestep":
            feeds[spec.name] = np.asarray(rng.integers(1, 1000), dtype=np.float32)
        else:
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def to_uint8_images(decoded: np.ndarray) -> np.ndarray:
    """The VAE's `sample [batch, 3, H, W]` in [-1, 1] -> uint8 `[batch, H, W, 3]`, rounded as diffusers' `numpy_to_pil`."""
    pixels = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return (pixels * 255).round().astype(np.uint8)
