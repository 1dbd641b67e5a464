"""The TensorRT adapter's binding plan and load errors, with plain data and the real absence of TensorRT."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtimes
from kiln.manifest import write_manifest
from runtimes import EngineError, FeedError, Signature, TensorSpec
from runtimes.tensorrt_adapter import EngineTensor, TensorRTPredictor, check_host, engine_signature, plan_bindings
from runtimes.decoder_lm import past_inputs

KV, HEAD, VOCAB = 2, 8, 16
tensorrt_absent = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")


def engine_tensors(profile_max_past: int = 64) -> list[EngineTensor]:
    """What a plan of one layer reports: dynamic axes are -1, profile 0 bounds the inputs."""
    low_cache, high_cache = (1, KV, 0, HEAD), (4, KV, profile_max_past, HEAD)
    return [
        EngineTensor("input_ids", True, "int64", (-1, -1), (1, 1), (4, 32)),
        EngineTensor("attention_mask", True, "int64", (-1, -1), (1, 1), (4, 32 + profile_max_past)),
        EngineTensor("position_ids", True, "int64", (-1, -1), (1, 1), (4, 32)),
        EngineTensor("past_key_values.0.key", True, "float16", (-1, KV, -1, HEAD), low_cache, high_cache),
        EngineTensor("past_key_values.0.value", True, "float16", (-1, KV, -1, HEAD), low_cache, high_cache),
        EngineTensor("logits", False, "float32", (-1, -1, VOCAB)),
        EngineTensor("present.0.key", False, "float16", (-1, KV, -1, HEAD)),
        EngineTensor("present.0.value", False, "float16", (-1, KV, -1, HEAD)),
    ]


def recorded_signature() -> Signature:
    """The manifest's signature, as the ONNX graph named the dims (dtypes there may differ from the plan)."""
    cache, present = ("batch", KV, "past_sequence", HEAD), ("batch", KV, "total_sequence", HEAD)
    return Signature(
        (TensorSpec("input_ids", "int64", ("batch", "sequence")),
         TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
         TensorSpec("position_ids", "int64", ("batch", "sequence")),
         TensorSpec("past_key_values.0.key", "float32", cache),
         TensorSpec("past_key_values.0.value", "float32", cache)),
        (TensorSpec("logits", "float32", ("batch", "sequence", VOCAB)),
         TensorSpec("present.0.key", "float32", present),
         TensorSpec("present.0.value", "float32", present)),
    )


def feed_shapes(batch: int, sequence: int, past: int) -> dict[str, tuple[int, ...]]:
    return {"input_ids": (batch, sequence), "attention_mask": (batch, past + sequence), "position_ids": (batch, sequence),
            "past_key_values.0.key": (batch, KV, past, HEAD), "past_key_values.0.value": (batch, KV, past, HEAD)}


def test_signature_takes_dtypes_from_the_plan_and_dim_names_from_the_manifest():
    signature = engine_signature(engine_tensors(), recorded_signature())
    cache = signature.input("past_key_values.0.key")
    assert cache == TensorSpec("past_key_values.0.key", "float16", ("batch", KV, "past_sequence", HEAD))
    assert signature.outputs[0] == TensorSpec("logits", "float32", ("batch", "sequence", VOCAB))
    assert [t.name for t in past_inputs(signature)] == ["past_key_values.0.key", "past_key_values.0.value"]


def test_without_a_recorded_signature_every_dynamic_axis_gets_its_own_name():
    signature = engine_signature(engine_tensors(), None)
    assert signature.input("input_ids").shape == ("input_ids.0", "input_ids.1")
    assert signature.outputs[1].shape == ("present.0.key.0", KV, "present.0.key.2", HEAD)
    # Distinct names: a prefill feed (past 0, sequence 3) passes the generic feed check.
    shapes = feed_shapes(batch=1, sequence=3, past=0)
    signature.validate({name: np.zeros(shape, dtype=signature.input(name).dtype) for name, shape in shapes.items()})


def test_a_manifest_naming_other_tensors_is_refused():
    recorded = recorded_signature()
    renamed = Signature(recorded.inputs, recorded.outputs[:1] + (TensorSpec("present.0.k", "float32", ()),) + recorded.outputs[2:])
    with pytest.raises(EngineError, match=r"only in the plan: present.0.key; only in the manifest: present.0.k"):
        engine_signature(engine_tensors(), renamed)


@pytest.mark.parametrize("batch, sequence, past", [(1, 5, 0), (2, 1, 7), (4, 32, 64)])
def test_output_shapes_follow_from_the_input_dims(batch, sequence, past):
    tensors = engine_tensors()
    plan = plan_bindings(tensors, engine_signature(tensors, recorded_signature()), feed_shapes(batch, sequence, past))
    assert plan.inputs == feed_shapes(batch, sequence, past)
    assert plan.outputs == {
        "logits": (batch, sequence, VOCAB),
        "present.0.key": (batch, KV, past + sequence, HEAD),
        "present.0.value": (batch, KV, past + sequence, HEAD),
    }


