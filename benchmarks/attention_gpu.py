"""The kiln attention kernel on a GPU against PyTorch's SDPA: correctness first, then speed.

    python benchmarks/attention_gpu.py [--json results.json]

Correctness: random shapes (GQA, ALiBi, padding masks, past length 0) and a few large ones, fp32 and
fp16, against SDPA in float64 (relative error ||out - ref|| / ||ref||). Speed: fp16, 32 query heads over
8 KV heads of 128 (a LLaMA-3-8B layer), batch 1/8 x sequence 128/2048, prefill (the whole sequence, past 0)
and decode (1 query over a cache of `sequence`), medians of CUDA-event timings (triton.testing.do_bench),
SDPA called the way transformers calls it (is_causal for prefill, enable_gqa).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plugins import load_torch_op  # noqa: E402
from plugins.reference import sdpa_reference  # noqa: E402
from tests.plugins.cases import key_mask_for, random_attention_cases  # noqa: E402


def inputs(batch, heads, kv_heads, q_len, capacity, head_dim, dtype, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator, device="cuda", dtype=torch.float32).to(dtype)
    return make(batch, heads, q_len, head_dim), make(batch, kv_heads, capacity, head_dim), make(batch, kv_heads, capacity, head_dim)


def relative_error(got, expected) -> float:
    return ((got.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check(op) -> list[dict]:
    rows = []
    large = [
        dict(batch=1, heads=32, kv_heads=8, q_len=128, past_len=0, spare=0, head_dim=128, alibi=False, masked=False, scale=None, seed=1),
        dict(batch=8, heads=32, kv_heads=8, q_len=1, past_len=2047, spare=0, head_dim=128, alibi=False, masked=True, scale=None, seed=2),
        dict(batch=2, heads=16, kv_heads=16, q_len=512, past_len=100, spare=5, head_dim=64, alibi=True, masked=True, scale=None, seed=3),
        dict(batch=1, heads=8, kv_heads=1, q_len=7, past_len=3000, spare=0, head_dim=256, alibi=True, masked=False, scale=0.2, seed=4),
    ]
    for name, cases in (("random", random_attention_cases(240, seed=5)), ("large", large)):
        for dtype in (torch.float32, torch.float16):
            worst = 0.0
            for case in cases:
                capacity = case["past_len"] + case["q_len"] + case["spare"]
                q, k, v = inputs(case["batch"], case["heads"], case["kv_heads"], case["q_len"], capacity, case["head_dim"], dtype, case["seed"])
                slopes = torch.rand(case["heads"], device="cuda") * 0.5 if case["alibi"] else None
                mask = key_mask_for(case)
                mask = None if mask is None else torch.from_numpy(mask).cuda()
                out = torch.full_like(q, float("nan"))  # nothing left unwritten may pass
                out.copy_(op(q, k, v, case["past_len"], slopes, case["scale"], mask))
                expected = sdpa_reference(q.double(), k.double(), v.double(), case["past_len"], slopes, case["scale"], mask)
                worst = max(worst, relative_error(out, expected) if not out.isnan().any() else float("inf"))
            rows.append(dict(cases=name, count=len(cases), dtype=str(dtype).removeprefix("torch."), worst_relative_error=worst))
            print(f"check {name:6} x{len(cases):3} {rows[-1]['dtype']:8} worst relative error {worst:.2e}", flush=True)
    return rows


def timings(op) -> list[dict]:
    from triton.testing import do_bench

    heads, kv_heads, head_dim, rows = 32, 8, 128, []
    for batch in (1, 8):
        for sequence in (128, 2048):
            for phase in ("prefill", "decode"):
                q_len = sequence if phase == "prefill" else 1
                q, k, v = inputs(batch, heads, kv_heads, q_len, sequence, head_dim, torch.float16, seed=7)
                past = sequence - q_len
                kiln = lambda: op(q, k, v, past)
                sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=phase == "prefill", enable_gqa=True)
                error = relative_error(kiln(), sdpa().double())
                kiln_ms = do_bench(kiln, warmup=25, rep=200, return_mode="median")
                sdpa_ms = do_bench(sdpa, warmup=25, rep=200, return_mode="median")
                cache_bytes = 2 * batch * kv_heads * sequence * head_dim * 2
                rows.append(dict(batch=batch, sequence=sequence, phase=phase, kiln_ms=kiln_ms, sdpa_ms=sdpa_ms,
                                 kiln_over_sdpa=kiln_ms / sdpa_ms, kiln_cache_read_gbs=cache_bytes / kiln_ms / 1e6,
                                 relative_error_vs_sdpa=error))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA or ROCm build of torch and a GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    op = load_torch_op()
    build_seconds = time.perf_counter() - started
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}; op built and loaded in {build_seconds:.0f} s", flush=True)
    results = dict(device=device, torch=torch.__version__, build_seconds=build_seconds, checks=check(op), timings=timings(op))
    print("\n| batch | seq | phase | kiln ms | SDPA ms | kiln / SDPA | kiln KV read GB/s | rel. error vs SDPA |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results["timings"]:
        print(f"| {r['batch']} | {r['sequence']} | {r['phase']} | {r['kiln_ms']:.4f} | {r['sdpa_ms']:.4f} | "
              f"{r['kiln_over_sdpa']:.2f} | {r['kiln_cache_read_gbs']:.0f} | {r['relative_error_vs_sdpa']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
