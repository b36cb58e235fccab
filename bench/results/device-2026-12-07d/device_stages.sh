#!/usr/bin/env bash
# fifteenth session. Stage in $1, tag in $2. Carry .whl and .dev/dev.sh (+ .dev/llama-src.tgz in call a).
set -uo pipefail
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" QTRT_KERNEL_CACHE=/tmp/qtrt-kernels QTRT_BENCH_DIR=/tmp QTRT_GPU_TESTS=1
t0=$SECONDS
[ "$1" != p ] && nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu-$2.txt"
llb() {  # llama.cpp from the llama-cpp-python 0.3.36 sdist's vendor tree, built in /root/llb in the background
  [ -f .dev/llama-src.tgz ] && [ ! -d /root/llb ] || return 0
  mkdir -p /root/llb && tar xzf .dev/llama-src.tgz -C /root/llb && setsid bash -c 'cd /root/llb && \
    cmake -S llama.cpp -B b -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release > build.log 2>&1 && \
    cmake --build b -j 12 --target llama-bench llama-batched-bench >> build.log 2>&1; echo "exit $?" > done' > /dev/null 2>&1 < /dev/null &
}
compile_all() {  # every real-model build not shipped prebuilt for these sources, 16 at a time
  python3 - <<'PY'
from concurrent.futures import ThreadPoolExecutor
from toolchain import kernels as K
b = K.real_model_builds()
with ThreadPoolExecutor(16) as p: list(p.map(lambda od: K.compile_kernel(od[0], od[1], fmt='cubin'), b))
print(len(b), 'builds ready')
PY
}
case "$1" in
  a)  # first call: llama.cpp build started, kernels compiled, the new builds' kernel tests, the A/B
    llb
    compile_all 2>&1 | tail -2
    timeout ${3:-200} python3 -m pytest -q tests/test_kernels_gpu.py -k "ssq or skinny_fused or skinny_cta_ring" > "$OUT/$2-ktests.log" 2>&1; tail -4 "$OUT/$2-ktests.log"
    timeout ${4:-280} python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches 8,16,32 \
      --variants ${5:-control,skinny_own_ssq} 2>&1 | tee "$OUT/$2-tune.log" | grep -E "m=|tok/s \(" | head -30
    cp "$OUT/tuning.json" "$OUT/$2-tuning.json" 2>/dev/null ;;
  p)  # $3: the piece carried in .dev/g40 (one per call)
    mkdir -p /root/m && cp .dev/g40/$3 /root/m/ && ls /root/m | wc -l ;;
  real)  # the real 1.5B assembled, checked, then the whole-model tests on it (fused graph)
    mkdir -p /root/models; F=/root/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    [ -f $F ] || cat /root/m/part* > $F
    echo "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046  $F" | sha256sum -c | tee "$OUT/$2-sha.log" || exit 1
    QTRT_GPU_REAL=1 QTRT_MODELS_DIR=/root/models timeout ${3:-450} python3 -m pytest -q -s tests/test_cuda_backend.py \
      -k "${4:-fused and not unfused and (batched_slots or greedy_32 or sums_of_squares)}" > "$OUT/$2-real.log" 2>&1
    grep -E "rel err|matched|passed|failed" "$OUT/$2-real.log" | tail -12 ;;
  test)
    llb
    timeout ${3:-400} python3 -m pytest -q ${5:-tests/test_cuda_backend.py tests/test_engine.py} ${4:+-k "$4"} > "$OUT/$2-tests.log" 2>&1; tail -8 "$OUT/$2-tests.log" ;;
  ktest)
    timeout ${3:-300} python3 -m pytest -q tests/test_kernels_gpu.py tests/test_gemm_gpu.py -k "${4:-skinny}" > "$OUT/$2-ktests.log" 2>&1; tail -5 "$OUT/$2-ktests.log" ;;
  tune)
    timeout ${3:-280} python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches ${4:-8,16,32} \
      --variants ${5:-control,skinny_own_ssq} 2>&1 | tee "$OUT/$2-tune.log" | grep -E "m=|tok/s \(" | head -30
    cp "$OUT/tuning.json" "$OUT/$2-tuning.json" 2>/dev/null ;;
  bench)  # with llama.cpp once its build is done (waits for it up to $3 s)
    for i in $(seq 1 ${3:-0}); do [ -f /root/llb/done ] && break; sleep 1; done
    cat /root/llb/done 2>/dev/null; tail -2 /root/llb/build.log 2>/dev/null
    L=(); [ -x /root/llb/b/bin/llama-bench ] && L=(--compare-llama-bench /root/llb/b/bin/llama-bench --compare-llama-batched-bench /root/llb/b/bin/llama-batched-bench)
    timeout 560 python3 -m toolchain.cli bench --contexts 128,4096 --batches 1,2,4,8,16,32 --prompts 512,4096,16384 "${L[@]}" -o "$OUT" 2>&1 | tee "$OUT/$2-bench.log" | tail -45 ;;
  probe)  # the real 1.5B (assembled from /root/m), ssq on / off against the reference
    llb
    mkdir -p /root/models; F=/root/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    [ -f $F ] || cat /root/m/part* > $F
    echo "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046  $F" | sha256sum -c | tee "$OUT/$2-sha.log" || exit 1
    timeout ${3:-300} python3 .dev/probe.py $F ${4:-1} ${5:-8} 2>&1 | tee "$OUT/$2-probe.log" | grep -v Warning ;;
  san)
    timeout ${3:-280} compute-sanitizer --tool ${4:-memcheck} python3 scripts/sanitize_step.py ${5:-} 2>&1 | tail -6 | tee "$OUT/$2-${4:-memcheck}.log" ;;
esac
echo "$1: $((SECONDS - t0)) s"
