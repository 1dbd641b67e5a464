"""Sweep every architecture of transformers' causal-LM mapping through `kiln convert`, token for token.

    .venv/bin/python benchmarks/family_sweep.py --json benchmarks/results/family-sweep.json
    .venv/bin/python benchmarks/family_sweep.py --only mistral,falcon
    .venv/bin/python benchmarks/family_sweep.py --target aoti-cpu --only llama,mixtral
    .venv/bin/python benchmarks/family_sweep.py --report shard0.json shard1.json   # the summary of shards

For each model_type: a tiny random config (the shared tiny sizes below, set where the config takes them),
then (1) can transformers itself build it and greedy-generate from it; (2) `kiln convert` of its
`save_pretrained` folder for `--target` (the CPU by default), verified; (3) the engine's greedy tokens against transformers'
`generate` at batch 1 and on a left-padded batch of 3 prompts of different lengths. Architectures
transformers cannot run from a tiny config are reported and left out of the ratio.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Sizes every tiny config gets where it has the field (MoE fields too); a few families need more below.
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, n_positions=256, n_ctx=256,
    num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, ffn_dim=128, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False,
    # Partial rotary, shared experts and expert groups, and the decoder half of encoder-decoder configs.
    rotary_dim=8, n_shared_experts=1, n_group=1, topk_group=1, decoder_layers=2, decoder_attention_heads=4,
    decoder_ffn_dim=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
    # Encoder families (BERT, RoBERTa, ...) run as causal LMs with a KV cache only as decoders.
    is_decoder=True,
    # Multi-head latent attention (DeepSeek and kin): the compressed KV and the rotary part of each head.
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=32,
    index_head_dim=16, index_n_heads=4,
    # GPT-Neo's per-layer attention kinds must add up to its layer count.
    attention_types=[[["global", "local"], 1]],
    num_encoder_layers=2, num_decoder_layers=2,
    # Looped (recurrent-depth) families split their layers into input, looped and output blocks.
    n_input_layers=1, n_output_layers=1,
)
# Tried in turn when transformers cannot run a family with TINY (None: leave the field to the config):
# latent-attention families rotate `head_dim` = qk_rope_head_dim and need as many KV heads as query heads;
# ProphetNet refuses `num_hidden_layers`.
RETRIES = [dict(num_key_value_heads=4, head_dim=8), dict(num_hidden_layers=None)]
PROMPTS = [[5, 17, 30, 42, 11], [7, 8], [9, 10, 11]]
NEW_TOKENS = 8
# Each architecture runs in its own process, bounded: a tiny config of some families still builds huge
# tables (one took 18 GB here), and one must not take the sweep or the machine down with it.
MEMORY_LIMIT = 8 << 30
SECONDS_LIMIT = 300


def tiny_config(model_type: str, retry: dict | None = None):
    """The config class with the tiny sizes, and so its sub-configs (a multimodal model's text, vision
    and audio towers, which a composite config builds from a dict of their fields)."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    config_class = CONFIG_MAPPING[model_type]
    sizes = {k: v for k, v in {**TINY, **(retry or {})}.items() if v is not None}
    default = config_class()
    towers = {name: dict(_settable(type(sub), sizes), model_type=sub.model_type)
              for name in getattr(config_class, "sub_configs", {})
              if isinstance(sub := getattr(default, name, None), PretrainedConfig)}
    return config_class(**_settable(config_class, sizes), **towers)


def _settable(config_class, sizes: dict) -> dict:
    # A derived size is a read-only property on some configs (Falcon's head_dim): leave those to the config.
    return {k: v for k, v in sizes.items() if not isinstance(getattr(config_class, k, None), property)}


def _randomize_zero_matrices(model) -> None:
    """A matrix a family initializes to zeros (AFMoE's router) ties every top-k choice, and torch and ONNX
    Runtime break ties differently; trained weights have no such ties, so give those matrices random values."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, 0.02)


def runnable_model(model_type: str):
    """A tiny model of this type and transformers' own greedy tokens, from the first config transformers runs."""
    import torch
    import transformers

    failures = []
    for retry in [None, *RETRIES]:
        try:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, retry)).eval()
            _randomize_zero_matrices(model)
            return model, [transformers_tokens(model, PROMPTS[:1]), transformers_tokens(model, PROMPTS)]
        except Exception as e:  # transformers' own failure: try the next config, report the first failure
            failures.append(e)
    raise failures[0]


def transformers_tokens(model, prompts) -> list[list[int]]:
    """transformers' own greedy tokens, left-padded like kiln's `generate`."""
    import torch
    import transformers

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    # A config of its own, not the model's: some families' defaults add logits processors (BART's
    # no_repeat_ngram_size, forced BOS/EOS) that make `generate` something other than plain greedy.
    model.generation_config = transformers.GenerationConfig(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask)
    return out[:, width:].tolist()


