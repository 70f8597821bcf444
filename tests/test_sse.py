"""The OpenAI SSE decoding path, from raw bytes to ``Token`` values, with no network.

The event-stream bodies in ``tests/data`` were recorded from a real llama-server (see
``tests/data/README.md``); here they are replayed through ``OpenAIClient.stream`` over an
``httpx.MockTransport``, cut into arbitrary chunks and rewritten with every line ending
the WHATWG event-stream format allows.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import ServerSentEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rocmux.errors import RequestError, StreamError
from rocmux.manager import PluginManager
from rocmux.openai_client import OpenAIClient
from rocmux.openai_dialect import decode_chunk, decode_event
from rocmux.types import Token, Usage

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


DATA = Path(__file__).parent / "data"
CHAT_BODY = (DATA / "llama_server_chat_stream.txt").read_bytes()
COMPLETION_BODY = (DATA / "llama_server_completion_stream.txt").read_bytes()

CHAT_TEXT = "The capital of France is Paris."
COMPLETION_TEXT = " Paris.\n\nThe United States has a population of approximately"

PLUGINS = PluginManager.discover(entry_points=False)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sse(chunks: Sequence[dict[str, Any]], *, done: bool = True) -> bytes:
    """An event-stream body the way llama-server writes it: one ``data:`` line per event."""
    events = [f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n" for chunk in chunks]
    if done:
        events.append("data: [DONE]\n\n")
    return "".join(events).encode()


# Text with 2-, 3- and 4-byte UTF-8 sequences (and a flag made of two code points), so
# that chunk boundaries fall inside multi-byte characters.
UTF8_PIECES = ["Par", "is", " — ", "Île-de-", "France ", "🇫🇷", " 日本語", " é\u0301", " ✓"]
UTF8_TEXT = "".join(UTF8_PIECES)
UTF8_BODY = sse(
    [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}]
    + [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in UTF8_PIECES]
    + [
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(UTF8_PIECES)}},
    ]
)

BODIES = {
    "chat": (CHAT_BODY, CHAT_TEXT),
    "completion": (COMPLETION_BODY, COMPLETION_TEXT),
    "utf8": (UTF8_BODY, UTF8_TEXT),
}


# -- the mock transport -------------------------------------------------------------------


class ChunkedStream(httpx.AsyncByteStream):
    """A response body delivered in exactly the given pieces."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.chunks = list(chunks)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


Handler = Callable[[httpx.Request], httpx.Response]


def event_stream(chunks: Sequence[bytes]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=ChunkedStream(chunks)
        )

    return handler


_CLIENTS: list[OpenAIClient] = []


async def make_client(handler: Handler) -> OpenAIClient:
    """An ``OpenAIClient`` whose HTTP client is a mock that answers with ``handler``.

    Building the real ``httpx.AsyncClient`` (an SSL context) takes ~20 ms, so one
    ``OpenAIClient`` is built and closed once and only its ``http`` is replaced per use.
    """
    if not _CLIENTS:
        client = OpenAIClient(base_url="http://test", backend="llamacpp_hip", plugins=PLUGINS)
        await client.http.aclose()
        _CLIENTS.append(client)
    client = _CLIENTS[0]
    client.http = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(handler))
    return client


async def collect(handler: Handler, path: str = "/v1/chat/completions") -> list[Token]:
    client = await make_client(handler)
    try:
        with anyio.fail_after(10):
            return [token async for token in client.stream(path, {"messages": []})]
    finally:
        await client.aclose()


