"""The diffusion kind on the export side: Stable-Diffusion-like pipelines from diffusers, their graphs by role,
and their eager reference.

Sources: a diffusers folder (`model_index.json`), a `package.module:factory` returning a diffusers pipeline,
or a preset built offline from configs. The IO contract (names, dims, size rules) is `runtimes.diffusion`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from exporter.errors import ModelSourceError
from exporter.families import Family
from exporter.graphs import GraphExport
from runtimes.diffusion import GRAPHS, TOKENIZER_FOLDER, PipelineFacts, contract_signatures

# The components a pipeline of this kind must have, as diffusers names its attributes.
COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
# diffusers' Upsample2D makes its input contiguous from batch 64 on: a branch the capture cannot keep, so graphs
# with an upsampler are captured for batches below it.
_UPSAMPLER_BATCH_LIMIT = 63
_MAX_LATENT_SIZE = 512

FAMILY = Family(
    "stable-diffusion", "stable-diffusion", positions="learned", max_positions=None, attention_registry=False,
    notes="text encoder (CLIP), UNet with cross-attention, VAE decoder; guidance and the scheduler in numpy",
    fusion_note="onnxscript's ORT fusions: the UNet's and CLIP's attention (MultiHeadAttention), skip layer norms",
)


class TextEncoder(torch.nn.Module):
    """CLIP's text tower: `input_ids` -> (`last_hidden_state`, `pooler_output`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids, return_dict=False)
        return out[0], out[1]


class UNet(torch.nn.Module):
    """The denoiser: (`sample`, `timestep` scalar, `encoder_hidden_states`) -> (`out_sample`,)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return (self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0],)


class VaeDecoder(torch.nn.Module):
    """`latent_sample` (already divided by the scaling factor) -> (`sample` in [-1, 1],)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return (self.vae.decode(latent_sample, return_dict=False)[0],)


def _diffusers():
    """diffusers, or ModelSourceError saying how to install it (converting a pipeline needs it; running one does not)."""
    try:
        import diffusers
    except ImportError:
        raise ModelSourceError("converting a diffusion pipeline needs diffusers: pip install 'torchkiln[diffusion]'") from None
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def accepts(source) -> bool:
    """A diffusers pipeline object (what a `package.module:factory` of this kind returns)."""
    return type(source).__module__.startswith("diffusers.") and hasattr(source, "components")


