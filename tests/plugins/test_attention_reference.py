"""The C++ CPU op and the NumPy reference against PyTorch's scaled_dot_product_attention."""

import math

import numpy as np
import pytest
import torch

from plugins import AttentionInputError, attention_reference
from plugins.reference import sdpa_reference as sdpa_attention
from tests.plugins.cases import key_mask_for, random_attention_cases

CASES = random_attention_cases(240)
FP32_TOLERANCE = 1e-5


def case_id(case: dict) -> str:
    return "b{batch}h{heads}kv{kv_heads}q{q_len}p{past_len}s{spare}d{head_dim}{alibi}{masked}".format(
        **{**case, "alibi": "-alibi" if case["alibi"] else "", "masked": "-masked" if case["masked"] else ""}
    )


def make_inputs(case: dict, dtype=torch.float32):
    generator = torch.Generator().manual_seed(case["seed"])
    capacity = case["past_len"] + case["q_len"] + case["spare"]
    q = torch.randn(case["batch"], case["heads"], case["q_len"], case["head_dim"], generator=generator)
    k = torch.randn(case["batch"], case["kv_heads"], capacity, case["head_dim"], generator=generator)
    v = torch.randn(case["batch"], case["kv_heads"], capacity, case["head_dim"], generator=generator)
    slopes = None
    if case.get("alibi"):
        # BLOOM's slopes: 2^(-8 i / heads)
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / case["heads"]) for i in range(case["heads"])])
    return q.to(dtype), k.to(dtype), v.to(dtype), slopes


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_op_and_numpy_reference_match_sdpa(case, torch_op):
    q, k, v, slopes = make_inputs(case)
    past_len, scale, mask = case["past_len"], case["scale"], key_mask_for(case)
    expected = sdpa_attention(q, k, v, past_len, slopes, scale, mask)

    got_op = torch_op(q, k, v, past_len, slopes, scale, None if mask is None else torch.from_numpy(mask))
    got_numpy = attention_reference(
        q.numpy(), k.numpy(), v.numpy(), past_len, None if slopes is None else slopes.numpy(), scale, mask
    )

    assert got_op.shape == q.shape and got_op.dtype == torch.float32
    assert (got_op - expected).abs().max().item() <= FP32_TOLERANCE
    assert got_numpy.dtype == np.float32
    assert np.abs(got_numpy - expected.numpy()).max() <= FP32_TOLERANCE


def test_cases_cover_the_contract_edges():
    assert len(CASES) >= 200
    assert any(c["past_len"] == 0 for c in CASES)
    assert any(c["batch"] > 1 for c in CASES)
    assert {c["heads"] // c["kv_heads"] for c in CASES} >= {1, 2, 3, 4}
    assert any(c["alibi"] and c["heads"] != c["kv_heads"] for c in CASES)
    assert any(c["head_dim"] % 2 and c["q_len"] % 2 for c in CASES)
    masks = [key_mask_for(c) for c in CASES if c["masked"]]
    assert len(masks) >= 50
    # Some queries see no key at all (their row's padding covers everything up to them).
    assert any((m[:, :1] == 0).any() for m in masks)


def test_a_query_that_sees_no_key_gets_zeros(torch_op):
    q, k, v, _ = make_inputs(dict(batch=2, heads=2, kv_heads=1, q_len=4, past_len=0, spare=0, head_dim=8, seed=9))
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.int32)
    got = torch_op(q, k, v, 0, key_mask=mask)
    assert torch.equal(got[0, :, :2], torch.zeros(2, 2, 8))
    assert got[0, :, 2:].abs().sum() > 0 and not got.isnan().any()
    numpy_got = attention_reference(q.numpy(), k.numpy(), v.numpy(), 0, key_mask=mask.numpy())
    assert np.array_equal(numpy_got[0, :, :2], np.zeros((2, 2, 8), np.float32))


def test_unused_cache_slots_are_never_read(torch_op):
    q, k, v, _ = make_inputs(dict(batch=2, heads=4, kv_heads=2, q_len=3, past_len=5, spare=4, head_dim=8, seed=1))
    clean = torch_op(q, k, v, 5)
    k[:, :, 8:], v[:, :, 8:] = math.nan, math.nan
    assert torch.equal(torch_op(q, k, v, 5), clean)
    assert np.array_equal(attention_reference(q.numpy(), k.numpy(), v.numpy(), 5), clean.numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_op_keeps_low_precision_dtypes(dtype, torch_op):
    q, k, v, slopes = make_inputs(dict(batch=1, heads=4, kv_heads=1, q_len=5, past_len=3, spare=0, head_dim=16, seed=2, alibi=True))
    got = torch_op(q.to(dtype), k.to(dtype), v.to(dtype), 3, slopes)
    expected = sdpa_attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), 3, slopes, None)
    assert got.dtype == dtype
    assert (got.float() - expected).abs().max().item() <= 1e-2


def test_opcheck(torch_op):
    samples = [
        make_inputs(dict(batch=2, heads=4, kv_heads=2, q_len=3, past_len=0, spare=0, head_dim=8, seed=3, alibi=True)) + (0,),
        make_inputs(dict(batch=1, heads=3, kv_heads=1, q_len=1, past_len=6, spare=2, head_dim=5, seed=4, alibi=False)) + (6,),
    ]
    masks = [torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.int32), None]
    for (q, k, v, slopes, past_len), mask in zip(samples, masks):
        kwargs = {"alibi_slopes": slopes, "scale": 0.3, "key_mask": mask}
        torch.library.opcheck(torch_op.default, (q, k, v, past_len), kwargs)


def test_fake_op_gives_the_output_shape_without_running(torch_op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 8, 5, 16), torch.empty(2, 2, 12, 16), torch.empty(2, 2, 12, 16)
        out = torch_op(q, k, v, 7)
    assert tuple(out.shape) == (2, 8, 5, 16)


@pytest.mark.parametrize("argument", ["key_mask", "alibi_slopes"])
def test_a_mask_or_slopes_on_another_device_than_the_query_is_refused(argument, torch_op):
    """On a GPU, a CPU mask read by the kernel is an illegal memory access; torch.compile and export trace
    the op on meta tensors, so the check there covers the GPU too (test_torch_op_gpu.py runs the kernel's)."""
    q, k = torch.empty(1, 2, 3, 8, device="meta"), torch.empty(1, 2, 5, 8, device="meta")
    cpu = {"key_mask": torch.ones(1, 5, dtype=torch.int32), "alibi_slopes": torch.ones(2)}[argument]
    with pytest.raises(RuntimeError, match=rf"{argument} must be on the query's device \(meta\); got cpu"):
        torch_op(q, k, k, 2, **{argument: cpu})


@pytest.mark.parametrize(
    "q_shape, kv_shape, past_len, message",
    [
        ((1, 6, 2, 8), (1, 4, 4, 8), 2, "multiple of kv_heads"),
        ((1, 4, 3, 8), (1, 2, 4, 8), 2, "must fit in the cache"),
        ((1, 4, 3, 8), (1, 2, 5, 4), 2, "head_dim"),
    ],
)
def test_contract_violations_name_the_problem(q_shape, kv_shape, past_len, message, torch_op):
    q, k = np.zeros(q_shape, np.float32), np.zeros(kv_shape, np.float32)
    with pytest.raises(AttentionInputError, match=message):
        attention_reference(q, k, k, past_len)
    with pytest.raises(RuntimeError, match=message):
        torch_op(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(k), past_len)
