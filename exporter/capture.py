"""Capture a decoder LM as ONNX with the KV-cache IO contract, through torch.export.

IO (the names Optimum and ONNX Runtime GenAI use): input_ids, attention_mask, position_ids,
past_key_values.{i}.key|value -> logits, present.{i}.key|value. One graph serves prefill (past length 0)
and decode. Caches are `[batch, kv_heads, past_sequence, head_dim]`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.errors import ExportError
from exporter.families import ModelFacts
from exporter.sources import LoadedModel
from optimizers.recipe import EXTERNAL_DATA_BYTES

# Above this the weights go to model.onnx.data, the rule the optimization passes save by. Protobuf cannot
# hold 2 GiB, and well before that, saving weights inside the .onnx builds the whole message in memory
# (measured on gpt2's 497 MB: peak RSS of the export 2.37 GB inline, 0.95 GB external).
EXTERNAL_DATA_THRESHOLD = EXTERNAL_DATA_BYTES
MODEL_FILE = "model.onnx"


def io_names(layers: int) -> tuple[list[str], list[str]]:
    cache = [(i, kind) for i in range(layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{k}" for i, k in cache]
    outputs = ["logits"] + [f"present.{i}.{k}" for i, k in cache]
    return inputs, outputs


class DecoderWithCache(torch.nn.Module):
    """A transformers causal LM with flat tensors in and out, the shape an exporter can capture."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        from transformers import DynamicCache

        # No config given: every layer keeps its full cache, local-attention layers mask instead of
        # trimming, so all caches share one `past_sequence` length.
        cache = DynamicCache([(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.layers)])
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)

    def flat_forward(self, *tensors):
        """Tensors in `io_names` input order -> outputs in `io_names` output order."""
        return self.forward(tensors[0], tensors[1], tensors[2], list(tensors[3:]))


def example_inputs(facts: ModelFacts, batch: int = 2, sequence: int = 3, past: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Random inputs in `io_names` order: `sequence` new tokens after `past` cached ones."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, facts.vocab_size, (batch, sequence), generator=generator)
    attention_mask = torch.ones(batch, past + sequence, dtype=torch.int64)
    position_ids = torch.arange(past, past + sequence).expand(batch, sequence).contiguous()
    cache_shape = (batch, facts.kv_heads, past, facts.head_dim)
    caches = [torch.randn(cache_shape, generator=generator) for _ in range(2 * facts.layers)]
    return [input_ids, attention_mask, position_ids, *caches]


@dataclass
class CapturedGraph:
    path: Path
    files: list[Path]
    external_data: bool
    opset: int
    torch_ops: dict[str, int] = field(default_factory=dict)  # custom ops in an AOTI package -> call sites


def dynamic_shapes(layers: int, batch, sequence, past, total) -> dict:
    """torch.export dynamic shapes for `DecoderWithCache.forward`, one Dim object per contract axis."""
    return {
        "input_ids": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: sequence},
        "past_key_values": [{0: batch, 2: past}] * (2 * layers),
    }


def contract_signature(facts: ModelFacts) -> dict:
    """The IO signature of the contract, as `runtimes.Signature.to_json` writes it."""
    inputs, outputs = io_names(facts.layers)
    cache = ["batch", facts.kv_heads, "past_sequence", facts.head_dim]
    shapes = {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "total_sequence"],
              "position_ids": ["batch", "sequence"], "logits": ["batch", "sequence", facts.vocab_size]}
    return {
        "inputs": [{"name": n, "dtype": "int64" if n in shapes else "float32", "shape": shapes.get(n, cache)} for n in inputs],
        "outputs": [{"name": n, "dtype": "float32",
                     "shape": shapes.get(n, ["batch", facts.kv_heads, "total_sequence", facts.head_dim])} for n in outputs],
    }


@contextlib.contextmanager
def quiet_exporter():
    """The exporters print progress and graph dumps and warn freely: keep them off the user's terminal."""
    log = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), torch.no_grad():
        warnings.simplefilter("ignore")
        yield


def capture(loaded: LoadedModel, out_dir: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> CapturedGraph:
    """Export `loaded` to `out_dir/model.onnx` (+ `model.onnx.data` when over the threshold)."""
    from torch.export import Dim

    facts = loaded.facts
    wrapper = DecoderWithCache(loaded.module, facts.layers).eval()
    inputs, outputs = io_names(facts.layers)
    args = example_inputs(facts)
    dims = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                wrapper, (args[0], args[1], args[2], args[3:]), dynamic_shapes=dynamic_shapes(facts.layers, *dims),
                dynamo=True, optimize=True, input_names=inputs, output_names=outputs,
            )
    except Exception as e:  # the exporter raises many types; all mean "this model cannot be captured"
        raise ExportError(export_failure(e)) from e
    _name_output_dims(program.model, facts)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.module.parameters())
    external = weight_bytes > external_data_threshold
    path = Path(out_dir) / MODEL_FILE
    program.save(path, external_data=external)
    files = [path] + ([path.with_name(path.name + ".data")] if external else [])
    opset = program.model.opset_imports.get("", 0)
    return CapturedGraph(path, files, external, opset)


def _name_output_dims(model, facts: ModelFacts) -> None:
    """Give outputs the contract's dim names; the exporter writes expressions like `past_sequence + sequence`."""
    import onnx_ir as ir

    for value in model.graph.outputs:
        if value.name == "logits":
            value.shape = ir.Shape(["batch", "sequence", facts.vocab_size])
        else:
            value.shape = ir.Shape(["batch", facts.kv_heads, "total_sequence", facts.head_dim])


def export_failure(error: Exception) -> str:
    """One readable line: the innermost reason, and the op the exporter stopped at when it says."""
    innermost = error
    while innermost.__cause__ is not None:
        innermost = innermost.__cause__
    reason = next((line.strip() for line in str(innermost).splitlines() if line.strip()), type(innermost).__name__)
    everything = "\n".join(str(e) for e in (error, innermost))
    op = re.search(r"(aten[.:]{1,2}\w+(?:\.\w+)?|torch\.ops\.[\w.]+)", everything)
    where = f" (failing op: {op.group(1)})" if op else ""
    return f"the model cannot be exported to ONNX: {type(innermost).__name__}: {reason}{where}"
