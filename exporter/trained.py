"""A confident preset: a tiny model trained in-process on a synthetic corpus, so quantization error shows.

Random weights give nearly flat logits, where any error flips the top-1 token and fidelity figures say
nothing. This model learns modular arithmetic sequences (`a, a+d, a+2d, ... mod M`): after two tokens the
next one is certain, so its logits have wide margins. Training is seeded and takes well under a minute on
2 CPU cores; the weights are cached, keyed by config, seed and `TRAINING_VERSION`, beside a word-level
tokenizer that spells each number token as its decimal ("5 8 11" -> the next is "14"), so the engine
takes and gives text.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Bump when the corpus or the training loop changes: cached weights of older versions are not reused.
TRAINING_VERSION = 1

BOS = 1
FIRST_NUMBER = 3  # token ids 0..2 are pad/bos/eos; numbers 0..modulus-1 follow


@dataclass(frozen=True)
class Corpus:
    """Arithmetic sequences: a start `a` and a step `d` drawn per sequence, then `a + k*d mod modulus`."""

    modulus: int = 64
    steps: tuple[int, ...] = (1, 2, 3, 5, 7)
    length: int = 48  # tokens per sequence, BOS included


@dataclass(frozen=True)
class Training:
    steps: int = 300
    batch: int = 16
    learning_rate: float = 5e-3
    warmup: int = 20


def sequences(count: int, seed: int, corpus: Corpus = Corpus()) -> np.ndarray:
    """`count` corpus sequences as token ids, `[count, corpus.length]`, int64; BOS first."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, corpus.modulus, size=(count, 1))
    step = np.asarray(corpus.steps)[rng.integers(0, len(corpus.steps), size=(count, 1))]
    k = np.arange(corpus.length - 1)[None, :]
    numbers = (start + k * step) % corpus.modulus + FIRST_NUMBER
    return np.concatenate([np.full((count, 1), BOS), numbers], axis=1).astype(np.int64)


# Training draws from seeds below this; held-out sequences from seeds at and above it.
_HELDOUT_SEED_BASE = 1_000_000


def heldout_sequences(count: int = 16, seed: int = 0, corpus: Corpus = Corpus()) -> np.ndarray:
    """Sequences from a seed stream training never uses, `[count, corpus.length]`: for fidelity checks.

    The corpus is small enough that some held-out sequences also occur in training; what matters for
    fidelity is that the model is confident on them, which it is on every sequence of the corpus.
    """
    return sequences(count, _HELDOUT_SEED_BASE + seed, corpus)


def cache_dir() -> Path:
    from plugins.cache import user_cache_dir

    return user_cache_dir() / "trained"


def cache_key(config: dict, seed: int, corpus: Corpus = Corpus(), training: Training = Training()) -> str:
    text = json.dumps(
        {"config": config, "seed": seed, "corpus": asdict(corpus), "training": asdict(training),
         "version": TRAINING_VERSION},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_trained_weights(module, name: str, config: dict, seed: int) -> Path:
    """Give `module` its trained weights: from the cache, or trained now and cached.

    Returns the cached folder: `weights.pt` and the corpus's `tokenizer.json`.
    """
    import torch

    folder = cache_dir() / f"{name}-{cache_key(config, seed)}"
    path = folder / "weights.pt"
    if not path.is_file():
        train(module, seed)
        folder.mkdir(parents=True, exist_ok=True)
        # Write then rename: a concurrent or interrupted build never leaves a truncated cache file.
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        torch.save(module.state_dict(), temporary)
        os.replace(temporary, path)
    module.load_state_dict(torch.load(path, weights_only=True))
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        temporary = tokenizer.with_name(f".{tokenizer.name}.{os.getpid()}")
        corpus_tokenizer(config["vocab_size"]).save(str(temporary))
        os.replace(temporary, tokenizer)
    return folder


def corpus_tokenizer(vocab_size: int, corpus: Corpus = Corpus()):
    """A `tokenizers.Tokenizer` over the corpus's words: "<pad>" "<s>" "</s>", then each number as its decimal."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<pad>": 0, "<s>": BOS, "</s>": 2, **{str(n): FIRST_NUMBER + n for n in range(corpus.modulus)}}
    vocab["<unk>"] = vocab_size - 1  # ids past the numbers are never trained on
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    return tokenizer


def train(module, seed: int, corpus: Corpus = Corpus(), training: Training = Training()) -> list[float]:
    """Train `module` (a transformers causal LM) in place on the corpus; returns the loss per step."""
    import torch

    threads = torch.get_num_threads()
    # One thread: steps this small gain nothing from two, and lose a lot when the other core is busy.
    torch.set_num_threads(1)
    try:
        return _train_steps(module, seed, corpus, training)
    finally:
        torch.set_num_threads(threads)


def _train_steps(module, seed: int, corpus: Corpus, training: Training) -> list[float]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.train()
        optimizer = torch.optim.AdamW(module.parameters(), lr=training.learning_rate, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / training.warmup) * max(0.05, 1 - step / training.steps)
        )
        losses = []
        for step in range(training.steps):
            batch = torch.from_numpy(sequences(training.batch, seed * 100_000 + step, corpus))
            loss = module(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        module.eval()
    return losses
