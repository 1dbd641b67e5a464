"""`kiln bench`: engines measured side by side in one process, interleaved, medians and spread.

Each round runs every engine once (A B C A B C ...), after a warm-up round, so drifts of a noisy
machine fall on all engines alike.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from runtimes.engine_dir import max_positions
from runtimes.foreign import is_foreign

# After a run, an ONNX Runtime pool spins a core for about 40 ms (measured here), OpenMP's a similar while; the
# engine timed next waits this long so that it does not share its cores with the last one's spinning.
SETTLE_S = 0.1


@dataclass(frozen=True)
class BenchConfig:
    prompt_lengths: tuple[int, ...] = (32, 128, 512)
    batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 32
    decode_prompt: int = 32
    rounds: int = 3
    threads: int = 2


@dataclass
class Candidate:
    """One thing to measure: a Predictor, and what the report says about it."""

    label: str
    predictor: object
    engine_dir: str | None
    size_bytes: int  # engine files on disk
    weight_bytes: int  # bytes a decode step reads: the weights, less gather-only tables
    max_positions: int | None  # prompts longer than this are skipped
    vocab_size: int


def engine_candidate(engine_dir: Path, threads: int, label: str | None = None, trust_native_code: bool = False) -> Candidate:
    """Load an engine directory for measuring, with its backend's options for `threads` threads."""
    import runtimes
    from kiln.backends import backend_named
    from runtimes.engine_dir import graph_entries, read_manifest

    if is_foreign(engine_dir):
        return foreign_candidate(Path(engine_dir), threads, label)
    manifest = read_manifest(engine_dir)
    backend = backend_named(manifest["backend"])
    predictor = runtimes.load(engine_dir, trust_native_code=trust_native_code, **backend.bench_options(threads))
    weights = sum(backend.weight_bytes(Path(engine_dir) / g["file"]) for g in graph_entries(manifest).values())
    config = manifest["source"]["config"]
    return Candidate(
        label or f"{Path(engine_dir).name} ({manifest['target']}/{manifest['precision']})", predictor, str(engine_dir),
        sum(entry["bytes"] for entry in manifest["files"].values()), weights, max_positions(manifest),
        config["vocab_size"],
    )


def foreign_candidate(folder: Path, threads: int, label: str | None = None) -> Candidate:
    """A decoder folder not built by torchkiln (an Optimum export, a genai-builder folder), measured the same way."""
    import runtimes
    from kiln.backends import backend_named
    from runtimes.decoder_lm import vocab_size
    from runtimes.foreign import context_length_of, foreign_graph_file

    backend = backend_named("onnxruntime")
    predictor = runtimes.load(folder, **backend.bench_options(threads))
    return Candidate(
        label or f"{folder.name} (not built by torchkiln)", predictor, str(folder),
        sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()), backend.weight_bytes(foreign_graph_file(folder)),
        context_length_of(folder), vocab_size(predictor.signature),
    )


def reference_candidate(engine_dir: Path, threads: int, compiled: bool = False) -> Candidate:
    """The engine's source model in PyTorch eager, or under `torch.compile(dynamic=True)` when `compiled`
    (compiling happens in the warm-up round); its weight bytes are not counted (no floor drawn)."""
    import torch

    from kiln.reference import load_reference
    from runtimes.engine_dir import read_manifest

    torch.set_num_threads(threads)
    manifest = read_manifest(engine_dir)
    predictor = load_reference(engine_dir)
    if compiled:
        for graph in predictor.graphs.values():
            graph.function = torch.compile(graph.function, dynamic=True)
    label = "torch.compile" if compiled else "pytorch eager"
    return Candidate(label, predictor, None, 0, 0, max_positions(manifest), manifest["source"]["config"]["vocab_size"])


