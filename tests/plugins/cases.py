"""Random shapes for the attention tests."""

import random

import numpy as np


def random_attention_cases(count: int, seed: int = 0) -> list[dict]:
    """Shapes that stress the edges: odd sizes, past length 0, batch > 1, GQA ratios, ALiBi, spare cache,
    padded keys."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        kv_heads = rng.choice([1, 1, 2, 3, 4])
        cases.append(
            dict(
                batch=rng.choice([1, 1, 2, 3]),
                kv_heads=kv_heads,
                heads=kv_heads * rng.choice([1, 1, 2, 3, 4]),
                q_len=rng.choice([1, 1, 2, 3, 5, 7, 16, 17]),
                past_len=0 if index % 4 == 0 else rng.choice([1, 2, 5, 9, 16, 31]),
                spare=rng.choice([0, 0, 0, 3]),  # preallocated cache slots past the valid keys
                head_dim=rng.choice([1, 3, 8, 16, 17, 32, 64]),
                alibi=index % 3 == 0,
                masked=index % 4 == 1,
                scale=None if index % 5 else rng.uniform(0.05, 1.0),
                seed=index,
            )
        )
    return cases


def key_mask_for(case: dict):
    """int32 [batch, kv_capacity] for a `masked` case, else None: random left padding per row (which can hide
    every key an early query sees), sometimes a hole, and random values in the unused slots."""
    if not case.get("masked"):
        return None
    rng = np.random.default_rng(case["seed"] + 1000)
    total = case["past_len"] + case["q_len"]
    mask = rng.integers(0, 2, (case["batch"], total + case["spare"])).astype(np.int32)
    mask[:, :total] = 1
    for row in range(case["batch"]):
        mask[row, : rng.integers(0, total)] = 0
        if total > 2 and rng.random() < 0.3:
            mask[row, rng.integers(0, total)] = 0
    return mask