def split(body: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``body`` cut at ``cuts`` (positions, any order, repeats give empty chunks)."""
    bounds = [0, *sorted(cuts), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def awkward_positions(body: bytes) -> list[int]:
    """Cut points inside multi-byte UTF-8 sequences, "\\r\\n" pairs and "\\n\\n" pairs."""
    positions = []
    for i in range(1, len(body)):
        inside_utf8 = body[i] & 0xC0 == 0x80  # a continuation byte
        inside_pair = body[i - 1 : i + 1] in (b"\r\n", b"\n\n", b"\r\r")
        if inside_utf8 or inside_pair:
            positions.append(i)
    return positions


@st.composite
def chunkings(draw: st.DrawFn, body: bytes) -> list[bytes]:
    """Ways to deliver ``body``: fixed-size pieces (1 byte and up) or arbitrary cuts."""
    if draw(st.booleans()):
        size = draw(st.integers(1, 16))
        return [body[i : i + size] for i in range(0, len(body), size)]
    anywhere = st.integers(0, len(body))
    awkward = awkward_positions(body)
    position = st.one_of(anywhere, st.sampled_from(awkward)) if awkward else anywhere
    return split(body, draw(st.lists(position, max_size=80)))


def text_of(tokens: Sequence[Token]) -> str:
    return "".join(token.text for token in tokens)


# -- the recordings, decoded whole ------------------------------------------------------------

REFERENCE: dict[str, list[Token]] = {}


async def reference(name: str) -> list[Token]:
    if name not in REFERENCE:
        body, _ = BODIES[name]
        REFERENCE[name] = await collect(event_stream([body]))
    return REFERENCE[name]


async def test_chat_recording_decodes_to_the_answer() -> None:
    tokens = await reference("chat")
    assert text_of(tokens) == CHAT_TEXT
    words = ["The", " capital", " of", " France", " is", " Paris", "."]
    assert tokens[: len(words)] == [Token(word) for word in words]
    stop, last = tokens[len(words) :]
    assert stop == Token("", "stop")
    # The ``choices: []`` chunk of ``stream_options.include_usage``.
    assert last.text == ""
    assert last.finish_reason is None
    assert last.usage == Usage(prompt_tokens=40, completion_tokens=8)
    assert last.timings is not None
    assert last.timings["predicted_n"] == 8.0
    assert last.timings["prompt_n"] == 40.0


async def test_completion_recording_decodes_to_the_text() -> None:
    tokens = await reference("completion")
    assert text_of(tokens) == COMPLETION_TEXT
    assert all(token.finish_reason is None for token in tokens[:-1])
    assert all(token.usage is None and token.timings is None for token in tokens[:-1])
    last = tokens[-1]
    assert (last.text, last.finish_reason) == ("", "length")
    assert last.usage == Usage(prompt_tokens=5, completion_tokens=12)
    assert last.timings is not None
    assert last.timings["predicted_n"] == 12.0


async def test_utf8_body_decodes_to_the_text() -> None:
    tokens = await reference("utf8")
    assert text_of(tokens) == UTF8_TEXT
    assert awkward_positions(UTF8_BODY)  # the property below has cuts to try


@pytest.mark.parametrize("name", sorted(BODIES))
async def test_one_byte_chunks(name: str) -> None:
    body, text = BODIES[name]
    tokens = await collect(event_stream([body[i : i + 1] for i in range(len(body))]))
    assert tokens == await reference(name)
    assert text_of(tokens) == text


@pytest.mark.parametrize("name", sorted(BODIES))
async def test_every_awkward_single_cut(name: str) -> None:
    """Two chunks, cut inside a multi-byte character or between two line-ending bytes."""
    body, _ = BODIES[name]
    expected = await reference(name)
    for newline in (b"\n", b"\r\n"):
        changed = body.replace(b"\n", newline)
        for cut in awkward_positions(changed):
            assert await collect(event_stream(split(changed, [cut]))) == expected, (newline, cut)


# -- properties over chunking and line endings ----------------------------------------------


# Everything is drawn in ``@given``: drawing inside the async test body (``st.data()``)
# lets hypothesis' StopTest escape from the anyio runner task.
def named_bodies(newlines: Sequence[bytes] = (b"\n",)) -> st.SearchStrategy[tuple[str, bytes]]:
    """A recording's name and its body, with every "\n" replaced by one of ``newlines``."""
    # JSON escapes newlines inside strings, so every raw "\n" is a line ending.
    return st.tuples(st.sampled_from(sorted(BODIES)), st.sampled_from(newlines)).map(
        lambda pair: (pair[0], BODIES[pair[0]][0].replace(b"\n", pair[1]))
    )


def chunked(bodies: st.SearchStrategy[tuple[str, bytes]]) -> st.SearchStrategy[Any]:
    return bodies.flatmap(lambda nb: st.tuples(st.just(nb[0]), chunkings(nb[1])))


@FAST
@given(case=chunked(named_bodies()))
async def test_any_chunking_gives_the_same_tokens(case: tuple[str, list[bytes]]) -> None:
    name, chunks = case
    body, text = BODIES[name]
    assert b"".join(chunks) == body
    tokens = await collect(event_stream(chunks))
    assert tokens == await reference(name)
    assert text_of(tokens) == text


@FAST
@given(case=chunked(named_bodies([b"\n", b"\r\n", b"\r"])))
async def test_any_line_ending_gives_the_same_tokens(case: tuple[str, list[bytes]]) -> None:
    name, chunks = case
    tokens = await collect(event_stream(chunks))
    assert tokens == await reference(name)
    assert text_of(tokens) == BODIES[name][1]


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"], ids=["crlf", "cr"])
@pytest.mark.parametrize("name", sorted(BODIES))
async def test_line_endings_with_one_byte_chunks(name: str, newline: bytes) -> None:
    body = BODIES[name][0].replace(b"\n", newline)
    tokens = await collect(event_stream([body[i : i + 1] for i in range(len(body))]))
    assert tokens == await reference(name)


IGNORED_LINES = [b": ping\n\n", b":\n", b"id: 7\n", b"retry: 100\n", b"\n", b"x-y: z\n"]


@FAST
@given(
    name=st.sampled_from(sorted(BODIES)),
    extra=st.lists(st.tuples(st.integers(0, 100), st.sampled_from(IGNORED_LINES)), max_size=6),
)
async def test_comments_and_other_fields_are_ignored(
    name: str, extra: list[tuple[int, bytes]]
) -> None:
    events = BODIES[name][0].split(b"\n\n")
    # Keep-alive comments, ids, retries, unknown fields and blank lines at the start of
    # an event are all ignored by the WHATWG rules.
    for index, line in extra:
        events[index % len(events)] = line + events[index % len(events)]
    tokens = await collect(event_stream([b"\n\n".join(events)]))
    assert tokens == await reference(name)


async def test_multi_line_data_is_joined_with_newlines() -> None:
    body = (
        b'data: {"choices":\n'
        b'data: [{"delta": {"content": "a"}}]}\n'
        b"\n"
        b'data: {"choices": [{"delta": {"content": "b"}, "finish_reason": "stop"}]}\n'
        b"\n"
        b"data: [DONE]\n\n"
    )
    assert await collect(event_stream([body])) == [Token("a"), Token("b", "stop")]


async def test_nothing_after_done_is_read() -> None:
    body = CHAT_BODY + b"data: this is not json\n\n"
    assert await collect(event_stream([body])) == await reference("chat")


async def test_an_unterminated_last_event_is_dropped() -> None:
    body = sse([{"choices": [{"delta": {"content": "a"}}]}], done=False)
    body += b'data: {"choices": [{"delta": {"content": "b"}}]}\n'
    assert await collect(event_stream([body])) == [Token("a")]


# -- malformed streams and error statuses ---------------------------------------------------


async def test_event_that_is_not_json() -> None:
    body = sse([{"choices": [{"delta": {"content": "a"}}]}], done=False) + b"data: {oops\n\n"
    with pytest.raises(StreamError, match="not JSON") as excinfo:
        await collect(event_stream([body]))
    assert "{oops" in str(excinfo.value)


async def test_event_that_is_a_json_array() -> None:
    with pytest.raises(StreamError, match="JSON list, not an object"):
        await collect(event_stream([b"data: [1, 2]\n\n"]))


async def test_error_chunk_mid_stream() -> None:
    body = sse(
        [
            {"choices": [{"delta": {"content": "a"}}]},
            {"error": {"code": 500, "message": "context overflow", "type": "server_error"}},
        ]
    )
    with pytest.raises(StreamError, match="context overflow"):
        await collect(event_stream([body]))


async def test_error_event_mid_stream() -> None:
    with pytest.raises(StreamError, match="error event: kaput"):
        await collect(event_stream([b"event: error\ndata: kaput\n\n"]))


async def test_error_status_with_json_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "boom", "code": 500}})

    with pytest.raises(RequestError) as excinfo:
        await collect(handler)
    message = str(excinfo.value)
    assert "500" in message
    assert "boom" in message
    assert "llamacpp_hip" in message
    assert "/v1/chat/completions" in message
    assert excinfo.value.status_code == 500
    assert excinfo.value.body == {"error": {"message": "boom", "code": 500}}


