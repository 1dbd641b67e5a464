"""The OpenAI request bodies kiln serve reads, validated by pydantic (errors become 400 naming the field).

Fields clients send that do not change decoding here (`user`, `logprobs`, ...) are accepted and ignored,
as OpenAI-compatible servers do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kiln.serve.errors import BadRequest
from runtimes.batching import Sampling

Prompt = str | list[int] | list[str] | list[list[int]]


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # 0 or -1: every token
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Generation):
    prompt: Prompt


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool calls...: handed to the chat template as they are

    role: str
    content: str


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]

    @classmethod
    def of(cls, body: _Generation, has_tokenizer: bool) -> GenerationParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if stop and not has_tokenizer:
            raise BadRequest("stop", "this engine carries no tokenizer, so stop strings cannot be matched")
        if any(not s for s in stop):
            raise BadRequest("stop", "stop strings must not be empty")
        sampling = Sampling(do_sample=body.temperature > 0, temperature=body.temperature, top_k=max(body.top_k, 0),
                            top_p=body.top_p, repetition_penalty=body.repetition_penalty, seed=body.seed)
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        return cls(max_tokens, sampling, stop)


def prompt_list(prompt: Prompt) -> list:
    """The prompts of a request: one string or id list, or a list of them."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt", "is empty; send text or token ids")
    return list(prompt)


class ImageRequest(BaseModel):
    """OpenAI's image generation body, plus the diffusion knobs (`steps`, `guidance`, `seed`, `scheduler`)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    size: str | None = None  # "WIDTHxHEIGHT"; None: the engine's default size
    response_format: Literal["b64_json"] = "b64_json"  # images are returned inline: the server keeps no files
    negative_prompt: str = ""
    steps: int = Field(25, ge=1, le=1000)
    guidance: float = Field(7.5, ge=0.0)
    seed: int = 0
    scheduler: str | None = None

    def pixels(self) -> tuple[int | None, int | None]:
        """(height, width) from `size`."""
        if self.size is None:
            return None, None
        width, x, height = self.size.partition("x")
        if not (x and width.isdigit() and height.isdigit()):
            raise BadRequest("size", f"expected WIDTHxHEIGHT in pixels, e.g. 512x512; got {self.size!r}")
        return int(height), int(width)
