# ruff: noqa: RUF001
# (the corpus holds look-alike characters on purpose)
"""hip_direct against a real llama-server: tokenizer ids, chat-template text and greedy
generations on the default model (SmolLM2-135M-Instruct, GPT-2 BPE "smollm"), plus the
SentencePiece tokenizer of the tiny factory model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import httpx
import pytest
from rocmux.types import LoadConfig

pytest.importorskip("torch")

from rocmux_hip_direct.plugin import HipDirectBackend
from rocmux_llamacpp_hip.backend import LlamaCppBackend

pytestmark = [pytest.mark.anyio, pytest.mark.llama_server]

BENCH = Path(__file__).resolve().parent.parent / "bench" / "hip_direct_parity.py"

CORPUS = [
    "Hello world!",
    "  leading spaces and trailing   ",
    "café naïve résumé Ångström Ünïcödé",
    "😀 🚀 👍🏽 ❤️ 🇫🇷 👨‍👩‍👧",
    "中文分词测试，日本語のテキスト、한국어 텍스트",
    "def f(x):\n\treturn x**2  # comment\n\n\n",
    "numbers 1234567 3.14159 -42 1,000,000 ١٢٣",
    "tabs\t\tand\nnewlines\r\n and    multiple     spaces",
    "I'm you're he'll they've she'd it's DON'T",
    "<|im_start|>user\nhi<|im_end|>",
    "— “quotes” ‘single’ … ©®™ ½ ² ∑ ∞ ≠",
    "Привет мир, Γειά σου Κόσμε, مرحبا بالعالم, שלום עולם, नमस्ते दुनिया",
    "http://example.com/path?q=1&r=2#frag",
    "    indented code\n        more indented",
    "a\u00a0b\u2003c\u3000d e\u0301",
    "x = [1, 2, 3]; y = {'a': 1}",
    " ",
    "\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hello  \n there"},
        {"role": "assistant", "content": "Hi! 😀"},
        {"role": "user", "content": "Ça va? 中文"},
    ],
]
# Indented block tags and newlines after them: rendered differently unless blocks are
# trimmed as llama-server trims them.
WHITESPACE_TEMPLATE = (
    "{% for message in messages %}\n"
    "  {% if message['role'] == 'user' %}\n"
    "[U] {{ message['content'] }}\n"
    "  {% else %}\n"
    "[{{ message['role'] }}] {{ message['content'] | trim }}\n"
    "  {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}[A]{{ bos_token }}{% endif %}\n"
)
# Issue 5's target: at least 18 of the 20 greedy sequences exact. With
# --numerics llamacpp every layer computes llama.cpp's x86 CPU numbers bit for bit
# (bench/results/hip_direct_parity.json: 20 of 20 on this machine); the floor keeps
# the target rather than the perfect score, for CPUs whose llama.cpp build takes
# other SIMD paths. The first token must agree everywhere.
MIN_EXACT = 18
MIN_FIRST_TOKEN = 20
MAX_GAP_AT_DIVERGENCE = 1.0


def _bench():
    spec = importlib.util.spec_from_file_location("hip_direct_parity", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("hip_direct_parity", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def server(default_model, llama_server):
    served = await LlamaCppBackend().load(default_model, LoadConfig(context_len=512, parallel=1))
    async with served:
        yield served.url


@pytest.fixture(scope="module")
async def model(default_model):
    loaded = await HipDirectBackend().load(
        default_model,
        LoadConfig(
            gpu_layers=0,
            context_len=512,
            parallel=20,
            threads=1,
            extra_flags=("--numerics", "llamacpp"),
        ),
    )
    async with loaded:
        yield loaded


async def _tokenize(url: str, text: str, add_special: bool) -> list[int]:
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=60) as client:
        response = await client.post(
            "/tokenize", json={"content": text, "add_special": add_special}
        )
        response.raise_for_status()
        return response.json()["tokens"]


async def _apply_template(url: str, messages: list[dict[str, str]]) -> str:
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=60) as client:
        response = await client.post("/apply-template", json={"messages": messages})
        response.raise_for_status()
        return response.json()["prompt"]


async def test_bpe_tokenizer_ids_equal_llama_server(server, model):
    for text in CORPUS:
        for add_special in (False, True):
            expected = await _tokenize(server, text, add_special)
            assert model.tokenize(text, add_special=add_special) == expected, repr(text)


async def test_chat_template_text_equals_llama_server(server, model):
    for messages in CONVERSATIONS:
        assert model.template.render(messages) == await _apply_template(server, messages)


async def test_spm_tokenizer_and_trimmed_template_equal_llama_server(tmp_path, llama_server):
    from gguf_factory import TinyLlama, write_tiny_llama

    path = write_tiny_llama(tmp_path / "ws.gguf", TinyLlama(chat_template=WHITESPACE_TEMPLATE))
    served = await LlamaCppBackend().load(path, LoadConfig(context_len=256, parallel=1))
    loaded = await HipDirectBackend().load(path, LoadConfig(context_len=256, threads=1))
    async with served, loaded:
        for text in CORPUS:
            for add_special in (False, True):
                expected = await _tokenize(served.url, text, add_special)
                assert loaded.tokenize(text, add_special=add_special) == expected, repr(text)
        for messages in CONVERSATIONS:
            rendered = await _apply_template(served.url, messages)
            assert loaded.template.render(messages) == rendered


async def test_greedy_generations_match_llama_server(server, model):
    bench = _bench()
    theirs = await bench.llama_server_reference(server, bench.PROMPTS)
    ours = await bench.hip_direct_ids(model, bench.PROMPTS)
    result = bench.compare(bench.PROMPTS, ours, theirs)
    parted = [r for r in result["sequences"] if not r["match"]]
    summary = [(r["first_divergence"], r["hip_direct_gap"], r["llama_server_gap"]) for r in parted]
    assert result["matched"] >= MIN_EXACT, summary
    first_agree = sum(r["match"] or r["first_divergence"] > 0 for r in result["sequences"])
    assert first_agree >= MIN_FIRST_TOKEN, summary
    # Where they part, it is at a near-tie, not a wrong model.
    for row in parted:
        assert row["hip_direct_gap"] < MAX_GAP_AT_DIVERGENCE, row