async def test_error_status_with_text_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="Loading model")

    with pytest.raises(RequestError, match="503.*Loading model") as excinfo:
        await collect(handler)
    assert excinfo.value.status_code == 503


async def test_json_reply_is_not_an_event_stream() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"text": "Paris"}]})

    with pytest.raises(StreamError, match="not an event stream") as excinfo:
        await collect(handler)
    assert "application/json" in str(excinfo.value)


async def test_request_body_asks_for_a_stream() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return event_stream([CHAT_BODY])(request)

    client = await make_client(handler)
    try:
        tokens = [t async for t in client.stream("/v1/completions", {"prompt": "x"})]
    finally:
        await client.aclose()
    assert text_of(tokens) == CHAT_TEXT
    assert seen == [{"prompt": "x", "stream": True}]


async def check_survives(chunks: Sequence[bytes]) -> None:
    """The client yields tokens or raises a rocmux error, never anything else, and ends."""
    try:
        tokens = await collect(event_stream(chunks))
    except (StreamError, RequestError):
        return
    assert all(isinstance(token, Token) for token in tokens)


@FAST
@given(chunks=st.binary(max_size=2000).flatmap(chunkings))
async def test_arbitrary_bytes_never_crash(chunks: list[bytes]) -> None:
    await check_survives(chunks)


