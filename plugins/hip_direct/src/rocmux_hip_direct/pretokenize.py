"""Pre-tokenization as llama.cpp's ``unicode_regex_split`` does it.

Each regex splits the pieces the previous one made; text between matches is kept as
pieces of its own. The GPT-2 and llama3 patterns use hand-written scanners (ported
from llama.cpp's ``unicode.cpp``), the others run Python's ``re`` on a "collapsed"
copy of the text in which every non-ASCII codepoint is replaced by one byte naming its
Unicode category, exactly as llama.cpp feeds ``std::regex``; this keeps the
``\\p{L}``-style classes without a Unicode-aware regex engine.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# Category flags, as llama.cpp's unicode_cpt_flags.
UNDEFINED = 0x0001
NUMBER = 0x0002
LETTER = 0x0004
SEPARATOR = 0x0008
ACCENT_MARK = 0x0010
PUNCTUATION = 0x0020
SYMBOL = 0x0040
CONTROL = 0x0080
WHITESPACE = 0x0100

_CATEGORY = {
    "N": NUMBER,
    "L": LETTER,
    "Z": SEPARATOR,
    "M": ACCENT_MARK,
    "P": PUNCTUATION,
    "S": SYMBOL,
    "C": CONTROL,
}
# Unicode's White_Space property (PropList.txt), which llama.cpp's table uses; Python's
# str.isspace() also counts U+001C..U+001F, which this must not.
_WHITESPACE = frozenset(
    (*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029)
) | {0x202F, 0x205F, 0x3000}

GPT2_PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
LLAMA3_PATTERNS = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
)
_QWEN2 = (
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

# ``tokenizer.ggml.pre`` -> the regexes llama.cpp applies, in order (llm_tokenizer_bpe).
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (
        "[\\p{P}\\$\\+<=>\\^~\\|]+",
        GPT2_PATTERN,
        "\\p{N}+",
        "[0-9][0-9][0-9]",
    ),
    "llama3": (LLAMA3_PATTERNS[1],),
    "gpt2": (GPT2_PATTERN,),
    "starcoder": ("\\p{N}", GPT2_PATTERN),
    "qwen2": (_QWEN2,),
    "falcon": ("[\\p{P}\\$\\+<=>\\^~\\|`]+", GPT2_PATTERN, "[0-9][0-9][0-9]"),
}
# Aliases, as llama_vocab::impl::load maps names to pre-tokenizer types.
_PRE_ALIASES = {
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "falcon3": "llama3",
    "pixtral": "llama3",
    "dbrx": "llama3",
    "smaug-bpe": "llama3",
    "gpt-2": "gpt2",
    "phi-2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "jais": "gpt2",
    "exaone4": "gpt2",
    "starcoder": "starcoder",
    "refact": "starcoder",
    "command-r": "starcoder",
    "smollm": "starcoder",
    "codeshell": "starcoder",
    "exaone": "starcoder",
    "minerva-7b": "starcoder",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "stablelm2": "qwen2",
    "megrez": "qwen2",
    "falcon": "falcon",
    "default": "default",
}


def pre_tokenizer_regexes(pre: str | None) -> tuple[str, ...]:
    """The regexes for a ``tokenizer.ggml.pre`` value; ``ValueError`` if unsupported."""
    if not pre:
        return PRE_TOKENIZERS["default"]
    try:
        return PRE_TOKENIZERS[_PRE_ALIASES[pre]]
    except KeyError:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported by hip_direct yet") from None


@lru_cache(maxsize=65536)
def cpt_flags(cpt: int) -> int:
    """llama.cpp's category and whitespace flags of a codepoint."""
    if cpt > 0x10FFFF:
        return UNDEFINED
    category = unicodedata.category(chr(cpt))
    flags = UNDEFINED if category == "Cn" else _CATEGORY[category[0]]
    if cpt in _WHITESPACE:
        flags |= WHITESPACE
    return flags


