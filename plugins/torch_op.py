"""kiln::causal_attention as a PyTorch op: build it at first use and load it.

CPU tensors run the C++ reference (torch_op.cpp); on a CUDA or ROCm build of torch that sees a GPU, the
kernel of causal_attention.cu is built in too (torch_op_cuda.cu; cpp_extension hipifies it for ROCm).

torch is imported here only, inside the loader, so that building kernels or running an ONNX Runtime
engine never needs it (torch is not a build requirement of the plugins either).
"""

import functools
from pathlib import Path

from plugins.build import SOURCE_DIR, default_build_dir, source_hash
from plugins.errors import PluginBuildError

TORCH_OP_SOURCES = (SOURCE_DIR / "torch_op.cpp", SOURCE_DIR / "torch_op.h", SOURCE_DIR / "attention_cpu.h")
TORCH_GPU_SOURCES = (SOURCE_DIR / "torch_op_cuda.cu", SOURCE_DIR / "causal_attention.cu", SOURCE_DIR / "compat.h")


@functools.cache
def load_torch_op(verbose: bool = False):
    """Build (once per source hash and torch version) and load the op; returns torch.ops.kiln.causal_attention.

    causal_attention(query [b, h, q, d], key [b, kv_h, s, d], value [b, kv_h, s, d], past_len,
    alibi_slopes [h] | None = None, scale | None = None, key_mask [b, s] | None = None) -> [b, h, q, d],
    with s >= past_len + q; key_mask 0 hides a key (padding).
    """
    import torch
    from torch.utils import cpp_extension

    if not hasattr(torch.ops.kiln, "causal_attention"):
        gpu = torch.cuda.is_available()
        sources = TORCH_OP_SOURCES + (TORCH_GPU_SOURCES if gpu else ())
        # The compiled library is tied to torch's C++ ABI, so torch's version is part of the cache key.
        kind = "gpu" if gpu else "cpu"
        build_dir = default_build_dir() / f"torch-{kind}-{source_hash(sources, torch.__version__)}"
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            cpp_extension.load(
                name=f"kiln_attention_torch_{kind}",
                sources=[str(TORCH_OP_SOURCES[0])] + ([str(TORCH_GPU_SOURCES[0])] if gpu else []),
                extra_cflags=["-O2"],
                extra_cuda_cflags=["-O3"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        except (RuntimeError, OSError) as error:
            raise PluginBuildError(
                f"the C++ compiler (through torch.utils.cpp_extension and ninja) failed to build "
                f"{', '.join(Path(p).name for p in sources)} into {build_dir}; "
                f"expected a loadable kiln::causal_attention op: {error}"
            ) from error
    _register_fake(torch)
    return torch.ops.kiln.causal_attention


def _register_fake(torch) -> None:
    # Lets torch.compile, torch.export and FakeTensor tracing reason about the op without running it.
    @torch.library.register_fake("kiln::causal_attention")
    def _(query, key, value, past_len, alibi_slopes=None, scale=None, key_mask=None):
        torch._check(query.dim() == 4, lambda: "query must be [batch, heads, q_len, head_dim]")
        torch._check(key.shape == value.shape, lambda: "key and value must have the same shape")
        torch._check(past_len + query.shape[2] <= key.shape[2], lambda: "past_len + q_len exceeds the cache")
        for name, tensor in (("key", key), ("value", value), ("alibi_slopes", alibi_slopes), ("key_mask", key_mask)):
            # The GPU kernel reads every tensor through raw pointers: one on the CPU is an illegal memory access.
            torch._check(tensor is None or tensor.device == query.device,
                         lambda: f"{name} must be on the query's device ({query.device}); got {tensor.device}")
        return query.new_empty(query.shape)
