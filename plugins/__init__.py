"""torchkiln's custom causal attention: one kernel source for CUDA and HIP, a CPU reference, and its hosts.

- build(target, archs) compiles the kernel (cuda: cubin + PTX, rocm: HIP code object, cpu: the C++
  reference as a shared library) and returns BuiltLibrary records for the engine manifest.
- attention_reference(q, k, v, past_len, ...) is the NumPy reference of the contract.
- load_torch_op() builds and loads kiln::causal_attention, the C++ reference as a PyTorch op.
- plugins.tensorrt_plugin registers kiln::CausalAttention with TensorRT (imports tensorrt lazily).
"""

from plugins.build import BuiltLibrary, build
from plugins.errors import AttentionInputError, PluginBuildError
from plugins.reference import attention_reference
from plugins.torch_op import load_torch_op

__all__ = [
    "AttentionInputError",
    "BuiltLibrary",
    "PluginBuildError",
    "attention_reference",
    "build",
    "load_torch_op",
]
