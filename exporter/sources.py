"""`load_model(spec)`: a preset name, a local Hugging Face folder, or a `package.module:factory`."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ModelSourceError
from exporter.families import Family, family_of
from exporter.graphs import KINDS, export_kind
from exporter.presets import PRESETS
from runtimes.decoder_lm import ModelFacts

# Models come from local files only: never let transformers reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class LoadedModel:
    module: "torch.nn.Module"  # a transformers causal LM, fp32, eval mode (or the source of another kind: a diffusers pipeline)
    family: Family
    facts: ModelFacts  # or the facts of another kind (runtimes.diffusion.PipelineFacts)
    config: "transformers.PretrainedConfig"  # or a dict of the source's configs (a pipeline's, by component)
    spec: str
    origin: str  # "preset" | "folder" | "factory"
    weights_sha256: str
    tokenizer_dir: Path | None = None
    kind: str = "decoder-lm"  # the model kind (exporter.graphs.KINDS): its IO contract and graphs


def load_model(spec: str, trust_remote_code: bool = False) -> LoadedModel:
    """Resolve `spec` and build the model.

    A `package.module:factory` spec imports and runs that code: only pass specs you trust.
    """
    if spec in PRESETS:
        return _load_preset(spec)
    if _FACTORY.match(spec) and not Path(spec).exists():
        return _load_factory(spec)
    if "/" in spec or os.sep in spec or Path(spec).exists():
        return _load_folder(Path(spec), trust_remote_code)
    raise ModelSourceError(
        f"{spec!r} is not a preset, a model folder or a package.module:factory "
        f"(presets: {', '.join(PRESETS)})"
    )


def _load_preset(name: str) -> LoadedModel:
    import torch
    import transformers

    preset = PRESETS[name]
    kind = export_kind(preset.kind, name)
    if kind.folder_marker:
        return _own_source(kind, kind.load().build_preset(name, preset), name, "preset")
    auto_class = getattr(transformers, kind.load().AUTO_CLASS)
    config = transformers.AutoConfig.for_model(preset.model_type, **preset.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        module = auto_class.from_config(config, dtype=torch.float32)
    tokenizer_dir = None
    if preset.trained:
        from exporter.trained import load_trained_weights

        tokenizer_dir = load_trained_weights(module, name, preset.config, preset.seed)
    loaded = _loaded(module, name, "preset", state_dict_sha256(module), preset.kind)
    loaded.tokenizer_dir = tokenizer_dir
    return loaded


def _load_factory(spec: str) -> LoadedModel:
    import torch

    module_name, attr = spec.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ModelSourceError(f"{spec}: cannot import module {module_name!r} ({e})") from None
    except AttributeError:
        raise ModelSourceError(f"{spec}: module {module_name!r} has no attribute {attr!r}") from None
    module = factory()
    for kind in KINDS.values():
        if kind.folder_marker and kind.load().accepts(module):
            return _own_source(kind, module, spec, "factory")
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "config"):
        raise ModelSourceError(
            f"{spec}: the factory returned {type(module).__name__}; expected a transformers causal LM "
            "(an nn.Module with a transformers .config) or a diffusers pipeline"
        )
    return _loaded(module.float(), spec, "factory", state_dict_sha256(module), "decoder-lm")


def _load_folder(folder: Path, trust_remote_code: bool) -> LoadedModel:
    import torch
    import transformers

    if not folder.is_dir():
        raise ModelSourceError(f"{folder}: no such model folder")
    for own in KINDS.values():
        if own.folder_marker and (folder / own.folder_marker).is_file():
            source, weights = own.load().load_folder(folder)
            return _own_source(own, source, str(folder), "folder", files_sha256(weights) if weights else None)
    kind = "decoder-lm"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{config_path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelSourceError(f"{config_path}: field 'model_type' is missing")
    weights = sorted(p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern))
    if not weights:
        raise ModelSourceError(f"{folder}: no weights (expected *.safetensors or pytorch_model.bin)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ModelSourceError(f"{config_path}: {_first_line(e)}") from None
    auto_class = getattr(transformers, export_kind(kind, str(folder)).load().AUTO_CLASS)
    model_class = _model_class(config, auto_class)
    if model_class is None:
        raise ModelSourceError(f"{config_path}: model_type {config.model_type!r} is not a model transformers' "
                               f"{auto_class.__name__} builds (not a {kind} model)")
    try:
        # transformers reads safetensors when present and torch.load(weights_only=True) otherwise.
        transformers.utils.logging.disable_progress_bar()  # convert shows its own progress
        module, info = model_class.from_pretrained(
            folder, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code,
            local_files_only=True, output_loading_info=True,
        )
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise ModelSourceError(f"{folder}: cannot load the weights: {_first_line(e)}") from None
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "mismatched_keys", "unexpected_keys")}
    if problems:
        problem, names = next(iter(problems.items()))
        raise ModelSourceError(
            f"{folder}: the weights do not match config.json ({problem.replace('_', ' ')}: {', '.join(map(str, list(names)[:3]))})"
        )
    tokenizer_dir = folder if any((folder / f).exists() for f in _TOKENIZER_FILES) else None
    loaded = _loaded(module, str(folder), "folder", files_sha256(weights), kind)
    loaded.tokenizer_dir = tokenizer_dir
    return loaded


def _model_class(config, auto_class):
    """The auto class where it maps this config; else the config's own `architectures` entry when that is
    one of the auto class's models built from this config type. A text tower saves its own config type (Emu3ForCausalLM writes
    `emu3_text_model`), which no auto mapping lists, though transformers built the model from it."""
    import transformers

    if type(config) in auto_class._model_mapping or getattr(config, "auto_map", None):
        return auto_class
    known = set(auto_class._model_mapping.values())
    return next((cls for name in getattr(config, "architectures", None) or []
                 if (cls := getattr(transformers, name, None)) in known and isinstance(config, cls.config_class)), None)


def _own_source(kind, source, spec: str, origin: str, weights_sha256: str | None = None) -> LoadedModel:
    """A LoadedModel of a kind that loads its own sources (`ExportKind.folder_marker`)."""
    module = kind.load()
    facts = module.model_facts(source, spec)
    return LoadedModel(module.prepared(source), module.FAMILY, facts, module.source_config(source), spec, origin,
                       weights_sha256 or module.weights_sha256(source), kind=kind.name)


def _loaded(module, spec: str, origin: str, weights_sha256: str, kind: str) -> LoadedModel:
    import transformers

    transformers.logging.set_verbosity_error()
    module.eval()
    config = module.config
    facts = export_kind(kind, spec).load().model_facts(module, spec)
    return LoadedModel(module, family_of(config, type(module)), facts, config, spec, origin, weights_sha256, kind=kind)


def state_dict_sha256(module) -> str:
    """sha256 over every parameter and buffer, by name: identifies weights built in memory."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """sha256 over the weight files' names and bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
