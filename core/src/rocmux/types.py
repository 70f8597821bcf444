"""Value types shared by every backend: configuration in, tokens out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
from attrs import validators as v

Role = Literal["system", "user", "assistant", "tool"]


def _tuple_of_str(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(x) for x in value)


def _positive_or_none(instance: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen(kw_only=True)
class LoadConfig:
    """How a runtime loads a model.

    ``None`` means "let the runtime (or rocmux's memory fit) decide".
    ``extra_flags`` are passed to the runtime verbatim, after validation by its plugin.
    """

    gpu_layers: int | None = attrs.field(default=None)
    context_len: int | None = attrs.field(default=None, validator=_positive_or_none)
    parallel: int | None = attrs.field(default=None, validator=_positive_or_none)
    flash_attn: bool | None = None
    threads: int | None = attrs.field(default=None, validator=_positive_or_none)
    devices: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    extra_flags: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)

    @gpu_layers.validator
    def _check_gpu_layers(self, attribute: attrs.Attribute[Any], value: int | None) -> None:
        if value is not None and value < 0:
            raise ValueError(f"gpu_layers must be >= 0 (or None for all), got {value!r}")


@attrs.frozen(kw_only=True)
class GenerateConfig:
    """Sampling settings for one request. ``None`` leaves the runtime's default."""

    max_tokens: int | None = attrs.field(default=256, validator=_positive_or_none)
    temperature: float | None = attrs.field(default=None, validator=v.optional(v.ge(0.0)))
    top_p: float | None = attrs.field(default=None, validator=v.optional([v.ge(0.0), v.le(1.0)]))
    top_k: int | None = attrs.field(default=None, validator=v.optional(v.ge(0)))
    min_p: float | None = attrs.field(default=None, validator=v.optional([v.ge(0.0), v.le(1.0)]))
    seed: int | None = None
    stop: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    repeat_penalty: float | None = attrs.field(default=None, validator=v.optional(v.gt(0.0)))
    ignore_eos: bool = attrs.field(default=False, validator=v.instance_of(bool))
    """Keep generating past end-of-generation tokens up to ``max_tokens`` (benchmarks).
    Sent as llama-server's and vLLM's ``ignore_eos``; a runtime without it stops at EOS."""

    @classmethod
    def greedy(cls, max_tokens: int = 256, seed: int = 0) -> GenerateConfig:
        """Deterministic decoding: temperature 0 with a fixed seed."""
        return cls(max_tokens=max_tokens, temperature=0.0, seed=seed)

    def to_openai(self) -> dict[str, Any]:
        """The request fields of the OpenAI API (plus the common llama.cpp extensions)."""
        body: dict[str, Any] = {}
        for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.stop:
            body["stop"] = list(self.stop)
        if self.repeat_penalty is not None:
            body["repeat_penalty"] = self.repeat_penalty
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


@attrs.frozen
class Message:
    """One chat message."""

    role: Role = attrs.field(validator=v.in_(("system", "user", "assistant", "tool")))
    content: str = attrs.field(validator=v.instance_of(str))

    def to_openai(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@attrs.frozen(kw_only=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class Token:
    """A piece of streamed output.

    ``text`` may be empty on the final event, which carries ``finish_reason`` and,
    when the runtime reports them, ``usage`` and ``timings`` (runtime-specific keys,
    e.g. llama.cpp's ``predicted_per_second``).
    """

    text: str
    finish_reason: str | None = None
    usage: Usage | None = attrs.field(default=None, kw_only=True)
    timings: Mapping[str, float] | None = attrs.field(default=None, kw_only=True)


@attrs.frozen(kw_only=True)
class Device:
    """A compute device as a backend sees it."""

    id: str
    name: str
    kind: Literal["rocm", "cuda", "vulkan", "metal", "cpu"]
    memory_total: int | None = None
    memory_free: int | None = None


@attrs.frozen(kw_only=True)
class Availability:
    """The result of a backend's detection.

    ``reason`` always says why: what was found when ``ok``, what is missing when not.
    Higher ``priority`` wins when several backends are available.
    """

    ok: bool
    reason: str
    priority: int = 0
    devices: tuple[Device, ...] = attrs.field(default=(), converter=tuple)
    version: str | None = None

    @classmethod
    def unavailable(cls, reason: str) -> Availability:
        return cls(ok=False, reason=reason, priority=0)
