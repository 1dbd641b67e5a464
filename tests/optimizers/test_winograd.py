"""The winograd pass: 3x3 convolutions rewritten as Winograd transforms give what ONNX Runtime's Conv gives."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizers.pass_types import PassContext
from optimizers.winograd import WINOGRAD

CHANNELS = 24
# Shapes the UNet never sees too: odd, non-square, a single pixel, batch 3 (the pass pads to whole tiles).
SHAPES = [(1, CHANNELS, 8, 8), (3, CHANNELS, 9, 14), (2, CHANNELS, 1, 1), (1, CHANNELS, 5, 2)]


def _convolutions() -> bytes:
    """Three eligible 3x3 convolutions (two sharing a weight, one a graph output) and a strided one that is not."""
    rng = np.random.default_rng(0)
    w1, w2, w3 = ((rng.standard_normal((CHANNELS, CHANNELS, 3, 3)) * 0.1).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal(CHANNELS).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "bias"], ["h1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["h2"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h2", "w3"], ["strided"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["h2", "w1", "bias"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "convolutions", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", CHANNELS, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("strided", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (bias, "bias"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def _rewritten(model: bytes, **options):
    import onnx

    rewritten, report = WINOGRAD(ir.serde.deserialize_model(onnx.load_from_string(model)),
                                 PassContext(options={"winograd": options}))
    return ir.serde.serialize_model(rewritten).SerializeToString(), report


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("big_tile_mb,tile", [(0.0, "tiles_2x2"), (1.0, "tiles_4x4")])
def test_rewritten_convolutions_match_direct_ones(big_tile_mb, tile):
    original = _convolutions()
    rewritten, report = _rewritten(original, min_channels=16, big_tile_mb=big_tile_mb)
    assert report.details["convs_rewritten"] == report.details[tile] == 3
    assert report.ops_after["Conv"] == 1  # the strided one
    direct, winograd = _session(original), _session(rewritten)
    assert [o.name for o in winograd.get_outputs()] == ["y", "strided"]
    rng = np.random.default_rng(1)
    for shape in SHAPES:
        x = rng.standard_normal(shape).astype(np.float32)
        for want, got in zip(direct.run(None, {"x": x}), winograd.run(None, {"x": x})):
            assert got.shape == want.shape
            # Measured: ~5e-7 of the output range with 2x2 tiles, ~3e-6 with 4x4 ones.
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), shape


def test_narrow_convolutions_stay_direct():
    """The default threshold (320 channels) keeps these 24-channel convolutions as they are."""
    _, report = _rewritten(_convolutions())
    assert not report.changed and report.details["convs_rewritten"] == 0


@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_tiny_sd_graphs_keep_their_outputs(sd_engine, component):
    """Every 3x3 convolution of the verified tiny-sd UNet and VAE decoder rewritten (its channels are few, hence
    min_channels=16): outputs within 1e-5 of their range of the engine's, at the guidance batch and non-square."""
    import onnx

    path = sd_engine / component / "model.onnx"
    original = onnx.load(str(path)).SerializeToString()  # weights and all, wherever they are stored
    rewritten, report = _rewritten(original, min_channels=16)
    assert report.details["convs_rewritten"] >= 4
    direct, winograd = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), _session(rewritten)
    rng = np.random.default_rng(2)
    for batch, height, width in ((2, 16, 16), (1, 8, 24)):
        feeds = {"unet": {"sample": rng.standard_normal((batch, 4, height, width), dtype=np.float32),
                          "timestep": np.array(500.0, np.float32),
                          "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32)},
                 "vae_decoder": {"latent_sample": rng.standard_normal((batch, 4, height, width), dtype=np.float32)},
                 }[component]
        want, got = direct.run(None, feeds)[0], winograd.run(None, feeds)[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.ptp(want)
