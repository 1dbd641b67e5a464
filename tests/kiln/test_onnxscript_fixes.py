"""The no-op rules of onnxscript keep a tiny epsilon: an RMSNorm of a zero row stays 0, not NaN."""
import numpy as np
import onnxruntime
import torch

from kiln.onnxscript_fixes import make_no_op_rules_exact


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
