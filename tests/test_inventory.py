"""The model inventory: header figures of real and generated GGUFs, split models, bad
files listed with their errors, and the lean reader agreeing with gguf.GGUFReader."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_factory import TinyLlama, write_split, write_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rocmux import inventory
from rocmux.errors import InvalidModel, ModelNotFound
from rocmux.inventory import ModelInfo, ScanEntry, scan

SHAPES = {
    "default": TinyLlama(),
    "wide-f16": TinyLlama(
        n_vocab=500,
        n_embd=96,
        n_layer=3,
        n_head=6,
        n_head_kv=3,
        n_ff=200,
        context_length=1024,
        dtype="f16",
        name="wide",
        chat_template=None,
    ),
}


def _llama_params(vocab: int, embd: int, layers: int, kv: int, ff: int, tied: bool) -> int:
    """Parameters of a llama model from its shape: what its tensors must add up to."""
    per_layer = 2 * embd + 2 * embd * embd + 2 * kv * embd + 3 * embd * ff
    return vocab * embd * (1 if tied else 2) + layers * per_layer + embd


def _reference(path: Path) -> tuple[int, dict[str, int], dict[str, int], dict[str, int]]:
    """n_params, tensors and bytes by type, bytes by tensor name, per gguf.GGUFReader."""
    reader = gguf.GGUFReader(path)
    types: dict[str, int] = {}
    type_bytes: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        type_bytes[t.tensor_type.name] = type_bytes.get(t.tensor_type.name, 0) + int(t.n_bytes)
    by_name = {t.name: int(t.n_bytes) for t in reader.tensors}
    return sum(int(t.n_elements) for t in reader.tensors), types, type_bytes, by_name


def _offset_of_value(data: bytes, key: str) -> int:
    """Offset of the value (after its type) of ``key`` in a GGUF's bytes."""
    raw = key.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw)
    return at + 8 + len(raw) + 4


# --- the default model ---------------------------------------------------------------------


def test_default_model_figures(default_model: Path) -> None:
    info = ModelInfo.from_gguf(default_model)

    assert info.path == default_model and info.files == (default_model,)
    assert info.size == default_model.stat().st_size
    assert info.architecture == "llama"
    assert info.file_type == "Q4_1"
    assert (info.block_count, info.head_count, info.head_count_kv) == (30, 9, 3)
    assert (info.embedding_length, info.feed_forward_length) == (576, 1536)
    assert (info.key_length, info.value_length) == (64, 64)
    assert (info.context_length, info.vocab_size) == (8192, 49152)
    assert info.has_chat_template and info.split_count == 1
    # SmolLM2 ties its output to the token embedding: no output.weight.
    assert info.n_params == _llama_params(49152, 576, 30, 192, 1536, tied=True) == 134_515_008
    assert dict(info.tensor_types) == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert info.n_tensors == 272
    embd_bytes = 49152 * 576 // 32 * 34  # Q8_0: 34 bytes a block of 32
    assert info.output_bytes == embd_bytes == info.tensor_type_bytes["Q8_0"]
    assert len(info.layer_bytes) == 30 and len(set(info.layer_bytes)) == 1
    assert info.other_bytes == embd_bytes + 576 * 4  # token_embd, output_norm
    assert sum(info.layer_bytes) + info.other_bytes == info.tensor_bytes
    assert info.size - 2_000_000 < info.tensor_bytes < info.size
    assert "chat_template" not in info.to_json()


