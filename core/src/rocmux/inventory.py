"""Model inventory: what a GGUF file holds, read from its header alone.

``ModelInfo.from_gguf`` reads the key/value section and the tensor infos of a GGUF
(and of every part of a split model) with a lean streaming parser; tensor data is never
read or mapped, so the cost is set by the header (mostly the tokenizer's string arrays),
not by the file size. ``gguf.GGUFReader`` is not used: it decodes every tokenizer array
and takes seconds on a 100 MB model. String arrays are skipped, not decoded: long ones
through a checked numpy walk (``_chain``), the rest one length at a time. ``scan`` lists
the models under files and folders, with an error for each file that cannot be read.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import gguf
import numpy as np  # gguf's own dependency, so already imported

from rocmux.errors import InvalidModel, ModelError, ModelNotFound
from rocmux.models import GGUF_MAGIC, SUPPORTED_VERSIONS

__all__ = ["ModelInfo", "ScanEntry", "scan"]

_VT = gguf.GGUFValueType
_K = gguf.Keys

# The first read covers the header of most models without a large vocabulary; reads
# double from there, so a 2 MB header costs a handful of them.
_FIRST_READ = 64 * 1024
# Each thread keeps its read buffer for the next file: filling fresh memory costs page
# faults (~2 ms for 4 MB on the test machine), reusing it costs nothing.
_KEEP_BUFFER = 16 * 1024 * 1024
# Real headers take a few MB (a 256k-token vocabulary about 6 MB); a count that reaches
# past this is corrupt, and the cap bounds the memory and time a corrupt file can cost.
_MAX_HEADER = 64 * 1024 * 1024
_scratch = threading.local()
# GGML_MAX_DIMS: llama.cpp refuses tensors with more dimensions.
_MAX_DIMS = 4
# Arrays of arrays are legal GGUF but no model nests deeper than this.
_MAX_NESTING = 3
# A length or size this large (1 TiB) is corrupt, not the sign of a cut-off file.
_ABSURD = 1 << 40
# String arrays this long are skipped with ``_chain``; after this many breaks in the
# chain (long strings) one array is left to the Python walk.
_VECTOR_MIN = 1024
_MAX_BREAKS = 16
# Bytes per ``_chain`` call at most: its arrays take up to 10 bytes per byte (a chunk of
# zeros marks every offset), so this bounds them to a few MB.
_CHUNK = 256 * 1024
# Small numeric arrays are decoded: some architectures store per-layer head counts.
_DECODE_ARRAY_MAX = 1024

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_U32_U64 = struct.Struct("<IQ")
# A tensor info after its name and dimension count, by dimension count: dims, type, offset.
_TENSOR_LAYOUTS = [struct.Struct(f"<{n}QIQ") for n in range(_MAX_DIMS + 1)]
_HEADER = struct.Struct("<4sIQQ")
_SCALARS: dict[int, struct.Struct] = {
    int(_VT.UINT8): struct.Struct("<B"),
    int(_VT.INT8): struct.Struct("<b"),
    int(_VT.UINT16): struct.Struct("<H"),
    int(_VT.INT16): struct.Struct("<h"),
    int(_VT.UINT32): struct.Struct("<I"),
    int(_VT.INT32): struct.Struct("<i"),
    int(_VT.FLOAT32): struct.Struct("<f"),
    int(_VT.BOOL): struct.Struct("<?"),
    int(_VT.UINT64): struct.Struct("<Q"),
    int(_VT.INT64): struct.Struct("<q"),
    int(_VT.FLOAT64): struct.Struct("<d"),
}
_STRING = int(_VT.STRING)
_ARRAY = int(_VT.ARRAY)
# ggml type id -> (name, elements per block, bytes per block)
_TENSOR_TYPES: dict[int, tuple[str, int, int]] = {
    int(t): (t.name, block, size) for t, (block, size) in gguf.GGML_QUANT_SIZES.items()
}
_FILE_TYPES: dict[int, str] = {
    int(t): t.name.removeprefix("MOSTLY_").removeprefix("ALL_") for t in gguf.LlamaFileType
}
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_TOKENS = _K.Tokenizer.LIST
_OUTPUTS = frozenset({"output.weight", "token_embd.weight"})
_BIG_ENDIAN = {int.from_bytes(v.to_bytes(4, "little"), "big") for v in SUPPORTED_VERSIONS}


# (name, ggml type name, elements, bytes): a plain tuple, as models have 100s to 1000s.
_Tensor = tuple[str, str, int, int]


@attrs.frozen
class _Array:
    """A skipped array value: its element type and length."""

    type: int
    count: int


@attrs.frozen(kw_only=True)
class _Part:
    """The header of one GGUF file."""

    path: Path
    size: int
    kv: dict[str, Any]
    tensors: list[_Tensor]  # in file order


class _Reader:
    """Parses one GGUF header; ``buf`` is a view of ``file[0:len(buf)]``, read as needed."""

    def __init__(self, path: Path, file: Any, size: int) -> None:
        self.path = path
        self.file = file
        self.size = size
        self.store: bytearray = getattr(_scratch, "store", None) or bytearray(_FIRST_READ)
        self.buf = memoryview(self.store)[:0]

    def close(self) -> None:
        """Keeps the buffer for this thread's next file, if it is not too big."""
        if len(self.store) <= _KEEP_BUFFER:
            _scratch.store = self.store

    # --- errors ---------------------------------------------------------------------

    def truncated(self, end: int) -> InvalidModel:
        return InvalidModel(
            f"{self.path} is truncated: its GGUF header needs at least {end} bytes but the "
            f"file has {self.size}; download or convert it again"
        )

    def corrupt(self, detail: str) -> InvalidModel:
        return InvalidModel(
            f"{self.path} has a corrupt GGUF header ({detail}); download or convert it again"
        )

    def check_fits(self, pos: int, n_bytes: int, what: str) -> None:
        """Raises unless ``n_bytes`` from ``pos`` lie within the file."""
        if pos + n_bytes <= self.size:
            return
        if n_bytes >= _ABSURD:
            raise self.corrupt(f"{what} at offset {pos} would take {n_bytes} bytes")
        # Short of absurd, a cut-off file and a wrong count look alike.
        raise InvalidModel(
            f"{self.path} is truncated or corrupt: {what} at offset {pos} runs to byte "
            f"{pos + n_bytes} but the file has {self.size}; download or convert it again"
        )

    # --- reading --------------------------------------------------------------------

    def need(self, end: int) -> memoryview:
        """The buffer, read on to at least ``end`` bytes."""
        filled = len(self.buf)
        if end <= filled:
            return self.buf
        if end > self.size:
            raise self.truncated(end)
        if end > _MAX_HEADER:
            raise self.corrupt(f"it runs past {_MAX_HEADER >> 20} MiB")
        target = min(self.size, _MAX_HEADER, max(end, 2 * filled, _FIRST_READ))
        if target > len(self.store):
            store = bytearray(min(_MAX_HEADER, max(target, 2 * len(self.store))))
            memoryview(store)[:filled] = self.buf  # a bytearray slice would copy it twice
            self.store = store
        view = memoryview(self.store)
        try:
            while filled < target:
                n = self.file.readinto(view[filled:target])
                if not n:  # the file shrank under us
                    raise self.truncated(end)
                filled += n
        except OSError as exc:
            raise InvalidModel(f"cannot read model file {self.path}: {exc.strerror}") from None
        self.buf = view[:filled]
        return self.buf

    def string(self, pos: int, what: str) -> tuple[str, int]:
        buf = self.need(pos + 8)
        (n,) = _U64.unpack_from(buf, pos)
        pos += 8
        self.check_fits(pos, n, f"{what} of length {n}")
        buf = self.need(pos + n)
        return self.store[pos : pos + n].decode("utf-8", "replace"), pos + n

    def value(self, pos: int, vtype: int, key: str, depth: int = 0) -> tuple[Any, int]:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            buf = self.need(pos + scalar.size)
            return scalar.unpack_from(buf, pos)[0], pos + scalar.size
        if vtype == _STRING:
            return self.string(pos, f"the string value of {_q(key)}")
        if vtype == _ARRAY:
            buf = self.need(pos + 12)
            etype, count = _U32_U64.unpack_from(buf, pos)
            return self.array(pos + 12, etype, count, key, depth)
        raise self.corrupt(f"key {_q(key)} has unknown value type {vtype}")

    def array(self, pos: int, etype: int, count: int, key: str, depth: int) -> tuple[Any, int]:
        what = f"array {_q(key)} of {count} items"
        scalar = _SCALARS.get(etype)
        if scalar is not None:
            n_bytes = count * scalar.size
            self.check_fits(pos, n_bytes, what)
            if count <= _DECODE_ARRAY_MAX:
                buf = self.need(pos + n_bytes)
                values = struct.unpack_from(f"<{count}{scalar.format[-1]}", buf, pos)
                return values, pos + n_bytes
            return _Array(etype, count), pos + n_bytes  # skipped by arithmetic
        if etype == _STRING:
            self.check_fits(pos, 8 * count, what)  # every string has an 8-byte length
            return _Array(etype, count), self.skip_strings(pos, count, key)
        if etype == _ARRAY and depth < _MAX_NESTING:
            self.check_fits(pos, 12 * count, what)
            for _ in range(count):
                buf = self.need(pos + 12)
                inner_type, inner_count = _U32_U64.unpack_from(buf, pos)
                _, pos = self.array(pos + 12, inner_type, inner_count, key, depth + 1)
            return _Array(etype, count), pos
        raise self.corrupt(f"array {_q(key)} has unsupported item type {etype}")

    def skip_strings(self, pos: int, count: int, key: str) -> int:
        """Position after ``count`` length-prefixed strings: the hot path of a scan.

        Tokenizer arrays hold 50k-400k strings. Long arrays go through ``_chain``
        (numpy, about 2.5 times faster) for as long as their strings have its common
        shape; the rest is walked in Python.
        """
        if count >= _VECTOR_MIN:
            pos, count = self.chain_strings(pos, count, key)
        return self.walk_strings(pos, count, key)

    def chain_strings(self, pos: int, count: int, key: str) -> tuple[int, int]:
        """Skips strings with ``_chain`` a chunk at a time; the position and count left."""
        per_string = 16.0  # bytes; a first guess, then what the chunks so far had
        breaks = 0
        while count and breaks < _MAX_BREAKS:
            # A chunk for the strings left, at the size seen so far; a little more, as
            # a chunk that stops short costs another round.
            want = int(min(max(count * per_string * 1.1, 16384), _CHUNK))
            limit = min(self.size, _MAX_HEADER, pos + want)
            if limit - pos < 64:
                break
            end, done, broke = _chain(self.need(limit), pos, count, limit - pos)
            if done:
                per_string = (end - pos) / done
                pos, count = end, count - done
            if broke or not done:
                # A string of 256 bytes or more (or seven zero bytes inside a string):
                # step over one string in Python and carry on.
                breaks += 1
                pos = self.walk_strings(pos, 1, key)
                count -= 1
        return pos, count

    def walk_strings(self, pos: int, count: int, key: str) -> int:
        """Position after ``count`` length-prefixed strings, walked in Python.

        The loop is as bare as Python allows: one bound ``unpack_from`` per string,
        unrolled by four, and no bounds check. Reading past the buffer raises
        ``struct.error``; the buffer then grows and the walk resumes at the start of
        the group of four that failed.
        """
        unpack = _U64.unpack_from
        while True:
            buf = self.buf
            group = 0
            start = pos
            try:
                for group in range(count >> 2):  # noqa: B007 (read after an error)
                    start = pos
                    pos += unpack(buf, pos)[0] + 8
                    pos += unpack(buf, pos)[0] + 8
                    pos += unpack(buf, pos)[0] + 8
                    pos += unpack(buf, pos)[0] + 8
                group = count >> 2
                start = pos
                for _ in range(count & 3):
                    pos += unpack(buf, pos)[0] + 8
            except (struct.error, OverflowError):  # past the buffer, or past any buffer
                failed = pos  # the start of the string whose length could not be read
                count -= 4 * group
                pos = start
                if failed + 8 > self.size:
                    raise self.past_end(failed, key) from None
                buf = None  # so that the old buffer can go once copied to a larger one
                self.need(failed + 8)
                continue
            if pos > self.size:
                raise self.past_end(pos, key)
            self.need(pos)
            return pos

    def past_end(self, pos: int, key: str) -> InvalidModel:
        if pos - self.size >= _ABSURD:
            return self.corrupt(f"a string in array {_q(key)} has an absurd length")
        return InvalidModel(
            f"{self.path} is truncated or corrupt: the strings of array {_q(key)} run past "
            f"the end of the file ({self.size} bytes); download or convert it again"
        )

    # --- the header -----------------------------------------------------------------

    def parse(self) -> _Part:
        if self.size == 0:
            raise InvalidModel(f"{self.path} is empty, not a GGUF file; download it again")
        if self.size < _HEADER.size:
            if bytes(self.need(self.size)[:4]) != GGUF_MAGIC[: self.size]:
                raise _not_gguf(self.path)
            raise self.truncated(_HEADER.size)
        buf = self.need(_HEADER.size)
        magic, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
        if magic != GGUF_MAGIC:
            raise _not_gguf(self.path)
        if version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file)" if version in _BIG_ENDIAN else ""
            raise InvalidModel(
                f"{self.path} is GGUF version {version}{hint}; only little-endian versions "
                "2 and 3 are read; convert it again with a current llama.cpp"
            )
        pos = _HEADER.size
        # Each key/value takes at least 13 bytes and each tensor info at least 24.
        self.check_fits(pos, 13 * n_kv, f"a count of {n_kv} metadata keys")
        self.check_fits(pos, 24 * n_tensors, f"a count of {n_tensors} tensors")

        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self.string(pos, "a metadata key")
            buf = self.need(pos + 4)
            (vtype,) = _U32.unpack_from(buf, pos)
            kv[key], pos = self.value(pos + 4, vtype, key)

        alignment = kv.get(_K.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise self.corrupt(f"general.alignment is {alignment!r}, not a power of two")

        tensors, pos, data_end, last = self.tensor_infos(pos, n_tensors, alignment)
        # Offsets count from the aligned end of the header; the furthest tensor must fit.
        end = -(-pos // alignment) * alignment + data_end
        if tensors and end > self.size:
            raise InvalidModel(
                f"{self.path} is truncated: tensor {_q(last)} ends at byte {end} but the file "
                f"has {self.size}; download or convert it again"
            )
        return _Part(path=self.path, size=self.size, kv=kv, tensors=tensors)

    def tensor_infos(
        self, pos: int, n_tensors: int, alignment: int
    ) -> tuple[list[_Tensor], int, int, str]:
        """The tensors, the header's end, and the furthest data end (offset) and its tensor.

        Models have hundreds to thousands of tensors, so the buffer is only grown when
        the next field may lie past it and everything else stays in locals.
        """
        buf = self.buf
        filled = len(buf)
        u64 = _U64.unpack_from
        u32 = _U32.unpack_from
        tensors: list[_Tensor] = []
        data_end = 0
        last = ""
        for _ in range(n_tensors):
            if pos + 8 > filled:
                buf = self.need(pos + 8)
                filled = len(buf)
            (n,) = u64(buf, pos)
            pos += 8
            if pos + n + 4 > filled:
                self.check_fits(pos, n, f"a tensor name of length {n}")
                buf = self.need(pos + n + 4)
                filled = len(buf)
            name = self.store[pos : pos + n].decode("utf-8", "replace")
            (n_dims,) = u32(buf, pos + n)
            pos += n + 4
            if n_dims > _MAX_DIMS:
                raise self.corrupt(f"tensor {_q(name)} has {n_dims} dimensions")
            layout = _TENSOR_LAYOUTS[n_dims]
            if pos + layout.size > filled:
                buf = self.need(pos + layout.size)
                filled = len(buf)
            *dims, ttype, offset = layout.unpack_from(buf, pos)
            pos += layout.size

            known = _TENSOR_TYPES.get(ttype)
            if known is None:
                import importlib.metadata

                raise self.corrupt(
                    f"tensor {_q(name)} has ggml type {ttype}, unknown to gguf "
                    f"{importlib.metadata.version('gguf')}"
                )
            type_name, block, type_size = known
            row = dims[0] if dims else 1
            if row % block:
                raise self.corrupt(
                    f"tensor {_q(name)} has rows of {row}, not whole {type_name} blocks"
                )
            if offset % alignment:
                raise self.corrupt(f"tensor {_q(name)} is at offset {offset}, not aligned")
            n_elements = math.prod(dims)
            n_bytes = n_elements // block * type_size
            if n_bytes >= _ABSURD:
                raise self.corrupt(f"tensor {_q(name)} would take {n_bytes} bytes")
            if offset + n_bytes > data_end:
                data_end = offset + n_bytes
                last = name
            tensors.append((name, type_name, n_elements, n_bytes))
        return tensors, pos, data_end, last


def _chain(buf: memoryview, pos: int, count: int, n: int) -> tuple[int, int, bool]:
    """Follows up to ``count`` strings from ``pos`` within ``buf[pos : pos + n]``.

    A string shorter than 256 bytes starts with a length whose seven upper bytes are
    zero. Every offset followed by seven zero bytes is marked: that finds all such
    starts, and maybe some false ones. From ``pos`` on, each marked start plus 8 plus its
    length byte must be the next mark; as far as that holds, the marks are exactly the
    strings that walking one length at a time would meet. Returns the position after
    the last string followed, how many were followed, and whether the chain broke
    (before ``count`` strings and the end of the chunk).
    """
    region = np.frombuffer(buf, np.uint8, n, pos)
    zero = region == 0
    marks = zero[1 : n - 6] & zero[2 : n - 5]
    for i in range(3, 8):
        marks &= zero[i : n - 7 + i]
    starts = np.flatnonzero(marks)
    if not len(starts) or starts[0]:
        return pos, 0, True
    k = min(count, len(starts))
    ends = starts[:k] + 8 + region[starts[:k]]
    bad = np.flatnonzero(ends[:-1] != starts[1:k])
    if len(bad):
        followed = int(bad[0]) + 1
        return pos + int(ends[followed - 1]), followed, True
    return pos + int(ends[-1]), k, False


def _q(name: str) -> str:
    """A key or tensor name for a message; a corrupt one can be long and garbled."""
    return repr(name if len(name) <= 64 else name[:60] + "...")


def _not_gguf(path: Path) -> InvalidModel:
    return InvalidModel(
        f"{path} is not a GGUF file (it does not start with the GGUF magic); rocmux's "
        "runtimes load GGUF models, convert others with llama.cpp's convert_hf_to_gguf.py"
    )


def _read_part(path: Path) -> _Part:
    """The header of one file; ``ModelNotFound``/``InvalidModel`` when it cannot be read."""
    try:
        with path.open("rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            reader = _Reader(path, file, size)
            try:
                return reader.parse()
            finally:
                reader.close()
    except FileNotFoundError:
        raise ModelNotFound(f"model file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise InvalidModel(f"{path} is a directory; pass a .gguf file inside it") from None
    except OSError as exc:
        raise InvalidModel(f"cannot read model file {path}: {exc.strerror}") from None


def _int(value: object) -> int | None:
    """An integer metadata value; per-layer arrays give their largest item."""
    if isinstance(value, tuple) and value and all(type(v) is int for v in value):
        return max(value)
    return value if type(value) is int else None


def _split_layout(part: _Part) -> tuple[int, int, str | None]:
    """(part number from 1, part count, name prefix) from the split keys or the file name."""
    match = _SPLIT_NAME.match(part.path.name)
    count = _int(part.kv.get(_K.Split.LLM_KV_SPLIT_COUNT))
    number = _int(part.kv.get(_K.Split.LLM_KV_SPLIT_NO))
    if count is None:
        count = int(match["count"]) if match else 1
    if number is None:
        number = int(match["no"]) if match else 1
    else:
        number += 1  # split.no counts from 0
    if not 1 <= number <= count <= 99999:
        raise InvalidModel(
            f"{part.path} has a corrupt GGUF header (split part {number} of {count}); "
            "download or convert it again"
        )
    return number, count, match["prefix"] if match else None


def _part_names(path: Path, prefix: str, count: int) -> list[Path]:
    return [path.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _frozen_map(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class ModelInfo:
    """What a GGUF model holds, from its header; ``from_gguf`` builds one."""

    path: Path  # the first file
    files: tuple[Path, ...]  # every part of a split model, in order
    size: int  # bytes of all files
    name: str  # general.name, else the file stem
    architecture: str | None
    file_type: str | None  # general.file_type as named by llama.cpp: "Q4_1", "F16"
    tensor_types: Mapping[str, int] = attrs.field(converter=_frozen_map, hash=False)
    tensor_type_bytes: Mapping[str, int] = attrs.field(converter=_frozen_map, hash=False)
    n_params: int
    context_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    embedding_length: int | None
    feed_forward_length: int | None
    key_length: int | None
    value_length: int | None
    vocab_size: int | None
    has_chat_template: bool
    layer_bytes: tuple[int, ...]  # bytes of the blk.N.* tensors, by N
    other_bytes: int  # bytes of every tensor outside the blocks
    output_bytes: int  # output.weight, or token_embd.weight when they are tied
    split_count: int

    @property
    def n_tensors(self) -> int:
        """Number of tensors in all files."""
        return sum(self.tensor_types.values())

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data in all files."""
        return sum(self.tensor_type_bytes.values())

    @classmethod
    def from_gguf(cls, path: Path | str) -> ModelInfo:
        """Reads the header of the GGUF at ``path`` and, for a split model, of every part.

        Given any part of a split model, the whole model is read and ``path`` is its
        first part. Raises ``ModelNotFound`` when the file does not exist and
        ``InvalidModel`` (naming the file and the problem) when it, or a part, cannot
        be read as GGUF.
        """
        path = Path(path).expanduser()
        part = _read_part(path)
        number, count, prefix = _split_layout(part)
        if count == 1:
            return cls._build([part])
        if prefix is None:
            raise InvalidModel(
                f"{path} is part {number} of a split model of {count} files but its name does "
                f"not follow <name>-{number:05d}-of-{count:05d}.gguf, so the other parts "
                "cannot be found; rename the parts as llama.cpp's gguf-split names them"
            )
        names = _part_names(path, prefix, count)
        parts: list[_Part] = []
        for i, name in enumerate(names, 1):
            if i == number:
                parts.append(part)
                continue
            try:
                other = _read_part(name)
            except ModelNotFound:
                raise InvalidModel(
                    f"split model {names[0]} is missing part {i} of {count}: {name} does not exist"
                ) from None
            other_number, other_count, _ = _split_layout(other)
            if (other_number, other_count) != (i, count):
                raise InvalidModel(
                    f"{name} says it is part {other_number} of {other_count}, not {i} of "
                    f"{count}; the parts of split model {names[0]} do not belong together"
                )
            parts.append(other)
        return cls._build(parts, prefix)

    @classmethod
    def _build(cls, parts: list[_Part], prefix: str | None = None) -> ModelInfo:
        first = parts[0]
        kv = first.kv
        tensors = [t for p in parts for t in p.tensors]
        expected = _int(kv.get(_K.Split.LLM_KV_SPLIT_TENSORS_COUNT))
        if len(parts) > 1 and expected is not None and expected != len(tensors):
            raise InvalidModel(
                f"split model {first.path} should hold {expected} tensors but its "
                f"{len(parts)} parts hold {len(tensors)}; download or convert it again"
            )

        types: dict[str, int] = {}
        type_bytes: dict[str, int] = {}
        layers: dict[int, int] = {}
        other = 0
        outputs: dict[str, int] = {}
        n_params = 0
        for name, type_name, n_elements, n_bytes in tensors:
            types[type_name] = types.get(type_name, 0) + 1
            type_bytes[type_name] = type_bytes.get(type_name, 0) + n_bytes
            n_params += n_elements
            if name.startswith("blk."):
                index = name.split(".", 2)[1]
                # isdecimal, as int() refuses other digits; the length keeps int() cheap.
                if index.isdecimal() and len(index) <= 9:
                    layers[int(index)] = layers.get(int(index), 0) + n_bytes
                    continue
            elif name in _OUTPUTS:
                outputs[name] = n_bytes
            other += n_bytes
        if layers and max(layers) >= len(tensors):
            raise InvalidModel(
                f"{first.path} has a corrupt GGUF header (a tensor of layer {max(layers)} "
                f"among {len(tensors)} tensors); download or convert it again"
            )

        arch = kv.get(_K.General.ARCHITECTURE)
        arch = arch if isinstance(arch, str) and arch else None

        def arch_int(key: str) -> int | None:
            return _int(kv.get(key.format(arch=arch))) if arch else None

        embedding = arch_int(_K.LLM.EMBEDDING_LENGTH)
        heads = arch_int(_K.Attention.HEAD_COUNT)
        heads_kv = arch_int(_K.Attention.HEAD_COUNT_KV)
        per_head = embedding // heads if embedding and heads and heads > 0 else None
        vocab = arch_int(_K.LLM.VOCAB_SIZE)
        if vocab is None:
            tokens = kv.get(_TOKENS)
            vocab = tokens.count if isinstance(tokens, _Array) else None
        file_type = kv.get(_K.General.FILE_TYPE)
        name = kv.get(_K.General.NAME)
        if not isinstance(name, str) or not name:
            name = prefix if prefix is not None else first.path.stem
        template = kv.get(_K.Tokenizer.CHAT_TEMPLATE)

        return cls(
            path=first.path,
            files=tuple(p.path for p in parts),
            size=sum(p.size for p in parts),
            name=name,
            architecture=arch,
            file_type=(
                _FILE_TYPES.get(file_type, str(file_type)) if type(file_type) is int else None
            ),
            tensor_types=types,
            tensor_type_bytes=type_bytes,
            n_params=n_params,
            context_length=arch_int(_K.LLM.CONTEXT_LENGTH),
            block_count=arch_int(_K.LLM.BLOCK_COUNT),
            head_count=heads,
            # llama.cpp's default when the key is absent: no grouped-query attention.
            head_count_kv=heads_kv if heads_kv is not None else heads,
            embedding_length=embedding,
            feed_forward_length=arch_int(_K.LLM.FEED_FORWARD_LENGTH),
            key_length=_first(arch_int(_K.Attention.KEY_LENGTH), per_head),
            value_length=_first(arch_int(_K.Attention.VALUE_LENGTH), per_head),
            vocab_size=vocab,
            has_chat_template=isinstance(template, str) and bool(template),
            layer_bytes=tuple(layers.get(i, 0) for i in range(max(layers) + 1 if layers else 0)),
            other_bytes=other,
            output_bytes=outputs.get("output.weight", outputs.get("token_embd.weight", 0)),
            split_count=len(parts),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (paths as strings), for ``--json`` output."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in attrs.fields(type(self))}


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


@attrs.frozen
class ScanEntry:
    """One model found by ``scan``: its ``info``, or the ``error`` that kept it unread."""

    path: Path
    info: ModelInfo | None
    error: str | None

    @property
    def ok(self) -> bool:
        """Whether the model was read."""
        return self.info is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: path, error and the info's ``to_json()`` (or None)."""
        return {
            "path": str(self.path),
            "error": self.error,
            "info": self.info.to_json() if self.info is not None else None,
        }


def _gguf_files(folder: Path, recursive: bool) -> Iterable[Path]:
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in files:
                if name.lower().endswith(".gguf"):
                    yield Path(root, name)
    else:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(".gguf") and entry.is_file():
                    yield Path(entry.path)


def scan(paths: Iterable[Path | str], recursive: bool = True) -> list[ScanEntry]:
    """The GGUF models in ``paths`` (files, or folders searched for ``*.gguf``), by path.

    The parts of a split model make one entry, under the path of its first part. A file
    that cannot be read is listed with its error; the scan never stops at one.
    """
    files: dict[str, Path] = {}
    entries: list[ScanEntry] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            for found in _gguf_files(path, recursive):
                files.setdefault(os.path.normpath(os.path.abspath(found)), found)
        elif path.exists():
            files.setdefault(os.path.normpath(os.path.abspath(path)), path)
        else:
            entries.append(ScanEntry(path, None, f"{path} does not exist"))

    # Parts of one split model are read once, through the first part present.
    groups: dict[Path, list[Path]] = {}
    for path in files.values():
        match = _SPLIT_NAME.match(path.name)
        if match and int(match["count"]) > 1:
            first = path.with_name(f"{match['prefix']}-00001-of-{match['count']}.gguf")
            groups.setdefault(first, []).append(path)
        else:
            groups[path] = [path]
    for first, members in groups.items():
        try:
            info = ModelInfo.from_gguf(min(members, key=lambda p: p.name))
        except ModelError as exc:
            entries.append(ScanEntry(first, None, str(exc)))
        else:
            entries.append(ScanEntry(info.path, info, None))
    entries.sort(key=lambda e: e.path)
    return entries
