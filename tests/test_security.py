"""What ``rocmux serve`` lets a client do, and what it does not: loopback by default,
API keys compared in constant time and required for the admin endpoints, model names
that resolve only to configured models, runtime flags that never come from requests,
no shell between rocmux and a runtime, size and token limits, and bad input (fuzzed
with hypothesis) that always gets a 4xx in OpenAI's error shape, never a 5xx or a hang.

Traffic goes to 127.0.0.1 only; ``0.0.0.0`` is bound for an instant, with no traffic.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rocmux import http_api
from rocmux.config import Config, Limits, ServerSettings
from rocmux.http_api import Api, Metrics
from rocmux.manager import PluginManager
from rocmux.pool import ModelPool
from rocmux.supervisor import free_port
from starlette.requests import Request
from test_serve import running, tiny

pytestmark = pytest.mark.llama_server

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def serving(
    entries: list[Any], limits: Limits | None = None, server: ServerSettings | None = None
) -> Iterator[tuple[str, ModelPool]]:
    """``running`` on its own event loop in a thread, for synchronous tests (hypothesis)."""
    ready, stop = threading.Event(), threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        async with running(entries, limits, server) as (url, pool):
            box["url"], box["pool"] = url, pool
            ready.set()
            while not stop.is_set():
                await anyio.sleep(0.05)

    def target() -> None:
        try:
            anyio.run(main)
        except BaseException as exc:
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=target, name="rocmux-serve-test")
    thread.start()
    try:
        assert ready.wait(60), "the server did not start"
        assert "error" not in box, box.get("error")
        yield box["url"], box["pool"]
    finally:
        stop.set()
        thread.join(60)
    assert "error" not in box, box.get("error")


def openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert set(error) == {"message", "type", "param", "code"}
    return error


# -- where it listens -----------------------------------------------------------------------


def _serve(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rocmux.cli", "serve", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until_banner(proc: subprocess.Popen[str]) -> list[str]:
    lines: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("rocmux serve: http://"):
            return lines
    raise AssertionError(f"no banner: {''.join(lines)}")


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on ``port`` (from /proc/net/tcp)."""
    found = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = row.split()[1], row.split()[3]
        address, hexport = local.split(":")
        if state == "0A" and int(hexport, 16) == port:
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_loopback_by_default_and_a_warning_when_exposed_without_a_key(tmp_path, tiny_model):
    assert ServerSettings().host == "127.0.0.1"
    assert Config.from_mapping({}).server.host == "127.0.0.1"
    empty = tmp_path / "rocmux.toml"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "ROCMUX_API_KEYS"}
    env["ROCMUX_CONFIG"] = str(empty)
    model = ["-m", str(tiny_model)]
    ports = [free_port() for _ in range(3)]
    runs = {
        "default": ["--port", str(ports[0]), *model],
        "exposed": ["--host", "0.0.0.0", "--port", str(ports[1]), *model],
        "exposed-with-key": ["--host", "0.0.0.0", "--port", str(ports[2]), *model],
    }
    procs = {}
    for name, args in runs.items():
        extra = {"ROCMUX_API_KEYS": "sk-test"} if name == "exposed-with-key" else {}
        procs[name] = _serve(args, {**env, **extra})
    try:
        out = {}
        for name, proc in procs.items():
            out[name] = "".join(_read_until_banner(proc))
            if name != "default":
                # Bound to 0.0.0.0 for an instant only: no traffic, stop at once.
                proc.send_signal(signal.SIGTERM)
        assert "WARNING" in out["exposed"] and "no API key" in out["exposed"]
        assert "WARNING" not in out["exposed-with-key"]
        assert "WARNING" not in out["default"]
        url = f"http://127.0.0.1:{ports[0]}/health"
        for _ in range(600):
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                threading.Event().wait(0.05)
        assert _listening_addresses(ports[0]) == {"127.0.0.1"}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- keys -----------------------------------------------------------------------------------


