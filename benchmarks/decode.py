"""Decode speed of the CPU engines against PyTorch eager, and the machine's memory-bandwidth floor.

    .venv/bin/python benchmarks/decode.py [--preset gpt2] [--prompt 32] [--new-tokens 64] [--threads 2] [--repeats 3]

Variants (plain export, fused fp32, int8, int4, PyTorch eager `generate`) run interleaved in one process,
batch 1, greedy; the table gives medians over the repeats. The floor is a variant's weight bytes read per
token divided by the read bandwidth a large `torch.sum` reaches with the same threads.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln.backends.onnxruntime import bytes_read_per_token  # noqa: E402  (after the path insert)
from kiln.bench import _cpu_name, read_bandwidth  # noqa: E402


def onnx_run(predictor, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(first-token seconds, decode tokens per second) of one greedy generation."""
    start = time.perf_counter()
    first = None
    for step, _ in enumerate(predictor.stream(prompt, max_new_tokens=new_tokens)):
        if step == 0:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return first, (new_tokens - 1) / (total - first)


def eager_run(module, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    import torch

    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        start = time.perf_counter()
        module(input_ids=ids, use_cache=True).logits[:, -1].argmax(-1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = module.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)
        total = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return first, (new_tokens - 1) / (total - first)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from exporter import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.preset)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        _benchmark(args, loaded, Path(tmp), argv)


def _benchmark(args, loaded, workdir: Path, argv) -> None:
    import torch

    from exporter.capture import capture
    from optimizers import PassContext, run_recipe
    from runtimes.generate import DecoderLMPredictor
    from runtimes.onnxruntime_adapter import OnnxRuntimePredictor

    build_seconds = {}
    start = time.perf_counter()
    plain = capture(loaded, workdir)["model"].path
    build_seconds["plain export"] = time.perf_counter() - start
    paths = {"plain export": plain}
    for label, precision in (("fused fp32", "fp32"), ("int8", "int8"), ("int4", "int4")):
        start = time.perf_counter()
        context = PassContext(target="cpu", recipe="cpu", precision=precision, facts=loaded.facts, family=loaded.family)
        run_recipe(plain, context, output=workdir / f"{precision}.onnx")
        paths[label] = workdir / f"{precision}.onnx"
        build_seconds[label] = time.perf_counter() - start
    # Idle pools must sleep, not spin: spinning variants would steal the cores from the one being timed.
    predictors = {label: DecoderLMPredictor({"model": OnnxRuntimePredictor(path, threads=args.threads, allow_spinning=False)})
                  for label, path in paths.items()}
    bandwidth = read_bandwidth(args.threads)

    prompt = np.random.default_rng(0).integers(3, loaded.facts.vocab_size, size=(1, args.prompt))
    eager_1 = "PyTorch eager, 1 thread"
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in [*predictors, "PyTorch eager", eager_1]}
    for label, predictor in predictors.items():  # warm-up: first runs allocate
        onnx_run(predictor, prompt, 4)
    eager_run(loaded.module, prompt, 4)
    for _ in range(args.repeats):
        for label, predictor in predictors.items():
            results[label].append(onnx_run(predictor, prompt, args.new_tokens))
        results["PyTorch eager"].append(eager_run(loaded.module, prompt, args.new_tokens))
        # A control: OpenMP with 2 threads collapses when another process holds a core; 1 thread does not.
        torch.set_num_threads(1)
        results[eager_1].append(eager_run(loaded.module, prompt, args.new_tokens))
        torch.set_num_threads(args.threads)

    eager_first = statistics.median(r[0] for r in results["PyTorch eager"])
    eager_rate = statistics.median(r[1] for r in results["PyTorch eager"])
    weight_bytes = {label: bytes_read_per_token(path) for label, path in paths.items()}
    weight_bytes["PyTorch eager"] = weight_bytes[eager_1] = sum(p.numel() * p.element_size() for n, p in loaded.module.named_parameters()
                                        if "wpe" not in n)
    command = "python benchmarks/decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"## Decode benchmark: {args.preset}, batch 1, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, greedy, median of {args.repeats} interleaved runs\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- machine: {_cpu_name()}, {platform.system()} {platform.release()}, torch {torch.__version__}, "
          f"onnxruntime {_ort_version()}")
    print(f"- command: `{command.strip()}`")
    print(f"- load average at the end (other processes share this machine): {os.getloadavg()[0]:.1f}")
    print(f"- read bandwidth ({args.threads} threads, 512 MiB torch.sum, best of 9): {bandwidth / 1e9:.1f} GB/s\n")
    print("| variant | decode tok/s | × eager | first token ms | × eager | weight MB read/token | floor tok/s | % of floor | build s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, runs in results.items():
        first = statistics.median(r[0] for r in runs)
        rate = statistics.median(r[1] for r in runs)
        floor = bandwidth / weight_bytes[label]
        build = f"{build_seconds[label]:.1f}" if label in build_seconds else "-"
        print(f"| {label} | {rate:.1f} | {rate / eager_rate:.2f} | {first * 1e3:.1f} | {first / eager_first:.2f} | "
              f"{weight_bytes[label] / 1e6:.0f} | {floor:.0f} | {rate / floor:.0%} | {build} |")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
