"""kiln serve on a real engine and a real port: OpenAI completions equal `generate`, streaming, errors,
back-pressure, cancellation, metrics, access keys, draining on SIGTERM."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import runtimes
from kiln.serve import ServeOptions, build_app
from tests.kiln.serve_helpers import free_port, live_server, slow_down

ENGINE = "tiny-trained"  # trained: confident logits, and a tokenizer that spells each token as a number


@pytest.fixture(scope="module")
def engine(engine_dir):
    return engine_dir(ENGINE)


@pytest.fixture(scope="module")
def alone(engine):
    """`alone(prompt_ids, n)` -> the tokens `Predictor.generate` gives that prompt by itself (up to EOS)."""
    predictor = runtimes.load(engine)
    eos = json.loads((engine / "manifest.json").read_text())["source"]["config"]["eos_token_id"]

    def run(ids, n):
        tokens = predictor.generate([ids], max_new_tokens=n, eos_token_id=eos)[0].tolist()
        return tokens[: tokens.index(eos)] if eos in tokens else tokens

    yield run
    predictor.close()


@pytest.fixture(scope="module")
def server(engine):
    app = build_app(engine, ServeOptions(max_batch=8), threads=1)
    with live_server(app) as url:
        yield url, app


def _complete(url, **body):
    return httpx.post(f"{url}/v1/completions", json={"temperature": 0, **body}, timeout=60)


def _prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 120, size=int(n))] for n in rng.integers(1, 24, size=count)]


def test_completions_equal_generate_and_streaming_yields_the_same(server, alone, engine):
    url, _ = server
    prompt = _prompts(1, seed=3)[0]
    reply = _complete(url, prompt=prompt, max_tokens=12)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["token_ids"] == alone(prompt, 12)
    assert reply.json()["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(choice["token_ids"]),
                                     "total_tokens": len(prompt) + len(choice["token_ids"])}

    streamed, text = [], ""
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                               "stream": True}, timeout=60) as events:
        lines = [line for line in events.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        delta = json.loads(line[len("data: "):])["choices"][0]
        streamed += delta["token_ids"]
        text += delta["text"]
    assert streamed == choice["token_ids"] and text == choice["text"]

    tokenizer = runtimes.load(engine).tokenizer
    assert choice["text"] == tokenizer.decode(choice["token_ids"])
    words = _complete(url, prompt="5 8 11", max_tokens=6).json()["choices"][0]
    assert words["token_ids"] == alone(tokenizer.encode("5 8 11", add_special_tokens=False).ids, 6)


def test_sixteen_concurrent_clients_get_what_each_would_get_alone(server, alone):
    url, _ = server
    prompts = _prompts(16, seed=1)
    lengths = [4 + i % 9 for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda job: _complete(url, prompt=job[0], max_tokens=job[1]), zip(prompts, lengths)))
    for prompt, n, reply in zip(prompts, lengths, replies):
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["token_ids"] == alone(prompt, n), prompt


def test_a_stop_string_ends_the_completion_before_it(server):
    url, _ = server
    full = _complete(url, prompt="5 8 11", max_tokens=8).json()["choices"][0]["text"]
    stop = full.split()[3]  # the fourth number it writes
    cut = _complete(url, prompt="5 8 11", max_tokens=8, stop=[" " + stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index(" " + stop)]


@pytest.mark.parametrize("body, field", [
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
    ({"prompt": [1, 999]}, "prompt"),
    ({"prompt": [1, 2], "max_tokens": 500}, "max_tokens"),
    ({"prompt": [1, 2], "temperature": -1}, "temperature"),
    ({"prompt": "", "max_tokens": 2}, "prompt"),
    ({"prompt": [1, 2], "stop": [""]}, "stop"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field):
    url, _ = server
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["message"].startswith(field)


def test_chat_needs_a_template_and_renders_the_one_given(engine, alone, tmp_path):
    url_reply = None
    app = build_app(engine, ServeOptions(), threads=1)
    with live_server(app) as url:
        url_reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "5 8"}]})
    assert url_reply.status_code == 400 and "chat template" in url_reply.json()["error"]["message"]

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }} {% endfor %}")
    app = build_app(engine, ServeOptions(chat_template=template), threads=1)
    with live_server(app) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "system", "content": "5 8"}, {"role": "user", "content": "11"}],
            "max_tokens": 5, "temperature": 0})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    tokenizer = app.state.service.tokenizer
    assert choice["message"]["role"] == "assistant"
    assert choice["token_ids"] == alone(tokenizer.encode("5 8 11 ", add_special_tokens=False).ids, 5)


def test_a_full_queue_gets_429_and_a_client_that_leaves_frees_its_slot(engine):
    from prometheus_client.parser import text_string_to_metric_families

    app = build_app(engine, ServeOptions(max_batch=1, max_queue=1), threads=1)
    slow_down(app, 0.02)
    scheduler = app.state.service.scheduler
    with live_server(app) as url, ThreadPoolExecutor(1) as pool:
        body = {"prompt": [5, 8, 11], "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)  # the first request holds the one slot
            waiting = pool.submit(_complete, url, prompt=[5, 8], max_tokens=2)
            _wait_for(lambda: scheduler.queue_depth == 1)
            refused = _complete(url, prompt=[5], max_tokens=2)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            sequence = next(iter(scheduler.batch.rows))
        # Leaving the stream early disconnects: the server cancels the sequence at the next step.
        assert waiting.result().status_code == 200
        _wait_for(lambda: sequence.finish_reason is not None)
        assert sequence.finish_reason == "cancelled" and len(sequence.tokens) < 100
        _wait_for(lambda: scheduler.active == 0)
        text = httpx.get(f"{url}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    statuses = {sample.labels["status"]: sample.value for sample in families["kiln_requests"].samples
                if sample.name == "kiln_requests_total"}
    assert statuses["429"] == 1 and statuses["200"] >= 2
    assert families["kiln_active_sequences"].samples[0].value == 0
    assert families["kiln_time_to_first_token_seconds"].type == "histogram"
    assert any(s.name.endswith("_count") and s.value >= 2 for s in families["kiln_inter_token_latency_seconds"].samples)


def test_api_keys_guard_everything_but_health(engine, tmp_path):
    app = build_app(engine, ServeOptions(api_keys=("k-123", "k-456")), threads=1)
    with live_server(app) as url:
        body = {"prompt": [5, 8], "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k-999"})
        assert wrong.status_code == 401 and wrong.json()["error"]["param"] == "authorization"
        right = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k-456"})
        assert right.status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").json()["digest"].startswith("sha256:")


def test_sigterm_drains_in_flight_requests(engine, alone, tmp_path):
    """`kiln serve` in its own process: SIGTERM while requests are queued or decoding; all of them complete."""
    port = free_port()
    command = [sys.executable, "-c", "from kiln.cli import main; main()", "serve", str(engine), "--port", str(port),
               "--max-batch", "1", "--threads", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _healthy(url), timeout=60)
        # 24 requests of 100 tokens, one at a time: the queue outlasts their arrival even on a loaded machine (with
        # 10, a full test run once saw all of them answered before the last one was counted in).
        prompts = _prompts(24, seed=2)
        with ThreadPoolExecutor(len(prompts)) as pool:
            replies = [pool.submit(_complete, url, prompt=p, max_tokens=100) for p in prompts]
            # Every request must be in the server before the signal: once draining, it accepts no new connection.
            _wait_for(lambda: _arrived(url) == len(prompts))
            process.send_signal(signal.SIGTERM)
            unanswered = sum(not r.done() for r in replies)
            results = [r.result() for r in replies]
        assert unanswered >= 2  # the signal came with requests still queued
        assert process.wait(60) == 0, process.stderr.read()
    finally:
        process.kill()
    for prompt, reply in zip(prompts, results):
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["token_ids"] == alone(prompt, 100)


def _healthy(url) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _arrived(url) -> float:
    """Completion requests the server holds or has answered: queued, decoding, or done."""
    lines = httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
    values = {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}
    return (values["kiln_queue_depth"] + values["kiln_active_sequences"]
            + values.get('kiln_requests_total{status="200"}', 0.0))


def _wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def test_a_diffusion_engine_serves_images_equal_to_generate_image(sd_engine):
    import base64
    import struct
    import zlib

    def pixels(png: bytes) -> np.ndarray:  # the server's PNGs: 8-bit RGB, filter 0 on every row
        width, height = struct.unpack(">II", png[16:24])
        data, at = b"", 8
        while at < len(png):
            length, kind = struct.unpack(">I4s", png[at:at + 8])
            data += png[at + 8:at + 8 + length] if kind == b"IDAT" else b""
            at += length + 12
        rows = np.frombuffer(zlib.decompress(data), np.uint8).reshape(height, 1 + width * 3)
        assert not rows[:, 0].any()
        return rows[:, 1:].reshape(height, width, 3)

    app = build_app(sd_engine, ServeOptions(), threads=1)
    with live_server(app) as url:
        body = {"prompt": "a red square", "n": 2, "steps": 2, "seed": 3, "size": "24x40"}
        reply = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
        bad = httpx.post(f"{url}/v1/images/generations", json={**body, "size": "30x30"}, timeout=60)
        text = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
        expected = app.state.service.engine.generate_image(["a red square"] * 2, steps=2, seed=3, height=40, width=24)
    assert reply.status_code == 200, reply.text
    images = [pixels(base64.b64decode(item["b64_json"])) for item in reply.json()["data"]]
    assert np.array_equal(np.stack(images), expected)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"
    assert text.status_code == 400 and "does not generate text" in text.json()["error"]["message"]


class _AtMostTwoRows:
    """The engine with a shape profile of at most 2 rows, as a TensorRT engine's may be."""

    def __init__(self, engine):
        self.engine, self.signature, self.cache_layout = engine, engine.signature, engine.cache_layout

    def forward(self, feeds):
        from runtimes.errors import FeedError

        if feeds["input_ids"].shape[0] > 2:
            raise FeedError(f"input 'input_ids': axis 0 is {feeds['input_ids'].shape[0]}, outside the profile 1..2")
        return self.engine.forward(feeds)


def test_the_scheduler_starts_when_its_engine_refuses_the_warm_up_batch(engine, alone):
    from kiln.serve.scheduler import Scheduler
    from runtimes.batching import Sequence

    with runtimes.load(engine, threads=1) as loaded:
        scheduler = Scheduler(_AtMostTwoRows(loaded), max_batch=4).start()  # warms up with 4 rows: refused
        done = []
        sequence = Sequence([5, 8, 11], 4)
        scheduler.submit(sequence, lambda tokens, reason: done.append(reason) if reason else None)
        deadline = time.monotonic() + 30
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
        scheduler.stop(30)
    assert done == ["length"] and sequence.tokens == alone([5, 8, 11], 4)
