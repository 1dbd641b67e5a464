"""`kiln serve`: an engine behind an OpenAI-compatible HTTP API (FastAPI): text engines through one
continuous-batching scheduler, text-to-image engines one batch of images at a time; Prometheus metrics,
bearer-token access.

`build_app(engine_dir)` loads and checks the engine before it returns, so a server (uvicorn, or a Ray Serve
replica) listens only once its engine is ready.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

import runtimes
from kiln.errors import KilnError
from kiln.images import png_bytes
from kiln.serve.chat import load_chat_template
from kiln.serve.errors import BadRequest
from kiln.serve.metrics import ServerMetrics
from kiln.serve.requests import ChatRequest, CompletionRequest, GenerationParams, ImageRequest, prompt_list
from kiln.serve.scheduler import QueueFull, Scheduler
from runtimes.batching import Sequence
from runtimes.engine_dir import engine_facts
from runtimes.errors import FeedError


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32  # sequences decoded together
    max_queue: int = 256  # requests waiting beyond those; more get 429
    api_keys: tuple[str, ...] = ()  # bearer tokens; empty: no access check
    open_metrics: bool = False  # /metrics without a key even when keys are set
    model_name: str | None = None  # the `model` the API reports [default: the engine folder's name]
    chat_template: Path | None = None  # a Jinja template file replacing the tokenizer's own


class CountRequests:
    """Counts `/v1/` responses by status. A plain ASGI middleware: FastAPI's `@app.middleware("http")` passes
    every streamed chunk through a task and a memory stream of its own, per token here."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def _error(status: int, message: str, kind: str, field: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": field, "code": status}},
                        status_code=status, headers=headers)


def load_api_keys(path: Path) -> tuple[str, ...]:
    """One key per line (blank lines and `#` comments skipped); a file without a key is an error."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise KilnError(f"--api-key-file {path}: {error.strerror}") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise KilnError(f"--api-key-file {path}: no key in it (one key per line)")
    return keys


class EngineService:
    """The loaded engine and what the API needs of it: for text, its tokenizer, limits, EOS tokens and the
    continuous-batching scheduler; for images, one generation at a time in a worker thread."""

    def __init__(self, engine_dir: Path, options: ServeOptions, load_options: dict):
        self.engine_dir = Path(engine_dir)
        self.engine = runtimes.load(self.engine_dir, **load_options)
        self.makes_text = hasattr(self.engine, "stream")  # what the engine's kind can do, not its name
        self.makes_images = hasattr(self.engine, "generate_image")
        if not (self.makes_text or self.makes_images):
            self.engine.close()
            raise KilnError(f"{engine_dir}: kiln serve runs engines that generate text or images; this one does neither")
        facts = engine_facts(self.engine_dir)
        self.digest = facts.digest
        self.max_positions = facts.max_positions
        self.eos_token_ids = facts.eos_token_ids
        self.tokenizer = self.engine.tokenizer
        self.model_name = options.model_name or self.engine_dir.name
        self.scheduler = None
        if self.makes_text:
            self.vocab_size = self.engine.signature.outputs[0].shape[-1]
            folder = self.engine_dir / facts.tokenizer_folder if facts.tokenizer_folder else None
            self.chat_template = load_chat_template(folder, options.chat_template)
            self.scheduler = Scheduler(self.engine, max_batch=options.max_batch, max_queue=options.max_queue).start()
        self.images_waiting = 0
        self.image_lock = asyncio.Lock()
        self.metrics = ServerMetrics(self.scheduler or _NoScheduler(self))

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        self.engine.close()

    def require(self, able: bool, what: str) -> None:
        if not able:
            raise BadRequest("model", f"this engine does not {what}; see GET /v1/models")

    def encode(self, prompt, field: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise BadRequest(field, "this engine carries no tokenizer: send token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            ids = list(prompt)
        if not ids:
            raise BadRequest(field, "is empty; a prompt needs at least one token")
        outside = [t for t in ids if not 0 <= t < self.vocab_size]
        if outside:
            raise BadRequest(field, f"token id {outside[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def check_length(self, ids: list[int], max_tokens: int) -> None:
        if self.max_positions and len(ids) + max_tokens > self.max_positions:
            raise BadRequest("max_tokens", f"the prompt's {len(ids)} tokens + max_tokens {max_tokens} exceed the "
                             f"engine's context of {self.max_positions} positions")


class _NoScheduler:
    """The metrics' view of an image engine: waiting and running image requests."""

    def __init__(self, service):
        self.service = service

    @property
    def queue_depth(self) -> int:
        return max(self.service.images_waiting - 1, 0)

    @property
    def active(self) -> int:
        return min(self.service.images_waiting, 1)


