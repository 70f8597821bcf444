"""The ``remote`` backend: a server on another host that speaks the OpenAI API.

Any server with ``/v1/completions`` and ``/v1/chat/completions`` streaming works:
another ``rocmux serve``, llama-server, vLLM. rocmux starts nothing; the remote end
owns its model, its memory and its process, so ``LoadConfig`` settings other than
``extra_flags`` (refused) are noted and ignored.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, ClassVar

import anyio
import attrs
import httpx
from rocmux.backend import Backend, TextModel
from rocmux.config import load_config
from rocmux.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidFlag,
    ModelClosed,
    RequestError,
    StreamError,
)
from rocmux.manager import PluginManager, get_plugin_manager
from rocmux.openai_client import OpenAIClient
from rocmux.types import Availability, GenerateConfig, LoadConfig, Message, Token

NAME = "remote"
URL_VAR = "ROCMUX_REMOTE_URL"
KEY_VAR = "ROCMUX_REMOTE_API_KEY"
# Below every local runtime (CPU llama.cpp is 10, hip_direct on a CPU 5): a remote
# server is used when asked for by name, or when nothing runs here.
DEFAULT_PRIORITY = 1
_KEYS = ("url", "api_key", "model", "priority", "timeout")


def normalize_url(url: str, where: str) -> str:
    """``url`` without a trailing ``/`` or ``/v1`` (the client adds ``/v1/...``)."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where} must start with http:// or https://, got {url!r}")
    return url.removesuffix("/v1")


