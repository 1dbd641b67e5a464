"""Do kiln engines load in Optimum's `ORTModelForCausalLM` as written, and generate transformers' tokens?

optimum-onnx pins transformers < 4.58 and kiln needs transformers 5, so this runs in two environments
(`make interop-optimum` does both):

    .venv/bin/python benchmarks/interop_optimum.py prepare build/interop          # kiln's venv
    build/venv-optimum/bin/python benchmarks/interop_optimum.py check build/interop  # optimum-onnx's venv

`prepare` saves a tiny random model per family, converts it for the CPU with kiln and records
transformers' own greedy tokens; `check` loads each engine dir unchanged into `ORTModelForCausalLM` and
compares its greedy tokens, at batch 1 and on a left-padded batch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FAMILIES = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
}
COMMON = dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
PROMPTS = [[5, 17, 30, 42, 11], [7, 8], [9, 10, 11]]
NEW_TOKENS = 8


def padded(prompts):
    width = max(map(len, prompts))
    ids = [[0] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return ids, mask, width


def greedy(model, prompts) -> list[list[int]]:
    """Greedy tokens of a transformers-style `generate` (transformers' model or Optimum's ORTModel)."""
    import torch
    from transformers import GenerationConfig

    ids, mask, width = padded(prompts)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=config)
    return out[:, width:].tolist()


def prepare(folder: Path) -> None:
    import torch
    import transformers

    import kiln

    results = {}
    for model_type, sizes in FAMILIES.items():
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(model_type, **sizes, **COMMON)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        model.save_pretrained(folder / f"{model_type}-source")
        engine = folder / f"{model_type}-engine"
        kiln.convert(str(folder / f"{model_type}-source"), output=engine, force=True)
        results[model_type] = {"engine": engine.name, "transformers": [greedy(model, PROMPTS[:1]), greedy(model, PROMPTS)],
                               "transformers_version": transformers.__version__}
        print(f"{model_type}: converted to {engine}")
    (folder / "expected.json").write_text(json.dumps(results, indent=1))


def check(folder: Path) -> int:
    import optimum.version
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    expected = json.loads((folder / "expected.json").read_text())
    failures = 0
    print(f"optimum {optimum.version.__version__}, transformers {transformers.__version__}")
    for model_type, record in expected.items():
        model = ORTModelForCausalLM.from_pretrained(folder / record["engine"], use_cache=True, use_io_binding=False)
        got = [greedy(model, PROMPTS[:1]), greedy(model, PROMPTS)]
        same = got == record["transformers"]
        failures += not same
        print(f"{model_type}: ORTModelForCausalLM loaded the kiln engine as written; greedy tokens "
              f"{'identical to' if same else 'DIFFERENT from'} transformers {record['transformers_version']} "
              f"(batch 1 and a left-padded batch of {len(PROMPTS)})")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "check"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        prepare(args.folder)
    else:
        sys.exit(1 if check(args.folder) else 0)


if __name__ == "__main__":
    main()
