"""Print a `kiln bench --json` report as the Markdown table the README carries.

Run: .venv/bin/python benchmarks/table.py benchmarks/results/gpt2-cpu.json
"""
import json
import sys


def main(path: str) -> None:
    report = json.load(open(path))
    machine = report["machine"]
    print(f"{report['date'][:10]}, {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
          f"{report['config']['threads']} threads, {report['config']['rounds']} rounds interleaved, medians; "
          f"read bandwidth {report['read_bandwidth_gb_s']:.1f} GB/s\n")
    batches = [str(b) for b in report["config"]["batches"]]
    lengths = [str(n) for n in report["config"]["prompt_lengths"]]
    print("| engine | " + " | ".join(f"decode b{b} tok/s" for b in batches) + " | × eager (b1) | floor b1 | first token ms | "
          + " | ".join(f"prefill {n} ms" for n in lengths) + " | MB on disk |")
    print("|" + " --- |" * (len(batches) + len(lengths) + 5))
    for e in report["engines"]:
        floor = f"{e['floor_tok_s']:.0f}" if e["floor_tok_s"] else "-"
        print(f"| {e['label']} | " + " | ".join(f"{e['decode_tok_s'][b]['median']:.1f}" for b in batches)
              + f" | {e['vs_first']['decode_b1']:.2f} | {floor} | {e['first_token_ms']['median']:.0f} | "
              + " | ".join(f"{e['prefill_ms'][n]['median']:.0f}" if n in e["prefill_ms"] else "-" for n in lengths)
              + f" | {e['size_bytes'] / 1e6:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
