"""`--calibration FILE`: the token ids static quantization calibrates on, from a text file or an `.npz`.

Text is tokenized with the model's own tokenizer (its folder's `tokenizer.json`) and cut into rows of
`ROW_TOKENS`; an `.npz` holds token ids (`input_ids`, or its one array), `[rows, sequence]` or one row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import KilnError

ROW_TOKENS = 64  # tokens per calibration prefill; shorter when the model has fewer positions


@dataclass(frozen=True)
class Calibration:
    feeds: list[dict]  # one prefill per row, in the decoder-LM contract's names
    source: str  # what the report says: the file and its token count


def read_calibration(path: Path, loaded) -> Calibration:
    """Token ids from `path`, as prefill feeds for `loaded`'s contract; KilnError naming the file when unusable."""
    from runtimes.decoder_lm import calibration_prefills, contract_signature

    if not path.is_file():
        raise KilnError(f"--calibration {path}: no such file")
    ids = _npz_ids(path) if path.suffix == ".npz" else _text_ids(path, loaded)
    if ids.size == 0:
        raise KilnError(f"--calibration {path}: holds no tokens")
    vocab = loaded.facts.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise KilnError(f"--calibration {path}: token id {int(ids.max() if ids.max() >= vocab else ids.min())} "
                        f"is outside the vocabulary [0, {vocab})")
    row = min(ROW_TOKENS, loaded.family.max_positions_of(loaded.config) or ROW_TOKENS)
    rows = ids.reshape(1, -1) if ids.ndim == 1 else ids
    if rows.shape[1] > row:  # long rows are cut into prefills the model's positions can hold
        flat = rows.reshape(-1)
        rows = flat[: len(flat) // row * row].reshape(-1, row)
    feeds = calibration_prefills(contract_signature(loaded.facts), rows)
    return Calibration(feeds, f"{path.name}: {int(rows.size)} tokens in {len(feeds)} prefills")


def _npz_ids(path: Path) -> np.ndarray:
    try:
        with np.load(path) as archive:
            names = archive.files
            name = "input_ids" if "input_ids" in names else names[0] if len(names) == 1 else None
            if name is None:
                raise KilnError(f"--calibration {path}: expected an array named input_ids (or one array), "
                                f"got {', '.join(names) or 'none'}")
            ids = archive[name]
    except (OSError, ValueError) as e:
        raise KilnError(f"--calibration {path}: cannot read as .npz ({e})") from None
    if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2):
        raise KilnError(f"--calibration {path}: expected integer token ids [rows, sequence], got {ids.dtype} "
                        f"{list(ids.shape)}")
    return ids.astype(np.int64)


def _text_ids(path: Path, loaded) -> np.ndarray:
    tokenizer_file = loaded.tokenizer_dir / "tokenizer.json" if loaded.tokenizer_dir else None
    if tokenizer_file is None or not tokenizer_file.is_file():
        raise KilnError(f"--calibration {path}: text needs the model's tokenizer, and {loaded.spec} has no "
                        "tokenizer.json; give an .npz of token ids instead")
    from tokenizers import Tokenizer

    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise KilnError(f"--calibration {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return np.array(Tokenizer.from_file(str(tokenizer_file)).encode(text).ids, dtype=np.int64)