def test_default_model_same_without_the_numpy_walk(
    default_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = ModelInfo.from_gguf(default_model)
    monkeypatch.setattr(inventory, "_VECTOR_MIN", 2**62)
    assert ModelInfo.from_gguf(default_model) == info


# --- generated models -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
def test_generated_model_figures(tmp_path: Path, shape: str) -> None:
    spec = SHAPES[shape]
    path = write_tiny_llama(tmp_path / f"{shape}.gguf", spec)
    info = ModelInfo.from_gguf(path)

    kv = spec.n_head_kv * spec.head_dim
    assert info.name == spec.name and info.architecture == "llama"
    assert info.file_type == ("F16" if spec.dtype == "f16" else "F32")
    assert info.size == path.stat().st_size
    assert info.block_count == spec.n_layer and len(info.layer_bytes) == spec.n_layer
    assert (info.head_count, info.head_count_kv) == (spec.n_head, spec.n_head_kv)
    assert (info.embedding_length, info.feed_forward_length) == (spec.n_embd, spec.n_ff)
    assert info.key_length == info.value_length == spec.head_dim
    assert (info.context_length, info.vocab_size) == (spec.context_length, spec.vocab_size)
    assert info.has_chat_template == (spec.chat_template is not None)
    assert info.n_params == _llama_params(
        spec.vocab_size, spec.n_embd, spec.n_layer, kv, spec.n_ff, tied=False
    )

    n_params, types, type_bytes, by_name = _reference(path)
    assert info.n_params == n_params
    assert dict(info.tensor_types) == types
    assert dict(info.tensor_type_bytes) == type_bytes
    assert info.output_bytes == by_name["output.weight"]
    for layer, size in enumerate(info.layer_bytes):
        assert size == sum(v for k, v in by_name.items() if k.startswith(f"blk.{layer}."))
    assert info.other_bytes == sum(v for k, v in by_name.items() if not k.startswith("blk."))


def test_vocab_size_falls_back_to_the_token_list(tmp_path: Path) -> None:
    data = write_tiny_llama(tmp_path / "m.gguf").read_bytes()
    # Renaming the key hides it, while the file stays well formed.
    data = data.replace(b"llama.vocab_size", b"llama.vocab_sizX")
    path = tmp_path / "renamed.gguf"
    path.write_bytes(data)
    assert ModelInfo.from_gguf(path).vocab_size == TinyLlama().vocab_size


def test_to_json_is_json(tiny_model: Path) -> None:
    info = ModelInfo.from_gguf(tiny_model)
    data = json.loads(json.dumps(info.to_json()))
    assert data["path"] == str(tiny_model) and data["files"] == [str(tiny_model)]
    assert data["n_params"] == info.n_params and data["layer_bytes"] == list(info.layer_bytes)
    assert data["tensor_types"] == dict(info.tensor_types)
    entry = json.loads(json.dumps(scan([tiny_model])[0].to_json()))
    assert entry == {"path": str(tiny_model), "error": None, "info": data}


def test_model_info_is_immutable(tiny_model: Path) -> None:
    info = ModelInfo.from_gguf(tiny_model)
    with pytest.raises(TypeError):
        info.tensor_types["F32"] = 0  # type: ignore[index]
    assert info == ModelInfo.from_gguf(tiny_model)
    assert hash(info) == hash(ModelInfo.from_gguf(tiny_model))


# --- size does not matter ---------------------------------------------------------------------


def _write_sparse(path: Path, n_embd: int, n_layer: int, n_ff: int, n_vocab: int) -> int:
    """A Q4_0 llama header describing GBs of tensors, the data left as a hole; its params."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("sparse")
    writer.add_block_count(n_layer)
    writer.add_embedding_length(n_embd)
    writer.add_head_count(n_embd // 128)
    writer.add_token_list([f"t{i}" for i in range(n_vocab)])
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output.weight": (n_vocab, n_embd)}
    for i in range(n_layer):
        shapes[f"blk.{i}.ffn_up.weight"] = (n_ff, n_embd)
    q4 = gguf.GGMLQuantizationType.Q4_0
    block, size = gguf.GGML_QUANT_SIZES[q4]
    total = 0
    for name, shape in shapes.items():
        n_bytes = shape[0] * shape[1] // block * size
        writer.add_tensor_info(name, shape, np.dtype(np.float32), n_bytes, raw_dtype=q4)
        total += -(-n_bytes // 32) * 32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header = path.stat().st_size
    os.truncate(path, -(-header // 32) * 32 + total)
    return sum(a * b for a, b in shapes.values())


def test_huge_sparse_file_is_read_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "huge.gguf"
    n_params = _write_sparse(path, n_embd=8192, n_layer=80, n_ff=28672 * 3, n_vocab=128_000)
    stat = path.stat()
    assert stat.st_size > 30 * 2**30 and stat.st_blocks * 512 < 2**24  # sparse: a hole
    start = time.perf_counter()
    info = ModelInfo.from_gguf(path)
    elapsed = time.perf_counter() - start
    assert info.n_params == n_params and info.vocab_size == 128_000
    assert info.size == path.stat().st_size and info.block_count == 80
    # Reading the data, even as holes, would take many seconds.
    assert elapsed < 1.0

    os.truncate(path, path.stat().st_size - 1)  # the last tensor now ends past the end
    with pytest.raises(InvalidModel, match=r"truncated: tensor 'blk\.79\.ffn_up\.weight'"):
        ModelInfo.from_gguf(path)


def test_corrupt_count_in_a_huge_file_costs_at_most_the_header_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A smaller cap than the real 64 MiB, as tracemalloc makes the walk up to it slow.
    monkeypatch.setattr(inventory, "_MAX_HEADER", 8 * 2**20)
    path = tmp_path / "huge.gguf"
    _write_sparse(path, n_embd=8192, n_layer=32, n_ff=28672, n_vocab=1000)
    with path.open("r+b") as f:
        data = f.read(1 << 16)
        # 2**27 tokens: 1 GiB at least, which the 4 GB file could hold. Zeros after the
        # count, and the hole after them, read as empty strings: the walk goes to the cap.
        at = _offset_of_value(data, "tokenizer.ggml.tokens") + 4
        f.seek(at)
        f.write(struct.pack("<Q", 2**27) + bytes(len(data) - at - 8))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InvalidModel, match="corrupt GGUF header.*runs past 8 MiB"):
            ModelInfo.from_gguf(path)
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # The 8 MiB buffer, and the 4 MiB one it grew from while it is copied.
    assert peak <= 13 * 2**20 and elapsed < 10


# --- split models --------------------------------------------------------------------------


def test_split_model_is_one_model_with_the_summed_size(tmp_path: Path) -> None:
    spec = TinyLlama(n_layer=3)
    (tmp_path / "whole").mkdir()
    (tmp_path / "split").mkdir()
    whole = ModelInfo.from_gguf(write_tiny_llama(tmp_path / "whole" / "m.gguf", spec))
    parts = write_split(tmp_path / "split" / "m", spec, parts=3)

    (entry,) = scan([tmp_path / "split"])
    info = entry.info
    assert entry.error is None and info is not None
    assert entry.path == info.path == parts[0] and info.files == tuple(parts)
    assert info.split_count == 3 and info.name == spec.name
    assert info.size == sum(p.stat().st_size for p in parts)
    assert info.n_params == whole.n_params and info.tensor_types == whole.tensor_types
    assert info.layer_bytes == whole.layer_bytes and info.output_bytes == whole.output_bytes
    assert info.vocab_size == whole.vocab_size and info.has_chat_template
    # Any part leads to the whole model.
    assert ModelInfo.from_gguf(parts[2]) == info


def test_split_model_with_a_missing_part(tmp_path: Path) -> None:
    parts = write_split(tmp_path / "m", TinyLlama(), parts=3)
    parts[1].unlink()
    with pytest.raises(InvalidModel, match=r"missing part 2 of 3: .*m-00002-of-00003\.gguf"):
        ModelInfo.from_gguf(parts[0])
    (entry,) = scan([tmp_path])
    assert entry.path == parts[0] and entry.info is None
    assert entry.error is not None and "m-00002-of-00003.gguf" in entry.error

    parts[0].unlink()
    (entry,) = scan([tmp_path])
    assert entry.path == parts[0] and entry.error is not None and "missing part 1" in entry.error


def test_split_part_under_another_name(tmp_path: Path) -> None:
    parts = write_split(tmp_path / "m", TinyLlama(), parts=2)
    renamed = parts[0].rename(tmp_path / "model.gguf")
    with pytest.raises(InvalidModel, match="does not follow"):
        ModelInfo.from_gguf(renamed)


# --- bad files -------------------------------------------------------------------------------


def test_scan_lists_bad_files_and_reads_the_good(tmp_path: Path) -> None:
    good = [write_tiny_llama(tmp_path / f"{shape}.gguf", spec) for shape, spec in SHAPES.items()]
    data = good[0].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:3000])
    (tmp_path / "noise.gguf").write_bytes(np.random.default_rng(1).bytes(5000))
    absurd = bytearray(data)
    at = _offset_of_value(data, "general.architecture")
    absurd[at : at + 8] = struct.pack("<Q", 2**50)
    (tmp_path / "absurd.gguf").write_bytes(absurd)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deeper.gguf").write_bytes(data)
    (tmp_path / "notes.txt").write_text("not a model")

    entries = scan([tmp_path])
    assert [e.path.name for e in entries] == [
        "absurd.gguf",
        "cut.gguf",
        "default.gguf",
        "noise.gguf",
        "deeper.gguf",
        "wide-f16.gguf",
    ]
    errors = {e.path.name: e.error for e in entries if e.error is not None}
    assert errors.keys() == {"absurd.gguf", "cut.gguf", "noise.gguf"}
    assert all(not e.ok for e in entries if e.path.name in errors)
    assert "absurd.gguf has a corrupt GGUF header" in errors["absurd.gguf"]
    assert "cut.gguf is truncated" in errors["cut.gguf"]
    assert "noise.gguf is not a GGUF file" in errors["noise.gguf"]
    infos = {e.path.name: e.info for e in entries if e.info is not None}
    assert infos["default.gguf"] == ModelInfo.from_gguf(good[0])
    assert infos["wide-f16.gguf"] == ModelInfo.from_gguf(good[1])
    assert infos["wide-f16.gguf"].block_count == 3

    assert [e.path.name for e in scan([tmp_path], recursive=False)] == [
        "absurd.gguf",
        "cut.gguf",
        "default.gguf",
        "noise.gguf",
        "wide-f16.gguf",
    ]


def test_scan_takes_files_and_reports_missing_paths(tmp_path: Path, tiny_model: Path) -> None:
    other = tmp_path / "model.bin"
    other.write_bytes(tiny_model.read_bytes())
    entries = scan([tmp_path / "nope.gguf", other, tiny_model, tiny_model.parent])
    by_name = {e.path.name: e for e in entries}
    assert len(entries) == 3  # the tiny model once, though named twice
    assert by_name["model.bin"].info is not None and by_name["tiny.gguf"].info is not None
    assert by_name["nope.gguf"].error is not None and "does not exist" in by_name["nope.gguf"].error
    assert entries == sorted(entries, key=lambda e: e.path)
    assert isinstance(entries[0], ScanEntry)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"", "is empty"),
        (lambda d: d[:10], "is truncated"),
        (lambda d: b"GGUF" + struct.pack("<I", 1) + d[8:], "GGUF version 1"),
        (lambda d: b"GGUF" + struct.pack(">I", 3) + d[8:], "big-endian"),
        (lambda d: d[:8] + struct.pack("<Q", 2**62) + d[16:], "a count of 4611686018427387904"),
        (lambda d: d[:16] + struct.pack("<Q", 10**9) + d[24:], "truncated or corrupt"),
    ],
    ids=["empty", "cut", "v1", "big-endian", "tensor-count", "kv-count"],
)
def test_bad_headers_are_named(tmp_path: Path, tiny_model: Path, mutate, message) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(mutate(tiny_model.read_bytes()))
    with pytest.raises(InvalidModel, match=message) as err:
        ModelInfo.from_gguf(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [(0, 2**60), (8, 2**64 - 1), (8, 2**63 + 5), (8 + 8 + 5 + 8 + 3, 2**45)],
    ids=["count", "first-length", "length-past-ssize", "third-length"],
)
def test_absurd_token_array_is_corrupt(tmp_path: Path, tiny_model: Path, field, value) -> None:
    data = bytearray(tiny_model.read_bytes())
    # The token list starts "<unk>", "<s>": [count][5]<unk>[3]<s>[len]...
    at = _offset_of_value(data, "tokenizer.ggml.tokens") + 4 + field  # after the item type
    data[at : at + 8] = struct.pack("<Q", value)
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(InvalidModel, match="corrupt GGUF header.*tokenizer.ggml.tokens"):
        ModelInfo.from_gguf(path)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        ModelInfo.from_gguf(tmp_path / "nope.gguf")
    with pytest.raises(InvalidModel, match="is a directory"):
        ModelInfo.from_gguf(tmp_path)


# --- any damage gives ModelInfo or InvalidModel ------------------------------------------------


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[int], Path]:
    """A small GGUF's bytes, the offsets of its header's fields and a scratch path."""
    spec = TinyLlama(n_vocab=270, n_embd=8, n_head=2, n_head_kv=1, n_ff=8, n_layer=1)
    folder = tmp_path_factory.mktemp("damaged")
    path = write_tiny_llama(folder / "small.gguf", spec)
    data = path.read_bytes()
    fields = _length_fields(data)
    # The walk above ends where GGUFReader says the header does: it found every field.
    header = gguf.GGUFReader(path).tensors[0].data_offset
    assert header - 32 < max(fields) < header
    return data, fields, folder / "damaged.gguf"


def _length_fields(data: bytes) -> list[int]:
    """Offsets of every count, length, type and dimension in an intact GGUF header."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    fields = [8, 16]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(pos: int) -> int:
        fields.append(pos)
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]

    for _ in range(n_kv):
        pos = string(pos)
        fields.append(pos)
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == 8:
            pos = string(pos)
        elif vtype == 9:
            fields += [pos, pos + 4]
            etype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                pos = string(pos) if etype == 8 else pos + sizes[etype]
        else:
            pos += sizes[vtype]
    for _ in range(n_tensors):
        pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        fields += range(pos, pos + 4 + 8 * n_dims + 12, 4)
        pos += 4 + 8 * n_dims + 12
    return fields


