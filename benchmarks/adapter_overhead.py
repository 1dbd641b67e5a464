"""What the ONNX Runtime adapter costs per decode step, against a bare InferenceSession.run loop.

Both decode the same prompt greedily on the same engine, interleaved in one process (A B, B A, ...),
and the medians are compared. Run: .venv/bin/python benchmarks/adapter_overhead.py [--preset gpt2]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort  # noqa: F401  (the session type in bare_loop's signature)

import kiln
from runtimes.decoder_lm import past_inputs


def bare_loop(session: ort.InferenceSession, past_names: list[str], prompt: np.ndarray, new_tokens: int, cache_shape):
    """The least a decode loop can do: run, argmax, feed the presents back. Returns per-token times."""
    batch, length = prompt.shape
    feeds = {"input_ids": prompt, "attention_mask": np.ones_like(prompt), "position_ids": np.arange(length)[None],
             **{n: np.zeros(cache_shape, np.float32) for n in past_names}}
    output_names = [o.name for o in session.get_outputs()]
    stamps = [time.perf_counter()]
    for step in range(new_tokens):
        outputs = dict(zip(output_names, session.run(output_names, feeds)))
        token = outputs["logits"][:, -1].argmax(-1)[:, None]
        stamps.append(time.perf_counter())
        total = length + step + 1
        feeds = {"input_ids": token, "attention_mask": np.ones((batch, total), np.int64),
                 "position_ids": np.array([[total - 1]]),
                 **{n: outputs[n.replace("past_key_values.", "present.")] for n in past_names}}
    return np.diff(stamps)


def adapter_loop(predictor, prompt: np.ndarray, new_tokens: int):
    stamps = [time.perf_counter()]
    predictor.generate(prompt, new_tokens, on_token=lambda _: stamps.append(time.perf_counter()))
    return np.diff(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    engine_dir = Path("build") / f"{args.preset}-cpu-fp32"
    if not (engine_dir / "manifest.json").exists():
        kiln.convert(args.preset, output=engine_dir, force=True)
    predictor = kiln.load(engine_dir, threads=args.threads)
    # The bare loop drives the adapter's own InferenceSession: two sessions of one model differed by up
    # to 10 % here depending on which was created first, which would hide what the adapter itself costs.
    session = predictor.model.session
    past = past_inputs(predictor.signature)
    cache_shape = (1, past[0].shape[1], 0, past[0].shape[3])
    prompt = np.random.default_rng(0).integers(0, 1000, size=(1, args.prompt))

    results = {"bare InferenceSession.run": [], "kiln ORT adapter": []}
    adapter_loop(predictor, prompt, 4)  # warm-up
    bare_loop(session, [p.name for p in past], prompt, 4, cache_shape)
    loops = {
        "bare InferenceSession.run": lambda: bare_loop(session, [p.name for p in past], prompt, args.new_tokens, cache_shape),
        "kiln ORT adapter": lambda: adapter_loop(predictor, prompt, args.new_tokens),
    }
    for round_index in range(args.rounds):
        # A B, then B A: whatever the first run of a round leaves behind falls on both loops alike.
        for name in (list(loops) if round_index % 2 == 0 else list(loops)[::-1]):
            results[name].append(loops[name]())

    print(f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; preset {args.preset}, "
          f"batch 1, prompt {args.prompt}, {args.new_tokens} new tokens, {args.threads} threads, {args.rounds} rounds interleaved")
    print("| loop | first token ms (median) | decode tok/s (median) | spread (min-max tok/s) |")
    print("| --- | --- | --- | --- |")
    decode_rates = {}
    for name, runs in results.items():
        first = statistics.median(r[0] for r in runs) * 1e3
        rates = [(len(r) - 1) / r[1:].sum() for r in runs]
        decode_rates[name] = statistics.median(rates)
        print(f"| {name} | {first:.1f} | {decode_rates[name]:.1f} | {min(rates):.1f}-{max(rates):.1f} |")
    bare, adapter = decode_rates.values()
    print(f"adapter cost per decode step: {100 * (bare / adapter - 1):+.1f} % of the bare loop's step time")


if __name__ == "__main__":
    main()