def sweep_one(model_type: str, workdir: Path, target: str = "cpu") -> dict:
    import kiln
    from kiln.errors import exit_code_of

    record: dict = {"model_type": model_type}
    try:
        model, want = runnable_model(model_type)
    except Exception as e:  # transformers' own failure: not counted
        record.update(status="transformers cannot run it", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return record
    folder = workdir / model_type
    model.save_pretrained(folder)
    start = time.perf_counter()
    try:
        result = kiln.convert(str(folder), target=target, output=workdir / f"{model_type}-engine", force=True)
    except Exception as e:
        code = exit_code_of(e)
        record.update(status="refused" if code == 2 else "failed" if code == 3 else "internal error", exit_code=code,
                      reason=str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
        if code == 1:
            record["traceback"] = traceback.format_exc()[-1500:]
        return record
    record["convert_seconds"] = round(time.perf_counter() - start, 1)
    record["relative_error"] = result.manifest["verification"]["logits"]["relative"]
    fusion = next((p for p in result.manifest["passes"] if p["name"] == "fusion"), None)
    if fusion:
        record["fused"] = fusion["fused"]
        record["attention_fused"] = fusion["details"]["attention_fused"]
    with kiln.load(result.engine_dir, trust_native_code=True) as engine:  # built just now
        got = [engine.generate(PROMPTS[:1], NEW_TOKENS).tolist(), engine.generate(PROMPTS, NEW_TOKENS).tolist()]
    record["batch1_identical"] = got[0] == want[0]
    record["padded_batch_identical"] = got[1] == want[1]
    record["status"] = "identical" if got == want else "different tokens"
    return record


def _sweep_in_child(model_type: str, target: str) -> dict:
    try:
        done = subprocess.run([sys.executable, __file__, "--one", model_type, "--target", target], capture_output=True, text=True,
                              timeout=SECONDS_LIMIT)
    except subprocess.TimeoutExpired:
        return {"model_type": model_type, "status": "timed out", "reason": f"over {SECONDS_LIMIT} s"}
    line = next((l for l in done.stdout.splitlines() if l.startswith("RECORD ")), None)
    if line is None:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model_type": model_type, "status": "crashed", "reason": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(line[len("RECORD "):])


# Refusals that say the model is no decoder with an attention KV cache: out of the ratio's scope.
NOT_KV_DECODER = ("not plain keys and values", "returns no KV cache", "keeps its own cache class",
                  "attends to an encoder's output")


def summary(records: list[dict]) -> str:
    """The ratio the issue asks for, then one markdown row per architecture."""
    runnable = [r for r in records if r["status"] != "transformers cannot run it"]
    outside = [r for r in runnable if r["status"] == "refused" and any(s in r["reason"] for s in NOT_KV_DECODER)]
    in_scope = [r for r in runnable if r not in outside]
    identical = [r for r in in_scope if r["status"] == "identical"]
    lines = [
        f"{len(records)} architectures: transformers cannot run {len(records) - len(runnable)} from a tiny config; "
        f"{len(outside)} of the rest keep no attention KV cache (recurrent, state-space, indexed or none) and are "
        f"refused with that reason; of the {len(in_scope)} decoders with an attention KV cache, {len(identical)} "
        f"({len(identical) / max(len(in_scope), 1):.0%}) convert and generate transformers' tokens exactly.",
        "", "| model_type | result | reason or details |", "|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: r["model_type"]):
        detail = r.get("reason", "")
        if r["status"] == "different tokens":
            detail = f"batch 1 identical: {r['batch1_identical']}, left-padded batch identical: {r['padded_batch_identical']}"
        elif r["status"] == "identical":
            detail = f"logits error {r['relative_error']:.1e} of range" + ("" if r.get("attention_fused", True) else "; attention unfused")
        lines.append(f"| {r['model_type']} | {r['status']} | {detail.replace('|', '/')[:240]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types (default: the whole causal-LM mapping)")
    parser.add_argument("--json", type=Path, help="write every record here")
    parser.add_argument("--shard", default="0/1", help="K/N: every N-th architecture from the K-th (run N at once)")
    parser.add_argument("--target", default="cpu", help="kiln target to convert for (default: cpu)")
    parser.add_argument("--report", type=Path, nargs="+", help="print the summary of these --json files (shards) and exit")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: sweep this type, print its record
    args = parser.parse_args()
    if args.report:
        print(summary([r for path in args.report for r in json.loads(path.read_text())]))
        return
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.one:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        with tempfile.TemporaryDirectory(prefix="kiln-sweep-") as tmp:
            print("RECORD " + json.dumps(sweep_one(args.one, Path(tmp), args.target)))
        return
    shard, shards = (int(n) for n in args.shard.split("/"))
    types = (args.only.split(",") if args.only else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))[shard::shards]
    records = []
    for model_type in types:
        record = _sweep_in_child(model_type, args.target)
        records.append(record)
        print(f"{model_type:<28} {record['status']:<26} {record.get('reason', '')[:110]}", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(records, indent=1))
    print("\n" + summary(records).splitlines()[0])


if __name__ == "__main__":
    main()
