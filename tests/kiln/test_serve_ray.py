"""kiln serve on Ray Serve: two replicas on a local Ray (loopback, 2 CPUs); one replica's actor is killed
while 50 requests are in flight, and every request still completes with the tokens the engine gives alone."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import runtimes
from kiln.serve import ServeOptions
from kiln.serve.ray_deployment import kiln_deployment
from tests.kiln.serve_helpers import free_port

ray = pytest.importorskip("ray", reason="Ray Serve is the `serve` extra; `make install` installs it")


def test_fifty_requests_survive_a_killed_replica(engine_dir):
    from ray import serve

    engine = engine_dir("tiny-trained")
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(3, 120, size=int(n))] for n in rng.integers(1, 20, size=50)]
    with runtimes.load(engine, threads=1) as predictor:
        alone = [predictor.generate([p], 24)[0].tolist() for p in prompts]

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(kiln_deployment(engine, ServeOptions(max_batch=8), {"threads": 1}, replicas=2), name="kiln",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/completions"
        done, retried = [], []

        def complete(prompt):
            for attempt in range(20):  # a request the killed replica held fails: the client retries it
                try:
                    reply = httpx.post(url, json={"prompt": prompt, "max_tokens": 24, "temperature": 0}, timeout=60)
                    if reply.status_code == 200:
                        done.append(prompt)
                        return reply.json()["choices"][0]["token_ids"]
                except httpx.HTTPError:
                    pass
                retried.append(prompt)
                time.sleep(0.2)
            raise AssertionError(f"no answer for {prompt} after 20 tries")

        with ThreadPoolExecutor(8) as pool:
            results = [pool.submit(complete, p) for p in prompts]
            while len(done) < 10:
                time.sleep(0.01)
            replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                        if a["name"].startswith("SERVE_REPLICA::kiln")]
            assert len(replicas) == 2
            ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
            tokens = [r.result() for r in results]
        assert len(done) == 50
        for got, expected in zip(tokens, alone):
            assert got == expected
    finally:
        serve.shutdown()
        ray.shutdown()