def _request(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def test_api_keys_are_compared_in_constant_time(monkeypatch, tiny_model):
    """Every configured key is compared, with ``hmac.compare_digest``, whatever the
    token: no ``==`` on secrets, no early exit that timing could reveal."""
    source = textwrap.dedent(inspect.getsource(Api._authorized))
    tree = ast.parse(source)
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    names = {n.id for c in compares for n in ast.walk(c) if isinstance(n, ast.Name)}
    assert not names & {"token", "key"}, f"a secret compared with an operator in {source}"
    assert "hmac.compare_digest" in source
    (loop,) = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
    assert ast.unparse(loop.iter) == "self.settings.api_keys"
    assert not any(isinstance(n, ast.Break | ast.Return) for n in ast.walk(loop))

    calls: list[tuple[bytes, bytes]] = []
    real = http_api.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(http_api.hmac, "compare_digest", counting)
    keys = ("sk-first", "sk-second-longer", "sk-3")
    pool = ModelPool([tiny(tiny_model)], Limits(), PluginManager.discover(entry_points=False))
    api = Api(pool, ServerSettings(api_keys=keys), Metrics())
    try:
        for header, expected in (
            ("Bearer sk-first", True),  # the first key: the others are still compared
            ("Bearer sk-3", True),
            ("Bearer sk-firs", False),  # a prefix
            ("Bearer " + "x" * 1000, False),  # any length
            ("Bearer sk-first ", False),
        ):
            calls.clear()
            assert api._authorized(_request(header)) is expected, header
            assert [b for _, b in calls] == [k.encode() for k in keys], header
        for header in (None, "sk-first", "Basic sk-first", "Bearer "):
            assert api._authorized(_request(header)) is False
    finally:
        anyio.run(api.aclose)


def test_admin_and_api_need_the_key_when_keys_are_set(tiny_model):
    with serving([tiny(tiny_model)], server=ServerSettings(api_keys=("sk-admin",))) as (url, _):
        good = {"authorization": "Bearer sk-admin"}
        bad = {"authorization": "Bearer sk-wrong"}
        with httpx.Client(base_url=url, timeout=60) as client:
            for headers in ({}, bad):
                openai_error(client.get("/admin/instances", headers=headers), 401)
                openai_error(client.post("/admin/instances/x/unload", headers=headers), 401)
                openai_error(client.get("/v1/models", headers=headers), 401)
                r = client.post(
                    "/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=headers
                )
                assert openai_error(r, 401)["code"] == "invalid_api_key"
            assert client.get("/admin/instances", headers=good).json() == {"instances": []}
            openai_error(client.post("/admin/instances/x/unload", headers=good), 404)
            assert client.get("/health").status_code == 200


# -- names, flags, shells ------------------------------------------------------------------

TRAVERSALS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "....//....//etc/passwd",
    "tiny/../tiny",
    "./tiny",
    "tiny\x00",
    "TINY",
    " tiny",
    "file:///etc/passwd",
    "~/.ssh/id_rsa",
    "C:\\Windows\\win.ini",
    str(Path(__file__)),
]


def test_model_names_resolve_only_to_configured_models(tiny_model):
    with serving([tiny(tiny_model)]) as (url, pool), httpx.Client(base_url=url, timeout=60) as c:
        names = [*TRAVERSALS, str(tiny_model), tiny_model.name, tiny_model.stem + "x"]
        for name in names:
            for path, body in (
                ("/v1/completions", {"model": name, "prompt": "x"}),
                ("/v1/chat/completions", {"model": name, "messages": [{"role": "user"}]}),
                ("/v1/embeddings", {"model": name, "input": "x"}),
            ):
                error = openai_error(c.post(path, json=body), 404)
                assert error["code"] == "model_not_found" and error["param"] == "model"
        # Paths: encoded traversal in the URL reaches no file and no other route.
        for path in (
            "/admin/instances/..%2F..%2Fetc%2Fpasswd/unload",
            "/admin/instances/%2e%2e/unload",
        ):
            openai_error(c.post(path), 404)
        for path in ("/v1/../../etc/passwd", "/v1/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd"):
            r = c.get(path)
            assert r.status_code == 404 and "root:" not in r.text
        assert not pool.instances  # nothing was loaded for any of them
        assert set(pool._resolved) <= {"tiny"}


