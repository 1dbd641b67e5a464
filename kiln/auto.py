"""`kiln convert --auto`: build every precision the budget allows (some of them two ways: `VARIANTS`), verify
each, measure those that pass on the user's shape, and keep the fastest. Every candidate's figures, or why it
was rejected, go into the chosen engine's report and manifest.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError, VerificationFailed
from kiln.manifest import write_json, write_manifest
from kiln.pipeline import ConvertResult, convert, default_output, move_into_place, refuse_existing, remove_stale_temporaries
from kiln.targets import target_named

# From least to most lossy: a budget admits itself and everything before it.
LOSSINESS = ("fp32", "bf16", "fp16", "int8-static", "int8", "int4")
_MANIFEST_OWN = ("schema_version", "torchkiln_version", "created", "files", "manifest_sha256")


@dataclass(frozen=True)
class Variant:
    """Another build of `precision` beside its recipe's: one pass swapped for another, or pass options set."""

    name: str
    precision: str
    swap: tuple[str, str] | None = None  # (the recipe's pass, the pass in its place)
    options: dict | None = None  # {pass: {option: value}}


# Which build of a precision is fastest depends on the CPU and the request. On a 2-core AMD EPYC, SmolLM-135M's
# int8 as weight-only 8-bit MatMulNBits decoded 1.20x the dynamic MatMulInteger at batch 1 but 0.79x at batch 8,
# and int4 in blocks of 128 decoded 1.28x / 1.24x blocks of 32 (README, "Against onnxruntime-genai").
# Verification gates each as it gates the recipe's own build.
VARIANTS = (
    Variant("int8-weight-only", "int8", swap=("int8_dynamic", "int8_weight_only")),
    Variant("int4-block-128", "int4", options={"int4": {"block_size": 128}}),
)


def parse_shape(text: str) -> dict[str, int]:
    """`batch=1,prompt=128,new=64` -> {"batch": 1, "prompt": 128, "new": 64}; all three keys required."""
    found = dict(re.findall(r"(\w+)=(\d+)", text or ""))
    if set(found) != {"batch", "prompt", "new"} or any(int(v) < 1 for v in found.values()):
        raise KilnError(f"--shape: expected batch=N,prompt=N,new=N with positive N, got {text!r}")
    return {k: int(v) for k, v in found.items()}


def candidate_precisions(target: str, budget: str) -> list[str]:
    from kiln.targets import TARGETS

    if budget not in LOSSINESS:
        raise KilnError(f"--budget: expected one of {', '.join(LOSSINESS)}, got {budget!r}")
    offered = TARGETS[target].precisions if target in TARGETS else target_named(target, "fp32").precisions
    return [p for p in LOSSINESS[: LOSSINESS.index(budget) + 1] if p in offered]


def candidates(target: str, budget: str, options: dict) -> list[tuple[str, str, dict]]:
    """(name, precision, convert options) of every build to try: each precision the budget allows, then its
    variants, except where they would change what the user chose (`options`: passes, pass options, options of
    the pass a variant swaps out) or where the target's recipe has no pass to swap."""
    from kiln.targets import TARGETS
    from optimizers import parse_pass_options
    from optimizers.recipe import recipe_for

    chosen = options.get("pass_options") or {}
    chosen = parse_pass_options(list(chosen)) if isinstance(chosen, (list, tuple)) else chosen
    found = []
    for precision in candidate_precisions(target, budget):
        found.append((precision, precision, dict(options)))
        for variant in (v for v in VARIANTS if v.precision == precision):
            if variant.swap and not options.get("passes") and variant.swap[0] not in chosen:
                old, new = variant.swap
                recipe = recipe_for(TARGETS[target].recipe, precision)
                if old in recipe:
                    found.append((variant.name, precision, {**options, "passes": [new if p == old else p for p in recipe]}))
            elif variant.options and not any(key in chosen.get(name, {})
                                             for name, settings in variant.options.items() for key in settings):
                merged = {name: {**chosen.get(name, {}), **variant.options.get(name, {})}
                          for name in {*chosen, *variant.options}}
                found.append((variant.name, precision, {**options, "pass_options": merged}))
    return found


def convert_auto(spec: str, target: str = "cpu", output=None, *, budget: str = "int4", shape: str = "batch=1,prompt=128,new=64",
                 force: bool = False, threads: int = 2, rounds: int = 3, on_step=None, **options) -> ConvertResult:
    from kiln.bench import BenchConfig, engine_candidate, run_bench

    wanted = parse_shape(shape)
    builds = candidates(target, budget, options)
    output = Path(output) if output is not None else default_output(spec, target, "auto")
    refuse_existing(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)
    scratch = output.parent / f".{output.name}.kiln-tmp-auto-{os.getpid()}"
    try:
        scratch.mkdir()
        built, rejected = {}, []
        precision_of = {name: precision for name, precision, _ in builds}
        for name, precision, build_options in builds:
            try:
                built[name] = convert(spec, target, precision, scratch / name, on_step=on_step, **build_options)
            except VerificationFailed as failure:
                rejected.append({"candidate": name, "precision": precision, "rejected": str(failure),
                                 "verification": failure.report})
        if not built:
            raise VerificationFailed(f"--auto: no candidate of {', '.join(name for name, _, _ in builds)} passed "
                                     "verification", {"candidates": rejected})
        config = BenchConfig(prompt_lengths=(wanted["prompt"],), batches=(wanted["batch"],), new_tokens=wanted["new"],
                             decode_prompt=wanted["prompt"], rounds=rounds, threads=threads)
        bench = run_bench([engine_candidate(r.engine_dir, threads, label=p, trust_native_code=True)  # built just now
                           for p, r in built.items()], config)
        measured = []
        for name, figures in zip(built, bench["engines"]):
            rate = figures["decode_tok_s"][str(wanted["batch"])]["median"]
            first = figures["first_token_ms"]["median"]
            # The user's request: a prefill, then `new` tokens for each of `batch` rows.
            seconds = first / 1e3 + wanted["batch"] * (wanted["new"] - 1) / rate
            logits = built[name].manifest["verification"]["logits"]
            measured.append({"candidate": name, "precision": precision_of[name], "request_seconds": seconds,
                             "decode_tok_s": rate, "first_token_ms": first, "size_bytes": figures["size_bytes"],
                             "top1_agreement": logits["top1_agreement"], "kl_mean": logits["kl_mean"]})
        chosen = min(measured, key=lambda m: m["request_seconds"])
        for entry in measured:
            if entry is not chosen:
                entry["rejected"] = f"slower on {shape}: {entry['request_seconds']:.3f} s vs {chosen['request_seconds']:.3f} s"
        summary = {"shape": wanted, "budget": budget, "chosen": chosen["candidate"], "candidates": measured + rejected,
                   "bench": {k: bench[k] for k in ("date", "machine", "config", "read_bandwidth_gb_s")}}
        engine_dir = built[chosen["candidate"]].engine_dir
        manifest = _record(engine_dir, summary)
        move_into_place(engine_dir, output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ConvertResult(output, manifest, manifest["steps"])


def _record(engine_dir: Path, summary: dict) -> dict:
    """Add the comparison to report.json and the manifest, re-hashing the files."""
    import json

    report = json.loads((engine_dir / "report.json").read_text())
    report["auto"] = summary
    write_json(engine_dir / "report.json", report)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    fields = {k: v for k, v in manifest.items() if k not in _MANIFEST_OWN}
    return write_manifest(engine_dir, dict(fields, auto=summary))
