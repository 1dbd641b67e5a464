"""The engine's tokenizer, when its source folder had one: text in and out of `generate`.

Only `tokenizers` is needed (a fast tokenizer's tokenizer.json), not transformers or torch.
"""
from __future__ import annotations

from pathlib import Path

from runtimes.errors import EngineError, FeedError


def load_tokenizer(engine_dir: Path, manifest: dict):
    """The `tokenizers.Tokenizer` stored in the engine, or None when it carries none."""
    folder = manifest.get("tokenizer")
    if not folder:
        return None
    path = Path(engine_dir) / folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise EngineError(f"{engine_dir}: the engine carries a tokenizer; install `tokenizers` to use it") from None
    return Tokenizer.from_file(str(path))


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Text prompts (a string or a list of strings) -> token id lists; ids pass through unchanged."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise FeedError("this engine carries no tokenizer: pass token ids instead of text")
        return [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    return prompts
