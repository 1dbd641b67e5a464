"""Random shapes for the attention tests."""

import random


def random_attention_cases(count: int, seed: int = 0) -> list[dict]:
    """Shapes that stress the edges: odd sizes, past length 0, batch > 1, GQA ratios, ALiBi, spare cache."""
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
                scale=None if index % 5 else rng.uniform(0.05, 1.0),
                seed=index,
            )
        )
    return cases