def load_folder(folder: Path) -> tuple[object, list[Path]]:
    """A diffusers pipeline folder (`model_index.json`, one subfolder per component) -> (pipeline, weight files)."""
    index = folder / "model_index.json"
    try:
        config = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{index}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    missing = [name for name in COMPONENTS if not (isinstance(config.get(name), list) and config[name][0])]
    if missing:
        raise ModelSourceError(f"{index}: no {', '.join(missing)} (a Stable-Diffusion-like pipeline has "
                               f"{', '.join(COMPONENTS)})")
    absent = [name for name in COMPONENTS if not (folder / name).is_dir()]
    if absent:
        raise ModelSourceError(f"{folder}: folder {absent[0]}/ is missing (model_index.json lists it)")
    diffusers = _diffusers()
    try:
        pipeline = diffusers.DiffusionPipeline.from_pretrained(
            folder, local_files_only=True, torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    except (ValueError, OSError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ModelSourceError(f"{folder}: diffusers cannot load the pipeline: {_first_line(e)}") from None
    return pipeline, sorted(p for pattern in ("*/*.safetensors", "*/*.bin") for p in folder.glob(pattern))


def build_preset(name: str, preset) -> object:
    """A pipeline built offline from the preset's component configs, with seeded random weights and a CLIP
    tokenizer over a small hand-built vocabulary (`tiny_clip_tokenizer`)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    diffusers = _diffusers()
    config = preset.config
    tokenizer = tiny_clip_tokenizer(config["tokenizer"]["words"], config["tokenizer"]["model_max_length"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **config["text_encoder"]))
        unet = diffusers.UNet2DConditionModel(**config["unet"])
        vae = diffusers.AutoencoderKL(**config["vae"])
    scheduler = getattr(diffusers, config["scheduler"]["_class_name"]).from_config(config["scheduler"])
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def tiny_clip_tokenizer(words: list[str], max_length: int):
    """A CLIP tokenizer (byte-pair, lower-cased, `</w>` marking word ends) over letters, digits and a few
    punctuation marks, with merges that spell each of `words` as one token."""
    from transformers import CLIPTokenizer

    symbols = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "r e", "re d</w>"
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)


def prepared(pipeline):
    """The pipeline with its torch components in float32 and eval mode, its progress bar off."""
    for role in ("text_encoder", "unet", "vae"):
        getattr(pipeline, role).float().eval()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def source_config(pipeline) -> dict:
    """The pipeline's `model_index.json` and each component's config, as the manifest records them."""
    config = {"model_index": json.loads(json.dumps(dict(pipeline.config), default=str))}
    for role in ("text_encoder", "unet", "vae", "scheduler"):
        component = getattr(pipeline, role).config
        as_dict = component.to_dict() if hasattr(component, "to_dict") else dict(component)
        config[role] = json.loads(json.dumps(as_dict, default=str))
    return config


def weights_sha256(pipeline) -> str:
    """sha256 over every component's parameters and buffers, by role and name: identifies weights built in memory."""
    digest = hashlib.sha256()
    for role in ("text_encoder", "unet", "vae"):
        for name, tensor in sorted(getattr(pipeline, role).state_dict().items()):
            digest.update(f"{role}.{name}".encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_facts(pipeline, where: str) -> PipelineFacts:
    """The sizes the contract and the driver need; ModelSourceError for a pipeline this kind cannot carry."""
    missing = [name for name in COMPONENTS if getattr(pipeline, name, None) is None]
    if missing:
        raise ModelSourceError(f"{where}: {type(pipeline).__name__} has no {', '.join(missing)} (a "
                               f"Stable-Diffusion-like pipeline has {', '.join(COMPONENTS)})")
    if getattr(pipeline, "text_encoder_2", None) is not None:
        raise ModelSourceError(f"{where}: {type(pipeline).__name__} has a second text encoder (SDXL-like), which the "
                               "diffusion contract does not carry yet")
    unet, vae, text, tokenizer = pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
    extras = {k: unet.config.get(k) for k in ("time_cond_proj_dim", "addition_embed_type", "class_embed_type")
              if unet.config.get(k) is not None}
    if extras:
        raise ModelSourceError(f"{where}: the UNet takes conditioning beyond text ({', '.join(f'{k}={v!r}' for k, v in extras.items())}), "
                               "which the diffusion contract does not carry")
    if vae.config.get("shift_factor") not in (None, 0, 0.0):
        raise ModelSourceError(f"{where}: the VAE has a shift_factor ({vae.config.shift_factor}), which the contract "
                               "does not apply")
    hidden = text.config.hidden_size
    if unet.config.cross_attention_dim != hidden:
        raise ModelSourceError(f"{where}: the UNet attends to width {unet.config.cross_attention_dim}, the text "
                               f"encoder gives {hidden}")
    sample_size = unet.config.sample_size
    if not isinstance(sample_size, int):
        raise ModelSourceError(f"{where}: unet/config.json sample_size {sample_size!r}: expected one integer (square)")
    text_length = min(int(tokenizer.model_max_length), int(text.config.max_position_embeddings))
    latent_multiple = 2 ** unet.num_upsamplers
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if sample_size % latent_multiple:
        raise ModelSourceError(f"{where}: unet/config.json sample_size {sample_size} is not a multiple of "
                               f"{latent_multiple} (2 ** its {unet.num_upsamplers} upsamplers)")
    return PipelineFacts(
        latent_channels=unet.config.in_channels, latent_multiple=latent_multiple, vae_scale_factor=vae_scale_factor,
        vae_scaling_factor=float(vae.config.scaling_factor), sample_size=sample_size, text_length=text_length,
        hidden_size=hidden, pad_token_id=int(tokenizer.pad_token_id),
        max_batch=_UPSAMPLER_BATCH_LIMIT if latent_multiple > 1 or vae_scale_factor > 1 else None,
        max_latent_size=_MAX_LATENT_SIZE,
    )


def _latent_dim(dim, name: str, multiple: int):
    """A latent side: `multiple * blocks` for the ONNX capture's named dims; AOTInductor's `Dim.DYNAMIC` hint takes
    no factor (the export derives the divisibility itself)."""
    blocks = dim(f"{name}_blocks", min=1, max=_MAX_LATENT_SIZE // multiple)
    try:
        return blocks * multiple if multiple > 1 else blocks
    except TypeError:
        return blocks


def graphs(loaded) -> dict[str, GraphExport]:
    """The kind's graphs by role: text encoder, UNet, VAE decoder, each with dynamic batch (and latent sides)."""
    pipeline, facts = loaded.module, loaded.facts
    signatures = contract_signatures(facts)
    side = facts.sample_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, pipeline.text_encoder.config.vocab_size, (2, facts.text_length), generator=generator)
    latents = torch.randn(2, facts.latent_channels, side, side, generator=generator)
    embeddings = torch.randn(2, facts.text_length, facts.hidden_size, generator=generator)
    limit = facts.max_batch

    def batch(dim):
        return dim("batch", min=1, max=limit) if limit else dim("batch", min=1)

    def unet_shapes(dim):
        height = _latent_dim(dim, "latent_height", facts.latent_multiple)
        width = _latent_dim(dim, "latent_width", facts.latent_multiple)
        b = batch(dim)
        return {"sample": {0: b, 2: height, 3: width}, "timestep": None, "encoder_hidden_states": {0: b}}

    def decoder_shapes(dim):
        return {"latent_sample": {0: batch(dim), 2: _latent_dim(dim, "latent_height", 1),
                                  3: _latent_dim(dim, "latent_width", 1)}}

    modules = eager_modules(loaded)
    return {
        "text_encoder": GraphExport(modules["text_encoder"], (ids,), lambda dim: {"input_ids": {0: dim("batch", min=1)}},
                                    signatures["text_encoder"]),
        "unet": GraphExport(modules["unet"], (latents, torch.tensor(999.0), embeddings), unet_shapes, signatures["unet"]),
        "vae_decoder": GraphExport(modules["vae_decoder"], (latents,), decoder_shapes, signatures["vae_decoder"]),
    }


def eager_modules(loaded) -> dict[str, torch.nn.Module]:
    pipeline = loaded.module
    return {"text_encoder": TextEncoder(pipeline.text_encoder).eval(), "unet": UNet(pipeline.unet).eval(),
            "vae_decoder": VaeDecoder(pipeline.vae).eval()}


def eager_functions(loaded) -> dict:
    """Each graph's source in PyTorch eager: tensors in its signature's input order -> its outputs."""
    modules = eager_modules(loaded)
    return {role: modules[role] for role in GRAPHS}


def manifest_fields(loaded) -> dict:
    """The pipeline's facts (VAE scaling factor, latent multiple, default size...) and where its tokenizer is."""
    return {"pipeline": loaded.facts.to_json(), "tokenizer": TOKENIZER_FOLDER}


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
