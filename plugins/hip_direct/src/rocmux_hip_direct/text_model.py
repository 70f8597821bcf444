"""``HipDirectModel``: the engine behind rocmux's TextModel contract.

There is no background task: whichever request is waiting for tokens runs the next
engine step in a worker thread (``anyio.to_thread``) while holding the step lock, so
the event loop stays free and every request advances as long as any one is being
read. Leaving a stream early cancels that request; its KV blocks are freed at once
when no step is running, else at the end of the running step.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import ClassVar

import anyio
import attrs
from rocmux.backend import TextModel
from rocmux.errors import ModelClosed, RuntimeFailure
from rocmux.types import GenerateConfig, Message, Token

from rocmux_hip_direct.chat_template import ChatTemplate
from rocmux_hip_direct.engine import Engine
from rocmux_hip_direct.sampling import SamplingParams
from rocmux_hip_direct.scheduler import Sequence as EngineSequence
from rocmux_hip_direct.tokenizer import Tokenizer


@attrs.define(eq=False)
class HipDirectModel(TextModel):
    """A model loaded in this process by the hip_direct backend."""

    backend_name: ClassVar[str] = "hip_direct"

    path: Path
    engine: Engine
    tokenizer: Tokenizer
    template: ChatTemplate
    device: str = "cpu"
    # engine steps per worker-thread trip; a GPU engine takes several (loader.py)
    burst: int = 1
    _lock: anyio.Lock = attrs.field(factory=anyio.Lock)
    _error: BaseException | None = None
    _closed: bool = False

    def err(self) -> BaseException | None:
        return self._error

    def generate(self, prompt: str, config: GenerateConfig | None = None) -> AsyncIterator[Token]:
        config = config or GenerateConfig()
        # As llama-server's /completion: BOS when the vocabulary asks for it, and
        # special-token text in the prompt parsed as those tokens.
        ids = self.tokenizer.encode(prompt, add_special=True, parse_special=True)
        return self._stream(ids, config)

    def chat(
        self, messages: Sequence[Message], config: GenerateConfig | None = None
    ) -> AsyncIterator[Token]:
        config = config or GenerateConfig()
        text = self.template.render(messages, add_generation_prompt=True)
        bos = self.template.bos_token
        add_bos = self.tokenizer.add_bos
        if add_bos and bos and text.startswith(bos):
            text = text[len(bos) :]  # the tokenizer adds it; do not double it
        ids = self.tokenizer.encode(text, add_special=True, parse_special=True)
        return self._stream(ids, config)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token text parsed), as llama-server's /tokenize."""
        return self.tokenizer.encode(text, add_special=add_special, parse_special=True)

    async def complete_ids(
        self, prompt: str, config: GenerateConfig | None = None
    ) -> tuple[list[int], list[float]]:
        """Generated token ids of a completion and the top-1 minus top-2 logit at each
        step (for parity checks against llama-server)."""
        config = config or GenerateConfig()
        ids = self.tokenizer.encode(prompt, add_special=True, parse_special=True)
        seq = self._submit(ids, config, record_gaps=True)
        async with aclosing(self._run(seq)) as events:
            async for _ in events:
                pass
        return seq.tokens[len(seq.prompt) :], list(seq.gaps or [])

    def _submit(
        self, ids: list[int], config: GenerateConfig, record_gaps: bool = False
    ) -> EngineSequence:
        if self._closed:
            raise ModelClosed("this hip_direct model was closed; load it again")
        params = SamplingParams.from_config(config)
        max_tokens = config.max_tokens or self.engine.n_ctx
        return self.engine.submit(ids, params, max_tokens, config.stop, record_gaps)

    async def _stream(self, ids: list[int], config: GenerateConfig) -> AsyncIterator[Token]:
        seq = self._submit(ids, config)
        # aclosing: leaving this stream must close the inner one now, not at GC time.
        async with aclosing(self._run(seq)) as events:
            async for token in events:
                yield token

    async def _run(self, seq: EngineSequence) -> AsyncIterator[Token]:
        try:
            while True:
                while seq.events:
                    yield seq.events.popleft()
                if seq.done:
                    if seq.finish_reason == "cancelled" and self._closed:
                        raise ModelClosed("the hip_direct model was closed during this request")
                    if seq.error is not None:
                        raise RuntimeFailure(f"hip_direct failed: {seq.error}") from seq.error
                    return
                await self._advance(seq)
        finally:
            if not seq.done:
                self.engine.cancel(seq)
                if not self._lock.locked():
                    # No step is running, so nothing else touches the scheduler now.
                    self.engine.apply_pending()

    async def _advance(self, seq: EngineSequence) -> None:
        """Run one engine step unless another request's step already served ``seq``."""
        async with self._lock:
            if seq.events or seq.done:
                return
            if self._closed:
                raise ModelClosed("this hip_direct model was closed; load it again")
            try:
                await anyio.to_thread.run_sync(self._burst)
            except Exception as exc:
                self._error = exc
                raise RuntimeFailure(f"hip_direct failed: {exc}") from exc

    def _burst(self) -> None:
        """Up to ``burst`` steps in one trip to the worker thread (the trip costs more
        than a graph-replayed decode step). It ends early at a step that produced some
        sequence's first token or ended or admitted a sequence, so first tokens and
        finishes reach their streams at once; otherwise tokens arrive ``burst`` at a time.
        """
        engine = self.engine
        for _ in range(max(1, self.burst)):
            before = {s.id for s in engine.scheduler.running}
            started = time.perf_counter()
            if not engine.step():
                return
            running = engine.scheduler.running
            if {s.id for s in running} != before or any(
                (s.t_first_token or 0.0) >= started for s in running
            ):
                return

    async def wait_idle(self) -> None:
        """Wait until no step is running and pending cancellations are applied."""
        async with self._lock:
            self.engine.apply_pending()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:  # let a running step finish first
            for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
                self.engine.cancel(seq)
            self.engine.apply_pending()
            self.engine.release()
