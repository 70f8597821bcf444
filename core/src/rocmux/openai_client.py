"""A thin streaming client for OpenAI-compatible servers.

Decoding is done by ``httpx-sse`` (WHATWG event-stream rules) and the
``rocmux_decode_event`` hook; this module only does the I/O around them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import httpx
from httpx_sse import EventSource

from rocmux.errors import RequestError, StreamError
from rocmux.manager import PluginManager
from rocmux.types import Token

KEEPALIVE_S = 2.0
"""Seconds an idle connection to a runtime is kept (here and in ``rocmux.relay``): well
before llama-server (cpp-httplib) closes it after 5 s, which is also httpx's default; one
reused just as the server closes it fails with no answer."""


def _error_message(response: httpx.Response) -> tuple[str, object]:
    try:
        body: object = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:500] or response.reason_phrase, response.text
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping):
            return str(error.get("message", error)), body
        return str(error), body
    return str(body), body


@attrs.define(eq=False)
class OpenAIClient:
    """Streams tokens from ``/v1/completions`` and ``/v1/chat/completions``."""

    base_url: str
    backend: str
    plugins: PluginManager
    http: httpx.AsyncClient = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            # Loopback only: proxies from the environment must never apply.
            trust_env=False,
            # Generation can pause for long prompts; only connecting is time-bounded.
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=128, keepalive_expiry=KEEPALIVE_S
            ),
            # A TLS context reads the CA bundle (~50 ms, on every model load); a runtime's
            # plain-HTTP URL never uses one.
            verify=not self.base_url.startswith("http://"),
        )

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Token]:
        """POST ``body`` with ``stream: true`` and yield the tokens of the reply.

        Raises ``RequestError`` for an error status (its JSON message quoted),
        ``StreamError`` for a malformed stream, and lets ``httpx.TransportError``
        through for the caller to tell a dead server from a network fault.
        """
        body = {**body, "stream": True}
        async with self.http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                message, parsed = _error_message(response)
                raise RequestError(
                    f"the {self.backend} server answered {response.status_code} to "
                    f"POST {path}: {message}",
                    status_code=response.status_code,
                    body=parsed,
                )
            content_type = response.headers.get("content-type", "")
            if content_type.partition(";")[0].strip().lower() != "text/event-stream":
                await response.aread()
                raise StreamError(
                    f"the {self.backend} server answered POST {path} with {content_type!r}, "
                    f"not an event stream: {response.text[:200]!r}"
                )
            decode = self.plugins.event_decoder(self.backend)
            async for event in EventSource(response).aiter_sse():
                if event.data == "[DONE]":
                    return
                for token in decode(event):
                    yield token

    async def aclose(self) -> None:
        await self.http.aclose()
