"""The seams are real: a backend is one record plus an adapter, and an engine opens on the device its
manifest names, both carried end to end by the pipeline, `runtimes.load` and the CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import kiln
import runtimes
from kiln.backends import BACKENDS, Backend, register_backend
from kiln.backends.onnxruntime import capture_onnx
from kiln.cli import cli
from kiln.targets import TARGETS, Target
from runtimes.loading import ADAPTERS
from runtimes.predictor import Predictor
from runtimes.signature import Signature, TensorSpec


class ReferencePredictor(Predictor):
    """A backend in a dozen lines: ONNX's own reference evaluator runs the graph (slowly, in Python)."""

    def __init__(self, path):
        import onnx
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(path)
        self.evaluator = ReferenceEvaluator(model)
        dims = lambda value: tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)  # noqa: E731
        dtypes = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32"}
        self.signature = Signature(
            tuple(TensorSpec(v.name, dtypes[v.type.tensor_type.elem_type], dims(v)) for v in model.graph.input),
            tuple(TensorSpec(v.name, dtypes[v.type.tensor_type.elem_type], dims(v)) for v in model.graph.output),
        )

    @classmethod
    def from_engine_dir(cls, engine_dir, manifest, graph, device="cpu", **options):
        return cls(engine_dir / graph["file"])

    def forward(self, feeds):
        names = [t.name for t in self.signature.outputs]
        return dict(zip(names, self.evaluator.run(names, dict(feeds))))


@pytest.fixture
def reference_backend(monkeypatch):
    """The record and a target for it, registered for this test only."""
    monkeypatch.setattr("kiln.backends.BACKENDS", dict(BACKENDS))
    monkeypatch.setattr("runtimes.loading.ADAPTERS", dict(ADAPTERS))
    monkeypatch.setitem(TARGETS, "onnx-reference", Target("onnx-reference", "onnx-reference", "cpu", ("fp32",),
                                                          "ONNX's reference evaluator"))
    register_backend(Backend(name="onnx-reference", adapter=f"{__name__}:ReferencePredictor", capture=capture_onnx,
                             recipe=lambda target, precision: ["cleanup"]))


def test_a_backend_is_one_record(reference_backend, tmp_path, engine_dir, reference):
    result = kiln.convert("tiny-gpt2", target="onnx-reference", output=tmp_path / "engine")
    manifest = result.manifest
    assert (manifest["backend"], manifest["target"]) == ("onnx-reference", "onnx-reference")
    assert manifest["verification"]["passed"] is True and manifest["verification"]["logits"]["relative"] <= 1e-3
    assert [p["name"] for p in manifest["passes"]] == ["cleanup"]
    with kiln.load(tmp_path / "engine") as engine:
        assert isinstance(engine.model, ReferencePredictor)
        got = engine.generate([[5, 17, 300], [7]], max_new_tokens=4)
    want = reference(engine_dir("tiny-gpt2")).generate([[5, 17, 300], [7]], max_new_tokens=4)
    np.testing.assert_array_equal(got, want)


class StandInGpuPredictor(Predictor):
    """Stands in for a CUDA adapter: records the device it was opened on, computes on the CPU."""

    opened_on: list[str] = []

    @classmethod
    def from_engine_dir(cls, engine_dir, manifest, graph, device="cpu", **options):
        from runtimes.onnxruntime_adapter import OnnxRuntimePredictor

        cls.opened_on.append(device)
        return OnnxRuntimePredictor(engine_dir / graph["file"])


def _rewrite_manifest(engine, **fields):
    from runtimes.engine_dir import manifest_digest

    manifest = json.loads((engine / "manifest.json").read_text())
    manifest.update(fields)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (engine / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def cuda_engine(engine_dir, tmp_path, monkeypatch):
    """The tiny-gpt2 engine with a manifest that says cuda, run by a stand-in adapter."""
    engine = shutil.copytree(engine_dir("tiny-gpt2"), tmp_path / "engine")
    monkeypatch.setitem(ADAPTERS, "standin-cuda", f"{__name__}:StandInGpuPredictor")
    _rewrite_manifest(engine, backend="standin-cuda", device="cuda")
    StandInGpuPredictor.opened_on.clear()
    return engine


def test_generate_and_predict_open_the_engine_on_its_manifests_device(cuda_engine, tmp_path):
    done = CliRunner().invoke(cli, ["generate", str(cuda_engine), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json"])
    assert done.exit_code == 0, done.output
    assert len(json.loads(done.stdout)["tokens"]) == 3
    ids = np.array([[1, 2, 3]])
    signature = runtimes.load(cuda_engine).signature
    from runtimes.decoder_lm import prefill_feeds

    np.savez(tmp_path / "feeds.npz", **prefill_feeds(signature, ids))
    done = CliRunner().invoke(cli, ["predict", str(cuda_engine), "--inputs", str(tmp_path / "feeds.npz"),
                                    "-o", str(tmp_path / "out.npz"), "--json"])
    assert done.exit_code == 0, done.output
    assert StandInGpuPredictor.opened_on == ["cuda", "cuda", "cuda"]


@pytest.mark.parametrize("backend, names", [("onnxruntime", "CUDAExecutionProvider"), ("aoti", "needs a GPU")])
def test_a_gpu_engine_without_a_gpu_exits_2_naming_it(engine_dir, tmp_path, backend, names):
    engine = shutil.copytree(engine_dir("tiny-gpt2"), tmp_path / "engine")
    _rewrite_manifest(engine, backend=backend, device="cuda", target="cuda",
                      providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    # Trusted: what is checked here is the device message, which the native-code gate would otherwise precede.
    for command in (["generate", str(engine), "--prompt-ids", "1,2", "--trust-native-code"],
                    ["verify", str(engine), "--trust-native-code"]):
        done = CliRunner().invoke(cli, command)
        assert done.exit_code == 2, done.output
        assert names in done.output and "Traceback" not in done.output
