"""kiln::causal_attention on a GPU: the CUDA (or HIP) kernel against SDPA computed in float64."""

import pytest
import torch

from plugins.reference import sdpa_reference
from tests.plugins.cases import key_mask_for, random_attention_cases
from tests.plugins.test_attention_reference import case_id, make_inputs

pytestmark = pytest.mark.gpu
CASES = random_attention_cases(240, seed=21)


def on_gpu(case, dtype):
    q, k, v, slopes = make_inputs(case)
    mask = key_mask_for(case)
    move = lambda t: None if t is None else torch.as_tensor(t).cuda()
    return (t.cuda().to(dtype) for t in (q, k, v)), move(slopes), move(mask)


def relative_error(got, expected) -> float:
    return ((got.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp32_kernel_matches_sdpa(case, torch_op):
    (q, k, v), slopes, mask = on_gpu(case, torch.float32)
    got = torch_op(q, k, v, case["past_len"], slopes, case["scale"], mask)
    expected = sdpa_reference(q.double(), k.double(), v.double(), case["past_len"], slopes, case["scale"], mask)
    assert got.is_cuda and got.dtype == torch.float32
    assert (got.double() - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", CASES[::4], ids=case_id)
def test_fp16_kernel_matches_sdpa(case, torch_op):
    (q, k, v), slopes, mask = on_gpu(case, torch.float16)
    got = torch_op(q, k, v, case["past_len"], slopes, case["scale"], mask)
    expected = sdpa_reference(q.double(), k.double(), v.double(), case["past_len"], slopes, case["scale"], mask)
    assert got.dtype == torch.float16
    assert relative_error(got, expected) <= 2e-3


def test_large_head_dim_and_long_cache(torch_op):
    case = dict(batch=2, heads=8, kv_heads=2, q_len=33, past_len=1500, spare=7, head_dim=256, alibi=True,
                masked=True, scale=None, seed=3)
    (q, k, v), slopes, mask = on_gpu(case, torch.float16)
    got = torch_op(q, k, v, 1500, slopes, None, mask)
    expected = sdpa_reference(q.double(), k.double(), v.double(), 1500, slopes, None, mask)
    assert relative_error(got, expected) <= 2e-3


@pytest.mark.parametrize("argument", ["key_mask", "alibi_slopes"])
def test_the_kernel_refuses_a_mask_or_slopes_left_on_the_cpu(argument, torch_op):
    q, k = torch.randn(1, 2, 3, 8, device="cuda"), torch.randn(1, 2, 5, 8, device="cuda")
    cpu = {"key_mask": torch.ones(1, 5, dtype=torch.int32), "alibi_slopes": torch.ones(2)}[argument]
    with pytest.raises(RuntimeError, match=f"{argument} must be on the query's device"):
        torch_op(q, k, k, 2, **{argument: cpu})
    torch.cuda.synchronize()  # no illegal memory access was left pending