def _cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def test_runtime_flags_never_come_from_requests(tiny_model):
    with serving([tiny(tiny_model)]) as (url, pool), httpx.Client(base_url=url, timeout=60) as c:
        ok = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        assert c.post("/v1/completions", json=ok).status_code == 200
        (instance,) = pool.instances.values()
        pid = instance.model.server.pid
        before = _cmdline(pid)
        hostile = {
            "--model": "/etc/passwd",
            "n_gpu_layers": 99,
            "ctx_size": 1,
            "extra_flags": ["--port", "1", "--model", "/etc/passwd"],
            "args": ["--ctx-size", "1"],
            "model_path": "/etc/passwd",
            "load": {"context_len": 1},
            "backend": "vllm_rocm",
        }
        r = c.post("/v1/completions", json={**ok, **hostile})
        assert r.status_code in (200, 400), r.text
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 2,
                **hostile,
            },
        )
        assert r.status_code in (200, 400), r.text
        openai_error(c.post("/v1/completions", json={**ok, "model": "tiny --ctx-size 1"}), 404)
        (after,) = pool.instances.values()
        assert after.model.server.pid == pid  # not restarted with other flags
        assert _cmdline(pid) == before
        assert b"/etc/passwd" not in b" ".join(before)


SHELL = re.compile(
    r"shell\s*=\s*True|os\.system\(|os\.popen\(|create_subprocess_shell|"
    r"subprocess\.getoutput|subprocess\.getstatusoutput|os\.exec\w*p?e?\(\s*['\"]/bin/sh"
)
SPAWNERS = {"Popen", "run", "call", "check_call", "check_output", "create_subprocess_exec"}


def test_no_shell_is_used_to_spawn_anything():
    sources = [
        *sorted((ROOT / "core" / "src").rglob("*.py")),
        *sorted((ROOT / "plugins").glob("*/src/**/*.py")),
    ]
    assert len(sources) > 20
    for path in sources:
        text = path.read_text(encoding="utf-8")
        assert not SHELL.search(text), f"{path}: {SHELL.search(text)}"
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in SPAWNERS or not node.args:
                continue
            # A command given as one string would need a shell to split it.
            first = node.args[0]
            is_string = isinstance(first, ast.JoinedStr) or (
                isinstance(first, ast.Constant) and isinstance(first.value, str)
            )
            assert not is_string, f"{path}:{node.lineno}: a command line as one string"
            assert not any(k.arg == "shell" for k in node.keywords), f"{path}:{node.lineno}"


# -- limits ---------------------------------------------------------------------------------


def test_token_and_size_limits(tiny_model):
    server = ServerSettings(max_tokens_limit=8, max_body_bytes=4096)
    with (
        serving([tiny(tiny_model)], server=server) as (url, _),
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        base = {"model": "tiny", "prompt": "x", "ignore_eos": True}
        for field, value in (
            ("max_tokens", 9),
            ("max_completion_tokens", 100),
            ("n_predict", -1),  # llama-server's "no end"
            ("n_predict", 10_000),
        ):
            error = openai_error(c.post("/v1/completions", json={**base, field: value}), 400)
            assert error["param"] == field
            assert "at most 8" in error["message"]
        error = openai_error(c.post("/v1/completions", json={**base, "max_tokens": 0}), 400)
        assert error["param"] == "max_tokens"
        r = c.post("/v1/completions", json=base)  # none asked: the limit applies
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        r = c.post("/v1/completions", json={**base, "max_tokens": 8})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
        openai_error(c.post("/v1/chat/completions", json={**chat, "max_tokens": 9}), 400)

        # Bodies over max_body_bytes: declared, or chunked with no declared length.
        big = json.dumps({**base, "prompt": "x" * 5000}).encode()
        openai_error(c.post("/v1/completions", content=big), 413)

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(big), 512):
                yield big[i : i + 512]

        openai_error(c.post("/v1/completions", content=chunks()), 413)