def _read_damaged(path: Path, data: bytes, vector: bool) -> None:
    """Reads a damaged copy: a ModelInfo or an InvalidModel naming the file, in little memory.

    ``vector``: the 270-token array goes through the numpy walk, else the Python one.
    """
    path.write_bytes(data)
    error: InvalidModel | None = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inventory, "_VECTOR_MIN", 8 if vector else 2**62)
        tracemalloc.start()
        try:
            ModelInfo.from_gguf(path)
        except InvalidModel as exc:  # any other exception fails the test
            error = exc
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    assert error is None or str(path) in str(error)
    assert peak < 2**20, f"{peak} bytes allocated for a {len(data)}-byte file"


DAMAGE = settings(
    max_examples=300,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow],
)


@DAMAGE
@given(data=st.data())
def test_truncations_never_break_the_reader(small_gguf, data) -> None:
    original, _, path = small_gguf
    length = data.draw(st.integers(0, len(original) - 1))
    _read_damaged(path, original[:length], data.draw(st.booleans()))


@DAMAGE
@given(data=st.data())
def test_header_mutations_never_break_the_reader(small_gguf, data) -> None:
    original, fields, path = small_gguf
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        # Anywhere past the magic (else it is just not GGUF), or right on a count or length.
        at = data.draw(st.one_of(st.integers(4, max(fields)), st.sampled_from(fields)))
        value = data.draw(
            st.one_of(
                st.binary(min_size=1, max_size=1),
                # Counts and lengths in every range, little-endian as GGUF stores them.
                st.integers(0, 2**64 - 1).map(lambda v: struct.pack("<Q", v)),
                st.integers(0, 2**16).map(lambda v: struct.pack("<Q", v)),
            )
        )
        damaged[at : at + len(value)] = value
    _read_damaged(path, bytes(damaged[: len(original)]), data.draw(st.booleans()))