class Run:
    """One prompt's sequence on the scheduler, read back as (new tokens, new text, finish reason) deltas."""

    def __init__(self, service: EngineService, ids: list[int], params: GenerationParams, arrived: float):
        self.service, self.params, self.arrived = service, params, arrived
        self.sequence = Sequence(ids, params.max_tokens, params.sampling, service.eos_token_ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None  # the engine's failure, when it failed
        self._decoded = ""  # all tokens decoded; `text` lags where a stop string might still begin
        self._last = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.service.scheduler.submit(self.sequence, lambda tokens, reason: loop.call_soon_threadsafe(
            self.queue.put_nowait, (tokens, reason)))
        self.service.metrics.prompt_tokens.inc(len(self.sequence.prompt))

    def cancel(self, reason: str = "cancelled") -> None:
        """Free the sequence's slot at the next step (a no-op once the scheduler has finished it)."""
        self.service.scheduler.cancel(self.sequence, reason)

    async def deltas(self) -> AsyncIterator[tuple[list[int], str, str | None]]:
        try:
            while self.finish_reason is None:
                tokens, reason = await self.queue.get()
                self._observe(len(tokens))
                text = self._add(tokens)
                if reason is not None and self.finish_reason is None:
                    self.finish_reason = "error" if reason.startswith("error") else reason
                    self.error = reason if self.finish_reason == "error" else None
                    text += self._flush()
                if tokens or text or self.finish_reason:
                    yield tokens, text, self.finish_reason
        finally:
            self.cancel()  # a client that went away, or a stop string: free the slot at the next step

    def _observe(self, count: int) -> None:
        if not count:
            return
        metrics, now = self.service.metrics, time.perf_counter()
        if self._last is None:
            metrics.time_to_first_token.observe(now - self.arrived)
        else:
            for _ in range(count):
                metrics.inter_token_latency.observe((now - self._last) / count)
        metrics.generated_tokens.inc(count)
        self._last = now

    def _add(self, tokens: list[int]) -> str:
        """New text for `tokens`, held back while it might be the start of a stop string or half a character."""
        self.tokens += tokens
        tokenizer = self.service.tokenizer
        if tokenizer is None or not tokens:
            return ""
        self._decoded = tokenizer.decode(self.tokens)
        for stop in self.params.stop:
            at = self._decoded.find(stop, len(self.text))
            if at >= 0:
                self._decoded = self._decoded[:at]
                self.finish_reason = "stop"
                self.cancel("stop")
                return self._flush()
        safe = len(self._decoded)
        if self._decoded.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next token
            safe = len(self._decoded.rstrip("\ufffd"))
        for stop in self.params.stop:  # keep back a tail that a stop string could still complete
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if self._decoded[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        safe = max(safe, len(self.text))
        new, self.text = self._decoded[len(self.text):safe], self._decoded[:safe]
        return new

    def _flush(self) -> str:
        new, self.text = self._decoded[len(self.text):], self._decoded
        return new


def build_app(engine_dir, options: ServeOptions = ServeOptions(), **load_options) -> FastAPI:
    """The ASGI app serving `engine_dir`; `load_options` go to `runtimes.load` (trust, threads, device)."""
    service = EngineService(Path(engine_dir), options, load_options)

    async def lifespan(app):
        yield
        service.close()  # uvicorn has drained the in-flight requests by now

    app = FastAPI(title="torchkiln", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        return _error(400, f"{field}: {first['msg']}", "invalid_request_error", field)

    @app.exception_handler(BadRequest)
    async def bad_request(request, error: BadRequest):
        return _error(error.status, str(error), "invalid_request_error", error.field)

    @app.exception_handler(QueueFull)
    async def queue_full(request, error: QueueFull):
        return _error(429, f"too many requests: {error}", "rate_limit_error", headers={"Retry-After": "1"})

    app.add_middleware(CountRequests, metrics=service.metrics)

    def require_key(request: Request) -> None:
        if not options.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # compare_digest against every key, without stopping at the first match: timing says nothing.
        matches = [hmac.compare_digest(given, key.encode()) for key in options.api_keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise BadRequest("authorization", "a valid API key is required (Authorization: Bearer KEY)", 401)

    guarded = [Depends(require_key)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "digest": service.digest,
                "provenance": service.engine.provenance}

    @app.get("/metrics", dependencies=[] if options.open_metrics else guarded)
    async def metrics():
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        makes = [kind for kind, able in (("text", service.makes_text), ("images", service.makes_images)) if able]
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "torchkiln", "max_model_len": service.max_positions,
                                            "generates": makes}]}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        service.require(service.makes_text, "generate text")
        arrived = time.perf_counter()
        params = GenerationParams.of(body, service.tokenizer is not None)
        prompts = [service.encode(p) for p in prompt_list(body.prompt)]
        return await _respond(service, request, prompts, params, arrived, "text_completion", body.stream)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest, request: Request):
        service.require(service.makes_text, "generate text")
        arrived = time.perf_counter()
        if service.chat_template is None or service.tokenizer is None:
            raise BadRequest("messages", "this engine's tokenizer has no chat template (serve it with --chat-template "
                             "FILE, or use /v1/completions)")
        params = GenerationParams.of(body, True)
        text = service.chat_template.render([m.model_dump() for m in body.messages])
        return await _respond(service, request, [service.encode(text, "messages")], params, arrived,
                              "chat.completion", body.stream)

    @app.post("/v1/images/generations", dependencies=guarded)
    async def images(body: ImageRequest):
        service.require(service.makes_images, "generate images")
        if service.images_waiting > options.max_queue:
            raise QueueFull(f"{service.images_waiting} image requests are in flight already (--max-queue {options.max_queue})")
        height, width = body.pixels()
        service.images_waiting += 1
        try:
            async with service.image_lock:  # one image batch at a time: a step already uses every core
                pictures = await asyncio.to_thread(
                    service.engine.generate_image, [body.prompt] * body.n, negative_prompt=body.negative_prompt,
                    steps=body.steps, guidance=body.guidance, seed=body.seed, height=height, width=width,
                    scheduler=body.scheduler)
        except FeedError as error:  # a size, batch or scheduler the engine refuses: its message names the allowed values
            raise BadRequest("size" if "height" in str(error) or "width" in str(error) else "request", str(error)) from None
        finally:
            service.images_waiting -= 1
        return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png_bytes(p)).decode()}
                                                      for p in pictures]}

    return app


