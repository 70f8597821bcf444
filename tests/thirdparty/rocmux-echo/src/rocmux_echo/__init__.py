"""A third-party backend, packaged on its own: it echoes the prompt word by word."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import ClassVar

import attrs
from rocmux import hookimpl
from rocmux.backend import Backend, TextModel
from rocmux.registry import BackendRegistry
from rocmux.types import Availability, GenerateConfig, LoadConfig, Message, Token


@attrs.define(eq=False)
class EchoModel(TextModel):
    closed: bool = False

    async def _echo(self, text: str) -> AsyncIterator[Token]:
        for word in text.split():
            yield Token(word + " ")
        yield Token("", "stop")

    def generate(self, prompt: str, config: GenerateConfig | None = None) -> AsyncIterator[Token]:
        return self._echo(prompt)

    def chat(
        self, messages: Sequence[Message], config: GenerateConfig | None = None
    ) -> AsyncIterator[Token]:
        return self._echo(messages[-1].content)

    def err(self) -> BaseException | None:
        return None

    async def close(self) -> None:
        self.closed = True


@attrs.define(eq=False)
class EchoBackend(Backend):
    name: ClassVar[str] = "echo"

    async def detect(self) -> Availability:
        return Availability(ok=True, reason="echo needs nothing", priority=1)

    async def load(self, model: Path, config: LoadConfig) -> TextModel:
        return EchoModel()


@hookimpl
def rocmux_register_backends(registry: BackendRegistry) -> None:
    registry.add(EchoBackend())
