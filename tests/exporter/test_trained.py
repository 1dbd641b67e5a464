"""The trained preset: weights cached in the user's cache folder, a tokenizer that spells its tokens, and
an engine that continues the sequences it learned."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import kiln
from exporter import load_model
from exporter.trained import FIRST_NUMBER, corpus_tokenizer


def test_the_tokenizer_spells_each_number_token():
    tokenizer = corpus_tokenizer(128)
    assert tokenizer.encode("5 8 11").ids == [FIRST_NUMBER + 5, FIRST_NUMBER + 8, FIRST_NUMBER + 11]
    assert tokenizer.decode([FIRST_NUMBER + 14, FIRST_NUMBER + 17]) == "14 17"
    assert tokenizer.encode("hello").ids == [127]  # unknown words map to the unused top id


def test_the_trained_engine_continues_a_sequence_from_text(tmp_path):
    engine = kiln.convert("tiny-trained", output=tmp_path / "engine", verify=False).engine_dir
    with kiln.load(engine) as predictor:
        tokens = predictor.generate("5 8 11", max_new_tokens=6)
        assert predictor.tokenizer.decode(tokens[0].tolist()) == "14 17 20 23 26 29"


def test_caches_live_in_the_user_cache_folder(tmp_path):
    """KILN_CACHE_DIR moves every cache; by default none is inside the source tree."""
    code = ("from plugins.build import default_build_dir; from kiln.tensorrt_build import default_cache_dir; "
            "from exporter.trained import cache_dir; print(default_build_dir(), default_cache_dir(), cache_dir())")
    moved = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"KILN_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert moved == [str(tmp_path / "plugins"), str(tmp_path / "tensorrt"), str(tmp_path / "trained")]
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}).stdout.split()
    source_tree = Path(__file__).resolve().parents[2]
    assert all(Path(p).is_relative_to(tmp_path / "home" / ".cache" / "torchkiln") for p in default)
    assert not any(Path(p).is_relative_to(source_tree) for p in default)


def test_trained_weights_are_cached_beside_the_tokenizer():
    loaded = load_model("tiny-trained")
    assert sorted(p.name for p in loaded.tokenizer_dir.iterdir()) == ["tokenizer.json", "weights.pt"]
    again = load_model("tiny-trained")
    assert again.weights_sha256 == loaded.weights_sha256
    assert np.isfinite(next(loaded.module.parameters()).detach().numpy()).all()
