"""The model's chat template (``tokenizer.chat_template``) rendered with jinja2.

Rendered the way llama-server renders it: a sandboxed, immutable environment with
``trim_blocks`` and ``lstrip_blocks`` on (llama-server's ``/apply-template`` drops the
newline after a block tag and the indentation before it, as Hugging Face's
``apply_chat_template`` does; a test checks this against llama-server),
``raise_exception`` and ``strftime_now`` available, and the ``bos_token``/``eos_token``
texts and ``add_generation_prompt`` set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

from rocmux.types import Message

# llama.cpp's fallback when a model has no template: ChatML.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The template raised (``raise_exception``) or failed to render."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source or CHATML
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except Exception as exc:  # jinja2's TemplateSyntaxError and friends
            raise TemplateError(f"the model's chat template does not parse: {exc}") from exc

    def render(
        self, messages: Sequence[Message | dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for ``messages``."""
        items = [m.to_openai() if isinstance(m, Message) else dict(m) for m in messages]
        try:
            return self._template.render(
                messages=items,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except Exception as exc:
            raise TemplateError(f"the model's chat template failed to render: {exc}") from exc
