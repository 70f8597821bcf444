"""A small GGUF reader: metadata, tensor descriptions and memory-mapped tensor bytes.

``gguf.GGUFReader`` builds a numpy array for every part of every field, which takes
seconds on a 50k-token vocabulary; this reads the same layout with ``struct`` and
``np.frombuffer`` and memory-maps the data, so no tensor is copied until it is asked
for. Split files (``<prefix>-0000i-of-0000n.gguf``) are read as one model.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from rocmux.errors import InvalidModel

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types: (struct format, numpy dtype) for the scalar ones.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "<u1"),
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


@attrs.frozen
class TensorInfo:
    """Where one tensor's bytes are and how to read them."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: rows first, the contiguous dimension last
    offset: int  # absolute byte offset in ``file_index``'s file
    nbytes: int
    file_index: int = 0

    @property
    def n_elements(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


class _Cursor:
    """Reads little-endian GGUF values from a buffer."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        # Vocabularies may hold byte sequences that are not UTF-8 on their own; keep
        # them reversible instead of failing.
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar("<I")
            n = self.scalar("<Q")
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype][1])
                arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
                self.pos += n * dtype.itemsize
                return arr.astype(bool) if etype == _BOOL else arr
            return [self.value(etype) for _ in range(n)]
        if vtype in _SCALARS:
            value = self.scalar(_SCALARS[vtype][0])
            return bool(value) if vtype == _BOOL else value
        raise InvalidModel(f"unknown GGUF value type {vtype}")


def _parse(path: Path, buf: memoryview, file_index: int) -> tuple[dict[str, Any], list[TensorInfo]]:
    if bytes(buf[:4]) != MAGIC:
        raise InvalidModel(f"{path} is not a GGUF file")
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise InvalidModel(f"{path} is GGUF version {version}; only versions 2 and 3 are read")
    n_tensors = cur.scalar("<Q")
    n_kv = cur.scalar("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        qtype = cur.scalar("<I")
        offset = cur.scalar("<Q")
        raw_infos.append((name, dims, qtype, offset))
    alignment = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    infos = []
    for name, dims, qtype_id, offset in raw_infos:
        try:
            qtype = GGMLQuantizationType(qtype_id)
        except ValueError:
            raise InvalidModel(f"{path}: tensor {name} has unknown type {qtype_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * type_size
        shape = tuple(reversed(dims)) if dims else (1,)
        infos.append(TensorInfo(name, qtype, shape, data_start + offset, nbytes, file_index))
    return meta, infos


class GGUFFile:
    """An open GGUF model (one file or all its splits), memory-mapped read-only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._maps: list[mmap.mmap] = []
        self._files = []
        paths = [self.path]
        match = _SPLIT_NAME.match(self.path.name)
        if match and int(match["count"]) > 1:
            count = int(match["count"])
            paths = [
                self.path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf")
                for i in range(1, count + 1)
            ]
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            for index, part in enumerate(paths):
                f = part.open("rb")
                self._files.append(f)
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps.append(mm)
                meta, infos = _parse(part, memoryview(mm), index)
                if index == 0:
                    self.metadata = meta
                for info in infos:
                    self.tensors[info.name] = info
        except (OSError, struct.error, ValueError) as exc:
            self.close()
            raise InvalidModel(f"cannot read GGUF file {self.path}: {exc}") from None

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value; ``{arch}`` in ``key`` is replaced by the architecture."""
        return self.metadata.get(key.replace("{arch}", self.architecture), default)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory map (no copy)."""
        info = self.tensors[name]
        return np.frombuffer(self._maps[info.file_index], np.uint8, info.nbytes, info.offset)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def close(self) -> None:
        """Unmap and close; arrays from :meth:`raw` must be dropped first."""
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive; the map goes away with it
        for f in self._files:
            f.close()
        self._maps.clear()
        self._files.clear()
