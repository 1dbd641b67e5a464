"""Which int8 is faster on this CPU: one projection as `int8_dynamic` makes it (DynamicQuantizeMatMul: int8
weights, activations quantized per call) against `int8_weight_only`'s and `int4`'s MatMulNBits (8-bit and
4-bit blocks, accuracy_level 4), at the shapes of a SmolLM-135M decoder.

    .venv/bin/python benchmarks/int8_kernels.py [--threads 2] [--rows 1,8,256] [--blocks 32,128] [--model gpt2]

Rows: 1 and 8 are decode steps at batch 1 and 8, 256 a prefill of 8 x 32 tokens. `--blocks`: the MatMulNBits
block sizes to compare (default 32); `--model gpt2`: gpt2's projections instead, as benchmarks/serve_load.py
serves them. Runs interleave the kernels; the table gives min / median microseconds (min: what the kernel costs
when nothing else runs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optimizers.quantize import nbits_blocks  # noqa: E402  (after the path insert)

# SmolLM-135M: hidden 576, 9 heads of 64, 3 KV heads, MLP 1536, vocab 49152 (the tied LM head).
PROJECTIONS = {"q, o": (576, 576), "k, v": (576, 192), "gate, up": (576, 1536), "down": (1536, 576),
               "lm_head": (576, 49152)}
# gpt2 (124M): the packed QKV, attention output, MLP up and down, tied LM head.
GPT2_PROJECTIONS = {"qkv": (768, 2304), "o": (768, 768), "fc": (768, 3072), "proj": (3072, 768),
                    "lm_head": (768, 50257)}


def sessions(weight: np.ndarray, threads: int, blocks: list[int]) -> dict:
    """kernel name -> an onnxruntime session computing `x [M, K] @ weight [K, N]` with it."""
    from onnx import numpy_helper

    scales = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127  # per output column, as int8_dynamic's per_channel
    int8 = np.clip(np.rint(weight / scales), -127, 127).astype(np.int8)
    made = {"DynamicQuantizeMatMul": _session("DynamicQuantizeMatMul", ["x", "B", "scales"], weight.shape, threads, {},
                                              [numpy_helper.from_array(int8, "B"),
                                               numpy_helper.from_array(scales.astype(np.float32), "scales")])}
    for bits, block in [(8, b) for b in blocks] + [(4, b) for b in blocks]:
        packed, block_scales = nbits_blocks(weight, bits, block, symmetric=True)
        attributes = dict(K=weight.shape[0], N=weight.shape[1], bits=bits, block_size=block, accuracy_level=4)
        made[f"MatMulNBits {bits}-bit/{block}"] = _session("MatMulNBits", ["x", "B", "scales"], weight.shape, threads, attributes,
                                                   [numpy_helper.from_array(packed, "B"),
                                                    numpy_helper.from_array(block_scales, "scales")])
    return made


def _session(op: str, inputs: list[str], shape: tuple[int, int], threads: int, attributes: dict, initializers: list):
    import onnxruntime
    from onnx import TensorProto, helper

    rows, cols = shape
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], domain="com.microsoft", **attributes)], op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", cols])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,256")
    parser.add_argument("--blocks", default="32", help="MatMulNBits block sizes, comma-separated.")
    parser.add_argument("--model", choices=("smollm", "gpt2"), default="smollm", help="Whose projection shapes.")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    kernels = None
    blocks = [int(b) for b in args.blocks.split(",")]
    for name, shape in (PROJECTIONS if args.model == "smollm" else GPT2_PROJECTIONS).items():
        made = sessions((rng.standard_normal(shape) * 0.02).astype(np.float32), args.threads, blocks)
        if kernels is None:
            kernels = list(made)
            print(f"| projection [K, N] | rows | {' | '.join(f'{k} us (min / median)' for k in kernels)} |")
            print("| --- | ---: |" + " ---: |" * len(kernels))
        for rows in map(int, args.rows.split(",")):
            x = rng.standard_normal((rows, shape[0])).astype(np.float32)
            seconds = {k: [] for k in made}
            repeats = 15 if rows * shape[1] > 1e6 else 60
            for _ in range(repeats):
                for kernel, session in made.items():
                    start = time.perf_counter()
                    session.run(None, {"x": x})
                    seconds[kernel].append(time.perf_counter() - start)
            cells = [f"{min(s) * 1e6:.0f} / {statistics.median(s) * 1e6:.0f}" for s in seconds.values()]
            print(f"| {name} {list(shape)} | {rows} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