def _split_gpt2(cpts: list[int], offsets: list[int]) -> list[int]:
    """llama.cpp's unicode_regex_split_custom_gpt2."""
    out: list[int] = []
    start = 0
    for length in offsets:
        ini, end = start, start + length
        start = end

        def flags(pos: int, ini: int = ini, end: int = end) -> int:
            return cpt_flags(cpts[pos]) if ini <= pos < end else 0

        def cpt_at(pos: int, ini: int = ini, end: int = end) -> int:
            return cpts[pos] if ini <= pos < end else -1

        prev = ini

        def add(stop: int) -> int:
            nonlocal prev
            n = stop - prev
            if n > 0:
                out.append(n)
            prev = stop
            return n

        pos = ini
        while pos < end:
            cpt = cpts[pos]
            f = flags(pos)
            if cpt == 0x27 and pos + 1 < end:  # 's 't 'm 'd 're 've 'll
                nxt = cpt_at(pos + 1)
                if nxt in (0x73, 0x74, 0x6D, 0x64):
                    pos += add(pos + 2)
                    continue
                if pos + 2 < end:
                    pair = (nxt, cpt_at(pos + 2))
                    if pair in ((0x72, 0x65), (0x76, 0x65), (0x6C, 0x6C)):
                        pos += add(pos + 3)
                        continue
            f2 = flags(pos + 1) if cpt == 0x20 else f
            if f2 & LETTER:
                pos += cpt == 0x20
                while f2 & LETTER:
                    pos += 1
                    f2 = flags(pos)
                add(pos)
                continue
            if f2 & NUMBER:
                pos += cpt == 0x20
                while f2 & NUMBER:
                    pos += 1
                    f2 = flags(pos)
                add(pos)
                continue
            if not (f2 & (WHITESPACE | LETTER | NUMBER)) and f2:
                pos += cpt == 0x20
                while not (f2 & (WHITESPACE | LETTER | NUMBER)) and f2:
                    pos += 1
                    f2 = flags(pos)
                add(pos)
                continue
            n_ws = 0
            while flags(pos + n_ws) & WHITESPACE:
                n_ws += 1
            if n_ws > 1 and cpt_at(pos + n_ws) != -1:  # \s+(?!\S)
                pos += n_ws - 1
                add(pos)
                continue
            if n_ws > 0:
                pos += n_ws
                add(pos)
                continue
            pos += 1
            add(pos)
    return out


def _lower(cpt: int) -> int:
    low = chr(cpt).lower()
    return ord(low) if len(low) == 1 else cpt


def _split_llama3(cpts: list[int], offsets: list[int]) -> list[int]:
    """llama.cpp's unicode_regex_split_custom_llama3."""
    out: list[int] = []
    start = 0
    for length in offsets:
        ini, end = start, start + length
        start = end

        def flags(pos: int, ini: int = ini, end: int = end) -> int:
            return cpt_flags(cpts[pos]) if ini <= pos < end else 0

        def cpt_at(pos: int, ini: int = ini, end: int = end) -> int:
            return cpts[pos] if ini <= pos < end else -1

        prev = ini

        def add(stop: int) -> int:
            nonlocal prev
            n = stop - prev
            if n > 0:
                out.append(n)
            prev = stop
            return n

        pos = ini
        while pos < end:
            cpt = cpts[pos]
            f = flags(pos)
            if cpt == 0x27 and pos + 1 < end:
                nxt = _lower(cpt_at(pos + 1))
                if nxt in (0x73, 0x74, 0x6D, 0x64):
                    pos += add(pos + 2)
                    continue
                if pos + 2 < end:
                    pair = (nxt, _lower(cpt_at(pos + 2)))
                    if pair in ((0x72, 0x65), (0x76, 0x65), (0x6C, 0x6C)):
                        pos += add(pos + 3)
                        continue
            if not (cpt in (0x0D, 0x0A) or f & NUMBER) and (f & LETTER or flags(pos + 1) & LETTER):
                pos += 1
                while flags(pos) & LETTER:
                    pos += 1
                add(pos)
                continue
            if f & NUMBER:
                first = pos
                while flags(pos) & NUMBER:
                    pos += 1
                    if pos - first >= 3:
                        add(pos)
                        first = pos
                add(pos)
                continue
            f2 = flags(pos + 1) if cpt == 0x20 else f
            if not (f2 & (WHITESPACE | LETTER | NUMBER)) and f:
                pos += cpt == 0x20
                while not (f2 & (WHITESPACE | LETTER | NUMBER)) and f2:
                    pos += 1
                    f2 = flags(pos)
                while cpt_at(pos) in (0x0D, 0x0A):
                    pos += 1
                add(pos)
                continue
            n_ws = 0
            last_rn = 0
            while flags(pos + n_ws) & WHITESPACE:
                if cpt_at(pos + n_ws) in (0x0D, 0x0A):
                    last_rn = pos + n_ws + 1
                n_ws += 1
            if last_rn > 0:
                pos = last_rn
                add(pos)
                continue
            if n_ws > 1 and cpt_at(pos + n_ws) != -1:
                pos += n_ws - 1
                add(pos)
                continue
            if n_ws > 0:
                pos += n_ws
                add(pos)
                continue
            pos += 1
            add(pos)
    return out


