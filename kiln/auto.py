"""`kiln convert --auto`: build every precision the budget allows, verify each, measure those that pass
on the user's shape, and keep the fastest. Every candidate's figures, or why it was rejected, go into
the chosen engine's report and manifest.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from kiln.errors import KilnError, VerificationFailed
from kiln.manifest import write_json, write_manifest
from kiln.pipeline import ConvertResult, convert, default_output, move_into_place, refuse_existing, remove_stale_temporaries
from kiln.targets import target_named

# From least to most lossy: a budget admits itself and everything before it.
LOSSINESS = ("fp32", "bf16", "fp16", "int8-static", "int8", "int4")
_MANIFEST_OWN = ("schema_version", "torchkiln_version", "created", "files", "manifest_sha256")


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


def convert_auto(spec: str, target: str = "cpu", output=None, *, budget: str = "int4", shape: str = "batch=1,prompt=128,new=64",
                 force: bool = False, threads: int = 2, rounds: int = 3, on_step=None, **options) -> ConvertResult:
    from kiln.bench import BenchConfig, engine_candidate, run_bench

    wanted = parse_shape(shape)
    precisions = candidate_precisions(target, budget)
    output = Path(output) if output is not None else default_output(spec, target, "auto")
    refuse_existing(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)
    scratch = output.parent / f".{output.name}.kiln-tmp-auto-{os.getpid()}"
    try:
        scratch.mkdir()
        built, rejected = {}, []
        for precision in precisions:
            try:
                built[precision] = convert(spec, target, precision, scratch / precision, on_step=on_step, **options)
            except VerificationFailed as failure:
                rejected.append({"precision": precision, "rejected": str(failure), "verification": failure.report})
        if not built:
            raise VerificationFailed(f"--auto: no candidate of {', '.join(precisions)} passed verification", {"candidates": rejected})
        config = BenchConfig(prompt_lengths=(wanted["prompt"],), batches=(wanted["batch"],), new_tokens=wanted["new"],
                             decode_prompt=wanted["prompt"], rounds=rounds, threads=threads)
        bench = run_bench([engine_candidate(r.engine_dir, threads, label=p, trust_native_code=True)  # built just now
                           for p, r in built.items()], config)
        measured = []
        for precision, figures in zip(built, bench["engines"]):
            rate = figures["decode_tok_s"][str(wanted["batch"])]["median"]
            first = figures["first_token_ms"]["median"]
            # The user's request: a prefill, then `new` tokens for each of `batch` rows.
            seconds = first / 1e3 + wanted["batch"] * (wanted["new"] - 1) / rate
            logits = built[precision].manifest["verification"]["logits"]
            measured.append({"precision": precision, "request_seconds": seconds, "decode_tok_s": rate, "first_token_ms": first,
                             "size_bytes": figures["size_bytes"], "top1_agreement": logits["top1_agreement"],
                             "kl_mean": logits["kl_mean"]})
        chosen = min(measured, key=lambda m: m["request_seconds"])
        for entry in measured:
            if entry is not chosen:
                entry["rejected"] = f"slower on {shape}: {entry['request_seconds']:.3f} s vs {chosen['request_seconds']:.3f} s"
        summary = {"shape": wanted, "budget": budget, "chosen": chosen["precision"], "candidates": measured + rejected,
                   "bench": {k: bench[k] for k in ("date", "machine", "config", "read_bandwidth_gb_s")}}
        engine_dir = built[chosen["precision"]].engine_dir
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
