"""kiln engines in Optimum and onnxruntime-genai, and their folders in kiln: loaded as written, same tokens.

optimum-onnx pins transformers < 4.58 and kiln needs transformers 5, so this runs in two environments
(`make interop` does all three steps):

    .venv/bin/python benchmarks/interop.py prepare build/interop              # kiln's venv
    build/venv-optimum/bin/python benchmarks/interop.py check build/interop   # optimum-onnx's venv
    .venv/bin/python benchmarks/interop.py foreign build/interop              # kiln's venv

`prepare` saves a tiny random model per family (with a tokenizer), converts it for the CPU with kiln,
records transformers' own greedy tokens, and builds the Llama one with onnxruntime-genai's model builder;
it also converts the tiny-sd diffusion pipeline and records kiln's images from fixed latents;
`check` loads each kiln engine dir unchanged into `ORTModelForCausalLM`, compares its greedy tokens (batch 1
and a left-padded batch), and exports the Llama one with Optimum; it loads the tiny-sd engine unchanged into
`ORTStableDiffusionPipeline` and compares its images with kiln's (same latents, DDIM, 4 steps, guidance 7.5); `foreign` opens the Optimum export and
the genai-builder folder with `kiln.load`, compares their tokens with transformers', and benchmarks all three
side by side.
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
SD_PROMPTS = ["a red square", "a blue circle"]
SD_RUN = dict(steps=4, guidance=7.5)


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


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the tiny vocab ("t5" is token 5): genai's builder needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, COMMON["vocab_size"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def prepare(folder: Path) -> None:
    import shutil
    import subprocess

    import torch
    import transformers

    import kiln

    results = {}
    for model_type, sizes in FAMILIES.items():
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(model_type, **sizes, **COMMON)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        source = folder / f"{model_type}-source"
        model.save_pretrained(source)
        save_tokenizer(source)
        engine = folder / f"{model_type}-engine"
        result = kiln.convert(str(source), output=engine, force=True)
        # A GroupQueryAttention engine (cache layout "slot") takes right-padded rows; Optimum pads on the left,
        # so its batch runs on the same model converted without GQA.
        padded_engine = engine
        if result.manifest.get("cache_layout") == "slot":
            padded_engine = folder / f"{model_type}-engine-no-gqa"
            kiln.convert(str(source), output=padded_engine, force=True, pass_options=["fusion.gqa=false"])
        results[model_type] = {"engine": engine.name, "padded_engine": padded_engine.name,
                               "transformers": [greedy(model, PROMPTS[:1]), greedy(model, PROMPTS)],
                               "transformers_version": transformers.__version__}
        print(f"{model_type}: converted to {engine}" + (f" and {padded_engine}" if padded_engine != engine else ""))
    shutil.rmtree(folder / "llama-genai", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(folder / "llama-source"),
                    "-o", str(folder / "llama-genai"), "-p", "fp32", "-e", "cpu", "-c", str(folder / "genai-cache")],
                   check=True, capture_output=True)
    print(f"llama: onnxruntime-genai's builder wrote {folder / 'llama-genai'}")
    (folder / "expected.json").write_text(json.dumps(results, indent=1))
    prepare_diffusion(folder)


def prepare_diffusion(folder: Path) -> None:
    """The tiny-sd engine, and kiln's images from fixed latents (the scheduler its config names: DDIM)."""
    import numpy as np

    import kiln

    engine = folder / "sd-engine"
    kiln.convert("tiny-sd", output=engine, force=True)
    latents = np.random.default_rng(0).standard_normal((len(SD_PROMPTS), 4, 16, 16), dtype=np.float32)
    with kiln.load(engine) as pipeline:
        images = pipeline.generate_image(SD_PROMPTS, steps=SD_RUN["steps"], guidance=SD_RUN["guidance"], latents=latents)
    np.savez(folder / "sd-expected.npz", latents=latents, kiln=images)
    print(f"tiny-sd: converted to {engine}; kiln's images recorded")


def check(folder: Path) -> int:
    import optimum.version
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    expected = json.loads((folder / "expected.json").read_text())
    failures = 0
    print(f"optimum {optimum.version.__version__}, transformers {transformers.__version__}")
    for model_type, record in expected.items():
        def load(name):
            return ORTModelForCausalLM.from_pretrained(folder / name, use_cache=True, use_io_binding=False)

        got = [greedy(load(record["engine"]), PROMPTS[:1]), greedy(load(record["padded_engine"]), PROMPTS)]
        same = got == record["transformers"]
        failures += not same
        print(f"{model_type}: ORTModelForCausalLM loaded the kiln engine as written; greedy tokens "
              f"{'identical to' if same else 'DIFFERENT from'} transformers {record['transformers_version']} "
              f"(batch 1 on {record['engine']}, a left-padded batch of {len(PROMPTS)} on {record['padded_engine']})")
    from optimum.exporters.onnx import main_export

    main_export(str(folder / "llama-source"), output=folder / "llama-optimum", task="text-generation-with-past")
    print(f"llama: Optimum exported {folder / 'llama-optimum'}")
    return failures + check_diffusion(folder)


def check_diffusion(folder: Path) -> int:
    """The tiny-sd engine in Optimum's ORTStableDiffusionPipeline, as written: the same images as kiln's."""
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    expected = np.load(folder / "sd-expected.npz")
    pipeline = ORTStableDiffusionPipeline.from_pretrained(folder / "sd-engine")
    images = pipeline(SD_PROMPTS, num_inference_steps=SD_RUN["steps"], guidance_scale=SD_RUN["guidance"],
                      latents=torch.from_numpy(expected["latents"]), output_type="np").images
    error = int(np.abs((images * 255).round().astype(np.int16) - expected["kiln"].astype(np.int16)).max())
    print(f"tiny-sd: ORTStableDiffusionPipeline loaded the kiln engine as written ({type(pipeline.scheduler).__name__}); "
          f"images {'within' if error <= 1 else 'NOT within'} 1/255 of kiln's from the same latents (max {error}/255)")
    return int(error > 1)


def foreign(folder: Path) -> int:
    """kiln.load on the Optimum export and the genai-builder folder: tokens against transformers', then a bench."""
    import subprocess

    import kiln

    want = json.loads((folder / "expected.json").read_text())["llama"]["transformers"]
    failures = 0
    for name in ("llama-optimum", "llama-genai"):
        with kiln.load(folder / name) as engine:
            alone = [engine.generate([prompt], NEW_TOKENS)[0].tolist() for prompt in PROMPTS]
            batch = engine.generate(PROMPTS, NEW_TOKENS).tolist()
            failures += alone != want[1]
            print(f"{name}: kiln.load opened it ({engine.provenance}); greedy tokens of each prompt alone "
                  f"{'identical to' if alone == want[1] else 'DIFFERENT from'} transformers'; left-padded batch "
                  f"{'identical' if batch == want[1] else 'different'}")
    bench = [str(Path(sys.executable).parent / "kiln"), "bench",
             *(str(folder / n) for n in ("llama-engine", "llama-optimum", "llama-genai")),
             "--prompt-lengths", "32,128", "--batches", "1,8", "--rounds", "3"]
    print("$ kiln " + " ".join(bench[1:]))
    subprocess.run(bench, check=True)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "check", "foreign"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        prepare(args.folder)
    else:
        sys.exit(1 if {"check": check, "foreign": foreign}[args.step](args.folder) else 0)


if __name__ == "__main__":
    main()