def read_bandwidth(threads: int, megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes per second a sum over a large fp32 tensor reads with `threads` threads (median), the tensor in huge
    pages where the engines' weights are (runtimes/huge_pages.py): 4 KiB pages would read slower than they do."""
    import torch

    from runtimes.huge_pages import anonymous_ranges, collapse_new

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    before = anonymous_ranges()
    data = torch.ones(megabytes * 1024 * 1024 // 4)
    collapse_new(before)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    torch.set_num_threads(previous)
    return data.numel() * 4 / statistics.median(times)


def prefill_seconds(predictor, length: int, rng: np.random.Generator, vocab: int) -> float:
    """One forward pass over `length` new tokens at batch 1 with an empty cache."""
    from runtimes.decoder_lm import prefill_feeds

    feeds = prefill_feeds(predictor.signature, rng.integers(0, vocab, size=(1, length)))
    start = time.perf_counter()
    predictor.predict(feeds)
    return time.perf_counter() - start


def generation_figures(predictor, batch: int, prompt: int, new_tokens: int, rng: np.random.Generator, vocab: int):
    """(first-token seconds, decode tokens/s over all rows) of one greedy generation with no EOS."""
    prompts = rng.integers(0, vocab, size=(batch, prompt))
    stamps = [time.perf_counter()]
    predictor.generate(prompts, new_tokens, on_token=lambda _: stamps.append(time.perf_counter()))
    first = stamps[1] - stamps[0]
    return first, batch * (len(stamps) - 2) / (stamps[-1] - stamps[1])


def run_bench(candidates: list[Candidate], config: BenchConfig, on_progress: Callable[[str], None] | None = None) -> dict:
    """Measure every candidate; the first is the baseline of the ratios."""
    rng = np.random.default_rng(0)
    vocab = min(c.vocab_size for c in candidates)
    samples = {c.label: {"prefill": {}, "first_token": [], "decode": {}} for c in candidates}
    bandwidths = []  # one per measured round: this machine's bandwidth drifts by a third over minutes
    for round_index in range(config.rounds + 1):  # round 0 warms up and is discarded
        if round_index:
            bandwidths.append(read_bandwidth(config.threads))
        for candidate in candidates:
            if on_progress:
                on_progress(f"round {round_index}/{config.rounds}: {candidate.label}")
            figures = samples[candidate.label]
            time.sleep(SETTLE_S)
            for length in config.prompt_lengths:
                if candidate.max_positions and length > candidate.max_positions:
                    continue
                seconds = prefill_seconds(candidate.predictor, length, rng, vocab)
                if round_index:
                    figures["prefill"].setdefault(length, []).append(seconds)
            for batch in config.batches:
                first, rate = generation_figures(candidate.predictor, batch, config.decode_prompt, config.new_tokens, rng, vocab)
                if round_index:
                    figures["decode"].setdefault(batch, []).append(rate)
                    if batch == 1:
                        figures["first_token"].append(first)
    bandwidth = statistics.median(bandwidths)
    results = []
    for candidate in candidates:
        figures = samples[candidate.label]
        results.append({
            "label": candidate.label,
            "engine_dir": candidate.engine_dir,
            "size_bytes": candidate.size_bytes,
            "weight_bytes": candidate.weight_bytes,
            "floor_tok_s": bandwidth / candidate.weight_bytes if candidate.weight_bytes else None,
            "floor_share_b1": _floor_share(figures["decode"].get(1), bandwidths, candidate.weight_bytes),
            "prefill_ms": {str(k): _spread(v, 1e3) for k, v in figures["prefill"].items()},
            "first_token_ms": _spread(figures["first_token"], 1e3),
            "decode_tok_s": {str(k): _spread(v) for k, v in figures["decode"].items()},
        })
    _add_ratios(results)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "memory_gib": _memory_gib(), "python": platform.python_version()},
        "config": asdict(config),
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "read_bandwidth_gb_s_rounds": [b / 1e9 for b in bandwidths],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "engines": results,
    }


def _floor_share(rates: list[float] | None, bandwidths: list[float], weight_bytes: int) -> float | None:
    """Median over rounds of decode steps per second (batch 1: tok/s) over that round's floor (bandwidth / weight
    bytes)."""
    if not rates or not weight_bytes:
        return None
    return statistics.median(rate * weight_bytes / bandwidth for rate, bandwidth in zip(rates, bandwidths))


def _spread(values: list[float], scale: float = 1.0) -> dict:
    return {"median": statistics.median(values) * scale, "min": min(values) * scale, "max": max(values) * scale,
            "runs": len(values)}


def _add_ratios(results: list[dict]) -> None:
    """Speed-ups against the first entry: > 1 means faster than it."""
    base = results[0]
    for entry in results:
        entry["vs_first"] = {
            **{f"decode_b{b}": entry["decode_tok_s"][b]["median"] / base["decode_tok_s"][b]["median"]
               for b in entry["decode_tok_s"] if b in base["decode_tok_s"]},
            **{f"prefill_{n}": base["prefill_ms"][n]["median"] / entry["prefill_ms"][n]["median"]
               for n in entry["prefill_ms"] if n in base["prefill_ms"]},
            "first_token": base["first_token_ms"]["median"] / entry["first_token_ms"]["median"],
        }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)


def plot(report: dict, path: Path) -> None:
    """Decode tok/s per engine and batch, each engine's bandwidth floor as a line; prefill latency per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = report["engines"]
    labels = [e["label"] for e in engines]
    fig, (decode_ax, prefill_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    batches = list(engines[0]["decode_tok_s"])
    width = 0.8 / max(len(batches), 1)
    for i, batch in enumerate(batches):
        rates = [e["decode_tok_s"].get(batch, {}).get("median", 0) for e in engines]
        decode_ax.bar(np.arange(len(engines)) + i * width, rates, width, label=f"batch {batch}")
    floors = [(x, e["floor_tok_s"]) for x, e in enumerate(engines) if e["floor_tok_s"]]
    for i, (x, floor) in enumerate(floors):
        decode_ax.hlines(floor, x - width / 2, x + width * (len(batches) - 0.5), colors="black", linestyles="--",
                         label="bandwidth floor, batch 1" if i == 0 else None)
    decode_ax.set_xticks(np.arange(len(engines)) + width * (len(batches) - 1) / 2, labels, rotation=15)
    decode_ax.set_ylabel("decode tokens/s (median)")
    decode_ax.set_title(f"Decode ({report['read_bandwidth_gb_s']:.0f} GB/s read bandwidth)")
    decode_ax.legend()
    lengths = sorted({n for e in engines for n in e["prefill_ms"]}, key=int)
    width = 0.8 / max(len(lengths), 1)
    for i, length in enumerate(lengths):
        latency = [e["prefill_ms"].get(length, {}).get("median", 0) for e in engines]
        prefill_ax.bar(np.arange(len(engines)) + i * width, latency, width, label=f"prompt {length}")
    prefill_ax.set_xticks(np.arange(len(engines)) + width * (len(lengths) - 1) / 2, labels, rotation=15)
    prefill_ax.set_ylabel("prefill latency ms, batch 1 (median)")
    prefill_ax.set_title("Prefill")
    prefill_ax.legend()
    fig.suptitle(f"kiln bench, {report['machine']['cores']} cores, {report['config']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
