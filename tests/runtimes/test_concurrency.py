import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import kiln
from runtimes.decoder_lm import past_inputs

THREADS, CALLS = 8, 200


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_one_predictor_serves_8_threads_of_mixed_calls(engine_dir):
    engine = kiln.load(engine_dir("tiny-gpt2"))
    empty = {s.name: np.zeros((2, 4, 0, 16), np.float32) for s in past_inputs(engine.signature)}
    rng = random.Random(0)

    def request(i):
        length = rng.randint(1, 9)
        ids = np.random.default_rng(i).integers(0, 1024, size=(2, length))
        if i % 2:
            return ("predict", {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                "position_ids": np.broadcast_to(np.arange(length), (2, length)).copy(), **empty})
        return ("generate", [list(ids[0]), list(ids[1][: max(1, length - 2)])])

    def call(item):
        kind, payload = item
        if kind == "predict":
            return engine.predict(payload)["logits"]
        return engine.generate(payload, max_new_tokens=4)

    requests = [request(i) for i in range(THREADS * CALLS)]
    serial = [call(r) for r in requests[:200]]  # also the warm-up
    rss_after_warmup = _rss_bytes()
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        threaded = list(pool.map(call, requests))
    rss_after = _rss_bytes()
    for expected, got in zip(serial, threaded):
        np.testing.assert_array_equal(expected, got)
    assert len(threaded) == THREADS * CALLS
    assert rss_after <= 1.1 * rss_after_warmup, f"RSS grew from {rss_after_warmup >> 20} to {rss_after >> 20} MiB"
