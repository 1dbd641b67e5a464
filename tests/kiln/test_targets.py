import json

import numpy as np
import pytest

import kiln
from kiln.errors import KilnError
from kiln.targets import TARGETS, missing_on_host


def test_aoti_cpu_engine_verifies(aoti_engine):
    manifest = json.loads((aoti_engine / "manifest.json").read_text())
    assert manifest["backend"] == "aoti" and manifest["graphs"]["model"]["file"] == "model.pt2"
    assert manifest["device"] == "cpu" and manifest["kind"] == "decoder-lm"
    assert sorted(manifest["files"]) == ["config.json", "generation_config.json", "model.pt2", "report.json"]
    assert manifest["interop"]["onnxruntime_genai"] is None  # and says why:
    assert manifest["interop"]["onnxruntime_genai_reason"] == "onnxruntime-genai runs ONNX graphs; this engine's graph is model.pt2"
    assert manifest["verification"]["passed"] is True
    assert manifest["verification"]["logits"]["relative"] <= 1e-3


def test_aoti_cpu_generates_the_reference_tokens(aoti_engine, engine_dir, reference):
    prompts = [[5, 17, 300, 42], [7, 7]]
    got = kiln.load(aoti_engine, trust_native_code=True).generate(prompts, max_new_tokens=16)
    np.testing.assert_array_equal(got, reference(engine_dir("tiny-gpt2")).generate(prompts, max_new_tokens=16))


