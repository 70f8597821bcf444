#!/usr/bin/env bash
# README command 1: set up, then ask the default model a question through llama-server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# shellcheck disable=SC1091
. .venv/bin/activate
rocmux backends
rocmux run --chat --temperature 0 --seed 0 --stats "${1:-What is the capital of France? Answer briefly.}"