def test_lean_reader_agrees_with_gguf_reader(small_gguf) -> None:
    original, _, path = small_gguf
    path.write_bytes(original)
    n_params, types, type_bytes, _ = _reference(path)
    info = ModelInfo.from_gguf(path)
    assert (info.n_params, dict(info.tensor_types), dict(info.tensor_type_bytes)) == (
        n_params,
        types,
        type_bytes,
    )


# --- the numpy walk of string arrays is the Python walk ------------------------------------

STRINGS = st.lists(
    st.one_of(
        st.binary(max_size=24),
        st.binary(min_size=250, max_size=300),  # lengths of 256 and more break the chain
        st.integers(7, 12).map(lambda n: b"\0" * n),  # zero runs make false marks
        st.just(b""),
    ),
    max_size=2000,
)


def _skip(data: bytes, count: int, vector: bool) -> int | str:
    """Where the walk over ``count`` strings of ``data`` ends, or its error."""
    reader = inventory._Reader(Path("strings"), io.BytesIO(data), len(data))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inventory, "_VECTOR_MIN", 1 if vector else 2**62)
        try:
            return reader.skip_strings(0, count, "k")
        except InvalidModel as exc:
            return str(exc)


@settings(max_examples=200, deadline=timedelta(seconds=2))
@given(strings=STRINGS, extra=st.integers(0, 3), tail=st.binary(max_size=300))
def test_numpy_walk_is_the_python_walk(strings, extra, tail) -> None:
    data = b"".join(struct.pack("<Q", len(s)) + s for s in strings) + tail
    count = len(strings) + extra  # past the strings, the tail is read as more of them
    python = _skip(data, count, vector=False)
    assert _skip(data, count, vector=True) == python
    if not extra:
        assert python == len(data) - len(tail)