async def _respond(service: EngineService, request: Request, prompts: list[list[int]], params: GenerationParams,
                   arrived: float, kind: str, stream: bool):
    for ids in prompts:
        service.check_length(ids, params.max_tokens)
    runs = [Run(service, ids, params, arrived) for ids in prompts]
    try:
        for run in runs:
            run.start()  # QueueFull (429) before any header is sent
    except QueueFull:
        for run in runs:
            run.cancel()
        raise
    ident = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
    if stream:
        return StreamingResponse(_events(runs, ident, kind, service.model_name), media_type="text/event-stream")
    watcher = asyncio.create_task(_cancel_on_disconnect(request, runs))
    try:
        await asyncio.gather(*(_drain(run) for run in runs))
    finally:
        watcher.cancel()
    failed = next((run.error for run in runs if run.error), None)
    if failed:
        return _error(500, f"the engine failed: {failed}", "server_error")
    choices = [_choice(kind, i, run.text, run.tokens, run.finish_reason) for i, run in enumerate(runs)]
    prompt_tokens = sum(len(ids) for ids in prompts)
    completion_tokens = sum(len(run.tokens) for run in runs)
    return {"id": ident, "object": kind, "created": int(time.time()), "model": service.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


async def _drain(run: Run) -> None:
    async for _ in run.deltas():
        pass


async def _cancel_on_disconnect(request: Request, runs: list[Run]) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    for run in runs:
        run.cancel()


def _choice(kind: str, index: int, text: str, tokens: list[int], finish_reason, delta: bool = False) -> dict:
    # `token_ids` beside the text (as vLLM returns them): what clients of engines without a tokenizer read.
    if kind.startswith("chat.completion"):
        key = "delta" if delta else "message"
        return {"index": index, key: {"role": "assistant", "content": text}, "token_ids": tokens,
                "finish_reason": finish_reason}
    return {"index": index, "text": text, "token_ids": tokens, "logprobs": None, "finish_reason": finish_reason}


async def _events(runs: list[Run], ident: str, kind: str, model: str) -> AsyncIterator[str]:
    """Server-sent events: one chunk per delta of any prompt, then `[DONE]`."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, run: Run):
        async for delta in run.deltas():
            await merged.put((index, delta))
        await merged.put((index, None))

    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    try:
        open_runs = len(runs)
        while open_runs:
            index, delta = await merged.get()
            if delta is None:
                open_runs -= 1
                continue
            tokens, text, reason = delta
            chunk = {"id": ident, "object": chunk_kind, "created": int(time.time()), "model": model,
                     "choices": [_choice(kind, index, text, tokens, reason, delta=True)]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the response ended): stop every run still going
        for task in tasks:
            task.cancel()
        for run in runs:
            run.cancel()
