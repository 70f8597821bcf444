"""Holding the forwards of a burst of requests until the whole burst has been read.

A runtime that batches (llama-server, vLLM) starts a step with the requests it has. Sent
straight to it, the 32 requests of an agent's fan-out land within a millisecond or so
and share one prefill step. Through ``rocmux serve`` one event loop reads and forwards
them one after another, so the first few land alone, start a step of their own, and
the others wait for that step to end before theirs begins: at 32 streams on an H100
that cost 4.5-7.7 ms of median time to first token (docs/benchmarks.md).

:class:`BurstGate` lets a forward go once no request has arrived for ``window``
seconds nor in two more passes of the event loop; the forwards held meanwhile then
leave together: their requests, built and on their connections already, are written
one after another in one callback, none waiting for another's task to run. A lone
request waits ``window`` (a fraction of a millisecond); one that keeps finding new
arrivals waits at most ``cap`` (20 windows).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import attrs


@attrs.define(eq=False)
class BurstGate:
    """Forwards wait in :meth:`passage` until arrivals (:meth:`arrived`) pause."""

    window: float
    """Seconds without a new arrival after which held forwards go; 0: never hold."""
    on_release: Callable[[int], None] = lambda n: None
    """Called with the number of forwards each release lets go."""
    cap: float = attrs.field(default=attrs.Factory(lambda self: 20 * self.window, takes_self=True))
    """The longest a forward is held, in seconds, however often requests arrive."""
    _last: float = attrs.field(default=0.0, init=False)
    _held: list[tuple[asyncio.Future[None], Callable[[], None] | None]] = attrs.field(
        factory=list, init=False
    )
    _since: float = attrs.field(default=0.0, init=False)
    _arrivals: int = attrs.field(default=0, init=False)

    def arrived(self) -> None:
        """A request came in: forwards held now wait for the quiet after it."""
        self._last = time.monotonic()
        self._arrivals += 1

    async def passage(self, send: Callable[[], None] | None = None) -> None:
        """Return when this request may be forwarded; ``send``, its forward (the write
        of the request), is called at that moment, with the rest of the burst's."""
        if self.window <= 0:
            if send is not None:
                send()
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if not self._held:
            self._since = time.monotonic()
            # Checked on every pass of the loop (a timer would round to a millisecond),
            # so each pass also polls the sockets for more of the burst.
            loop.call_soon(self._check, loop)
        self._held.append((waiter, send))
        await waiter

    def _check(self, loop: asyncio.AbstractEventLoop, mark: int = -1, passes: int = 0) -> None:
        now = time.monotonic()
        if now - self._since < self.cap:
            if now - self._last < self.window:
                loop.call_soon(self._check, loop)
                return
            # Quiet by the clock, but a request read from its socket in this pass of the
            # loop reaches its handler (and arrived()) only in the next one or the one
            # after: it was a pass spent parsing a batch of the burst that looked quiet.
            if mark != self._arrivals:
                loop.call_soon(self._check, loop, self._arrivals, 1)
                return
            if passes < 2:
                loop.call_soon(self._check, loop, mark, passes + 1)
                return
        held, self._held = self._held, []
        released = 0
        for waiter, send in held:
            if waiter.done():  # a cancelled request's
                continue
            try:
                if send is not None:
                    send()
            except Exception as exc:  # the forward's own error, for its request
                waiter.set_exception(exc)
                continue
            waiter.set_result(None)
            released += 1
        self.on_release(released)
