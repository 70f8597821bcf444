"""Checking and resolving model files."""

from __future__ import annotations

import struct
from pathlib import Path

from rocmux.errors import InvalidModel, ModelNotFound

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)


def check_gguf(path: Path) -> Path:
    """Return ``path`` resolved if it looks like a readable GGUF file, else raise.

    Reads only the fixed header (magic, version, counts), so it is cheap for files
    of any size; the runtime does the full parse.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFound(f"model file {path} does not exist; check the path")
    if path.is_dir():
        raise InvalidModel(f"{path} is a directory; pass a .gguf file inside it")
    try:
        with path.open("rb") as f:
            header = f.read(24)
    except OSError as exc:
        raise InvalidModel(f"cannot read model file {path}: {exc.strerror}") from None
    if len(header) < 24 or header[:4] != GGUF_MAGIC:
        raise InvalidModel(
            f"{path} is not a GGUF file (it does not start with the GGUF magic); "
            "rocmux's runtimes load GGUF models, convert others with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    (version,) = struct.unpack_from("<I", header, 4)
    if version not in SUPPORTED_VERSIONS:
        raise InvalidModel(f"{path} is GGUF version {version}; only versions 2 and 3 are read")
    tensors, kvs = struct.unpack_from("<QQ", header, 8)
    size = path.stat().st_size
    # A count larger than the file could hold means a corrupt header, not a big model.
    if tensors > size or kvs > size:
        raise InvalidModel(
            f"{path} has a corrupt GGUF header ({tensors} tensors, {kvs} metadata keys "
            f"in {size} bytes); download or convert it again"
        )
    return path.resolve()


def resolve_model(model: str | Path | None) -> Path:
    """The GGUF to load: ``model`` if given, else the configured, else the default model."""
    if model is None:
        from rocmux.config import load_config

        configured = load_config().model
        if configured is not None:
            return check_gguf(configured)
        from rocmux.default_model import default_model_path

        return check_gguf(default_model_path())
    return check_gguf(Path(model))
