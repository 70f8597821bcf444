"""Tokenizers built from a GGUF vocabulary, with llama.cpp's exact behaviour.

Two kinds: ``gpt2`` (byte-level BPE with merges and a pre-tokenizer chosen by
``tokenizer.ggml.pre``) and ``llama`` (SentencePiece-style: score-ordered bigram
merges with byte fallback). Special tokens are split out first, as llama.cpp's
``tokenizer_st_partition`` does. Ported from llama.cpp's ``src/llama-vocab.cpp``.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from rocmux_hip_direct.pretokenize import pre_tokenizer_regexes, regex_split

# GGUF token types and the attributes llama.cpp derives from them.
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = (
    1,
    2,
    3,
    4,
    5,
    6,
)
ATTR_UNKNOWN = 1 << 1
ATTR_UNUSED = 1 << 2
ATTR_NORMAL = 1 << 3
ATTR_CONTROL = 1 << 4
ATTR_USER_DEFINED = 1 << 5
ATTR_BYTE = 1 << 6
_TYPE_TO_ATTR = {
    TYPE_NORMAL: ATTR_NORMAL,
    TYPE_UNKNOWN: ATTR_UNKNOWN,
    TYPE_CONTROL: ATTR_CONTROL,
    TYPE_USER_DEFINED: ATTR_USER_DEFINED,
    TYPE_UNUSED: ATTR_UNUSED,
    TYPE_BYTE: ATTR_BYTE,
}
SPACE_MARK = "\u2581"  # SentencePiece's escaped space

# Token texts llama.cpp treats as end of generation (llama_vocab::impl::load).
EOG_TEXTS = frozenset(
    [
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
    ]
)
# Fill-in-the-middle pad/repo/file-separator tokens, which llama.cpp also ends on.
FIM_EOG_TEXTS = frozenset(
    [
        "<|fim_pad|>",
        "<fim-pad>",
        "<fim_pad>",
        "<PAD>",
        "[PAD]",
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
        "<|file_sep|>",
    ]
)
EOT_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# Maps every UTF-8 byte to its GPT-2 character, for str.translate on latin-1 text.
_BYTE_TRANSLATION = {b: c for b, c in BYTE_TO_CHAR.items()}


@attrs.define(eq=False)
class Tokenizer:
    """Text <-> token ids for one vocabulary."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    scores: list[float]
    attrs_: list[int]
    merges: dict[tuple[str, str], int]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    pre: str | None
    regexes: tuple[str, ...] = ()
    ignore_merges: bool = False
    token_to_id: dict[str, int] = attrs.field(factory=dict)
    eog_ids: frozenset[int] = frozenset()
    special_ids: list[int] = attrs.field(factory=list)
    _pieces: list[bytes] = attrs.field(factory=list)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (``tokenizer.ggml.*`` keys)."""
        model = str(meta.get("tokenizer.ggml.model", "llama"))
        if model not in ("gpt2", "llama"):
            raise ValueError(f"tokenizer model {model!r} is not supported by hip_direct yet")
        tokens = list(meta["tokenizer.ggml.tokens"])
        n = len(tokens)
        scores_raw = meta.get("tokenizer.ggml.scores")
        scores = [float(x) for x in scores_raw] if scores_raw is not None else [0.0] * n
        types_raw = meta.get("tokenizer.ggml.token_type")
        types = [int(x) for x in types_raw] if types_raw is not None else [TYPE_NORMAL] * n
        attrs_ = [_TYPE_TO_ATTR.get(t, 0) for t in types]
        pre = meta.get("tokenizer.ggml.pre")
        merges: dict[tuple[str, str], int] = {}
        if model == "gpt2":
            add_bos, add_space_prefix, defaults = False, False, (11, 11, None)
            for rank, word in enumerate(meta.get("tokenizer.ggml.merges", [])):
                pos = word.find(" ", 1)
                if pos != -1:
                    merges.setdefault((word[:pos], word[pos + 1 :]), rank)
            regexes = pre_tokenizer_regexes(pre)
            ignore_merges = pre in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")
            if ignore_merges:
                add_bos = True
        else:
            add_bos, add_space_prefix, defaults = True, True, (1, 2, 0)
            regexes, ignore_merges = (), False
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", add_space_prefix))
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

        def special(key: str, default: int | None) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}_token_id", default)
            return int(value) if value is not None and 0 <= int(value) < n else default

        bos_id = special("bos", defaults[0])
        eos_id = special("eos", defaults[1])
        unk_id = special("unknown", defaults[2])
        eot_id = special("eot", None)
        token_to_id = {text: i for i, text in enumerate(tokens)}
        if eot_id is None:
            eot_id = next((token_to_id[t] for t in EOT_TEXTS if t in token_to_id), None)
        eog = {i for t, i in token_to_id.items() if t in EOG_TEXTS or t in FIM_EOG_TEXTS}
        for extra in (eos_id, eot_id, special("eom", None)):
            if extra is not None:
                eog.add(extra)
        for i in eog:  # llama.cpp forces EOG tokens to be control tokens
            attrs_[i] |= ATTR_CONTROL
        for i, text in enumerate(tokens):
            if attrs_[i] & ATTR_CONTROL and "unused" in text:
                attrs_[i] |= ATTR_UNUSED
        mask = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
        special_ids = [i for i in range(n) if attrs_[i] & mask]
        special_ids.sort(key=lambda i: -len(tokens[i].encode("utf-8", "surrogateescape")))
        tok = cls(
            model=model,
            tokens=tokens,
            scores=scores,
            attrs_=attrs_,
            merges=merges,
            bos_id=bos_id,
            eos_id=eos_id,
            eot_id=eot_id,
            unk_id=unk_id,
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=add_space_prefix,
            pre=pre,
            regexes=regexes,
            ignore_merges=ignore_merges,
            token_to_id=token_to_id,
            eog_ids=frozenset(eog),
            special_ids=special_ids,
        )
        tok._pieces = [tok._piece(i) for i in range(n)]
        return tok

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def is_eog(self, token: int) -> bool:
        return token in self.eog_ids

    def is_control(self, token: int) -> bool:
        return bool(self.attrs_[token] & ATTR_CONTROL)

    # -- encoding ---------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` (llama_tokenize)."""
        fragments: list[str | int] = [text] if text else []
        for special in self.special_ids:
            if not parse_special and self.attrs_[special] & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue  # user-defined tokens are always split out
            fragments = _partition(fragments, self.tokens[special], special)
        out: list[int] = []
        if self.model == "llama":
            if add_special and self.add_bos and self.bos_id is not None:
                out.append(self.bos_id)
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._encode_spm(frag.replace(" ", SPACE_MARK), out)
                prev_special = False
        else:
            if add_special and self.add_bos and self.bos_id is not None:
                out.append(self.bos_id)
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._encode_bpe(frag, out)
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _byte_token(self, byte: int) -> int:
        if self.model == "llama":
            token = self.token_to_id.get(f"<0x{byte:02X}>")
            if token is not None:
                return token
            return self.token_to_id[bytes([byte]).decode("latin-1")]
        return self.token_to_id[BYTE_TO_CHAR[byte]]

    def _encode_spm(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize."""
        # Each symbol: [start, length, prev, next]; lengths are in characters, which is
        # what llama.cpp's UTF-8 byte lengths amount to for valid text.
        n = len(text)
        if n == 0:
            return
        sym_start = list(range(n))
        sym_len = [1] * n
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        queue: list[tuple[float, int, int, int]] = []
        rev_merge: dict[str, tuple[int, int]] = {}
        token_to_id = self.token_to_id

        def add_bigram(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            s = sym_start[left]
            piece = text[s : s + sym_len[left] + sym_len[right]]
            token = token_to_id.get(piece)
            if token is None:
                return
            heapq.heappush(queue, (-self.scores[token], left, right, len(piece)))
            rev_merge[piece] = (left, right)

        for i in range(1, n):
            add_bigram(i - 1, i)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            if sym_len[left] == 0 or sym_len[right] == 0 or sym_len[left] + sym_len[right] != size:
                continue
            sym_len[left] += sym_len[right]
            sym_len[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, nxt[left])

        def resegment(index: int) -> None:
            s = sym_start[index]
            piece = text[s : s + sym_len[index]]
            token = token_to_id.get(piece)
            if token is not None:
                out.append(token)
                return
            pair = rev_merge.get(piece)
            if pair is None:
                out.extend(self._byte_token(b) for b in piece.encode("utf-8"))
                return
            resegment(pair[0])
            resegment(pair[1])

        i = 0
        while i != -1:
            resegment(i)
            i = nxt[i]

    def _encode_bpe(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_bpe_session::tokenize."""
        token_to_id = self.token_to_id
        for word in regex_split(text, self.regexes):
            encoded = word.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATION)
            if self.ignore_merges and encoded in token_to_id:
                out.append(token_to_id[encoded])
                continue
            for piece in self._bpe_word(encoded):
                token = token_to_id.get(piece)
                if token is not None:
                    out.append(token)
                    continue
                # llama.cpp looks up each UTF-8 byte of the piece as a one-byte string;
                # only ASCII bytes can be found that way.
                for b in piece.encode("utf-8"):
                    key = bytes([b]).decode("utf-8", "surrogateescape")
                    if key in token_to_id:
                        out.append(token_to_id[key])

    def _bpe_word(self, word: str) -> list[str]:
        """Merge the characters of one pre-token by rank, lowest first, leftmost first."""
        n = len(word)
        if n <= 1:
            return [word] if word else []
        merges = self.merges
        text = list(word)
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        queue: list[tuple[int, int, str, int]] = []

        def add_bigram(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            rank = merges.get((text[left], text[right]))
            if rank is not None:
                heapq.heappush(queue, (rank, left, text[left] + text[right], right))

        for i in range(1, n):
            add_bigram(i - 1, i)
        while queue:
            _, left, joined, right = heapq.heappop(queue)
            if not text[left] or not text[right] or text[left] + text[right] != joined:
                continue
            text[left] = joined
            text[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, nxt[left])
        return [t for t in text if t]

    # -- decoding ---------------------------------------------------------------------

    def _piece(self, token: int) -> bytes:
        """The bytes a token stands for when special tokens are not rendered."""
        attr = self.attrs_[token]
        text = self.tokens[token]
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN):
            return b""
        if attr & ATTR_USER_DEFINED:
            return text.encode("utf-8", "surrogateescape")
        if attr & ATTR_BYTE:
            if self.model == "gpt2" and len(text) == 1:
                return bytes([CHAR_TO_BYTE.get(text, 0)])
            return bytes([int(text[3:5], 16)])
        if attr & ATTR_NORMAL:
            if self.model == "llama":
                return text.replace(SPACE_MARK, " ").encode("utf-8", "surrogateescape")
            try:
                return bytes(CHAR_TO_BYTE[c] for c in text)
            except KeyError:
                return text.encode("utf-8", "surrogateescape")
        return b""

    def piece(self, token: int, special: bool = False) -> bytes:
        """Bytes of one token (llama_token_to_piece); control tokens only when ``special``."""
        if special and self.attrs_[token] & (ATTR_CONTROL | ATTR_UNKNOWN):
            return self.tokens[token].encode("utf-8", "surrogateescape")
        return self._pieces[token]

    def decode(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of ``tokens`` (invalid UTF-8 replaced)."""
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", "replace")


def _partition(fragments: list[str | int], special_text: str, special_id: int) -> list[str | int]:
    """Split every text fragment on occurrences of one special token."""
    out: list[str | int] = []
    for frag in fragments:
        if isinstance(frag, int) or special_text not in frag:
            out.append(frag)
            continue
        start = 0
        while True:
            hit = frag.find(special_text, start)
            if hit == -1:
                break
            if hit > start:
                out.append(frag[start:hit])
            out.append(special_id)
            start = hit + len(special_text)
        if start < len(frag):
            out.append(frag[start:])
    return out
