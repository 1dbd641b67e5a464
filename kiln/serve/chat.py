"""Chat prompts: the tokenizer's Jinja chat template rendered the way transformers renders it (a sandboxed
environment, `add_generation_prompt`, `bos_token`/`eos_token`), so the runtime needs jinja2, not transformers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.serve.errors import BadRequest


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special_tokens: dict  # bos_token / eos_token, as the template may use them

    def render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        try:
            return environment.from_string(self.source).render(messages=messages, add_generation_prompt=True,
                                                               **self.special_tokens)
        except TemplateError as error:
            raise BadRequest("messages", f"the chat template refused them: {error}") from None


def load_chat_template(tokenizer_folder: Path | None, template_file: Path | None = None) -> ChatTemplate | None:
    """`template_file`, else the tokenizer's `chat_template.jinja` (transformers 5) or tokenizer_config.json's
    `chat_template`; None when there is none."""
    config_path = tokenizer_folder / "tokenizer_config.json" if tokenizer_folder else None
    config = json.loads(config_path.read_text()) if config_path and config_path.is_file() else {}
    special = {name: config[name] for name in ("bos_token", "eos_token") if isinstance(config.get(name), str)}
    if template_file is not None:
        try:
            return ChatTemplate(Path(template_file).read_text(), special)
        except OSError as error:
            raise KilnError(f"--chat-template {template_file}: {error.strerror}") from None
    if tokenizer_folder and (tokenizer_folder / "chat_template.jinja").is_file():
        return ChatTemplate((tokenizer_folder / "chat_template.jinja").read_text(), special)
    if isinstance(config.get("chat_template"), str):
        return ChatTemplate(config["chat_template"], special)
    return None