# -- bad input, fuzzed ---------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values,
        "content": st.text(max_size=16) | json_values,
        "name": json_values,
    },
)
# Sampling and llama-server fields, with plausible values or anything at all.
extras = {
    "max_tokens": st.integers(-3, 12) | json_values,
    "n_predict": st.integers(-3, 12) | json_values,
    "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
    "top_p": st.floats(-1, 2, allow_nan=False) | json_values,
    "top_k": st.integers(-5, 100) | json_values,
    "min_p": json_values,
    "seed": st.integers(-(2**40), 2**40) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "stop": st.lists(st.text(max_size=4), max_size=3) | st.text(max_size=4) | json_values,
    "logit_bias": st.dictionaries(st.integers(-5, 70000).map(str), st.floats(-100, 100))
    | json_values,
    "n_probs": st.integers(-2, 5) | json_values,
    "logprobs": st.booleans() | json_values,
    "top_logprobs": st.integers(-2, 30) | json_values,
    "n": st.integers(-1, 3) | json_values,
    "presence_penalty": json_values,
    "frequency_penalty": json_values,
    "repeat_penalty": json_values,
    "grammar": st.sampled_from(['root ::= "a"', "root ::=", "nonsense", ""]) | json_values,
    "json_schema": st.sampled_from([{}, {"type": "object"}, {"type": 5}]) | json_values,
    "response_format": st.sampled_from(
        [{"type": "json_object"}, {"type": "json_schema"}, {"type": "text"}, {"type": "x"}]
    )
    | json_values,
    "tools": json_values,
    "tool_choice": json_values,
    "samplers": st.lists(st.sampled_from(["top_k", "temperature", "x"]), max_size=3) | json_values,
    "cache_prompt": json_values,
    "id_slot": st.integers(-2, 8) | json_values,
    "ignore_eos": st.booleans() | json_values,
    "echo": json_values,
    "user": json_values,
}


def with_extras(base: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` plus up to three of ``extras``, so that many requests stay valid."""
    names = st.lists(st.sampled_from(sorted(extras)), max_size=3, unique=True)
    return st.tuples(base, names).flatmap(
        lambda pair: st.fixed_dictionaries({k: extras[k] for k in pair[1]}).map(
            lambda more: {**pair[0], **more}
        )
    )


completion = with_extras(
    st.fixed_dictionaries(
        {
            "model": st.sampled_from(["tiny", "tiny", "default", "../tiny"]),
            "prompt": st.text(max_size=16)
            | st.lists(st.integers(-5, 70000), max_size=4)
            | json_values,
        }
    )
)
chat = with_extras(
    st.fixed_dictionaries(
        {
            "model": st.just("tiny"),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "assistant"])},
                    optional={"content": st.text(max_size=16) | json_values},
                ),
                min_size=1,
                max_size=3,
            )
            | st.lists(message, max_size=3),
        }
    )
)
embedding = st.fixed_dictionaries(
    {"model": st.just("tiny"), "input": st.text(max_size=8) | json_values},
    optional={"encoding_format": json_values, "dimensions": json_values},
)
anything = (
    st.fixed_dictionaries(
        {},
        optional={"model": st.sampled_from(["tiny", ""]) | json_values, **extras},
    )
    | json_values
)
# (path, body): mostly well-formed requests with odd fields, so that most of them reach
# the runtime; some sent to the wrong endpoint; some anything at all.
requests = (
    st.tuples(st.just("/v1/completions"), completion)
    | st.tuples(st.just("/v1/chat/completions"), chat)
    | st.tuples(st.just("/v1/embeddings"), embedding)
    | st.tuples(
        st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]),
        completion | chat | anything,
    )
)
raw_bodies = st.binary(max_size=64) | st.text(max_size=64).map(str.encode)


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        openai_error(r, r.status_code)
    elif "text/event-stream" in r.headers.get("content-type", ""):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events, r.text[:200]
        last = events[-1] if events[-1] != "[DONE]" else events[-2]
        assert "error" not in json.loads(last), last


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def test_fuzzed_requests_get_4xx_openai_errors_never_5xx_or_a_hang(tiny_model):
    limits = Limits(stall_timeout=20.0)
    server = ServerSettings(max_tokens_limit=4, max_body_bytes=1 << 16)
    with (
        serving([tiny(tiny_model)], limits, server) as (url, pool),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        assert (
            client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 200
        )
        (instance,) = pool.instances.values()
        pid = instance.model.server.pid
        endpoints = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])

        @FUZZ
        @given(requests)
        def json_bodies(request: tuple[str, object]) -> None:
            path, body = request
            _check(client.post(path, content=json.dumps(body).encode()))

        @FUZZ
        @given(endpoints, raw_bodies, st.sampled_from(["application/json", "text/plain", ""]))
        def raw(path: str, body: bytes, kind: str) -> None:
            _check(client.post(path, content=body, headers={"content-type": kind}))

        json_bodies()
        raw()
        # The runtime never died on any of it.
        (after,) = pool.instances.values()
        assert after.model.server.pid == pid and after.crashes == 0
