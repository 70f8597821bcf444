#!/usr/bin/env bash
# README command 2: set up, lint, and run the whole test suite (real llama-server runs included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest "$@"
