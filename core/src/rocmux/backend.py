"""The two contracts every runtime implements: :class:`Backend` and :class:`TextModel`."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import attrs

from rocmux.types import Availability, GenerateConfig, LoadConfig, Message, Token


@attrs.define(eq=False)
class TextModel(abc.ABC):
    """A loaded model that streams tokens.

    ``generate`` and ``chat`` return async iterators of :class:`Token`. Leaving the
    loop early (``break``, an exception, cancellation) cancels that request only; the
    model stays loaded. Calls may run concurrently. ``close()`` is idempotent.
    """

    backend_name: ClassVar[str] = ""

    @abc.abstractmethod
    def generate(self, prompt: str, config: GenerateConfig | None = None) -> AsyncIterator[Token]:
        """Stream a raw completion of ``prompt``."""

    @abc.abstractmethod
    def chat(
        self, messages: Sequence[Message], config: GenerateConfig | None = None
    ) -> AsyncIterator[Token]:
        """Stream the assistant's reply, the model's chat template applied by the runtime."""

    @abc.abstractmethod
    def err(self) -> BaseException | None:
        """The last error this model hit, or ``None``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the model and everything it holds. Safe to call more than once."""

    async def __aenter__(self) -> TextModel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


@attrs.define(eq=False)
class Backend(abc.ABC):
    """A runtime that can load models.

    ``detect`` must not raise: it returns :class:`Availability` with a reason either
    way. It may do I/O (run the binary, read sysfs) but only when called, never at
    import or registration time.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    async def detect(self) -> Availability:
        """Say whether this backend can run here, why, and at what priority."""

    @abc.abstractmethod
    async def load(self, model: Path, config: LoadConfig) -> TextModel:
        """Load ``model`` and return it ready to generate."""
