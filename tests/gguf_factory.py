"""Tiny llama-architecture GGUF files with random weights, which llama-server loads.

The vocabulary is a SentencePiece ("llama") one: ``<unk>``, ``<s>``, ``</s>``, the 256
byte-fallback tokens, the ChatML control tokens and a few hundred word pieces, so any
text tokenizes and the ChatML chat template renders. The rows of ``output.weight`` for
every token that is not a word piece are zero while the others are random, so greedy
decoding never picks an end-of-generation token (nor a byte or control token): a
completion runs to ``max_tokens`` and its text is valid UTF-8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs
import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
SPACE = "\u2581"  # SentencePiece's word-boundary mark

_WORD_TEXT = (
    "the be to of and a in that have I it for not on with he as you do at this but his by "
    "from they we say her she or an will my one all would there their what so up out if "
    "about who get which go me when make can like time no just him know take people into "
    "year your good some could them see other than then now look only come its over think "
    "also back after use two how our work first well way even new want because any these "
    "give day most us is are was were has had been hello world model test token server "
    "chat user assistant system yes ok thanks please answer question"
)
_WORDS = _WORD_TEXT.split()
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"-()[]/"
_TT = gguf.TokenType


@attrs.frozen(kw_only=True)
class TinyLlama:
    """Shape and content of a tiny llama model; ``n_vocab=None`` is the natural vocabulary."""

    n_vocab: int | None = None
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    context_length: int = 512
    seed: int = 0
    dtype: Literal["f32", "f16"] = "f32"
    name: str = "tiny-llama"
    chat_template: str | None = CHATML_TEMPLATE

    def __attrs_post_init__(self) -> None:
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError("n_embd must be n_head times an even head size")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")
        if min(self.n_layer, self.n_ff, self.context_length) < 1:
            raise ValueError("n_layer, n_ff and context_length must be positive")
        if self.dtype not in ("f32", "f16"):
            raise ValueError(f"dtype must be 'f32' or 'f16', not {self.dtype!r}")
        minimum = len(_fixed_tokens()) + 1
        if self.n_vocab is not None and self.n_vocab < minimum:
            raise ValueError(f"n_vocab must be at least {minimum}")

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.n_embd // self.n_head

    @property
    def vocab_size(self) -> int:
        """Number of tokens the written file has."""
        return len(vocabulary(self.n_vocab))


def _fixed_tokens() -> list[tuple[str, float, int]]:
    """Special, byte and ChatML tokens: (text, score, type), ids from 0."""
    tokens = [("<unk>", 0.0, _TT.UNKNOWN), ("<s>", 0.0, _TT.CONTROL), ("</s>", 0.0, _TT.CONTROL)]
    tokens += [(f"<0x{b:02X}>", 0.0, _TT.BYTE) for b in range(256)]
    tokens += [("<|im_start|>", 0.0, _TT.CONTROL), ("<|im_end|>", 0.0, _TT.CONTROL)]
    return tokens


def _pieces() -> list[str]:
    """Word pieces in an order where every piece's prefixes come before it."""
    pieces: dict[str, None] = {SPACE: None}
    for ch in _CHARS:
        pieces[ch] = None
        pieces[SPACE + ch] = None
    for word in _WORDS:
        piece = SPACE + word
        for end in range(2, len(piece) + 1):
            pieces[piece[:end]] = None
    return list(pieces)


def vocabulary(n_vocab: int | None = None) -> list[tuple[str, float, int]]:
    """The (text, score, token type) list; word pieces cut or ``<unused_N>`` added to fit."""
    tokens = _fixed_tokens()
    # SentencePiece merges by score; later (longer) pieces get lower scores, which is
    # fine since each is reachable through its prefix chain.
    tokens += [(p, -float(i), _TT.NORMAL) for i, p in enumerate(_pieces())]
    if n_vocab is None:
        return tokens
    if n_vocab <= len(tokens):
        return tokens[:n_vocab]
    extra = n_vocab - len(tokens)
    return tokens + [(f"<unused_{i}>", -1e9, _TT.UNUSED) for i in range(extra)]


