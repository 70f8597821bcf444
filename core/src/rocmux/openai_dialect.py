"""Built-in plugin: decode OpenAI-style streaming chunks (chat and completions).

llama-server, vLLM and most local runtimes speak this dialect, so it is the
``trylast`` fallback of ``rocmux_decode_event``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rocmux import hookimpl
from rocmux.errors import StreamError
from rocmux.types import Token, Usage

if TYPE_CHECKING:
    from httpx_sse import ServerSentEvent


def _count(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StreamError(f"malformed usage in stream: {key} = {value!r}")
    return value


def _usage(raw: object) -> Usage | None:
    if not isinstance(raw, Mapping):
        return None
    return Usage(
        prompt_tokens=_count(raw, "prompt_tokens"),
        completion_tokens=_count(raw, "completion_tokens"),
    )


def _timings(raw: object) -> Mapping[str, float] | None:
    if not isinstance(raw, Mapping):
        return None
    timings: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        try:
            number = float(value)
        except OverflowError:
            continue
        if math.isfinite(number):
            timings[str(key)] = number
    return timings


def decode_chunk(chunk: Mapping[str, Any]) -> list[Token]:
    """Tokens in one decoded JSON chunk of ``/v1/completions`` or ``/v1/chat/completions``."""
    error = chunk.get("error")
    if error is not None:
        message = error.get("message", error) if isinstance(error, Mapping) else error
        raise StreamError(f"the runtime reported an error mid-stream: {message}")
    choices = chunk.get("choices")
    if choices is None:
        choices = []
    if not isinstance(choices, list):
        raise StreamError(f"'choices' must be a list, got {type(choices).__name__}")
    usage = _usage(chunk.get("usage"))
    timings = _timings(chunk.get("timings"))
    tokens: list[Token] = []
    for choice in choices:
        if not isinstance(choice, Mapping):
            raise StreamError(f"a choice must be an object, got {choice!r}")
        if "delta" in choice:
            delta = choice["delta"]
            if not isinstance(delta, Mapping):
                raise StreamError(f"'delta' must be an object, got {delta!r}")
            text = delta.get("content")
        else:
            text = choice.get("text")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise StreamError(f"token text must be a string, got {text!r}")
        finish = choice.get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            raise StreamError(f"finish_reason must be a string, got {finish!r}")
        if text or finish:
            tokens.append(Token(text, finish, usage=usage, timings=timings))
            usage = timings = None  # attach once
    if usage is not None or timings is not None:
        tokens.append(Token("", None, usage=usage, timings=timings))
    return tokens


def decode_event(event: ServerSentEvent) -> list[Token]:
    """Decode one SSE event whose data is an OpenAI JSON chunk."""
    if event.event not in ("", "message"):
        if event.event == "error":
            raise StreamError(f"the runtime sent an error event: {event.data[:500]}")
        return []
    if not event.data:
        return []
    try:
        chunk = json.loads(event.data)
    except json.JSONDecodeError as exc:
        raise StreamError(
            f"the runtime sent an event that is not JSON ({exc.msg}): {event.data[:200]!r}"
        ) from None
    except RecursionError:
        raise StreamError("the runtime sent JSON nested too deeply to decode") from None
    if not isinstance(chunk, Mapping):
        raise StreamError(f"the runtime sent a JSON {type(chunk).__name__}, not an object")
    return decode_chunk(chunk)


@hookimpl(trylast=True)
def rocmux_decode_event(backend: str, event: ServerSentEvent) -> Sequence[Token] | None:
    return decode_event(event)
