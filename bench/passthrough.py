"""Two bare pass-through proxies in front of one llama-server: the floors under what any
Python front end, and ``rocmux serve``'s stack in particular, can add to a request.

``tcp``: a uvloop TCP server that opens a connection to the upstream for each one it
accepts and copies bytes both ways, parsing nothing. No Python proxy does less per
request, so what it adds is the least a Python process in the path costs.

``asgi``: uvicorn, configured as ``rocmux serve`` runs it, with a raw ASGI app (no
starlette, no pool, no checks) that forwards each POST's body with rocmux's
:class:`~rocmux.relay.RelayClient` and streams the answer back; ``--burst-window`` puts
rocmux's :class:`~rocmux.burst.BurstGate` in front of the forwards, as ``rocmux serve``
does. What it adds is the floor of uvicorn plus the relay.

Neither is a product: no errors are explained, nothing is validated. ``bench/proxy.py
--floors`` runs both beside the direct and rocmux paths.

Run: ``python bench/passthrough.py {tcp,asgi} --port P --upstream http://127.0.0.1:Q``
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import uvloop


class _Pipe(asyncio.Protocol):
    """One side of a copied connection; ``peer`` is the other side's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Downstream(_Pipe):
    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.address = (host, port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(_Pipe, *self.address)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        up.peer, self.peer = self, up
        if self.transport is None or self.transport.is_closing():
            assert up.transport is not None
            up.transport.close()
            return
        assert up.transport is not None
        for data in self.pending:
            up.transport.write(data)
        self.pending.clear()


async def serve_tcp(port: int, upstream: str) -> None:
    parts = urlsplit(upstream)
    host, up_port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Downstream(host, up_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def asgi_app(upstream: str, burst_window: float) -> Any:
    from rocmux.burst import BurstGate
    from rocmux.relay import RelayClient

    relay = RelayClient()
    gate = BurstGate(burst_window)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await relay.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        gate.arrived()
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        # A window of 0 makes the gate send at once.
        body = b"".join(chunks)
        answer = await relay.post(upstream, scope["path"], body, None, hold=gate.passage)
        kind = answer.headers.get("content-type", "application/json").encode()
        await send(
            {
                "type": "http.response.start",
                "status": answer.status_code,
                "headers": [(b"content-type", kind)],
            }
        )
        try:
            async for chunk in answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await answer.aclose()
        await send({"type": "http.response.body", "body": b""})

    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["tcp", "asgi"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8080")
    parser.add_argument("--burst-window", type=float, default=0.0, help="asgi: seconds")
    args = parser.parse_args(argv)
    if args.kind == "tcp":
        uvloop.run(serve_tcp(args.port, args.upstream))
        return
    import uvicorn

    uvicorn.run(
        asgi_app(args.upstream, args.burst_window),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        proxy_headers=False,
        access_log=False,
    )


if __name__ == "__main__":
    main()
