"""What other ONNX Runtime tools look for in a model folder, written into engines so they load one as it is.

Decoder engines: Optimum's `ORTModelForCausalLM` reads `config.json` (and `generation_config.json`);
onnxruntime-genai reads `genai_config.json` and the tokenizer files beside the graph. Diffusion engines are
in Optimum's layout, which its `ORTStableDiffusionPipeline` loads: `model_index.json`, `scheduler/`,
`tokenizer/` and a `config.json` beside each graph (the engine's own driver reads the scheduler and tokenizer
from there too).
"""
from __future__ import annotations

import json
from pathlib import Path

GENAI_CONFIG = "genai_config.json"
# Op domains ONNX Runtime runs without a custom-op library (onnxruntime-genai cannot register kiln's).
_ORT_DOMAINS = {"", "ai.onnx", "com.microsoft"}
# The engine's first ONNX Runtime provider -> genai's name for it in provider_options (None: the CPU, no entry).
_GENAI_PROVIDERS = {"CPUExecutionProvider": None, "CUDAExecutionProvider": "cuda"}


def write_source_configs(loaded, workdir: Path) -> list[str]:
    """The source's `config.json` and `generation_config.json` (a preset's too: both built from its config)."""
    loaded.config.to_json_file(workdir / "config.json")
    written = ["config.json"]
    generation = getattr(loaded.module, "generation_config", None)
    if generation is not None:
        generation.to_json_file(workdir / "generation_config.json")
        written.append("generation_config.json")
    return written


def genai_support(loaded, target, graph_path: Path) -> str | None:
    """Why onnxruntime-genai cannot run this engine, or None when it can."""
    if graph_path.suffix != ".onnx":
        return f"onnxruntime-genai runs ONNX graphs; this engine's graph is {graph_path.name}"
    provider = target.providers[0] if target.providers else None
    if provider not in _GENAI_PROVIDERS:
        return f"the engine runs on ONNX Runtime's {provider}, which this genai_config does not set up"
    facts = loaded.facts
    if facts.layer_caches or facts.value_dim != facts.head_dim:
        # genai sizes every layer's cache from one head_size and one num_key_value_heads.
        return "layers differ in cache width (or values in width from keys), which genai_config cannot describe"
    import onnx

    graph = onnx.load(graph_path, load_external_data=False).graph
    domains = sorted({node.domain for node in graph.node} - _ORT_DOMAINS)
    if domains:
        return f"the graph uses ops of {', '.join(domains)}, which onnxruntime-genai cannot load"
    return None


def genai_config(loaded, graph_file: str, target, max_positions: int | None) -> dict:
    """`genai_config.json` for a kiln decoder graph: the generic `decoder` model type with the engine's IO
    names, so no per-family table is needed; search defaults from the model's generation config."""
    from runtimes.decoder_lm import PAST_PREFIX, PRESENT_PREFIX

    facts, config = loaded.facts, loaded.config
    generation = getattr(loaded.module, "generation_config", None)

    def token(name: str):
        value = getattr(generation, name, None)
        return value if value is not None else getattr(config, name, None)

    pad = token("pad_token_id")
    eos = token("eos_token_id")
    context = max_positions or 4096  # genai requires one; a model that declares no position limit gets this
    genai_provider = _GENAI_PROVIDERS[target.providers[0]]
    provider_options = [{genai_provider: {}}] if genai_provider else []
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": token("bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "vocab_size": facts.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": graph_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "head_size": facts.head_dim,
                "hidden_size": facts.hidden_size,
                "num_attention_heads": facts.heads,
                "num_key_value_heads": facts.kv_heads,
                "num_hidden_layers": facts.layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": f"{PAST_PREFIX}%d.key", "past_value_names": f"{PAST_PREFIX}%d.value"},
                "outputs": {"logits": "logits", "present_key_names": f"{PRESENT_PREFIX}%d.key",
                            "present_value_names": f"{PRESENT_PREFIX}%d.value"},
            },
        },
        "search": {
            "do_sample": bool(getattr(generation, "do_sample", False)),
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # kiln graphs concatenate the cache (present = past + new), not genai's shared buffer.
            "past_present_share_buffer": False,
            "temperature": float(getattr(generation, "temperature", None) or 1.0),
            "top_k": int(getattr(generation, "top_k", None) or 50),
            "top_p": float(getattr(generation, "top_p", None) or 1.0),
            "repetition_penalty": float(getattr(generation, "repetition_penalty", None) or 1.0),
        },
    }


def write_decoder_files(loaded, workdir: Path, target, graphs: dict) -> dict:
    """Write the files above; returns the manifest's `interop` entry (each tool's file, or why it has none).
    `graphs` is the manifest's entry: role -> file (after the build: a TensorRT plan, say, replaces the ONNX)."""
    entry: dict = {"config": write_source_configs(loaded, workdir)}
    graph_file = graphs["model"]["file"]
    max_positions = loaded.family.max_positions_of(loaded.config)
    reason = genai_support(loaded, target, workdir / graph_file)
    if reason is None:
        document = genai_config(loaded, graph_file, target, max_positions)
        (workdir / GENAI_CONFIG).write_text(json.dumps(document, indent=2) + "\n")
        entry["onnxruntime_genai"] = GENAI_CONFIG
    else:
        entry["onnxruntime_genai"] = None
        entry["onnxruntime_genai_reason"] = reason
    return entry


# Optimum's folder for each graph role -> the diffusers component whose config.json it carries.
_DIFFUSION_CONFIGS = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}


def write_diffusion_files(loaded, workdir: Path, target, graphs: dict) -> dict:
    """Optimum's diffusion layout around the graphs; returns the manifest's `interop` entry."""
    pipeline = loaded.module
    pipeline.save_config(workdir)  # model_index.json
    pipeline.scheduler.save_config(workdir / "scheduler")
    tokenizer = workdir / "tokenizer"
    pipeline.tokenizer.save_pretrained(tokenizer)
    written = ["model_index.json", "scheduler/scheduler_config.json", *write_bpe_files(tokenizer)]
    for role in graphs:
        folder = Path(graphs[role]["file"]).parent
        component = getattr(pipeline, _DIFFUSION_CONFIGS[role])
        if hasattr(component.config, "to_json_file"):  # a transformers model (the text encoder)
            component.config.to_json_file(workdir / folder / "config.json")
        else:
            component.save_config(workdir / folder)
        written.append(f"{folder.as_posix()}/config.json")
    other = sorted(g["file"] for g in graphs.values() if Path(g["file"]).suffix != ".onnx")
    if other:  # an AOTInductor package, say: the layout's files serve the engine's own driver
        return {"optimum": None, "optimum_reason": f"Optimum runs ONNX graphs; this engine's are {', '.join(other)}",
                "files": written}
    return {"optimum": "model_index.json", "files": written}


def write_bpe_files(folder: Path) -> list[str]:
    """`vocab.json` and `merges.txt` from a byte-pair `tokenizer.json`, where they are missing: transformers 5
    saves only `tokenizer.json`, and older transformers (Optimum's environment) build CLIPTokenizer from the two."""
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    if model.get("type") != "BPE":
        return []
    written = []
    if not (folder / "vocab.json").exists():
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n")
        written.append(f"{folder.name}/vocab.json")
    if not (folder / "merges.txt").exists():
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
        written.append(f"{folder.name}/merges.txt")
    return written


# Model kind -> what it writes for other tools; a kind without an entry writes nothing.
WRITERS = {"decoder-lm": write_decoder_files, "diffusion": write_diffusion_files}