# JSON that is not too deep and has no value that the known bugs below trip over
# (huge integers, infinities), mixed with the pieces of a real stream.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=True, allow_infinity=False)
    | st.text(max_size=10)
    | st.sampled_from(["choices", "delta", "content", "text", "finish_reason", "usage"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "choices",
                    "delta",
                    "content",
                    "text",
                    "finish_reason",
                    "usage",
                    "timings",
                    "error",
                ]
                + ["prompt_tokens", "completion_tokens", "message", "x"]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
fragments = st.one_of(
    json_values.map(lambda value: f"data: {json.dumps(value)}\n\n".encode()),
    st.sampled_from(CHAT_BODY.split(b"\n\n") + COMPLETION_BODY.split(b"\n\n")),
    st.sampled_from(
        [b"\n", b"\r", b"\r\n", b"data:", b"data: ", b"event: error\n", b"event: x\n"]
        + [b": c\n", b"[DONE]", b"{", b"}", b'"', b"\xc3", b"\xff", b"\x00"]
    ),
    st.binary(max_size=8),
)


@FAST
@given(chunks=st.lists(fragments, max_size=20).map(b"".join).flatmap(chunkings))
async def test_stream_like_garbage_never_crashes(chunks: list[bytes]) -> None:
    await check_survives(chunks)


# -- decode_chunk / decode_event ------------------------------------------------------------


def event(data: str, name: str = "") -> ServerSentEvent:
    return ServerSentEvent(event=name, data=data)


def test_chat_delta() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    assert decode_chunk(chunk) == [Token("Hi")]


def test_chat_role_only_delta_gives_nothing() -> None:
    chunk = {"choices": [{"delta": {"role": "assistant", "content": None}}]}
    assert decode_chunk(chunk) == []
    assert decode_chunk({"choices": [{"delta": {}}]}) == []


def test_completion_text() -> None:
    chunk = {"choices": [{"text": " Paris", "index": 0, "logprobs": None}]}
    assert decode_chunk(chunk) == [Token(" Paris")]


def test_finish_reason() -> None:
    assert decode_chunk({"choices": [{"delta": {}, "finish_reason": "stop"}]}) == [
        Token("", "stop")
    ]
    assert decode_chunk({"choices": [{"text": "", "finish_reason": "length"}]}) == [
        Token("", "length")
    ]


def test_usage_and_timings_on_the_final_chunk() -> None:
    chunk = {
        "choices": [{"text": "", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17},
        "timings": {"predicted_n": 12, "predicted_per_second": 18.5, "label": "x"},
    }
    (token,) = decode_chunk(chunk)
    assert token == Token(
        "",
        "length",
        usage=Usage(prompt_tokens=5, completion_tokens=12),
        timings={"predicted_n": 12.0, "predicted_per_second": 18.5},
    )
    assert token.usage is not None
    assert token.usage.total_tokens == 17


def test_usage_and_timings_are_attached_once() -> None:
    chunk = {
        "choices": [{"text": "a"}, {"text": "b", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
    }
    first, second = decode_chunk(chunk)
    assert first.usage == Usage(prompt_tokens=1, completion_tokens=2)
    assert second.usage is None


def test_usage_chunk_with_no_choices() -> None:
    chunk = {
        "choices": [],
        "usage": {"prompt_tokens": 40, "completion_tokens": 8},
        "timings": {"prompt_ms": 918.855},
    }
    assert decode_chunk(chunk) == [
        Token(
            "",
            None,
            usage=Usage(prompt_tokens=40, completion_tokens=8),
            timings={"prompt_ms": 918.855},
        )
    ]


def test_chunk_without_choices_or_usage_gives_nothing() -> None:
    assert decode_chunk({}) == []
    assert decode_chunk({"choices": None, "usage": None}) == []


def test_error_chunk() -> None:
    with pytest.raises(StreamError, match="mid-stream: out of memory"):
        decode_chunk({"error": {"message": "out of memory", "code": 500}})
    with pytest.raises(StreamError, match="mid-stream: plain"):
        decode_chunk({"error": "plain"})
    with pytest.raises(StreamError, match="out of memory"):
        decode_event(event('{"error": {"message": "out of memory"}}'))


def test_not_json() -> None:
    with pytest.raises(StreamError, match=r"not JSON \(Expecting value\): 'nope'"):
        decode_event(event("nope"))
    with pytest.raises(StreamError, match="not JSON"):
        decode_event(event('{"choices": ['))


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        ({"choices": {"text": "a"}}, "'choices' must be a list, got dict"),
        ({"choices": "a"}, "'choices' must be a list, got str"),
        ({"choices": ["a"]}, "a choice must be an object"),
        ({"choices": [{"text": 5}]}, "token text must be a string, got 5"),
        ({"choices": [{"text": ["a"]}]}, "token text must be a string"),
        ({"choices": [{"delta": {"content": 1.5}}]}, "token text must be a string"),
        ({"choices": [{"delta": "a"}]}, "'delta' must be an object"),
        ({"choices": [{"text": "a", "finish_reason": 1}]}, "finish_reason must be a string"),
        ({"usage": {"prompt_tokens": "many"}}, "malformed usage"),
        ({"usage": {"prompt_tokens": [1]}}, "malformed usage"),
    ],
)
def test_wrong_types(chunk: dict[str, Any], match: str) -> None:
    with pytest.raises(StreamError, match=match):
        decode_chunk(chunk)
    with pytest.raises(StreamError, match=match):
        decode_event(event(json.dumps(chunk)))


def test_events_without_data_or_of_other_types() -> None:
    assert decode_event(event("")) == []
    assert decode_event(event('{"choices": [{"text": "a"}]}', "message")) == [Token("a")]
    assert decode_event(event('{"choices": [{"text": "a"}]}', "ping")) == []
    with pytest.raises(StreamError, match="error event: bad"):
        decode_event(event("bad", "error"))


def test_hook_decodes_through_the_plugin_manager() -> None:
    assert PLUGINS.decode_event("llamacpp_hip", event('{"choices": [{"text": "a"}]}')) == [
        Token("a")
    ]


# -- hostile JSON becomes StreamError, never a bare Python error ----------------------------


def test_infinite_usage_count_is_a_stream_error() -> None:
    with pytest.raises(StreamError):
        decode_event(event('{"choices": [], "usage": {"prompt_tokens": Infinity}}'))


def test_huge_timing_is_dropped() -> None:
    tokens = decode_event(
        event('{"choices": [], "timings": {"prompt_ms": 1%s, "n": 2}}' % ("0" * 400))
    )
    assert tokens[0].timings == {"n": 2.0}


def test_usage_counts_must_be_whole_numbers() -> None:
    for bad in ("1.7", '"12"', "true", "-1"):
        with pytest.raises(StreamError, match="malformed usage"):
            decode_event(event(f'{{"choices": [], "usage": {{"prompt_tokens": {bad}}}}}'))


def test_null_error_field_is_not_an_error() -> None:
    assert decode_event(event('{"error": null, "choices": [{"text": "a"}]}')) == [Token("a")]


def test_deeply_nested_json_is_a_stream_error() -> None:
    with pytest.raises(StreamError):
        decode_event(event("[" * 100_000))