@attrs.frozen(kw_only=True)
class RemoteSettings:
    """Where the remote server is and how to talk to it."""

    url: str
    api_key: str | None = None
    model: str | None = None
    """Model name sent with each request; ``None`` takes the server's first model."""
    priority: int = DEFAULT_PRIORITY
    timeout: float = 3.0
    """Seconds to connect, and for detection's probes to answer."""

    @classmethod
    def resolve(
        cls, table: Mapping[str, Any], environ: Mapping[str, str] = os.environ
    ) -> RemoteSettings:
        """From ``[backends.remote]``, with ``$ROCMUX_REMOTE_URL`` and
        ``$ROCMUX_REMOTE_API_KEY`` taking precedence. ``ConfigError`` says what is
        missing or wrong."""
        unknown = sorted(set(table) - set(_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key [backends.remote].{unknown[0]}; known keys: {', '.join(_KEYS)}"
            )
        if environ.get(URL_VAR):
            url = normalize_url(environ[URL_VAR], URL_VAR)
        elif table.get("url"):
            url = normalize_url(str(table["url"]), "[backends.remote] url")
        else:
            raise ConfigError(
                f"no remote server is configured: set url in [backends.remote] of "
                f'rocmux.toml (url = "http://host:port") or {URL_VAR}'
            )
        priority = table.get("priority", DEFAULT_PRIORITY)
        timeout = table.get("timeout", 3.0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(f"[backends.remote] priority must be an integer, got {priority!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"[backends.remote] timeout must be positive seconds: {timeout!r}")
        api_key = environ.get(KEY_VAR) or table.get("api_key") or None
        model = table.get("model") or None
        return cls(
            url=url,
            api_key=None if api_key is None else str(api_key),
            model=None if model is None else str(model),
            priority=priority,
            timeout=float(timeout),
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def probe(settings: RemoteSettings) -> tuple[Availability, list[str]]:
    """Ask the server whether it is up (``/health``, else ``/v1/models``) and which
    models it serves. Never raises: a failure is the reason of an unavailable result."""
    url = settings.url
    # Proxies from the environment do not apply: rocmux talks to the server directly,
    # as it does to local runtimes.
    async with httpx.AsyncClient(
        base_url=url, headers=settings.headers(), timeout=settings.timeout, trust_env=False
    ) as http:
        try:
            health = await http.get("/health")
            models = await http.get("/v1/models")
        except httpx.TimeoutException:
            return Availability.unavailable(
                f"the remote server at {url} did not answer within {settings.timeout:g} s"
            ), []
        except httpx.TransportError as exc:
            return Availability.unavailable(
                f"cannot reach the remote server at {url}: {_describe(exc)}"
            ), []
    if models.status_code in (401, 403):
        return Availability.unavailable(
            f"the remote server at {url} refused the API key (HTTP {models.status_code}); "
            f"set api_key in [backends.remote] or {KEY_VAR}"
        ), []
    if health.status_code == 503:
        return Availability.unavailable(
            f"the remote server at {url} is up but not ready yet (/health answered 503)"
        ), []
    if health.status_code != 200 and models.status_code != 200:
        return Availability.unavailable(
            f"{url} does not look like an OpenAI-compatible server: /health answered "
            f"{health.status_code} and /v1/models {models.status_code}"
        ), []
    names = _model_ids(models)
    listed = f"; models: {', '.join(names)}" if names else ""
    return Availability(
        ok=True,
        reason=f"OpenAI-compatible server at {url} answers{listed}",
        priority=settings.priority,
    ), names


def _model_ids(response: httpx.Response) -> list[str]:
    if response.status_code != 200:
        return []
    try:
        data = response.json().get("data", [])
        return [str(item["id"]) for item in data if isinstance(item, Mapping) and "id" in item]
    except (ValueError, AttributeError, TypeError):
        return []


@attrs.define(eq=False)
class RemoteModel(TextModel):
    """A model served by a remote OpenAI-compatible server.

    Closing it closes the connections; the remote model stays loaded there. When the
    server goes away, requests fail with a ``StreamError`` naming its URL; there is
    nothing to restart on this side, so the next request works once the server is back.
    """

    backend_name: ClassVar[str] = NAME

    url: str
    client: OpenAIClient
    model_name: str | None = None
    request_defaults: dict[str, Any] = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)
    _error: BaseException | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def generate(self, prompt: str, config: GenerateConfig | None = None) -> AsyncIterator[Token]:
        config = config or GenerateConfig()
        body = {**self.request_defaults, "prompt": prompt, **config.to_openai()}
        return self._stream("/v1/completions", body)

    def chat(
        self, messages: Sequence[Message], config: GenerateConfig | None = None
    ) -> AsyncIterator[Token]:
        config = config or GenerateConfig()
        body = {
            **self.request_defaults,
            "messages": [m.to_openai() for m in messages],
            **config.to_openai(),
        }
        return self._stream("/v1/chat/completions", body)

    def err(self) -> BaseException | None:
        return self._error

    def _closed_error(self, during: bool = False) -> ModelClosed:
        when = " during this request" if during else ""
        return ModelClosed(f"the remote model at {self.url} was closed{when}; load it again")

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Token]:
        if self._closed:
            raise self._closed_error()
        finished = False
        try:
            async with aclosing(self.client.stream(path, body)) as tokens:
                async for token in tokens:
                    finished = finished or token.finish_reason is not None
                    yield token
        except httpx.TransportError as exc:
            raise self._failed(self._lost(path, exc)) from exc
        except RequestError as exc:
            raise self._failed(
                RequestError(
                    f"{exc} (remote {self.url})", status_code=exc.status_code, body=exc.body
                )
            ) from exc
        except StreamError as exc:
            raise self._failed(StreamError(f"{exc} (remote {self.url})")) from exc
        if not finished:
            raise self._failed(
                StreamError(
                    f"the remote server at {self.url} ended the {path} stream without a "
                    "finish reason"
                )
            )

    def _failed(self, error: Exception) -> Exception:
        self._error = error
        return error

    def _lost(self, path: str, exc: httpx.TransportError) -> Exception:
        if self._closed:
            return self._closed_error(during=True)
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return StreamError(
                f"cannot reach the remote server at {self.url} (POST {path}): "
                f"{_describe(exc)}; is it running?"
            )
        return StreamError(
            f"lost the connection to the remote server at {self.url} during POST {path} "
            f"({_describe(exc)}): the server went away or the network dropped"
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.client.aclose()


@attrs.define(eq=False)
class RemoteBackend(Backend):
    """Uses an OpenAI-compatible server elsewhere as the runtime.

    ``url``, ``api_key`` and ``model`` given here win over the configuration (tests and
    programs pass them); else ``$ROCMUX_REMOTE_URL`` / ``$ROCMUX_REMOTE_API_KEY`` and
    ``[backends.remote]`` in rocmux.toml apply.
    """

    name: ClassVar[str] = NAME
    plugins: PluginManager | None = None
    url: str | None = None
    api_key: str | None = None
    model: str | None = None

    def settings(self) -> RemoteSettings:
        """The settings in force; ``ConfigError`` when no URL is known."""
        table: dict[str, Any] = dict(load_config().backend_options(NAME))
        environ: Mapping[str, str] = os.environ
        if self.url is not None:
            table["url"] = self.url
            environ = {k: v for k, v in os.environ.items() if k != URL_VAR}
        if self.api_key is not None:
            table["api_key"] = self.api_key
        if self.model is not None:
            table["model"] = self.model
        return RemoteSettings.resolve(table, environ)

    async def detect(self) -> Availability:
        try:
            settings = self.settings()
            availability, _models = await probe(settings)
        except Exception as exc:  # detection must never raise: a bad table is a reason
            return Availability.unavailable(str(exc) or repr(exc))
        return availability

    async def load(self, model: Path, config: LoadConfig) -> RemoteModel:
        """Connect to the server. ``model`` only labels the request: the remote serves
        its own models, picked by ``[backends.remote] model`` or its first one."""
        settings = self.settings()
        if config.extra_flags:
            raise InvalidFlag(
                f"the remote backend cannot pass runtime flags ({' '.join(config.extra_flags)}); "
                f"set them where the server at {settings.url} is started"
            )
        client = OpenAIClient(settings.url, NAME, self.plugins or get_plugin_manager())
        client.http.headers.update(settings.headers())
        client.http.timeout = httpx.Timeout(None, connect=settings.timeout)
        try:
            name = settings.model or await self._first_model(client, settings)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await client.aclose()
            raise
        defaults: dict[str, Any] = {"stream_options": {"include_usage": True}}
        if name is not None:
            defaults["model"] = name
        remote = RemoteModel(
            url=settings.url, client=client, model_name=name, request_defaults=defaults
        )
        ignored = [
            field.name
            for field in attrs.fields(LoadConfig)
            if field.name != "extra_flags" and getattr(config, field.name) != field.default
        ]
        if ignored:
            remote.notes.append(
                f"ignored by the remote backend (set them on the server): {', '.join(ignored)}"
            )
        remote.notes.append(f"{model} -> model {name or '(server default)'} at {settings.url}")
        return remote

    async def _first_model(self, client: OpenAIClient, settings: RemoteSettings) -> str | None:
        try:
            response = await client.http.get("/v1/models", timeout=settings.timeout)
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"cannot reach the remote server at {settings.url}: {_describe(exc)}"
            ) from exc
        if response.status_code in (401, 403):
            raise BackendUnavailable(
                f"the remote server at {settings.url} refused the API key "
                f"(HTTP {response.status_code}); set api_key in [backends.remote] or {KEY_VAR}"
            )
        names = _model_ids(response)
        return names[0] if names else None