@pytest.mark.parametrize("name", [n for n in TARGETS if missing_on_host(TARGETS[n])])
def test_targets_without_their_hardware_fail_fast(name, tmp_path):
    with pytest.raises(KilnError, match=f"target '{name}' cannot be built on this machine: .*(needs|lacks)"):
        kiln.convert("tiny-gpt2", target=name, output=tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_aoti_cuda_engine_verifies(tmp_path):
    result = kiln.convert("tiny-gpt2", target="aoti-cuda", output=tmp_path / "e")
    assert result.manifest["verification"]["passed"] is True


GPU_TARGETS = [name for name, target in TARGETS.items() if target.device != "cpu"]


@pytest.mark.parametrize("name", GPU_TARGETS)
def test_generate_and_predict_open_each_gpu_target_on_its_gpu(name, engine_dir, tmp_path, monkeypatch):
    """Through the CLI, an engine opens on its manifest's device (`--device cuda:1` picks the GPU): ONNX Runtime
    engines on stand-ins of their providers, computing on the CPU; the others reach their adapter, which says
    what this machine lacks."""
    from click.testing import CliRunner

    from kiln.backends import backend_of
    from kiln.cli import cli
    from runtimes.decoder_lm import prefill_feeds
    from tests.runtimes.ort_standin import StandInGpuProviders, engine_for_target

    target = TARGETS[name]
    standin = StandInGpuProviders(monkeypatch, [p for p in target.providers if p != "CPUExecutionProvider"])
    engine = engine_for_target(engine_dir("tiny-gpt2"), tmp_path / "engine", target)
    generate = ["generate", str(engine), "--prompt-ids", "5,17,300", "--max-new-tokens", "4", "--device", "cuda:1",
                "--json", "--trust-native-code"]
    done = CliRunner().invoke(cli, generate)
    if backend_of(target).runs_on_torch:  # needs a GPU build of torch (and TensorRT): neither is here
        assert done.exit_code == 2, done.output
        assert f"engine target {name!r}" in done.output and ("'cuda:1' needs a GPU" in done.output
                                                             or "TensorRT engines need TensorRT" in done.output)
        return
    assert done.exit_code == 0, done.output
    with kiln.load(engine_dir("tiny-gpt2")) as cpu:
        assert json.loads(done.stdout)["tokens"] == cpu.generate([[5, 17, 300]], max_new_tokens=4)[0].tolist()
        np.savez(tmp_path / "feeds.npz", **prefill_feeds(cpu.signature, np.array([[5, 17, 300]])))
    done = CliRunner().invoke(cli, ["predict", str(engine), "--inputs", str(tmp_path / "feeds.npz"),
                                    "-o", str(tmp_path / "out.npz"), "--device", "cuda:1"])
    assert done.exit_code == 0, done.output
    opened = [s for s in standin.sessions if s.providers != ["CPUExecutionProvider"]]  # not the cpu engine's
    assert [s.providers for s in opened] == [list(target.providers)] * 2
    assert [s.options[target.providers[0]]["device_id"] for s in opened] == ["1", "1"]


def test_an_onnx_runtime_gpu_target_needs_its_provider_not_a_gpu_torch(monkeypatch):
    """onnxruntime-gpu brings its own CUDA: a CPU build of torch (this one) does not stop the cuda target."""
    from tests.runtimes.ort_standin import StandInGpuProviders

    StandInGpuProviders(monkeypatch, ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
    assert missing_on_host(TARGETS["cuda"]) is None
    assert missing_on_host(TARGETS["ort-tensorrt"]) is None
    assert "needs a CUDA build of torch and a GPU" in missing_on_host(TARGETS["aoti-cuda"])  # runs inside torch


@pytest.mark.parametrize("name, precision, expected", [
    ("cuda", "fp32", {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "tf32": False,
                      "provider_options": {"CUDAExecutionProvider": {"use_tf32": "0"}}}),
    ("cuda", "fp16", {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "tf32": True}),
    ("rocm", "fp32", {"providers": ["MIGraphXExecutionProvider", "CPUExecutionProvider"], "shape_buckets": True}),
    ("cpu", "fp32", {"providers": ["CPUExecutionProvider"]}),
])
def test_provider_facts_recorded_at_convert(name, precision, expected):
    """fp32 on an NVIDIA GPU turns TF32 off (it rounds matmul inputs to 10 bits) and says so in the manifest."""
    from kiln.backends import BuildRequest, backend_of

    target = TARGETS[name]
    assert backend_of(target).manifest_fields(BuildRequest(target, precision), {}, None) == expected


def test_ort_tensorrt_records_its_profile_and_caches(tmp_path):
    """--profile becomes the TensorRT provider's shape ranges, so it builds once, not at every new cache length."""
    from types import SimpleNamespace

    import onnx

    from kiln.backends import BuildRequest, backend_of
    from kiln.errors import KilnError
    from kiln.tensorrt_build import onnx_signature
    from tests.kiln.tensorrt_graphs import contract_graph

    onnx.save(contract_graph(), tmp_path / "model.onnx")
    graphs = {"model": SimpleNamespace(signature=onnx_signature(tmp_path / "model.onnx"))}
    loaded = SimpleNamespace(family=SimpleNamespace(max_positions_of=lambda config: 256), config=None)
    target = TARGETS["ort-tensorrt"]
    request = BuildRequest(target, "fp32", profile="batch=1:1:2,sequence=1:1:16,past=0:16:48")
    fields = backend_of(target).manifest_fields(request, graphs, loaded)
    trt = fields["provider_options"]["TensorrtExecutionProvider"]
    cache = "past_key_values.0.{}:{}x2x{}x8"
    assert trt["trt_profile_min_shapes"] == ",".join(
        ["input_ids:1x1", "attention_mask:1x1", "position_ids:1x1", cache.format("key", 1, 0), cache.format("value", 1, 0)])
    assert trt["trt_profile_max_shapes"] == ",".join(
        ["input_ids:2x16", "attention_mask:2x64", "position_ids:2x16", cache.format("key", 2, 48), cache.format("value", 2, 48)])
    assert (trt["trt_engine_cache_enable"], trt["trt_timing_cache_enable"]) == ("1", "1")
    assert fields["provider_options"]["CUDAExecutionProvider"] == {"use_tf32": "0"} and fields["tf32"] is False
    assert fields["profile"]["batch"] == [1, 1, 2]  # verification's inputs keep inside it
    with pytest.raises(KilnError, match="--profile sets shape ranges for TensorRT; target 'cuda'"):
        backend_of(TARGETS["cuda"]).manifest_fields(BuildRequest(TARGETS["cuda"], "fp32", profile="batch=1"), graphs, loaded)
