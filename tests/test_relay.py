"""The serve proxy's lean HTTP/1.1 client (``rocmux.relay``) against a real process:
``tests/servers/sse_upstream.py``, which speaks llama-server's streaming wire format
(chunked SSE, keep-alive) and misbehaves on request."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rocmux import relay
from rocmux.relay import RelayClient
from rocmux.supervisor import free_port

pytestmark = pytest.mark.anyio

SERVER = str(Path(__file__).parent / "servers" / "sse_upstream.py")


def _start(*options: str) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, SERVER, *options], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready", ready
        yield f"http://127.0.0.1:{ready[1]}"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    yield from _start()


@pytest.fixture(scope="module")
def trickling_upstream() -> Iterator[str]:
    """One event every 0.1 s."""
    yield from _start("--interval", "0.1")


@pytest.fixture(scope="module")
def dropping_upstream() -> Iterator[str]:
    """Drops the second request on every kept-alive connection, unanswered."""
    yield from _start("--drop-second")


@pytest.fixture
async def client() -> AsyncIterator[RelayClient]:
    client = RelayClient()
    try:
        yield client
    finally:
        await client.aclose()


def body(**fields: object) -> bytes:
    return json.dumps({"prompt": "x", "stream": True, **fields}).encode()


def events(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


async def test_a_stream_arrives_whole_and_its_connection_is_reused(upstream, client):
    first = await client.post(upstream, "/v1/completions", body(max_tokens=20), 5.0)
    assert first.status_code == 200
    assert first.headers["content-type"] == "text/event-stream"
    data = events(await first.aread())
    await first.aclose()
    assert data[-1] == "[DONE]"
    texts = [json.loads(d)["choices"][0]["text"] for d in data[:-1]]
    assert texts == [f" t{i}" for i in range(20)]
    assert json.loads(data[-2])["usage"]["completion_tokens"] == 20
    second = await client.post(upstream, "/v1/completions", body(max_tokens=3), 5.0)
    assert second._conn is first._conn  # keep-alive: the same connection
    assert len(events(await second.aread())) == 4
    await second.aclose()


async def test_a_plain_answer_reads_whole(upstream, client):
    response = await client.post(upstream, "/v1/completions", body(max_tokens=5, stream=False), 5)
    content = json.loads(await response.aread())
    await response.aclose()
    assert content["choices"][0]["text"] == " t0 t1 t2 t3 t4"


async def test_an_expired_idle_connection_is_not_reused(upstream):
    client = RelayClient(keepalive_expiry=0.0)
    try:
        first = await client.post(upstream, "/v1/completions", body(max_tokens=1), 5.0)
        await first.aread()
        await first.aclose()
        second = await client.post(upstream, "/v1/completions", body(max_tokens=1), 5.0)
        await second.aread()
        await second.aclose()
        assert second._conn is not first._conn
        assert first._conn.closed or first._conn.transport.is_closing()
    finally:
        await client.aclose()


async def test_a_stream_closed_early_drops_its_connection(upstream, client):
    response = await client.post(upstream, "/v1/completions", body(max_tokens=1000), 5.0)
    async for _ in response.aiter_raw():
        break
    await response.aclose()
    # The runtime sees the disconnect (and stops generating): never pooled.
    assert response._conn.transport.is_closing()
    assert not any(client._idle.values())


async def test_silence_past_the_stall_timeout_is_a_read_timeout(upstream, client):
    started = time.monotonic()
    response = await client.post(upstream, "/v1/completions", body(fault="stall"), 0.3)
    with pytest.raises(httpx.ReadTimeout, match="nothing for 0.3 s"):
        await response.aread()
    await response.aclose()
    assert time.monotonic() - started < 3


async def test_a_stream_longer_than_the_stall_timeout_but_never_silent_that_long_is_whole(
    trickling_upstream, client
):
    # One stall timer serves the whole response: it must re-arm, not fire, while events
    # keep coming more often than the timeout (12 events over ~1.2 s, timeout 0.25 s).
    response = await client.post(trickling_upstream, "/v1/completions", body(max_tokens=12), 0.25)
    data = events(await response.aread())
    await response.aclose()
    assert len(data) == 13 and data[-1] == "[DONE]"


async def test_a_stall_after_a_trickle_is_a_read_timeout_at_the_timeout(trickling_upstream, client):
    # Events every 0.1 s, then silence: the timeout counts from the last event.
    response = await client.post(trickling_upstream, "/v1/completions", body(max_tokens=1000), 0.25)
    seen = 0
    with pytest.raises(httpx.ReadTimeout, match="nothing for 0.25 s"):
        async for raw in response.aiter_raw():
            seen += raw.count(b"data: ")
            if seen >= 5:
                response._conn.transport.pause_reading()  # the runtime goes silent
                paused = time.monotonic()
    assert 0.2 < time.monotonic() - paused < 1.0
    await response.aclose()


async def test_a_cut_stream_is_a_protocol_error(upstream, client):
    response = await client.post(upstream, "/v1/completions", body(fault="cut"), 5.0)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending complete message"):
        await response.aread()
    await response.aclose()


async def test_a_close_before_the_head_says_so(upstream, client):
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await client.post(upstream, "/v1/completions", body(fault="nohead"), 5.0)


async def test_an_answer_that_is_not_http_is_a_protocol_error(upstream, client):
    with pytest.raises(httpx.RemoteProtocolError, match="not HTTP"):
        await client.post(upstream, "/v1/completions", body(fault="garbage"), 5.0)


async def test_nothing_listening_is_a_connect_error(client):
    with pytest.raises(httpx.ConnectError, match="cannot connect"):
        await client.post(f"http://127.0.0.1:{free_port()}", "/v1/completions", b"{}", 5.0)


async def test_https_is_refused(client):
    with pytest.raises(ValueError, match="plain HTTP"):
        await client.post("https://127.0.0.1:1", "/v1/completions", b"{}", 5.0)


async def test_a_slow_reader_pauses_the_runtime_instead_of_buffering_it_all(
    upstream, client, monkeypatch
):
    monkeypatch.setattr(relay, "_PAUSE_AT", 16 * 1024)
    response = await client.post(upstream, "/v1/completions", body(max_tokens=3000), 5.0)
    with anyio.fail_after(5):
        while not response._conn.paused:
            await anyio.sleep(0.01)
    await anyio.sleep(0.2)
    # Paused at the threshold: a few socket reads past it at most, not the whole answer.
    assert response._conn.buffered < 16 * 1024 + 256 * 1024
    data = events(await response.aread())
    await response.aclose()
    assert len(data) == 3001 and data[-1] == "[DONE]"


async def test_an_idle_connection_that_closes_leaves_the_pool(upstream, client):
    response = await client.post(upstream, "/v1/completions", body(max_tokens=1), 5.0)
    await response.aread()
    await response.aclose()
    conn = response._conn
    assert list(client._idle[conn.key]) == [conn]
    conn.transport.abort()  # as when the runtime drops an idle keep-alive connection
    with anyio.fail_after(5):
        while client._open:
            await anyio.sleep(0.01)
    assert not client._idle[conn.key]


@given(
    events=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40),
)
def test_any_split_of_a_chunked_answer_reassembles_it(events, cuts):
    """The parse does no I/O: feeding a chunked answer in arbitrary pieces gives back
    exactly its body, and the end of the message, whatever the cuts."""
    import asyncio

    import httptools

    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    wire += b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    loop = asyncio.new_event_loop()
    try:
        conn = relay._Connection(loop, ("h", 1), lambda c: None)
        conn.parser = httptools.HttpResponseParser(conn)
        at = 0
        for cut in cuts:
            conn.data_received(wire[at : at + cut])
            at += cut
        conn.data_received(wire[at:])
    finally:
        loop.close()
    assert conn.error is None
    assert conn.status == 200 and conn.complete
    assert b"".join(conn.chunks) == b"".join(events)


async def test_a_fresh_post_skips_the_pooled_connections(upstream, client):
    first = await client.post(upstream, "/v1/completions", body(max_tokens=1), 5.0)
    await first.aread()
    await first.aclose()
    again = await client.post(upstream, "/v1/completions", body(max_tokens=1), 5.0, fresh=True)
    await again.aread()
    await again.aclose()
    assert again._conn is not first._conn
    assert len(client._idle[first._conn.key]) == 2  # both kept for later requests


async def test_a_request_lost_on_a_reused_connection_goes_again_on_a_fresh_one(
    dropping_upstream, client
):
    """What the serve proxy does (``Api._send``): the pooled connection fails without
    a response, and the retry opens a new connection instead of taking the next one."""
    first = await client.post(dropping_upstream, "/v1/completions", body(max_tokens=2), 5.0)
    await first.aread()
    await first.aclose()
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await client.post(dropping_upstream, "/v1/completions", body(max_tokens=2), 5.0)
    again = await client.post(
        dropping_upstream, "/v1/completions", body(max_tokens=2), 5.0, fresh=True
    )
    assert len(events(await again.aread())) == 3
    await again.aclose()


async def test_a_held_request_is_written_only_when_its_hold_writes_it(upstream, client):
    """``hold`` gets the write of a request that is ready to go (the burst gate's
    use): nothing reaches the runtime until it calls it; a hold that is cancelled
    first drops the connection instead of returning it to the pool."""
    go = anyio.Event()
    writes: list[object] = []

    async def hold(send) -> None:
        writes.append(send)
        await go.wait()
        send()

    result: list[relay.RelayResponse] = []

    async def post() -> None:
        result.append(
            await client.post(upstream, "/v1/completions", body(max_tokens=2), 5.0, hold=hold)
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(post)
        await anyio.sleep(0.2)
        assert len(writes) == 1 and not result  # held: no answer without a request
        (conn,) = client._open
        assert conn.parser is None  # not begun: nothing written on it yet
        go.set()
    (response,) = result
    assert response.status_code == 200 and events(await response.aread())[-1] == "[DONE]"
    await response.aclose()

    async def never(send) -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.1):
        await client.post(upstream, "/v1/completions", body(max_tokens=2), 5.0, hold=never)
    assert not client._open and not any(client._idle.values())


async def test_a_connection_closed_while_its_request_is_held_fails_at_once(upstream, client):
    """A pooled connection that closes after checkout but before the held write
    (the runtime closed it meanwhile) fails like a lost request, at once, so that the
    caller can retry on a new one; a write on it would vanish and the request would
    wait out the read timeout."""
    warm = await client.post(upstream, "/v1/completions", body(max_tokens=1), 5.0)
    await warm.aread()
    await warm.aclose()

    async def hold(send) -> None:
        (conn,) = client._open
        conn.transport.close()  # as if the runtime had closed it
        await anyio.sleep(0.05)  # connection_lost comes in
        send()

    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await client.post(upstream, "/v1/completions", body(max_tokens=1), 3.0, hold=hold)
    assert time.monotonic() - started < 2.0
    again = await client.post(upstream, "/v1/completions", body(max_tokens=1), 5.0, fresh=True)
    assert again.status_code == 200
    await again.aread()
    await again.aclose()


@pytest.fixture(scope="module")
def closing_upstream() -> Iterator[str]:
    """Closes the connection after every streamed answer, as llama-server does."""
    yield from _start("--close-after-stream")


async def _burst(client: RelayClient, base: str, n: int) -> list[relay.RelayResponse]:
    """``n`` streams at once, read whole; their responses (closed)."""
    responses: list[relay.RelayResponse] = []

    async def one() -> None:
        response = await client.post(base, "/v1/completions", body(max_tokens=3), 5.0)
        responses.append(response)
        assert len(events(await response.aread())) == 4
        await response.aclose()

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return responses


async def _idle(client: RelayClient, base: str, n: int) -> set[relay._Connection]:
    """Once ``base`` has ``n`` idle connections, those connections."""
    key = client._address(base)[:2]
    with anyio.fail_after(5):
        while len(client._idle.get(key, ())) < n:
            await anyio.sleep(0.01)
    return set(client._idle[key])


@pytest.mark.parametrize("spares", [True, False])
async def test_a_burst_after_a_burst_finds_its_connections_open_ahead(closing_upstream, spares):
    """llama-server closes a connection after each stream: with ``spares`` the client
    opens as many again in the background, so the next burst connects nowhere."""
    client = RelayClient(spares=spares)
    try:
        first = await _burst(client, closing_upstream, 8)
        with anyio.fail_after(5):  # the upstream closes every one
            while not all(r._conn.closed for r in first):
                await anyio.sleep(0.01)
        if not spares:
            await anyio.sleep(0.2)
            assert not any(client._idle.values())
            return
        ready = await _idle(client, closing_upstream, 8)
        second = await _burst(client, closing_upstream, 8)
        assert {r._conn for r in second} == ready
    finally:
        await client.aclose()


async def test_spares_are_renewed_before_they_expire(closing_upstream):
    client = RelayClient(spares=True, keepalive_expiry=0.4)
    try:
        await _burst(client, closing_upstream, 4)
        ready = await _idle(client, closing_upstream, 4)
        await anyio.sleep(0.5)  # past the expiry of the first ones
        renewed = await _idle(client, closing_upstream, 4)
        assert not renewed & ready
        assert all(c.closed or c.transport.is_closing() for c in ready)
        second = await _burst(client, closing_upstream, 4)
        assert {r._conn for r in second} <= renewed | set(client._idle[second[0]._conn.key])
        assert not {r._conn for r in second} & ready
    finally:
        await client.aclose()


async def test_spares_end_when_the_address_goes_quiet_or_away():
    client = RelayClient(spares=True, keepalive_expiry=0.4, spare_for=0.3)
    try:
        for base in _start("--close-after-stream"):
            await _burst(client, base, 2)
            await _idle(client, base, 2)
            with anyio.fail_after(5):  # quiet for spare_for: the keeper stops renewing
                while client._keepers:
                    await anyio.sleep(0.05)
        client.spare_for = 30.0
        for base in _start("--close-after-stream"):
            await _burst(client, base, 2)
            await _idle(client, base, 2)
            key = client._address(base)[:2]
        # The upstream is gone: renewing fails to connect and the keeper ends. (The keeper
        # may start only now: the burst's connections can reach the idle list before the
        # upstream's close does, and their close is what wakes it.)
        with anyio.fail_after(5):
            while client._keepers or key in client._peak:
                await anyio.sleep(0.05)
        assert key not in client._peak and not client._keepers
    finally:
        await client.aclose()


async def test_closing_the_client_stops_its_spares(closing_upstream):
    client = RelayClient(spares=True)
    await _burst(client, closing_upstream, 3)
    await _idle(client, closing_upstream, 3)
    tasks = [task for task, _ in client._keepers.values()]
    assert tasks
    await client.aclose()
    await anyio.sleep(0.05)
    assert all(task.done() for task in tasks)
    assert not client._open


async def test_dropping_an_address_closes_its_spares_and_stops_renewing_them(closing_upstream):
    """Before a runtime is stopped (``rocmux serve`` unloading it): llama-server exits
    ~0.1 s later while idle connections are open to it."""
    client = RelayClient(spares=True)
    try:
        await _burst(client, closing_upstream, 3)
        ready = await _idle(client, closing_upstream, 3)
        client.drop(closing_upstream)
        assert all(c.transport.is_closing() for c in ready)
        await anyio.sleep(0.3)
        assert not client._keepers
        assert not any(client._idle.values())
        assert not client._open
    finally:
        await client.aclose()
