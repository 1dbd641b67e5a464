"""`kiln inspect --report`: one Markdown page per engine: manifest, pass log, fidelity, bench, plot."""
from __future__ import annotations

from pathlib import Path

from runtimes.engine_dir import engine_kind


def markdown_report(engine_dir: Path, manifest: dict, ops: dict[str, int], bench: dict | None = None,
                    plot_name: str | None = None, summary=None, bench_lines: list[str] | None = None) -> str:
    """The page; `summary(report)` reads a verification report of a kind other than decoder-lm in one line, and
    `bench_lines` are that kind's bench table (its report's own shape)."""
    source, verification = manifest["source"], manifest["verification"]
    lines = [
        f"# {Path(engine_dir).name}",
        "",
        f"- source: `{source['spec']}` ({engine_kind(manifest)} from a {source.get('origin')}, family {source['family']}), weights sha256 `{source['weights_sha256'][:16]}…`",
        f"- target: {manifest['target']} / {manifest['precision']} on {manifest['backend']}, torchkiln {manifest['torchkiln_version']}, "
        f"built {manifest['created']}",
        "- steps: " + ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in manifest["steps"]),
        "",
        "## Passes",
        "",
        "| pass | seconds | fused / quantized | nodes before → after | weights MB before → after |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in manifest.get("passes", []):
        changes = ", ".join(f"{op} {n}" for op, n in {**p["fused"], **p["quantized"]}.items()) or ("changed" if p["changed"] else "-")
        nodes = f"{sum(p['ops_before'].values())} → {sum(p['ops_after'].values())}"
        lines.append(f"| {p['name']} | {p['seconds']:.2f} | {changes} | {nodes} | {p['bytes_before'] / 1e6:.2f} → {p['bytes_after'] / 1e6:.2f} |")
    lines += ["", "## Fidelity against PyTorch", ""]
    if verification.get("skipped"):
        lines.append("Skipped (`--no-verify`).")
    elif "logits" not in verification:  # another kind's report: its line, then each graph's outputs
        lines += [summary(verification), "", "| graph output | max abs error | relative to range |", "| --- | --- | --- |"]
        lines += [f"| {role}.{name} | {e['max_abs']:.3g} | {e['relative']:.3g} |"
                  for role, outputs in verification.get("components", {}).items() for name, e in outputs.items()]
    else:
        logits = verification["logits"]
        lines += [
            f"{'Passed' if verification['passed'] else 'FAILED'}: top-1 agreement {logits['top1_agreement']:.2%} on "
            f"{logits['decisive_positions']} decisive positions ({logits['near_ties']} near-ties), KL mean {logits['kl_mean']:.3g}, "
            "gates: " + _gates(verification["tolerance"]) + ".",
            "",
            "| output | max abs error | relative to range |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {name} | {e['max_abs']:.3g} | {e['relative']:.3g} |" for name, e in verification["outputs"].items()]
    for candidate in (manifest.get("auto") or {}).get("candidates", []):
        if candidate is manifest["auto"]["candidates"][0]:
            lines += ["", "## --auto candidates", "", "| candidate | precision | request s | decode tok/s | top-1 | verdict |",
                      "| --- | --- | --- | --- | --- | --- |"]
        lines.append(f"| {candidate.get('candidate', candidate['precision'])} | {candidate['precision']} | "
                     f"{candidate.get('request_seconds', float('nan')):.3f} | "
                     f"{candidate.get('decode_tok_s', float('nan')):.1f} | {candidate.get('top1_agreement', float('nan')):.2%} | "
                     f"{candidate.get('rejected', 'chosen')} |")
    if bench_lines:
        lines += ["", "## Bench", "", f"{bench['date']}, {bench['machine']['cpu']}, {bench['machine']['cores']} cores", "",
                  *bench_lines]
        if plot_name:
            lines += ["", f"![bench]({plot_name})"]
    elif bench:
        lines += ["", "## Bench", "", f"{bench['date']}, {bench['machine']['cpu']}, {bench['machine']['cores']} cores; "
                  f"read bandwidth {bench['read_bandwidth_gb_s']:.1f} GB/s", "",
                  "| engine | decode b1 tok/s | first token ms | floor b1 |", "| --- | --- | --- | --- |"]
        for e in bench["engines"]:
            floor = f"{e['floor_tok_s']:.0f}" if e["floor_tok_s"] else "-"
            lines.append(f"| {e['label']} | {e['decode_tok_s']['1']['median']:.1f} | {e['first_token_ms']['median']:.1f} | {floor} |")
        if plot_name:
            lines += ["", f"![bench]({plot_name})"]
    lines += ["", "## Ops", "", ", ".join(f"{op} {n}" for op, n in ops.items()) or "-", "", "## Files", "",
              "| file | bytes | sha256 |", "| --- | --- | --- |"]
    lines += [f"| {name} | {e['bytes']:,} | `{e['sha256']}` |" for name, e in manifest["files"].items()]
    return "\n".join(lines) + "\n"


def _gates(tolerance: dict) -> str:
    relative = "not gated" if tolerance["relative"] is None else f"≤ {tolerance['relative']:g} of the range"
    return f"error {relative}, top-1 ≥ {tolerance['top1']:.1%}"
