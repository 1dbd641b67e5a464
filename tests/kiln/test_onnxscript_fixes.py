"""Corrections to onnxscript: tiny epsilons survive its no-op rules; complex unsqueeze (Llama 4 rotary) exports."""
import numpy as np
import onnxruntime
import torch

from kiln.onnxscript_fixes import add_complex_unsqueeze, make_no_op_rules_exact


class RMSNormCore(torch.nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)  # Helium's epsilon


def test_an_epsilon_of_1e_8_survives_the_export_optimizer():
    make_no_op_rules_exact()
    program = torch.onnx.export(RMSNormCore(), (torch.zeros(2, 4),), dynamo=True, optimize=True)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = np.array([[0, 0, 0, 0], [1, 2, 3, 4]], np.float32)
    got = session.run(None, {session.get_inputs()[0].name: rows})[0]
    assert "Add" in [node.op_type for node in program.model_proto.graph.node]
    np.testing.assert_allclose(got, RMSNormCore()(torch.from_numpy(rows)).numpy(), rtol=1e-6)


class ComplexRotary(torch.nn.Module):
    """Llama 4's rotary: positions to a complex `freqs_cis`, indexed with None (a complex unsqueeze)."""

    def forward(self, x, positions):
        freqs = positions[..., None].float() * torch.arange(1, 5).float()
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
        x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_ * freqs_cis[:, :, None, :]).flatten(3)


def test_a_complex_rotary_exports_and_matches_torch():
    add_complex_unsqueeze()
    add_complex_unsqueeze()  # idempotent
    x, positions = torch.randn(2, 5, 3, 8), torch.arange(5).expand(2, 5)
    sequence = torch.export.Dim("sequence")
    program = torch.onnx.export(ComplexRotary(), (x, positions), dynamo=True,
                                dynamic_shapes=({1: sequence}, {1: sequence}))
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x, positions = torch.randn(2, 7, 3, 8), torch.arange(7).expand(2, 7) + 3
    got = session.run(None, {"x": x.numpy(), "positions": positions.numpy()})[0]
    np.testing.assert_allclose(got, ComplexRotary()(x, positions).numpy(), atol=1e-5)