def test_total_sequence_is_derived_when_no_input_carries_it():
    tensors = [t for t in engine_tensors() if t.name != "attention_mask"]
    recorded = recorded_signature()
    signature = engine_signature(tensors, Signature(tuple(s for s in recorded.inputs if s.name != "attention_mask"), recorded.outputs))
    shapes = {k: v for k, v in feed_shapes(2, 3, 5).items() if k != "attention_mask"}
    assert plan_bindings(tensors, signature, shapes).outputs["present.0.key"] == (2, KV, 8, HEAD)


def test_unnamed_output_dims_are_left_to_tensorrt():
    tensors = engine_tensors()
    plan = plan_bindings(tensors, engine_signature(tensors, None), feed_shapes(2, 1, 7))
    assert plan.outputs["logits"] == (-1, -1, VOCAB)
    assert plan.outputs["present.0.key"] == (-1, KV, -1, HEAD)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (feed_shapes(2, 1, 65), r"input 'past_key_values.0.key': axis 2 is 65, outside the engine's optimization profile 0..64"),
        (feed_shapes(8, 1, 7), r"input 'input_ids': axis 0 is 8, outside the engine's optimization profile 1..4"),
        ({**feed_shapes(1, 1, 1), "input_ids": (1, 1, 1)}, r"input 'input_ids': expected rank 2, got rank 3 \[1, 1, 1\]"),
        ({k: v for k, v in feed_shapes(1, 1, 1).items() if k != "position_ids"}, r"missing input 'position_ids'"),
    ],
)
def test_feeds_outside_the_profile_name_the_input_and_the_range(shapes, message):
    tensors = engine_tensors(profile_max_past=64)
    with pytest.raises(FeedError, match=message):
        plan_bindings(tensors, engine_signature(tensors, recorded_signature()), shapes)


def test_a_plan_from_another_tensorrt_or_gpu_is_refused_before_deserializing():
    built_on = {"tensorrt_version": "10.13.0", "compute_capability": "9.0", "gpu_name": "NVIDIA H100"}
    check_host(built_on, "NVIDIA H200", "9.0", "10.13.0")
    check_host(None, "NVIDIA A100", "8.0", "10.13.0")
    with pytest.raises(EngineError, match=r"built by TensorRT 10.13.0, this machine has 10.14.1; rebuild the engine here"):
        check_host(built_on, "NVIDIA H100", "9.0", "10.14.1")
    with pytest.raises(EngineError, match=r"built for compute capability 9.0 \(NVIDIA H100\), this GPU \(NVIDIA A100\) is 8.0"):
        check_host(built_on, "NVIDIA A100", "8.0", "10.13.0")


@pytest.fixture
def tensorrt_engine_dir(tmp_path):
    """An engine directory as the tensorrt target writes it (the plan bytes are not a real plan)."""
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "engine.plan").write_bytes(b"not a plan")
    write_manifest(engine, {"target": "tensorrt", "precision": "fp16", "backend": "tensorrt", "device": "cuda",
                            "graphs": {"model": {"file": "engine.plan", "signature": recorded_signature().to_json()}}})
    return engine


@tensorrt_absent
def test_loading_without_tensorrt_names_what_is_missing(tensorrt_engine_dir):
    with pytest.raises(EngineError, match=r"engine target 'tensorrt': TensorRT engines need TensorRT: pip install tensorrt"):
        runtimes.load(tensorrt_engine_dir, trust_native_code=True)
    with pytest.raises(EngineError, match=r"TensorRT engines need TensorRT"):
        TensorRTPredictor(tensorrt_engine_dir / "engine.plan", recorded_signature())


def test_loading_on_the_cpu_says_which_device_is_needed(tensorrt_engine_dir):
    with pytest.raises(EngineError, match=r"engine target 'tensorrt' runs on cuda, not device='cpu'"):
        runtimes.load(tensorrt_engine_dir, device="cpu")
    with pytest.raises(EngineError, match=r"TensorRT engines run on an NVIDIA GPU: expected device 'cuda' or 'cuda:N', got 'cpu'"):
        TensorRTPredictor(tensorrt_engine_dir / "engine.plan", recorded_signature(), device="cpu")


def test_load_options_the_adapter_does_not_take_are_refused(tensorrt_engine_dir):
    with pytest.raises(EngineError, match=r"TensorRT engines take no load options; got threads"):
        runtimes.load(tensorrt_engine_dir, threads=4, trust_native_code=True)


def test_importing_runtimes_and_the_builder_imports_neither_tensorrt_nor_torch():
    code = ("import sys, runtimes, runtimes.tensorrt_adapter, kiln.tensorrt_build; "
            "print(sorted(m for m in ('tensorrt', 'torch', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.stdout.strip() == "[]"
