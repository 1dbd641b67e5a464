"""Load on `kiln serve`: throughput and latency at 1, 4, 16, 64 concurrent streaming clients, continuous
batching against one-request-at-a-time serving (`--max-batch 1`), side by side in one run.

    .venv/bin/python benchmarks/serve_load.py build/gpt2-cpu-int8 [--clients 1,4,16,64] [--requests 256]
        [--seconds 180] [--max-tokens 32] [--out benchmarks/results/serve-load]

Each mode starts its own `kiln serve` on a free loopback port; the modes alternate per concurrency level, so
both see the machine in the same state. Every client sends greedy streaming completions of random prompts
(8 to 64 tokens, seeded) back to back until the level's request count or time bound is reached. Reported
per level: generated tokens per second over the level's wall time, p50/p99 time to first token, p50/p99
inter-token latency (client side, from the server-sent events), errors. `--url` measures a running server
instead (one mode).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np

MODES = {"continuous batching": [], "one at a time": ["--max-batch", "1"]}


async def one_request(client: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    stamps, tokens = [], 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        async with client.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                return {"error": f"HTTP {response.status}"}
            async for line in response.content:  # line by line: one server-sent event each
                if line.startswith(b"data: {"):
                    count = len(json.loads(line[6:])["choices"][0]["token_ids"])
                    if count:
                        stamps.append(time.perf_counter())
                        tokens += count
    except aiohttp.ClientError as error:
        return {"error": type(error).__name__}
    if not stamps:
        return {"error": "no tokens"}
    return {"tokens": tokens, "ttft": stamps[0] - start, "itl": list(np.diff(stamps))}


async def level(url: str, clients: int, requests: int, seconds: float, max_tokens: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, size=int(n)).tolist() for n in rng.integers(8, 65, size=requests)]
    queue = list(reversed(prompts))
    results = []
    deadline = time.perf_counter() + seconds

    async def client_loop(client):
        while queue and time.perf_counter() < deadline:
            results.append(await one_request(client, url, queue.pop(), max_tokens))

    start = time.perf_counter()
    # aiohttp, whose C parser spent 0.7 s of CPU on 8192 streamed tokens where httpx spent 1.65 s: on two cores,
    # what the load generator spends is taken from the server it measures.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=600)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    itl = [gap for r in ok for gap in r["itl"]]

    def pct(values, q):
        return round(float(np.percentile(values, q)) * 1000, 1) if values else None

    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "tokens": sum(r["tokens"] for r in ok), "seconds": round(wall, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99)}


def start_server(engine: Path, extra: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", "from kiln.cli import main; main()", "serve", str(engine), "--host", "127.0.0.1",
               "--port", str(port), "--threads", str(threads), "--max-queue", "1024", *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
                if reply.status == 200:
                    return process, url
        except OSError:  # not listening yet, or not ready (urllib's HTTPError is an OSError too)
            pass
        if process.poll() is not None:
            raise SystemExit(f"kiln serve {engine} exited with {process.returncode}")
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"kiln serve {engine} did not become healthy")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, levels in report["modes"].items():
        clients = [entry["clients"] for entry in levels]
        throughput.plot(clients, [entry["tokens_per_s"] for entry in levels], marker="o", label=mode)
        ttft.plot(clients, [entry["ttft_ms_p99"] for entry in levels], marker="o", label=mode)
    for axis, label in ((throughput, "generated tokens/s"), (ttft, "p99 time to first token (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"kiln serve, {report['engine']}, {report['max_tokens']} new tokens per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}`", "", f"{report['date']}, {report['machine']}", "",
             "| mode | clients | requests | errors | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, levels in report["modes"].items():
        for e in levels:
            lines.append(f"| {mode} | {e['clients']} | {e['requests']} | {e['errors']} | {e['tokens_per_s']} | "
                         f"{e['ttft_ms_p50']} | {e['ttft_ms_p99']} | {e['itl_ms_p50']} | {e['itl_ms_p99']} |")
    ratios = report.get("throughput_ratio")
    if ratios:
        lines += ["", "Continuous batching / one at a time, tokens/s: " +
                  ", ".join(f"{clients} clients {ratio:.2f}x" for clients, ratio in ratios)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--clients", default="1,4,16,64")
    # 256: 16 requests per client at 16 clients, so the level's ramp-up and drain weigh little in its throughput.
    parser.add_argument("--requests", type=int, default=256, help="Requests per level and mode (a bound).")
    parser.add_argument("--seconds", type=float, default=180, help="Time bound per level and mode.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--url", help="Measure this running server (loopback) instead of starting one per mode.")
    parser.add_argument("--out", type=Path, help="Write OUT.json, OUT.md and OUT.png.")
    args = parser.parse_args()
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        raise SystemExit("--url: the load generator only targets loopback servers")
    manifest = json.loads((args.engine / "manifest.json").read_text())
    vocab = manifest["source"]["config"]["vocab_size"]
    clients = [int(c) for c in args.clients.split(",")]
    modes = {"server": None} if args.url else MODES
    servers = {} if args.url else {mode: start_server(args.engine, extra, args.threads) for mode, extra in MODES.items()}
    report = {"engine": str(args.engine), "max_tokens": args.max_tokens, "command": " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{len(__import__('os').sched_getaffinity(0))} cores", "modes": {mode: [] for mode in modes}}
    try:
        for count in clients:
            for mode in modes:  # alternating per level: both modes see the machine in the same state
                url = args.url or servers[mode][1]
                entry = asyncio.run(level(url, count, args.requests, args.seconds, args.max_tokens, vocab, seed=count))
                report["modes"][mode].append(entry)
                print(f"{mode:>20} | {count:>3} clients | {entry['tokens_per_s']:>7} tok/s | TTFT p99 "
                      f"{entry['ttft_ms_p99']} ms | errors {entry['errors']}", flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)
    if not args.url:
        batched, single = report["modes"]["continuous batching"], report["modes"]["one at a time"]
        # [clients, ratio] per level, in order: a level may repeat (--clients 16,16,16)
        report["throughput_ratio"] = [[b["clients"], round(b["tokens_per_s"] / s["tokens_per_s"], 2)]
                                      for b, s in zip(batched, single) if s["tokens_per_s"]]
    print(markdown(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))
        plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
