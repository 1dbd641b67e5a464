"""kiln's CPU engines against onnxruntime-genai's model builder, on a SmolLM-135M-shaped Llama with random weights.

    .venv/bin/python benchmarks/peers.py [--work build/peers] [--precisions fp32,int8,int4] [--batches 1,8]
        [--rounds 5] [--prompt 32] [--new-tokens 64] [--threads 2] [--reconvert] [--genai-huge-pages]
        [--out benchmarks/results/peers]
    .venv/bin/python benchmarks/peers.py --tiny --rounds 1      # a 2-layer model: the whole script in minutes

Needs the `genai` extra (onnxruntime-genai, which `dev` brings) and `tokenizers`. Steps:

1. A seeded `LlamaForCausalLM` of SmolLM-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49152,
   tied embeddings) is saved as a Hugging Face folder under WORK, with a word-level tokenizer (`t0` ... `tN`):
   the builder refuses a folder without one; the prompts are token ids either way.
2. Each precision is converted by `kiln convert --target cpu --json` (verification included, as users run it)
   and by `python -m onnxruntime_genai.models.builder -e cpu`, each in its own process: wall seconds and the
   peak RSS of the process tree's largest process (`wait4`). An existing engine folder is reused (its recorded
   figures with it) unless `--reconvert`.
3. Generation runs one process per measurement (this script with the hidden `--worker`), tools alternating
   within each round and precisions interleaved: load, a 4-token warm-up, then one greedy generation of
   `--new-tokens` tokens after a random `--prompt`-token prompt (seeded, the same for both tools), every row
   generating exactly that many (no EOS stop). First token: prefill and the first token's choice, request
   set-up included. Decode tok/s is aggregate over the batch, batch * (new_tokens - 1) / decode seconds.
   kiln runs through `kiln.load(..., threads=T)` and `stream`, ONNX Runtime's idle threads spinning as genai's
   do (one process runs at a time); genai through
   `og.Model` and `og.Generator`, `intra_op_num_threads` set by a `genai_config` overlay. Each worker then
   measures the read bandwidth, so each decode figure has its own floor (bandwidth / weight bytes).
4. Medians over `--rounds`, written to OUT.json, OUT.md and OUT.png. A conversion or measurement that fails is
   reported with its error and the rest carry on.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kiln.backends import backend_named  # noqa: E402  (after the path insert)
from kiln.bench import _cpu_name, _floor_share, read_bandwidth  # noqa: E402

# The model's shape by name; tokens ids 0-2 are the tokenizer's unk, bos and eos.
SHAPES = {
    "smollm-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                        rope_theta=10000.0, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                 vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=10000.0,
                 rms_norm_eps=1e-5),
}
SPECIAL = dict(bos_token_id=1, eos_token_id=2)
TOOLS = ("kiln", "genai")
WARMUP_TOKENS = 4
SEED = 0
# Subprocesses import kiln from this checkout whether or not it is installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
# glibc's huge pages for every allocation of the process (glibc 2.35+): the nearest a genai user comes to the
# huge pages kiln's runtime moves its weights into (runtimes/huge_pages.py).
GLIBC_HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def save_source(folder: Path, shape: dict) -> None:
    """The seeded random-weight Llama and a word-level tokenizer over its vocabulary, as a Hugging Face folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, **SPECIAL)).eval()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(shape["vocab_size"])}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1",
                                         eos_token="t2").save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def run_measured(command: list[str], log_stem: Path) -> dict:
    """Run `command` with stdout and stderr to LOG_STEM.out/.err; its exit code, wall seconds and peak RSS.

    The peak RSS is `wait4`'s: the largest of the process and the descendants it waited for, not their sum.
    """
    out_path, err_path = Path(f"{log_stem}.out"), Path(f"{log_stem}.err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=ENV)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # already reaped: Popen must not wait again
    return {"exit_code": process.returncode, "wall_s": round(seconds, 2), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "stdout": out_path.read_text(), "stderr": err_path.read_text()}


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def convert_kiln(source: Path, engine: Path, precision: str, log_stem: Path) -> dict:
    """`kiln convert` into `engine`; the conversion record (the figures of `--json` kept: steps, top-1)."""
    command = [sys.executable, "-c", "from kiln.cli import main; main()", "convert", str(source), "--target", "cpu",
               "--precision", precision, "-o", str(engine), "--force", "--json"]
    run = run_measured(command, log_stem)
    record = {"command": _shell(command), "wall_s": run["wall_s"], "peak_rss_bytes": run["peak_rss_bytes"]}
    try:
        report = json.loads(run["stdout"])
    except json.JSONDecodeError:
        return {**record, "error": f"exit {run['exit_code']}: {last_line(run['stderr'])}"}
    if not report.get("ok"):
        return {**record, "error": f"exit {report.get('exit_code')}: {report.get('error')}"}
    logits = report["verification"].get("logits", {})
    return {**record, "steps_s": {step["name"]: step["seconds"] for step in report["steps"]},
            "top1_agreement": logits.get("top1_agreement")}


def convert_genai(source: Path, engine: Path, precision: str, log_stem: Path) -> dict:
    """onnxruntime-genai's builder into `engine`, through a sibling folder renamed once it succeeded."""
    partial = engine.with_name(engine.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(partial),
               "-p", precision, "-e", "cpu", "-c", str(engine.parent / "genai-cache")]
    run = run_measured(command, log_stem)
    record = {"command": _shell(command), "wall_s": run["wall_s"], "peak_rss_bytes": run["peak_rss_bytes"]}
    if run["exit_code"] != 0:
        return {**record, "error": f"exit {run['exit_code']}: {last_line(run['stderr'] + run['stdout'])}"}
    shutil.rmtree(engine, ignore_errors=True)
    partial.rename(engine)
    return record


def convert(tool: str, source: Path, engine: Path, precision: str, reconvert: bool) -> dict:
    """Convert unless `engine` exists (then its recorded figures); the record gains the engine's size and graph."""
    record_path = engine.with_name(engine.name + ".convert.json")
    if engine.exists() and not reconvert:
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        record["reused"] = True
    else:
        print(f"converting: {tool} {precision} -> {engine}", flush=True)
        converter = convert_kiln if tool == "kiln" else convert_genai
        record = converter(source, engine, precision, engine.with_name(engine.name + ".convert"))
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        record["reused"] = False
    record.update(tool=tool, precision=precision, engine=str(engine))
    if engine.exists() and "error" not in record:
        record["size_bytes"] = sum(p.stat().st_size for p in engine.rglob("*") if p.is_file())
        record.update(graph_facts(engine / "model.onnx"))
        record["weight_bytes"] = backend_named("onnxruntime").weight_bytes(engine / "model.onnx")
    status = f"failed: {record['error']}" if "error" in record else f"{record.get('wall_s', '?')} s"
    print(f"{tool:>5} {precision}: {'reused, ' if record['reused'] else ''}{status}", flush=True)
    return record


def graph_facts(model_path: Path) -> dict:
    """Node count and op histogram of the main graph (subgraphs not counted)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    return {"nodes": len(graph.node), "ops": dict(ops.most_common())}


def worker(args) -> None:
    """One measurement in this process; prints one JSON line."""
    rng = np.random.default_rng(SEED)
    prompts = rng.integers(3, args.vocab, size=(args.batch, args.prompt))
    run = run_kiln if args.worker == "kiln" else run_genai
    result = run(args.engine, prompts, args.new_tokens, args.threads)
    # Right after the generation, in the same process: this machine's bandwidth drifts by a third in minutes.
    result["read_bandwidth"] = read_bandwidth(args.threads)
    print(json.dumps(result))


def run_kiln(engine: Path, prompts: np.ndarray, new_tokens: int, threads: int) -> dict:
    import kiln

    start = time.perf_counter()
    with kiln.load(engine, threads=threads) as predictor:
        load_s = time.perf_counter() - start

        def generate(count: int):
            steps = []
            start = time.perf_counter()
            for tokens in predictor.stream(prompts, count):  # no eos_token_id: every row runs `count` steps
                steps.append((time.perf_counter(), tokens))
            return start, [stamp for stamp, _ in steps], np.stack([tokens for _, tokens in steps], axis=1)

        generate(WARMUP_TOKENS)
        return _figures(load_s, *_timed(generate, new_tokens))


def run_genai(engine: Path, prompts: np.ndarray, new_tokens: int, threads: int) -> dict:
    import onnxruntime  # noqa: F401  onnxruntime-genai 0.18 aborts the process at import unless this is loaded first
    import onnxruntime_genai as og

    start = time.perf_counter()
    config = og.Config(str(engine))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - start
    batch, prompt = prompts.shape

    def generate(count: int):
        params = og.GeneratorParams(model)
        # Lengths count the prompt; min_length = max_length keeps EOS from ending a row early.
        params.set_search_options(batch_size=batch, max_length=prompt + count, min_length=prompt + count, do_sample=False)
        stamps = []
        start = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(prompts.astype(np.int32))  # runs the prefill
        while not generator.is_done():
            generator.generate_next_token()  # a decode step over the last token (none on the first call), a choice
            stamps.append(time.perf_counter())
        return start, stamps, np.stack([generator.get_sequence(row)[prompt:] for row in range(batch)])

    generate(WARMUP_TOKENS)
    return _figures(load_s, *_timed(generate, new_tokens))


def _timed(generate, new_tokens: int):
    """`generate(new_tokens)` with the process's CPU seconds over it."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start, stamps, tokens = generate(new_tokens)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return start, stamps, tokens, cpu


def _figures(load_s: float, start: float, stamps: list[float], tokens: np.ndarray, cpu_s: float) -> dict:
    decode_s = stamps[-1] - stamps[0]
    batch, steps = tokens.shape
    return {"load_s": load_s, "first_token_ms": (stamps[0] - start) * 1e3, "decode_s": decode_s,
            "decode_tok_s": batch * (steps - 1) / decode_s, "new_tokens": steps,
            "cpu_per_wall": cpu_s / (stamps[-1] - start), "tokens": tokens.tolist()}


def measure(tool: str, engine: Path, batch: int, args) -> dict:
    """One worker process; its figures, or {"error": ...}."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--engine", str(engine),
               "--batch", str(batch), "--vocab", str(args.shape["vocab_size"]), "--prompt", str(args.prompt),
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    try:
        env = {**ENV, **GLIBC_HUGE_PAGES} if tool == "genai" and args.genai_huge_pages else ENV
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {last_line(done.stderr)}"}
    lines = done.stdout.strip().splitlines()
    if not lines:
        return {"error": f"no result: {last_line(done.stderr)}"}
    result = json.loads(lines[-1])
    if result["new_tokens"] != args.new_tokens:
        return {"error": f"generated {result['new_tokens']} tokens per row, not {args.new_tokens}"}
    return result


def summarize(samples: dict, errors: dict, precision: str, batch: int, tool: str, weight_bytes: int | None) -> dict:
    runs = samples.get((precision, batch, tool), [])
    if not runs:
        return {"error": errors.get((precision, batch, tool), "not measured")}
    median = {key: statistics.median(run[key] for run in runs)
              for key in ("first_token_ms", "decode_tok_s", "load_s", "cpu_per_wall", "read_bandwidth")}
    # Each run's decode steps per second over its own floor, the read bandwidth over the weight bytes a step
    # reads: a step reads every weight once, so the floor bounds it at any batch while the weights dominate.
    floor = _floor_share([run["decode_tok_s"] / batch for run in runs], [run["read_bandwidth"] for run in runs],
                         weight_bytes)
    return {**median, "decode_tok_s_per_row": median["decode_tok_s"] / batch, "floor_share": floor,
            "decode_tok_s_runs": [run["decode_tok_s"] for run in runs], "runs": len(runs),
            "error": errors.get((precision, batch, tool))}


def same_tokens(samples: dict, precision: str, batch: int) -> float | None:
    """Share of positions where kiln's and genai's greedy tokens agree (first round's generation)."""
    kiln_runs, genai_runs = samples.get((precision, batch, "kiln")), samples.get((precision, batch, "genai"))
    if not kiln_runs or not genai_runs:
        return None
    return float((np.array(kiln_runs[0]["tokens"]) == np.array(genai_runs[0]["tokens"])).mean())


def round_ratios(row: dict) -> list[float]:
    """kiln's decode rate over genai's, round by round: the two measured one after the other, so a drift of the
    shared machine between rounds cancels out of each ratio."""
    kiln_runs, genai_runs = (row[tool].get("decode_tok_s_runs") or [] for tool in TOOLS)
    if len(kiln_runs) != len(genai_runs):  # a failed run would pair measurements from different rounds
        return []
    return [k / g for k, g in zip(kiln_runs, genai_runs)]


def _shell(command: list[str]) -> str:
    return " ".join(f"'{part}'" if " " in part or ";" in part else part for part in command)


def _cell(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    lines = [f"`{report['command']}`", "",
             f"{report['date']}, {machine['cpu']}, {machine['cores']} cores; load average at the end "
             f"{machine['load_average_end']:.1f} (the machine is shared)", "",
             "Versions: " + ", ".join(f"{name} {version}" for name, version in report["versions"].items()), "",
             f"Model: LlamaForCausalLM, {settings['shape_name']} shape, random weights (seed {SEED}): "
             + ", ".join(f"{k} {v}" for k, v in settings["shape"].items()), "",
             f"Generation: greedy, prompt {settings['prompt']} random ids, {settings['new_tokens']} new tokens per row, "
             f"{settings['threads']} intra-op threads, one process per measurement, medians over {settings['rounds']} "
             "round(s). Decode tok/s is aggregate over the batch: batch * (new tokens - 1) / decode seconds. "
             "kiln / genai: the ratio of the medians; per round: the ratio within each round, where the two ran one "
             "after the other. "
             "First token: prefill plus the first token's choice, request set-up included. Same tokens: share of "
             "positions where both tools chose the same token (first round). Share of floor: decode steps per second over "
             "the read bandwidth (a 512 MiB torch.sum, measured by each worker right after its generation) divided "
             "by the engine's weight bytes; medians over rounds. kiln's runtime moves each CPU session's weights "
             "into huge pages at load; genai's workers ran with "
             + (" ".join(f"{k}={v}" for k, v in settings.get("genai_env", {}).items()) or "the default environment")
             + ".", ""]
    lines += _generation_table(report) + [""] + _conversion_table(report) + [""] + _graph_table(report)
    loads = [f"{tool} {row['precision']} {_cell(row[tool].get('load_s'), '.2f')} s"
             for row in report["generation"] if row["batch"] == report["generation"][0]["batch"] for tool in TOOLS]
    cpu = [f"{tool} {row['precision']} b{row['batch']} {_cell(row[tool].get('cpu_per_wall'), '.2f')}"
           for row in report["generation"] for tool in TOOLS]
    lines += ["", "Engine load (median): " + ", ".join(loads) + ".",
              "", "CPU seconds per wall second over a generation (about the thread count when pools spin): "
              + ", ".join(cpu) + "."]
    return "\n".join(lines) + "\n"


def _generation_table(report: dict) -> list[str]:
    lines = ["| precision | batch | kiln decode tok/s (aggregate) | genai decode tok/s (aggregate) | kiln / genai "
             "| kiln / genai per round, median (range) | kiln first token ms | genai first token ms | same tokens "
             "| kiln / genai decode, share of floor |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for row in report["generation"]:
        kiln_run, genai_run = row["kiln"], row["genai"]
        for tool in TOOLS:
            if row[tool].get("error") and row[tool]["error"] != "conversion failed":  # those are listed once, below
                notes.append(f"- {tool} {row['precision']} batch {row['batch']}: {row[tool]['error']}")
        kiln_rate, genai_rate = kiln_run.get("decode_tok_s"), genai_run.get("decode_tok_s")
        ratio = kiln_rate / genai_rate if kiln_rate and genai_rate else None
        paired = round_ratios(row)
        per_round = (f"{statistics.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f})" if paired else "-")
        lines.append(f"| {row['precision']} | {row['batch']} | {_cell(kiln_rate, '.1f', 'failed')} | "
                     f"{_cell(genai_rate, '.1f', 'failed')} | {_cell(ratio, '.2f')} | {per_round} | "
                     f"{_cell(kiln_run.get('first_token_ms'), '.1f')} | {_cell(genai_run.get('first_token_ms'), '.1f')} "
                     f"| {_cell(row['same_tokens'], '.0%')} | "
                     f"{_cell(kiln_run.get('floor_share'), '.0%')} / {_cell(genai_run.get('floor_share'), '.0%')} |")
    notes += [f"- {record['tool']} {record['precision']} conversion: {record['error']}"
              for record in report["conversions"] if "error" in record]
    return lines + (["", "Failed:", *notes] if notes else [])


def _conversion_table(report: dict) -> list[str]:
    lines = ["Conversions (each in its own process; peak RSS of the largest process; kiln's includes its "
             "verification against PyTorch):", "",
             "| tool | precision | status | wall s | peak RSS GB | kiln export / optimize / verify s | kiln top-1 "
             "| engine MB |", "| --- | --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for record in report["conversions"]:
        steps = record.get("steps_s")
        split = " / ".join(f"{steps.get(name, 0):.1f}" for name in ("export", "optimize", "verify")) if steps else "-"
        status = "failed (above)" if "error" in record else ("reused" if record["reused"] else "ok")
        rss, size = record.get("peak_rss_bytes"), record.get("size_bytes")
        lines.append(f"| {record['tool']} | {record['precision']} | {status} | {_cell(record.get('wall_s'), '.1f')} | "
                     f"{_cell(rss and rss / 1e9, '.2f')} | {split} | {_cell(record.get('top1_agreement'), '.1%')} | "
                     f"{_cell(size and size / 1e6, '.1f')} |")
    return lines


def _graph_table(report: dict) -> list[str]:
    lines = ["Graphs (`model.onnx`, main graph):", "",
             "| tool | precision | nodes | top ops |", "| --- | --- | ---: | --- |"]
    for record in report["conversions"]:
        if "nodes" in record:
            top = ", ".join(f"{op} {count}" for op, count in list(record["ops"].items())[:8])
            lines.append(f"| {record['tool']} | {record['precision']} | {record['nodes']} | {top} |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row["batch"] for row in report["generation"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        rows = [row for row in report["generation"] if row["batch"] == batch]
        x = np.arange(len(rows))
        for offset, tool in ((-0.2, "kiln"), (0.2, "genai")):
            values = [row[tool].get("decode_tok_s") or 0 for row in rows]
            bars = axis.bar(x + offset, values, width=0.4, label=tool)
            for bar, value in zip(bars, values):
                top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
                axis.annotate(f"{value:.0f}" if value else "failed", top, ha="center", va="bottom", fontsize=8)
        axis.set_xticks(x, [row["precision"] for row in rows])
        axis.set_title(f"batch {batch}")
        axis.set_ylabel("decode tok/s (aggregate over the batch)")
        axis.grid(axis="y", alpha=0.3)
        axis.legend()
    settings = report["settings"]
    fig.suptitle(f"kiln vs onnxruntime-genai builder, {settings['shape_name']}-shaped Llama, CPU, "
                 f"{settings['threads']} threads, {settings['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "peers", help="Source model and engines.")
    parser.add_argument("--tiny", action="store_true", help="A 2-layer, hidden-64, 1024-token model: a smoke test.")
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800, help="Seconds allowed to one measurement process.")
    parser.add_argument("--reconvert", action="store_true", help="Rebuild the source model and every engine.")
    parser.add_argument("--genai-huge-pages", action="store_true",
                        help="Run genai's workers with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc's huge pages).")
    parser.add_argument("--out", type=Path, help="Write OUT.json, OUT.md and OUT.png [default: "
                        "benchmarks/results/peers, or WORK/peers-tiny with --tiny].")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--engine", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.engine or args.batch or args.vocab:
        parser.error("--engine, --batch and --vocab are the worker's own; the benchmark takes --batches")

    args.shape_name = "tiny" if args.tiny else "smollm-135m"
    args.shape = SHAPES[args.shape_name]
    precisions = args.precisions.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    out = args.out or (args.work / "peers-tiny" if args.tiny else ROOT / "benchmarks" / "results" / "peers")
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / f"source-{args.shape_name}"
    if args.reconvert or not (source / "config.json").exists():
        print(f"saving the {args.shape_name}-shaped source model to {source}", flush=True)
        save_source(source, args.shape)

    conversions = [convert(tool, source, args.work / f"{tool}-{args.shape_name}-{precision}", precision, args.reconvert)
                   for precision in precisions for tool in TOOLS]
    engines = {(r["tool"], r["precision"]): Path(r["engine"]) for r in conversions if "error" not in r}
    samples: dict[tuple, list[dict]] = collections.defaultdict(list)
    errors: dict[tuple, str] = {}
    for round_index in range(args.rounds):
        # The tool that goes first alternates by round and by measurement, so drifts fall on both alike.
        order = TOOLS if round_index % 2 == 0 else TOOLS[::-1]
        for batch in batches:
            for precision in precisions:
                for tool in order:
                    key = (precision, batch, tool)
                    if (tool, precision) not in engines or key in errors:
                        continue
                    result = measure(tool, engines[tool, precision], batch, args)
                    if "error" in result:
                        errors[key] = result["error"]
                        print(f"round {round_index + 1}/{args.rounds}: {tool} {precision} batch {batch}: failed: "
                              f"{result['error']}", flush=True)
                        continue
                    samples[key].append(result)
                    print(f"round {round_index + 1}/{args.rounds}: {tool:>5} {precision} batch {batch}: "
                          f"{result['decode_tok_s']:.1f} tok/s, first token {result['first_token_ms']:.1f} ms", flush=True)
                order = order[::-1]
    for record in conversions:
        if "error" in record:
            for batch in batches:
                errors[record["precision"], batch, record["tool"]] = "conversion failed"

    weights = {(r["tool"], r["precision"]): r.get("weight_bytes") for r in conversions}
    generation = [{"precision": precision, "batch": batch, "same_tokens": same_tokens(samples, precision, batch),
                   **{tool: summarize(samples, errors, precision, batch, tool, weights.get((tool, precision)))
                      for tool in TOOLS}}
                  for batch in batches for precision in precisions]
    report = {
        "command": "python benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
                    "load_average_end": os.getloadavg()[0]},
        "versions": {name: _version(name) for name in ("torchkiln", "onnxruntime", "onnxruntime-genai", "torch",
                                                       "transformers")},
        "settings": {"shape_name": args.shape_name, "shape": args.shape, "prompt": args.prompt,
                     "new_tokens": args.new_tokens, "threads": args.threads, "rounds": args.rounds, "batches": batches,
                     "precisions": precisions, "seed": SEED, "warmup_tokens": WARMUP_TOKENS,
                     "genai_env": GLIBC_HUGE_PAGES if args.genai_huge_pages else {}},
        "conversions": conversions,
        "generation": generation,
    }
    text = markdown(report)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md and .png")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
