import numpy as np
import onnx
import pytest
import torch

from exporter import ExportError, load_model
from exporter.capture import capture, export_failure
from exporter.decoder_lm import DecoderWithCache, example_inputs
from runtimes.decoder_lm import io_names
from runtimes.onnxruntime_adapter import OnnxRuntimePredictor


@pytest.fixture(scope="module")
def llama_graph(engine_dir):
    """tiny-llama as captured by convert (the session's engine), and the model it came from."""
    return load_model("tiny-llama"), engine_dir("tiny-llama") / "model.onnx"


def test_io_names_follow_the_contract(llama_graph):
    loaded, path = llama_graph
    model = onnx.load(path)
    inputs, outputs = io_names(loaded.facts.layers)
    initializers = {t.name for t in model.graph.initializer}  # an input with a default: logits_to_keep
    assert [i.name for i in model.graph.input if i.name not in initializers] == inputs
    assert [o.name for o in model.graph.output] == outputs
    assert inputs[:5] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert dims["attention_mask"] == ["batch", "total_sequence"]


@pytest.mark.parametrize("batch, past", [(1, 0), (3, 0), (1, 7), (3, 7)])
def test_one_graph_serves_prefill_and_decode(llama_graph, batch, past):
    loaded, path = llama_graph
    session = OnnxRuntimePredictor(path)
    args = example_inputs(loaded.facts, batch=batch, sequence=1 if past else 5, past=past, seed=batch + past)
    inputs, outputs = io_names(loaded.facts.layers)
    got = session.predict(dict(zip(inputs, (a.numpy() for a in args))))
    with torch.no_grad():
        want = DecoderWithCache(loaded.module, loaded.facts.layers).flat_forward(*args)
    for name, expected in zip(outputs, want):
        np.testing.assert_allclose(got[name], expected.numpy(), atol=1e-4, err_msg=name)
    assert got["present.0.key"].shape == (batch, 2, past + (1 if past else 5), 16)


def test_weights_go_to_external_data_over_the_threshold(tmp_path):
    loaded = load_model("tests.factories:tiny_gpt2")
    graph = capture(loaded, tmp_path, external_data_threshold=0)["model"]
    assert graph.external_data and [p.name for p in graph.files] == ["model.onnx", "model.onnx.data"]
    data_bytes = (tmp_path / "model.onnx.data").stat().st_size
    assert data_bytes >= 0.9 * sum(p.numel() * 4 for p in loaded.module.parameters())
    weights = onnx.load(graph.path, load_external_data=False).graph.initializer
    large = [t for t in weights if np.prod(t.dims) >= 1024]
    assert large and all(t.data_location == onnx.TensorProto.EXTERNAL for t in large)
    args = example_inputs(loaded.facts)
    got = OnnxRuntimePredictor(graph.path).predict(dict(zip(io_names(1)[0], (a.numpy() for a in args))))
    assert got["logits"].shape == (2, 3, 128)


class _DataDependent(torch.nn.Module):
    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        if input_ids.sum() > 0:  # control flow on a value: torch.export cannot capture it
            return (input_ids.float(),)
        return (-input_ids.float(),)


def test_unexportable_model_names_the_reason(tmp_path, monkeypatch):
    loaded = load_model("tiny-gpt2")
    monkeypatch.setattr("exporter.decoder_lm.DecoderWithCache", lambda model, layers: _DataDependent())
    with pytest.raises(ExportError, match="cannot be exported to ONNX: .+") as info:
        capture(loaded, tmp_path)
    assert len(str(info.value).splitlines()) == 1
    print(info.value)


def test_an_export_failure_with_a_header_line_keeps_the_line_under_it():
    try:
        try:
            raise ValueError("The following inconsistencies were found:\nEq(s70 + Max(0, 1 - s36), 1) is inconsistent!\n")
        except ValueError as inner:
            raise RuntimeError("export failed") from inner
    except RuntimeError as error:
        message = export_failure(error)
    assert message == ("the model cannot be exported to ONNX: ValueError: The following inconsistencies were found: "
                       "Eq(s70 + Max(0, 1 - s36), 1) is inconsistent!")