def test_cli_models_lists_good_split_and_corrupt_files(tmp_path, default_model):
    """`rocmux models DIR`: right figures for each model, an error line for the corrupt
    file, exit status 0."""
    import json
    import os
    import subprocess
    import sys

    from gguf_factory import TinyLlama, write_split, write_tiny_llama

    os.symlink(default_model, tmp_path / default_model.name)
    write_tiny_llama(tmp_path / "a.gguf", TinyLlama(n_layer=2))
    write_tiny_llama(tmp_path / "b.gguf", TinyLlama(n_layer=3, n_embd=96, n_head=6, n_head_kv=3))
    write_split(tmp_path / "split", TinyLlama(n_layer=4), parts=3)
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    done = subprocess.run(
        [sys.executable, "-m", "rocmux.cli", "models", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {os.path.basename(r["path"]): r for r in json.loads(done.stdout)}
    assert rows[default_model.name]["info"]["block_count"] == 30
    assert rows["a.gguf"]["info"]["block_count"] == 2
    assert rows["b.gguf"]["info"]["embedding_length"] == 96
    split = [r for name, r in rows.items() if name.startswith("split")]
    assert len(split) == 1
    assert split[0]["info"]["split_count"] == 3
    assert split[0]["info"]["block_count"] == 4
    assert rows["corrupt.gguf"]["info"] is None
    assert rows["corrupt.gguf"]["error"]
    table = subprocess.run(
        [sys.executable, "-m", "rocmux.cli", "models", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert table.returncode == 0
    assert "error" in table.stdout
    assert "corrupt.gguf" in table.stdout