# Collapsed stand-ins and the ASCII members of each category (unicode_regex_split).
_COLLAPSED = {
    NUMBER: "\xd1",
    LETTER: "\xd2",
    PUNCTUATION: "\xd3",
    ACCENT_MARK: "\xd4",
    SYMBOL: "\xd5",
}
_ASCII_MEMBERS = {
    NUMBER: "0-9",
    LETTER: "A-Za-z",
    PUNCTUATION: "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}",
    ACCENT_MARK: "",
    SYMBOL: "\\$\\+<->\\^`\\|",
}
_UCAT = {
    "\\p{N}": NUMBER,
    "\\p{L}": LETTER,
    "\\p{P}": PUNCTUATION,
    "\\p{M}": ACCENT_MARK,
    "\\p{S}": SYMBOL,
    "\\p{Lu}": LETTER,
    "\\p{Ll}": LETTER,
    "\\p{Lt}": LETTER,
    "\\p{Lm}": LETTER,
    "\\p{Lo}": LETTER,
}
_UCAT_RE = re.compile(r"\\p\{[A-Za-z]+\}")


@lru_cache(maxsize=64)
def _collapsed_regex(expr: str) -> re.Pattern[str]:
    """The regex with each ``\\p{..}`` replaced by its collapsed byte and ASCII members."""
    out = []
    inside = False
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch == "[" and (i == 0 or expr[i - 1] != "\\"):
            inside = True
            out.append(ch)
        elif inside and ch == "]" and expr[i - 1] != "\\":
            inside = False
            out.append(ch)
        elif (m := _UCAT_RE.match(expr, i)) and m.group() in _UCAT:
            cat = _UCAT[m.group()]
            body = _COLLAPSED[cat] + _ASCII_MEMBERS[cat]
            out.append(body if inside else f"[{body}]")
            i = m.end()
            continue
        else:
            out.append(ch)
        i += 1
    return re.compile("".join(out), re.ASCII)


def _collapse(cpts: list[int]) -> str:
    chars = []
    for cpt in cpts:
        if cpt < 128:
            chars.append(chr(cpt))
            continue
        f = cpt_flags(cpt)
        if f & WHITESPACE:
            chars.append("\x0b")
        else:
            chars.append(_COLLAPSED.get(f & 0xFF, "\xd0"))
    return "".join(chars)


def _split_regex(text: str, pattern: re.Pattern[str], offsets: list[int]) -> list[int]:
    """Matches and the gaps between them, within each piece (unicode_regex_split_stl)."""
    out: list[int] = []
    start = 0
    for length in offsets:
        last = 0
        for m in pattern.finditer(text, start, start + length):
            pos, n = m.start() - start, m.end() - m.start()
            if pos > last:
                out.append(pos - last)
            if n:
                out.append(n)
            last = pos + n
        if last < length:
            out.append(length - last)
        start += length
    return out


def regex_split(text: str, regexes: tuple[str, ...]) -> list[str]:
    """Split ``text`` into pre-tokens with llama.cpp's semantics."""
    cpts = [ord(c) for c in text]
    offsets = [len(cpts)]
    collapsed: str | None = None
    plain: str | None = None
    for expr in regexes:
        if expr == GPT2_PATTERN:
            offsets = _split_gpt2(cpts, offsets)
        elif expr in LLAMA3_PATTERNS:
            offsets = _split_llama3(cpts, offsets)
        elif _UCAT_RE.search(expr):
            if collapsed is None:
                collapsed = _collapse(cpts)
            offsets = _split_regex(collapsed, _collapsed_regex(expr), offsets)
        else:
            if plain is None:
                # std::wregex's \s knows only ASCII whitespace: others become \v.
                plain = "".join(
                    "\x0b" if ord(c) > 0x7F and cpt_flags(ord(c)) & WHITESPACE else c for c in text
                )
            offsets = _split_regex(plain, re.compile(expr, re.ASCII), offsets)
    words = []
    start = 0
    for n in offsets:
        words.append(text[start : start + n])
        start += n
    return words
