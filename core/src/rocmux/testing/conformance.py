"""The checks every rocmux backend must pass: :class:`BackendConformance`.

Each check is a synchronous test that runs its own event loop (``anyio.run``), so the
suite needs no async pytest plugin and works next to whichever one a project uses.
Every check loads its own model and closes it, so a failure in one cannot leak into
the next.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import anyio
import pytest

from rocmux.backend import Backend, TextModel
from rocmux.errors import RocmuxError
from rocmux.selection import DETECT_TIMEOUT
from rocmux.testing.processes import descendants, describe
from rocmux.types import Availability, GenerateConfig, LoadConfig, Message, Token

NOT_APPLICABLE = "not applicable"
"""Prefix of the skip reason of a check that cannot apply to a backend (a crash check
for a backend with no process). A skip is not a pass: the summary counts it apart."""
NOT_RUN = "not run"
"""Prefix of the skip reason of a check that could apply but did not run here (the
backend is unavailable, no model was found)."""

T = TypeVar("T")


class BackendConformance:
    """The conformance suite; subclass it in a test file to run it against a backend.

    Set ``backend_name`` (a registered backend) and ``model_path``, or override the
    fixtures ``conformance_backend``, ``conformance_model_path`` and
    ``conformance_load_config`` as methods of the subclass. Override
    ``conformance_kill`` (and optionally ``conformance_busy``) for a backend whose
    runtime process is not a :class:`rocmux.served.ServedModel` server.
    """

    backend_name: ClassVar[str | None] = None
    """Name of the registered backend under test; ``None`` takes ``--rocmux-backend``."""
    model_path: ClassVar[str | Path | None] = None
    """Model to load; ``None`` takes ``--rocmux-model``, else rocmux's configured model."""
    load_config: ClassVar[LoadConfig] = LoadConfig()
    short: ClassVar[GenerateConfig] = GenerateConfig(max_tokens=8)
    """A request that finishes quickly."""
    long: ClassVar[GenerateConfig] = GenerateConfig(max_tokens=100_000)
    """A request that must still be running when it is cancelled or its runtime killed
    (give the model a context long enough for it)."""
    prompt: ClassVar[str] = "Once upon a time"
    messages: ClassVar[tuple[Message, ...]] = (Message("user", "Tell me a story."),)
    timeout: ClassVar[float] = 120.0
    """Seconds each check may take, loading included."""
    settle_timeout: ClassVar[float] = 10.0
    """Seconds a cancelled stream may take to close, and processes to go after close."""
    event_loop: ClassVar[str] = "asyncio"
    """anyio backend the checks run on (``asyncio`` or ``trio``)."""

    # -- hooks a subclass may override -------------------------------------------------

    def conformance_kill(self, model: TextModel) -> bool:
        """Kill the runtime process behind ``model`` abruptly; ``False`` when it has none.

        The default SIGKILLs the server of a :class:`rocmux.served.ServedModel` (any
        model with ``server.pid``). An in-process runtime returns ``False``: the crash
        check is then reported as not applicable.
        """
        pid = getattr(getattr(model, "server", None), "pid", None)
        if not isinstance(pid, int):
            return False
        os.kill(pid, signal.SIGKILL)
        return True

    async def conformance_busy(self, model: TextModel) -> bool | None:
        """Whether the runtime is still working on a request; ``None`` when unknown.

        Used after a stream is left early: when it returns a bool, the runtime must
        report idle within ``settle_timeout``. The default does not know.
        """
        return None

    # -- the checks ---------------------------------------------------------------------

    def test_detect_returns_an_availability_with_a_reason(
        self, conformance_backend: Backend
    ) -> None:
        """``detect()`` does not raise, finishes in time, and always says why."""
        self._run(self._detect, conformance_backend)

    def test_load_and_close_are_idempotent(
        self,
        conformance_available_backend: Backend,
        conformance_model_path: Path,
        conformance_load_config: LoadConfig,
    ) -> None:
        """Loading twice gives two working models; ``close()`` twice is fine; a closed
        model refuses work with a rocmux error that says it was closed."""
        self._run(
            self._load_close,
            conformance_available_backend,
            conformance_model_path,
            conformance_load_config,
        )

    def test_generate_streams_tokens_then_a_finish_reason(
        self,
        conformance_available_backend: Backend,
        conformance_model_path: Path,
        conformance_load_config: LoadConfig,
    ) -> None:
        """``generate`` yields :class:`Token` objects and exactly one finish reason."""
        self._run(
            self._stream_once,
            conformance_available_backend,
            conformance_model_path,
            conformance_load_config,
            "generate",
        )

    def test_chat_streams_tokens_then_a_finish_reason(
        self,
        conformance_available_backend: Backend,
        conformance_model_path: Path,
        conformance_load_config: LoadConfig,
    ) -> None:
        """``chat`` yields :class:`Token` objects and exactly one finish reason."""
        self._run(
            self._stream_once,
            conformance_available_backend,
            conformance_model_path,
            conformance_load_config,
            "chat",
        )

    def test_leaving_the_loop_early_cancels_only_that_request(
        self,
        conformance_available_backend: Backend,
        conformance_model_path: Path,
        conformance_load_config: LoadConfig,
    ) -> None:
        """``break`` and a cancelled scope end the stream promptly, are not errors,
        and the model serves the next request."""
        self._run(
            self._leave_early,
            conformance_available_backend,
            conformance_model_path,
            conformance_load_config,
        )

    def test_two_concurrent_requests_both_finish(
        self,
        conformance_available_backend: Backend,
        conformance_model_path: Path,
        conformance_load_config: LoadConfig,
    ) -> None:
        """A ``generate`` and a ``chat`` at once on one model both finish."""
        self._run(
            self._concurrent,
            conformance_available_backend,
            conformance_model_path,
            conformance_load_config,
        )

    def test_a_killed_runtime_is_a_clear_error(
        self,
        conformance_available_backend: Backend,
        conformance_model_path: Path,
        conformance_load_config: LoadConfig,
    ) -> None:
        """Killing the runtime mid-stream raises a rocmux error with a message, sets
        ``err()``, does not hang the next request, and ``close()`` still cleans up."""
        skipped = self._run(
            self._crash,
            conformance_available_backend,
            conformance_model_path,
            conformance_load_config,
        )
        if skipped:
            pytest.skip(skipped)

    def test_no_process_is_left_behind_after_close(
        self,
        conformance_available_backend: Backend,
        conformance_model_path: Path,
        conformance_load_config: LoadConfig,
    ) -> None:
        """Every process started by load (found through ``/proc``) is gone after close."""
        self._run(
            self._leftovers,
            conformance_available_backend,
            conformance_model_path,
            conformance_load_config,
        )

    # -- machinery ------------------------------------------------------------------------

    def _run(self, check: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def bounded() -> T:
            try:
                with anyio.fail_after(self.timeout):
                    return await check(*args)
            except TimeoutError:
                raise AssertionError(
                    f"{check.__name__.strip('_')} did not finish within {self.timeout:g} s "
                    "(raise `timeout` on the test class if the runtime is just slow)"
                ) from None

        return anyio.run(bounded, backend=self.event_loop)

    @asynccontextmanager
    async def _loaded(
        self, backend: Backend, path: Path, config: LoadConfig
    ) -> AsyncIterator[TextModel]:
        model = await backend.load(path, config)
        assert isinstance(model, TextModel), (
            f"{type(backend).__name__}.load returned {type(model).__name__}, not a TextModel"
        )
        try:
            yield model
        finally:
            with anyio.CancelScope(shield=True), anyio.fail_after(self.settle_timeout * 3):
                await model.close()

    async def _collect(self, stream: AsyncIterator[Token]) -> list[Token]:
        async with aclosing(stream) as tokens:  # type: ignore[type-var]
            return [token async for token in tokens]

    def _check_stream(self, tokens: list[Token], what: str, max_tokens: int | None) -> None:
        assert tokens, f"{what} yielded nothing; the last item must carry a finish reason"
        for token in tokens:
            assert isinstance(token, Token), f"{what} yielded {token!r}, not a rocmux Token"
            assert isinstance(token.text, str), f"{what} yielded a Token whose text is not str"
        finishes = [i for i, t in enumerate(tokens) if t.finish_reason is not None]
        assert len(finishes) == 1, (
            f"{what} yielded {len(finishes)} tokens with a finish reason; exactly one must "
            f"carry it: {[t.finish_reason for t in tokens if t.finish_reason is not None]}"
        )
        end = finishes[0]
        reason = tokens[end].finish_reason
        assert isinstance(reason, str), f"{what}: finish reason {reason!r} is not a str"
        assert reason, f"{what}: the finish reason is empty"
        trailing = [t.text for t in tokens[end + 1 :] if t.text]
        assert not trailing, (
            f"{what} yielded text after its finish reason ({trailing!r}); only empty "
            "tokens (usage, timings) may follow it"
        )
        pieces = sum(1 for t in tokens if t.text)
        if max_tokens is not None:
            assert pieces <= max_tokens, (
                f"{what} yielded {pieces} pieces of text for max_tokens={max_tokens}"
            )

    def _request(self, model: TextModel, kind: str, config: GenerateConfig) -> Any:
        if kind == "chat":
            return model.chat(list(self.messages), config)
        return model.generate(self.prompt, config)

    # -- detection ----------------------------------------------------------------------

    async def _detect(self, backend: Backend) -> None:
        assert isinstance(backend, Backend), f"{backend!r} is not a rocmux Backend"
        assert isinstance(backend.name, str), "a backend's name must be a str"
        assert backend.name, "a backend needs a name"
        try:
            with anyio.fail_after(DETECT_TIMEOUT):
                availability = await backend.detect()
        except TimeoutError:
            raise AssertionError(
                f"{backend.name}.detect() did not finish within {DETECT_TIMEOUT:g} s; "
                "`rocmux backends` would report it as hung"
            ) from None
        except Exception as exc:
            raise AssertionError(
                f"{backend.name}.detect() raised {exc!r}; it must return "
                "Availability.unavailable(reason) instead"
            ) from exc
        assert isinstance(availability, Availability), (
            f"{backend.name}.detect() returned {availability!r}, not an Availability"
        )
        assert isinstance(availability.reason, str), "Availability.reason must be a str"
        assert availability.reason.strip(), (
            f"{backend.name}.detect() gave no reason (ok={availability.ok}); say what was "
            "found, or what is missing"
        )
        assert isinstance(availability.priority, int), "priority must be an int"

    # -- load and close -----------------------------------------------------------------

    async def _refuses(self, model: TextModel, kind: str) -> None:
        error: BaseException | None = None
        tokens: list[Token] = []
        try:
            tokens = await self._collect(self._request(model, kind, self.short))
        except Exception as exc:
            error = exc
        assert error is not None, f"a closed model streamed {len(tokens)} tokens from {kind}"
        assert isinstance(error, RocmuxError), (
            f"a closed model raised {type(error).__name__}: {error!r} from {kind}; raise "
            "rocmux.errors.ModelClosed"
        )
        assert "closed" in str(error).lower(), (
            f"a closed model's error does not say it was closed: {error!r}"
        )

    async def _load_close(self, backend: Backend, path: Path, config: LoadConfig) -> None:
        async with (
            self._loaded(backend, path, config) as first,
            self._loaded(backend, path, config) as second,
        ):
            assert first is not second, "load must return a new model each time"
            await first.close()
            await first.close()
            await self._refuses(first, "generate")
            await self._refuses(first, "chat")
            tokens = await self._collect(second.generate(self.prompt, self.short))
            what = "generate on a second model after the first was closed"
            self._check_stream(tokens, what, self.short.max_tokens)
            await second.close()
        # _loaded closed both once more on the way out: idempotent again.

    # -- streaming ------------------------------------------------------------------------

    async def _stream_once(
        self, backend: Backend, path: Path, config: LoadConfig, kind: str
    ) -> None:
        async with self._loaded(backend, path, config) as model:
            tokens = await self._collect(self._request(model, kind, self.short))
            self._check_stream(tokens, kind, self.short.max_tokens)
            assert model.err() is None, f"err() is {model.err()!r} after a clean {kind}"

    async def _leave_early(self, backend: Backend, path: Path, config: LoadConfig) -> None:
        async with self._loaded(backend, path, config) as model:
            # break
            seen = 0
            stream = self._request(model, "generate", self.long)
            with anyio.fail_after(self.settle_timeout):
                async with aclosing(stream) as tokens:
                    async for _token in tokens:
                        seen += 1
                        if seen == 2:
                            break
            assert seen == 2, f"the long request ended after {seen} tokens; raise `long`"
            await self._settled(model)
            # a cancelled scope around the loop
            scope_seen = 0
            with anyio.fail_after(self.settle_timeout), anyio.CancelScope() as scope:
                async with aclosing(self._request(model, "chat", self.long)) as tokens:
                    async for _token in tokens:
                        scope_seen += 1
                        scope.cancel()
            assert scope.cancelled_caught, (
                "the stream ran to its end inside a cancelled scope: it must reach a "
                "checkpoint (an await) between tokens so that cancellation can stop it"
            )
            await self._settled(model)
            assert model.err() is None, (
                f"err() is {model.err()!r} after leaving streams early; a cancel is not an error"
            )
            tokens_after = await self._collect(model.generate(self.prompt, self.short))
            self._check_stream(tokens_after, "generate after two cancelled requests", None)

    async def _settled(self, model: TextModel) -> None:
        busy = await self.conformance_busy(model)
        if busy is None:
            return
        with anyio.move_on_after(self.settle_timeout):
            while busy:
                await anyio.sleep(0.02)
                busy = await self.conformance_busy(model)
        assert not busy, (
            f"the runtime still works on a request {self.settle_timeout:g} s after its "
            "stream was left; leaving the loop must cancel the request"
        )

    async def _concurrent(self, backend: Backend, path: Path, config: LoadConfig) -> None:
        async with self._loaded(backend, path, config) as model:
            results: dict[str, list[Token]] = {}

            async def one(kind: str) -> None:
                results[kind] = await self._collect(self._request(model, kind, self.short))

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "generate")
                tg.start_soon(one, "chat")
            for kind in ("generate", "chat"):
                self._check_stream(results[kind], f"concurrent {kind}", self.short.max_tokens)

    # -- failure --------------------------------------------------------------------------

    async def _crash(self, backend: Backend, path: Path, config: LoadConfig) -> str | None:
        before = descendants()
        async with self._loaded(backend, path, config) as model:
            killed: bool | None = None
            finished = False
            error: BaseException | None = None
            try:
                async with aclosing(self._request(model, "generate", self.long)) as tokens:
                    async for token in tokens:
                        if killed is None:
                            killed = self.conformance_kill(model)
                            if not killed:
                                break
                        finished = finished or token.finish_reason is not None
            except Exception as exc:
                error = exc
            if killed is None:
                raise AssertionError("the long request yielded no token before the kill")
            if not killed:
                return (
                    f"{NOT_APPLICABLE}: backend {backend.name!r} has no runtime process to "
                    "kill (conformance_kill returned False); override conformance_kill to "
                    "point this check at one"
                )
            assert error is not None, (
                "the stream ended normally after its runtime was killed"
                + (" with a finish reason" if finished else " without a finish reason")
                + "; a killed runtime must raise (raise `long` if the request finished first)"
            )
            assert isinstance(error, RocmuxError), (
                f"a killed runtime surfaced {type(error).__name__}: {error!r}; raise a "
                "rocmux.errors.RuntimeFailure (ServerCrashed, StreamError) that says what died"
            )
            assert str(error).strip(), f"{type(error).__name__} carries no message"
            assert model.err() is not None, "err() must return the error after a crash"
            # The next request may recover (a restarted runtime) or fail clearly; not hang.
            later: BaseException | None = None
            try:
                tokens_after = await self._collect(model.generate(self.prompt, self.short))
            except Exception as exc:
                later = exc
            else:
                self._check_stream(tokens_after, "generate after a crash", None)
            if later is not None:
                assert isinstance(later, RocmuxError), (
                    f"a request after the crash raised {type(later).__name__}: {later!r}, "
                    "not a rocmux error"
                )
                assert str(later).strip(), f"{type(later).__name__} after a crash has no message"
        await self._no_new_processes(before, "closing a model whose runtime was killed")
        return None

    async def _leftovers(self, backend: Backend, path: Path, config: LoadConfig) -> None:
        before = descendants()
        async with self._loaded(backend, path, config) as model:
            tokens = await self._collect(model.generate(self.prompt, self.short))
            self._check_stream(tokens, "generate", self.short.max_tokens)
        await self._no_new_processes(before, "close()")

    async def _no_new_processes(self, before: set[int], after_what: str) -> None:
        left = descendants() - before
        with anyio.move_on_after(self.settle_timeout):
            while left:
                await anyio.sleep(0.05)
                left = descendants() - before
        assert not left, (
            f"processes started by the model are still there {self.settle_timeout:g} s after "
            f"{after_what} (zombies count: wait for your children): {describe(left)}"
        )
