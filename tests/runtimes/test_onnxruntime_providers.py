"""ONNX Runtime's GPU providers as the adapter drives them: checked active after the session starts, CUDA
libraries preloaded, options from the manifest and this machine, MIGraphX fed a few bucketed shapes. The
providers are stand-ins (tests/runtimes/ort_standin.py); the arithmetic runs on the real CPU provider."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner

import kiln
from kiln.cli import cli
from kiln.targets import TARGETS
from runtimes.decoder_lm import SLOT, prefill_feeds
from runtimes.errors import EngineError
from runtimes.onnxruntime_adapter import OnnxRuntimePredictor, provider_load_problem
from tests.runtimes.ort_standin import StandInGpuProviders, engine_for_target

PROMPTS = [[5, 17, 300, 42, 9], [7, 7]]


@pytest.fixture
def cpu_tokens(engine_dir):
    with kiln.load(engine_dir("tiny-gpt2")) as engine:
        return engine.generate(PROMPTS, max_new_tokens=20)


def test_a_gpu_provider_that_falls_back_to_the_cpu_is_refused(monkeypatch, engine_dir, tmp_path):
    """onnxruntime-gpu whose CUDA libraries do not load only logs, and runs on the CPU: refused, exit 2."""
    StandInGpuProviders(monkeypatch, ["CUDAExecutionProvider"], failing=["CUDAExecutionProvider"])
    engine = engine_for_target(engine_dir("tiny-gpt2"), tmp_path / "e", TARGETS["cuda"])
    done = CliRunner().invoke(cli, ["generate", str(engine), "--prompt-ids", "1,2", "--max-new-tokens", "2"])
    assert done.exit_code == 2, done.output
    assert "ONNX Runtime did not start CUDAExecutionProvider (the session would run on CPUExecutionProvider)" in done.output
    assert "its library libonnxruntime_providers_cuda.so is not in this onnxruntime" in done.output


def test_the_library_a_provider_misses_is_named_as_the_loader_says_it(tmp_path):
    """A provider library whose dependency is absent (libcublasLt.so.13, say): dlopen names that dependency."""
    compiler = shutil.which("cc") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C compiler here to build the stand-in provider library")
    (tmp_path / "empty.c").write_text("int kiln_stand_in;\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcublasLt.so.13", "-o", tmp_path / "libcublasLt.so.13",
                    tmp_path / "empty.c"], check=True)
    subprocess.run([compiler, "-shared", "-fPIC", "-Wl,--no-as-needed", "-o", tmp_path / "libonnxruntime_providers_cuda.so",
                    tmp_path / "empty.c", f"-L{tmp_path}", "-l:libcublasLt.so.13"], check=True)
    (tmp_path / "libcublasLt.so.13").unlink()
    problem = provider_load_problem("CUDAExecutionProvider", tmp_path)
    assert problem.startswith("libonnxruntime_providers_cuda.so does not load: ")
    assert "libcublasLt.so.13: cannot open shared object file" in problem


def test_cuda_libraries_are_preloaded_before_the_first_cuda_session(monkeypatch, engine_dir, tmp_path):
    import runtimes.onnxruntime_adapter as adapter

    standin = StandInGpuProviders(monkeypatch, ["CUDAExecutionProvider"])
    calls = []
    real = onnxruntime.preload_dlls
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda **kw: (calls.append(len(standin.sessions)), real(**kw)))
    monkeypatch.setattr(adapter, "_preload_cuda_libraries", adapter._preload_cuda_libraries.__wrapped__)
    kiln.load(engine_dir("tiny-gpt2")).close()  # a CPU engine: nothing to preload
    assert calls == []
    kiln.load(engine_for_target(engine_dir("tiny-gpt2"), tmp_path / "e", TARGETS["cuda"])).close()
    assert calls == [1]  # before the cuda session, after the cpu one


def test_ort_tensorrt_gets_its_profile_caches_tf32_and_gpu(monkeypatch, engine_dir, tmp_path, cpu_tokens):
    """The TensorRT provider builds for the recorded shape ranges, once: its engine and timing caches go to the
    user's cache folder, keyed by the engine's digest; fp32 turns TF32 off; `cuda:1` picks the GPU."""
    standin = StandInGpuProviders(monkeypatch, ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    profile = {"trt_profile_min_shapes": "input_ids:1x1", "trt_profile_opt_shapes": "input_ids:1x1",
               "trt_profile_max_shapes": "input_ids:8x256", "trt_engine_cache_enable": "1", "trt_timing_cache_enable": "1"}
    engine = engine_for_target(engine_dir("tiny-gpt2"), tmp_path / "e", TARGETS["ort-tensorrt"], tf32=False,
                               provider_options={"TensorrtExecutionProvider": profile,
                                                 "CUDAExecutionProvider": {"use_tf32": "0"}})
    with kiln.load(engine, device="cuda:1") as loaded:
        np.testing.assert_array_equal(loaded.generate(PROMPTS, max_new_tokens=20), cpu_tokens)
    (session,) = standin.sessions
    assert session.providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt, cuda = session.options["TensorrtExecutionProvider"], session.options["CUDAExecutionProvider"]
    (folder,) = (tmp_path / "cache" / "onnxruntime").iterdir()
    assert trt == {**profile, "device_id": "1", "trt_engine_cache_path": str(folder), "trt_timing_cache_path": str(folder)}
    assert cuda == {"use_tf32": "0", "device_id": "1"} and session.options["CPUExecutionProvider"] == {}
    assert folder.name.endswith(f"-ort{onnxruntime.__version__}")
    assert not any(p.name.startswith("trt") for p in engine.iterdir())  # the engine directory stays as built
    import os

    assert os.environ["NVIDIA_TF32_OVERRIDE"] == "0"  # TensorRT's provider has no TF32 option of its own


def test_a_manifest_cannot_name_a_library_for_a_provider_to_load(monkeypatch, engine_dir, tmp_path):
    """Provider options that load code or read folders are this machine's to set, never an engine's."""
    StandInGpuProviders(monkeypatch, ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    crafted = {"TensorrtExecutionProvider": {"trt_engine_decryption_enable": "1",
                                             "trt_engine_decryption_lib_path": "/tmp/anything.so"}}
    engine = engine_for_target(engine_dir("tiny-gpt2"), tmp_path / "e", TARGETS["ort-tensorrt"], provider_options=crafted)
    with pytest.raises(EngineError, match="sets trt_engine_decryption_enable, "
                       "trt_engine_decryption_lib_path for TensorrtExecutionProvider: expected only"):
        kiln.load(engine)


def test_migraphx_sees_a_few_bucketed_shapes_and_gives_the_same_tokens(monkeypatch, tmp_path, cpu_tokens):
    """MIGraphX compiles per input shape: 20 decode steps would be 20 compiles; bucketed, they are 3. Buckets pad
    on the left, as an engine whose attention is MultiHeadAttention reads its rows (cache layout APPEND)."""
    appended = kiln.convert("tiny-gpt2", output=tmp_path / "append", pass_options=["fusion.gqa=false"]).engine_dir
    standin = StandInGpuProviders(monkeypatch, ["MIGraphXExecutionProvider"])
    engine = engine_for_target(appended, tmp_path / "e", TARGETS["rocm"], shape_buckets=True)
    with kiln.load(engine) as loaded:
        np.testing.assert_array_equal(loaded.generate(PROMPTS, max_new_tokens=20), cpu_tokens)
        ids = np.array([[3, 1, 4, 1, 5, 9]])
        feeds = prefill_feeds(loaded.signature, ids)
        got = loaded.predict(feeds)
    with kiln.load(appended) as reference:
        want = reference.predict(feeds)
    for name in want:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    shapes = {(fed["input_ids"][1], fed["past_key_values.0.key"][2]) for fed in standin.sessions[0].fed}
    assert shapes == {(8, 0), (1, 8), (1, 16), (1, 32)}  # prompt 5 -> 8; pasts 5..23 -> 8, 16, 32


def test_an_engine_that_reads_right_padded_rows_is_fed_unbucketed(monkeypatch, engine_dir, tmp_path, cpu_tokens):
    # tiny-gpt2's engine attends with GroupQueryAttention, which reads each row from column 0 (cache layout SLOT).
    standin = StandInGpuProviders(monkeypatch, ["MIGraphXExecutionProvider"])
    engine = engine_for_target(engine_dir("tiny-gpt2"), tmp_path / "e", TARGETS["rocm"], shape_buckets=True)
    with kiln.load(engine) as loaded:
        assert loaded.cache_layout == SLOT
        np.testing.assert_array_equal(loaded.generate(PROMPTS, max_new_tokens=20), cpu_tokens)
    prompts = {fed["input_ids"][1] for fed in standin.sessions[0].fed if fed["past_key_values.0.key"][2] == 0}
    assert prompts == {5}  # the prompt as it is, not padded to a bucket of 8


def test_bfloat16_io_is_named_in_the_signature(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, ["n"])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.FLOAT)], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]), tmp_path / "m.onnx")
    predictor = OnnxRuntimePredictor(tmp_path / "m.onnx")
    assert predictor.signature.inputs[0].dtype == "bfloat16" and predictor.signature.outputs[0].dtype == "float32"