def _tensors(spec: TinyLlama, types: np.ndarray) -> dict[str, np.ndarray]:
    """Weights shaped like PyTorch Linear weights (out, in); norms are ones."""
    rng = np.random.default_rng(spec.seed)
    wtype = np.float16 if spec.dtype == "f16" else np.float32
    n_vocab, d, kv = len(types), spec.n_embd, spec.n_head_kv * spec.head_dim

    def w(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(wtype)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)  # 1-D tensors stay f32 as converters write them

    out: dict[str, np.ndarray] = {"token_embd.weight": w(n_vocab, d)}
    for i in range(spec.n_layer):
        out[f"blk.{i}.attn_norm.weight"] = ones(d)
        out[f"blk.{i}.attn_q.weight"] = w(d, d)
        out[f"blk.{i}.attn_k.weight"] = w(kv, d)
        out[f"blk.{i}.attn_v.weight"] = w(kv, d)
        out[f"blk.{i}.attn_output.weight"] = w(d, d)
        out[f"blk.{i}.ffn_norm.weight"] = ones(d)
        out[f"blk.{i}.ffn_gate.weight"] = w(spec.n_ff, d)
        out[f"blk.{i}.ffn_up.weight"] = w(spec.n_ff, d)
        out[f"blk.{i}.ffn_down.weight"] = w(d, spec.n_ff)
    out["output_norm.weight"] = ones(d)
    # Logits spread about ±2 over word pieces; zero for all other tokens.
    output = w(n_vocab, d, scale=2.0 / np.sqrt(d))
    output[types != _TT.NORMAL] = 0
    out["output.weight"] = output
    return out


def _writer(path: Path, spec: TinyLlama) -> tuple[gguf.GGUFWriter, dict[str, np.ndarray]]:
    """A GGUFWriter with every key/value set, and the tensors still to add."""
    arch = "llama"
    vocab = vocabulary(spec.n_vocab)
    types = np.array([t for _, _, t in vocab], dtype=np.int32)

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(spec.name)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if spec.dtype == "f16" else gguf.LlamaFileType.ALL_F32
    )
    writer.add_vocab_size(len(vocab))
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)

    writer.add_tokenizer_model("llama")
    writer.add_token_list([text for text, _, _ in vocab])
    writer.add_token_scores([score for _, score, _ in vocab])
    writer.add_token_types([int(t) for t in types])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)
    return writer, _tensors(spec, types)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_llama(path: Path, spec: TinyLlama = TinyLlama()) -> Path:
    """Writes ``spec`` as one GGUF file at ``path`` and returns ``path``."""
    path = Path(path)
    writer, tensors = _writer(path, spec)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    _finish(writer)
    return path


def write_split(path_prefix: Path, spec: TinyLlama = TinyLlama(), parts: int = 2) -> list[Path]:
    """Writes ``spec`` as ``parts`` split files ``<prefix>-0000i-of-0000n.gguf``, in order.

    llama.cpp loads the whole model when given the first file.
    """
    path_prefix = Path(path_prefix)
    path = path_prefix.with_name(path_prefix.name + ".gguf")  # its stem is the prefix
    writer, tensors = _writer(path, spec)
    if not 2 <= parts <= len(tensors):
        raise ValueError(f"parts must be between 2 and {len(tensors)}")
    bounds = {len(tensors) * k // parts for k in range(1, parts)}
    for index, (name, array) in enumerate(tensors.items()):
        if index in bounds:
            writer.tensors.append({})  # start the next split file
        writer.add_tensor(name, array)
    files = writer.format_shard_names(path)
    _finish(writer)
    return files


LLAMA_3_2_1B_SHAPE = TinyLlama(
    n_embd=2048,
    n_layer=16,
    n_head=32,
    n_head_kv=8,
    n_ff=8192,
    n_vocab=128256,
    context_length=8192,
    dtype="f16",
    name="llama-3.2-1b-shape",
)
"""Llama-3.2-1B's shapes in f16 (output head untied), random weights: about 2.4 GiB,
for speed and memory runs on a GPU."""
