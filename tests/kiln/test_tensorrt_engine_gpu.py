"""A real plan of tiny-gpt2, built and run on the GPU and compared with ONNX Runtime on the same graph."""
import numpy as np
import pytest

import runtimes
from kiln.manifest import write_manifest
from kiln.tensorrt_build import build_engine_files
from runtimes import FeedError
from runtimes.decoder_lm import past_inputs

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]
PROFILE = "batch=1:2:4,sequence=1:1:32,past=0:16:64"


@pytest.fixture(scope="session")
def captured(tmp_path_factory):
    """tiny-gpt2 captured to ONNX (no optimizer passes) and its source facts."""
    from exporter import load_model
    from exporter.capture import capture

    loaded = load_model("tiny-gpt2")
    graph = capture(loaded, tmp_path_factory.mktemp("onnx"))["model"]
    return graph.path, loaded


@pytest.fixture(scope="session")
def tensorrt_engine(captured, tmp_path_factory):
    onnx_path, loaded = captured
    engine = tmp_path_factory.mktemp("tensorrt") / "engine"
    engine.mkdir()
    fields = build_engine_files(onnx_path, engine, "fp32", PROFILE, loaded.config.max_position_embeddings,
                                cache_dir=tmp_path_factory.mktemp("cache"))
    write_manifest(engine, {"target": "tensorrt", "precision": "fp32", "backend": "tensorrt", "device": "cuda",
                            "graphs": {"model": fields["graph"]}, "tensorrt": fields["tensorrt"],
                            "profile": fields["profile"]})
    return engine, fields


@pytest.fixture(scope="session")
def predictors(captured, tensorrt_engine):
    from runtimes.onnxruntime_adapter import OnnxRuntimePredictor

    engine = runtimes.load(tensorrt_engine[0], trust_native_code=True)
    yield engine, OnnxRuntimePredictor(captured[0])
    engine.close()


def feeds(signature, vocab: int, batch: int, sequence: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    result = {
        "input_ids": rng.integers(0, vocab, (batch, sequence), dtype=np.int64),
        "attention_mask": np.ones((batch, past + sequence), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + sequence), (batch, sequence)).copy(),
    }
    for spec in past_inputs(signature):
        shape = (batch, spec.shape[1], past, spec.shape[3])
        result[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return result


@pytest.mark.parametrize("batch, sequence, past", [(1, 7, 0), (2, 1, 9), (4, 32, 64)])
def test_plan_matches_onnx_runtime_on_prefill_and_decode(predictors, batch, sequence, past):
    engine, reference = predictors
    vocab = engine.signature.outputs[0].shape[-1]
    inputs = feeds(engine.signature, vocab, batch, sequence, past)
    got, want = engine.predict(inputs), reference.predict(inputs)
    assert set(got) == set(want)
    assert got["present.0.key"].shape == (batch, want["present.0.key"].shape[1], past + sequence, want["present.0.key"].shape[3])
    for name in want:
        # TensorRT may use TF32 for fp32 matmuls: about 1e-3 relative.
        np.testing.assert_allclose(got[name], want[name], rtol=1e-2, atol=1e-2, err_msg=name)


def test_greedy_generation_matches_onnx_runtime(predictors):
    engine, reference = predictors
    prompts = [[5, 17, 33, 2], [9, 9]]
    np.testing.assert_array_equal(engine.generate(prompts, max_new_tokens=8), reference.generate(prompts, max_new_tokens=8))


def test_a_feed_outside_the_profile_is_refused_before_running(predictors):
    engine, _ = predictors
    vocab = engine.signature.outputs[0].shape[-1]
    with pytest.raises(FeedError, match=r"input 'input_ids': axis 1 is 33, outside the engine's optimization profile 1..32"):
        engine.predict(feeds(engine.signature, vocab, batch=1, sequence=33, past=0))


def test_the_manifest_records_the_gpu_tensorrt_and_profile(tensorrt_engine):
    _, fields = tensorrt_engine
    record = fields["tensorrt"]
    assert fields["profile"]["total_sequence"] == [1, 17, 96]
    assert record["tf32"] is False
    assert record["cache_hit"] is False and len(record["cache_key"]) == 64
    assert record["compute_capability"].count(".") == 1 and record["tensorrt_version"][0].isdigit()


def test_a_second_build_reuses_the_cached_plan(captured, tensorrt_engine, tmp_path):
    onnx_path, loaded = captured
    engine, first = tensorrt_engine
    cache_dir = tmp_path / "cache"
    again = build_engine_files(onnx_path, tmp_path, "fp32", PROFILE, loaded.config.max_position_embeddings, cache_dir)
    assert again["tensorrt"]["cache_hit"] is False  # a fresh cache folder
    twice = build_engine_files(onnx_path, tmp_path, "fp32", PROFILE, loaded.config.max_position_embeddings, cache_dir)
    assert twice["tensorrt"]["cache_hit"] is True
    assert twice["tensorrt"]["cache_key"] == again["tensorrt"]["cache_key"] == first["tensorrt"]["cache_key"]
