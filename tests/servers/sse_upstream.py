"""A synthetic OpenAI-style streaming server: llama-server's wire format without a model.

Answers ``POST /v1/completions`` (and any other POST) with ``max_tokens`` events of
llama-server's shape, one HTTP chunk each, ``--interval`` seconds apart, then
``data: [DONE]``; ``GET /health`` with 200. Keep-alive, like llama-server.

Misbehaviour for tests, by the request's ``"fault"`` field:
``"stall"`` (stop sending after the first event, connection open), ``"cut"`` (close the
connection after the first event), ``"garbage"`` (a head that is not HTTP),
``"nohead"`` (close without answering). With ``--drop-second``, the second request on
every connection is dropped unanswered (as llama-server does when it closes a kept-alive
connection just as it is reused). With ``--close-after-stream``, every streamed answer
ends with the connection closed, as llama-server's do. ``GET /connections`` answers how
many connections the server has accepted.

Prints ``ready <port>`` when it listens. Used by tests/test_relay.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: keep-alive\r\n\r\n"
)


def event(i: int, finish: str | None) -> bytes:
    data: dict[str, object] = {
        "choices": [{"text": f" t{i}", "index": 0, "logprobs": None, "finish_reason": finish}],
        "created": 1763917000,
        "id": "chatcmpl-abcdefghijklmnopqrstuvwxyz012345",
        "model": "m",
        "system_fingerprint": "b1-abcdef",
        "object": "text_completion",
    }
    if finish:
        data["usage"] = {"completion_tokens": i + 1, "prompt_tokens": 5, "total_tokens": i + 6}
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def answer(body: dict[str, object], w: asyncio.StreamWriter, interval: float) -> bool:
    """Write one answer; False when the connection must close."""
    fault = body.get("fault")
    if fault == "nohead":
        return False
    if fault == "garbage":
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        return False
    n = int(body.get("max_tokens", 16))  # type: ignore[call-overload]
    if not body.get("stream"):
        text = "".join(f" t{i}" for i in range(n))
        payload = json.dumps(
            {
                "choices": [{"text": text, "index": 0, "finish_reason": "length"}],
                "usage": {"completion_tokens": n, "prompt_tokens": 5, "total_tokens": n + 5},
            }
        ).encode()
        w.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        return True
    w.write(HEAD)
    for i in range(n):
        w.write(chunk(event(i, "length" if i == n - 1 else None)))
        await w.drain()
        if i == 0 and fault == "cut":
            return False
        if i == 0 and fault == "stall":
            await asyncio.sleep(3600)
        if interval:
            await asyncio.sleep(interval)
    w.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return True


ACCEPTED = 0


async def handle(
    r: asyncio.StreamReader,
    w: asyncio.StreamWriter,
    interval: float,
    drop_second: bool,
    close_after_stream: bool,
) -> None:
    global ACCEPTED
    ACCEPTED += 1
    served = 0
    try:
        while line := await r.readline():
            method, path, _ = line.split(b" ", 2)
            length = 0
            while (header := await r.readline()) not in (b"\r\n", b""):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            raw = await r.readexactly(length) if length else b"{}"
            if method == b"GET":
                answer_get = b'{"status":"ok"}'
                if path == b"/connections":
                    answer_get = b"%d" % ACCEPTED
                w.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(answer_get), answer_get)
                )
                continue
            served += 1
            if drop_second and served == 2:
                break
            request = json.loads(raw)
            if not await answer(request, w, interval):
                break
            if close_after_stream and request.get("stream"):
                await w.drain()
                break
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        w.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between events")
    parser.add_argument("--drop-second", action="store_true")
    parser.add_argument("--close-after-stream", action="store_true")
    args = parser.parse_args()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args.interval, args.drop_second, args.close_after_stream),
        "127.0.0.1",
        args.port,
        backlog=1024,
    )
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
