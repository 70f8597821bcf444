"""A blocking facade for scripts and notebooks: tokens in a plain ``for`` loop.

    import rocmux
    with rocmux.load() as model:
        for token in model.chat([rocmux.Message("user", "Hi")]):
            print(token.text, end="")

The async model runs on an event loop in a helper thread (an anyio blocking portal).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
from anyio.from_thread import BlockingPortal, start_blocking_portal

from rocmux.backend import TextModel
from rocmux.types import GenerateConfig, LoadConfig, Message, Token

_END = object()


async def _next(stream: AsyncIterator[Token]) -> object:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


async def _aclose(stream: AsyncIterator[Token]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _messages(messages: Sequence[Message | dict[str, str]] | str) -> list[Message]:
    if isinstance(messages, str):
        return [Message("user", messages)]
    return [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in messages]  # type: ignore[arg-type]


@attrs.define(eq=False)
class BlockingModel:
    """A :class:`TextModel` driven from synchronous code."""

    model: TextModel
    _portal: BlockingPortal
    _portal_cm: AbstractContextManager[BlockingPortal]
    _closed: bool = False

    def _iterate(self, stream: AsyncIterator[Token]) -> Iterator[Token]:
        try:
            while True:
                item = self._portal.call(_next, stream)
                if item is _END:
                    return
                yield item  # type: ignore[misc]
        finally:
            # Leaving the loop early cancels the request, as in the async API.
            self._portal.call(_aclose, stream)

    def generate(self, prompt: str, config: GenerateConfig | None = None) -> Iterator[Token]:
        return self._iterate(self.model.generate(prompt, config))

    def chat(
        self,
        messages: Sequence[Message | dict[str, str]] | str,
        config: GenerateConfig | None = None,
    ) -> Iterator[Token]:
        """Stream a chat reply; a plain string is taken as one user message."""
        return self._iterate(self.model.chat(_messages(messages), config))

    def complete(self, prompt: str, config: GenerateConfig | None = None) -> str:
        return "".join(t.text for t in self.generate(prompt, config))

    def reply(
        self,
        messages: Sequence[Message | dict[str, str]] | str,
        config: GenerateConfig | None = None,
    ) -> str:
        return "".join(t.text for t in self.chat(messages, config))

    def err(self) -> BaseException | None:
        return self.model.err()

    def close(self) -> None:
        """Close the model and stop its event loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._portal.call(self.model.close)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> BlockingModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def load(
    model: str | Path | None = None,
    *,
    backend: str | None = None,
    config: LoadConfig | None = None,
    **load_options: Any,
) -> BlockingModel:
    """Load ``model`` (default: the configured or default model) and return it, ready.

    ``load_options`` are :class:`LoadConfig` fields (``context_len=4096``, ...).
    """
    from rocmux.selection import open_model

    if load_options:
        config = attrs.evolve(config or LoadConfig(), **load_options)
    portal_cm = start_blocking_portal()
    portal = portal_cm.__enter__()
    try:
        text_model = portal.call(lambda: open_model(model, backend=backend, config=config))
    except BaseException as exc:
        portal_cm.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return BlockingModel(text_model, portal, portal_cm)
