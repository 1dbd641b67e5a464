"""Decoder folders not built by torchkiln (an Optimum export, onnxruntime-genai's model builder): one ONNX
graph with the same IO names, opened from what the folder itself says. There is no manifest, so nothing
is hash-checked and no verification record exists: the Predictor says so in `provenance`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from runtimes.decoder_lm import APPEND, PAST_PREFIX, PRESENT_PREFIX, SLOT
from runtimes.engine_dir import MANIFEST
from runtimes.errors import EngineError
from runtimes.generate import DecoderLMPredictor
from runtimes.predictor import Predictor
from runtimes.signature import Signature, TensorSpec
from runtimes.tokenizer import load_tokenizer

NOT_BUILT_BY_KILN = "not built by torchkiln: no verification record"


def is_foreign(folder) -> bool:
    """A folder without torchkiln's manifest: another tool's model folder, opened by `load_foreign`."""
    return Path(folder).is_dir() and not (Path(folder) / MANIFEST).exists()


def foreign_graph_file(folder: Path) -> Path | None:
    """The decoder graph of a folder without a manifest: genai_config's `decoder.filename`, else
    `model.onnx` (Optimum's name), else the folder's only `.onnx` file."""
    genai = folder / "genai_config.json"
    if genai.is_file():
        try:
            name = json.loads(genai.read_text())["model"]["decoder"]["filename"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EngineError(f"{genai}: no model.decoder.filename ({e})") from None
        return folder / name
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    graphs = sorted(folder.glob("*.onnx"))
    return graphs[0] if len(graphs) == 1 else None


class ForeignDecoderGraph(Predictor):
    """Runs a foreign graph with the feeds kiln's decoder kind builds: those it does not take are dropped
    (genai's graphs compute positions inside GroupQueryAttention and take no `position_ids`), and cache
    axes the graph leaves symbolic get their sizes from the folder's config."""

    def __init__(self, inner: Predictor, cache_shape: tuple[int, int]):
        self.inner = inner
        self._names = {t.name for t in inner.signature.inputs}
        self.signature = Signature(
            tuple(_with_cache_shape(t, cache_shape) if t.name.startswith(PAST_PREFIX) else t for t in inner.signature.inputs),
            tuple(_with_cache_shape(t, cache_shape) if t.name.startswith(PRESENT_PREFIX) else t for t in inner.signature.outputs),
        )

    def predict(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return super().predict(self._taken(feeds))

    def forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.forward(self._taken(feeds))

    def close(self) -> None:
        self.inner.close()

    def _taken(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: value for name, value in feeds.items() if name in self._names}


def _with_cache_shape(spec: TensorSpec, cache_shape: tuple[int, int]) -> TensorSpec:
    """`[batch, kv_heads, length, head_dim]` with the heads and head dim filled in where they are symbolic."""
    batch, heads, length, dim = spec.shape
    return TensorSpec(spec.name, spec.dtype, (batch, heads if isinstance(heads, int) else cache_shape[0], length,
                                              dim if isinstance(dim, int) else cache_shape[1]))


def cache_shape_of(folder: Path) -> tuple[int, int]:
    """(kv heads, head dim) from the folder's genai_config.json or config.json."""
    genai = folder / "genai_config.json"
    if genai.is_file():
        decoder = json.loads(genai.read_text())["model"]["decoder"]
        return int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    path = folder / "config.json"
    if not path.is_file():
        raise EngineError(f"{folder}: neither manifest.json, genai_config.json nor config.json: not a model folder")
    config = json.loads(path.read_text())
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    if not heads or not hidden:
        raise EngineError(f"{path}: no num_attention_heads/hidden_size to size the cache from")
    return int(config.get("num_key_value_heads") or heads), int(config.get("head_dim") or hidden // heads)


def context_length_of(folder: Path) -> int | None:
    """The model's position limit: config.json's, else genai_config.json's `context_length`."""
    for name, read in (("config.json", lambda c: c.get("n_positions") or c.get("max_position_embeddings")),
                       ("genai_config.json", lambda c: c["model"].get("context_length"))):
        if (folder / name).is_file():
            return read(json.loads((folder / name).read_text()))
    return None


def layout_of(graph: Path) -> str:
    """SLOT where the graph attends with GroupQueryAttention (it reads each row's cache from column 0, whether its
    lengths come from positions, as kiln's, or from the mask, as genai's builder's), else APPEND."""
    import onnx

    nodes = onnx.load(graph, load_external_data=False).graph.node
    return SLOT if any(node.op_type == "GroupQueryAttention" for node in nodes) else APPEND


def load_foreign(folder: Path, device: str | None = None, **backend_options) -> DecoderLMPredictor:
    """A DecoderLMPredictor over the folder's ONNX decoder graph, marked as not built by torchkiln."""
    from runtimes.onnxruntime_adapter import OnnxRuntimePredictor, refuse_escaping_external_data

    if device not in (None, "cpu"):
        raise EngineError(f"{folder}: folders not built by torchkiln open on the CPU only (got device={device!r})")
    graph = foreign_graph_file(folder)
    if graph is None or not graph.is_file():
        raise EngineError(f"{folder}: not an engine directory (no manifest.json) and no single ONNX decoder graph")
    refuse_escaping_external_data(graph, folder)
    inner = OnnxRuntimePredictor(graph, **backend_options)
    names = {t.name for t in inner.signature.inputs} | {t.name for t in inner.signature.outputs}
    absent = [n for n in ("input_ids", "attention_mask", "logits", f"{PAST_PREFIX}0.key", f"{PRESENT_PREFIX}0.key")
              if n not in names]
    if absent:
        inner.close()
        raise EngineError(f"{graph}: not a decoder graph with a KV cache under the Optimum/genai IO names "
                          f"(no {', '.join(absent)})")
    predictor = DecoderLMPredictor({"model": ForeignDecoderGraph(inner, cache_shape_of(folder))},
                                   tokenizer=load_tokenizer(folder, {"tokenizer": "."}), cache_layout=layout_of(graph))
    predictor.provenance = NOT_BUILT_BY_KILN
    return predictor
