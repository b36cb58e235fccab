#!/usr/bin/env bash
# fourteenth session. Stage in $1, tag in $2. Carry .whl and this folder's scripts (as scripts/.dev19*).
set -uo pipefail
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" QTRT_KERNEL_CACHE=/tmp/qtrt-kernels QTRT_BENCH_DIR=/tmp QTRT_GPU_TESTS=1
t0=$SECONDS
[ "$1" != p ] && nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu-$2.txt"
# from call a on: the default it picked (/root/pick), set in this call's copy of the tree too
[ "$1" != a ] && [ "$1" != p ] && [ -f /root/pick ] && python3 scripts/.dev19_flip.py $(cat /root/pick) | tee "$OUT/$2-flip.txt"
case "$1" in
  a)  # the first call: the A/B of the warp rings' sizes and L2 asks, their kernel tests, the pick
    : # (a llama.cpp build in the background: left out here)
    timeout ${3:-300} python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches 8,16,32 \
      --variants ${4:-control,skinny_l2pf8,skinny_l2pf3,skinny_s3x1,skinny_s3x1_l2pf8,skinny_l2pf8_qkv_s3,skinny_l2pf8_o_s3} 2>&1 | tee "$OUT/$2-tune.log" | grep -E "m=|tok/s \(" | head -30
    cp "$OUT/tuning.json" "$OUT/$2-tuning.json" 2>/dev/null; cp "$OUT/tuning.json" /root/a-tuning.json
    timeout ${5:-200} python3 -m pytest -q tests/test_kernels_gpu.py -k "skinny_warp_ring_sizes or skinny_cta_ring or scales_h2" > "$OUT/$2-ktests.log" 2>&1; tail -4 "$OUT/$2-ktests.log"
    python3 scripts/.dev19_pick.py /root/a-tuning.json "$OUT/$2-ktests.log" > /root/pick; cat /root/pick ;;
  p)  # $3: the piece carried in .dev/gguf60 (one per call)
    mkdir -p /root/m && cp .dev/g40/$3 /root/m/ && ls /root/m | wc -l ;;
  real)  # the real 1.5B assembled, checked, then the whole-model tests on it (fused graph)
    mkdir -p /root/models; F=/root/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    [ -f $F ] || cat /root/m/part* > $F
    echo "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046  $F" | sha256sum -c | tee "$OUT/$2-sha.log" || exit 1
    QTRT_GPU_REAL=1 QTRT_MODELS_DIR=/root/models timeout ${3:-450} python3 -m pytest -q -s tests/test_cuda_backend.py \
      -k "${4:-fused and not unfused and (batched_slots or greedy_32 or a_mixed_step or step_logits or beyond)}" > "$OUT/$2-real.log" 2>&1
    grep -E "rel err|matched|passed|failed" "$OUT/$2-real.log" | tail -12 ;;
  test)
    : # (a llama.cpp build in the background: left out here)
    timeout ${3:-400} python3 -m pytest -q ${5:-tests/test_cuda_backend.py tests/test_engine.py} ${4:+-k "$4"} > "$OUT/$2-tests.log" 2>&1; tail -8 "$OUT/$2-tests.log" ;;
  ktest)
    : # (a llama.cpp build in the background: left out here)
    timeout ${3:-300} python3 -m pytest -q tests/test_kernels_gpu.py tests/test_gemm_gpu.py -k "${4:-skinny}" > "$OUT/$2-ktests.log" 2>&1; tail -5 "$OUT/$2-ktests.log" ;;
  tune)
    timeout ${3:-280} python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches ${4:-8,16,32} \
      --variants ${5:-control,skinny_l2pf8} 2>&1 | tee "$OUT/$2-tune.log" | grep -E "m=|tok/s \(" | head -30 ;;
  bench)  # with llama.cpp once its build is done (waits for it up to $3 s)
    for i in $(seq 1 ${3:-0}); do [ -f /root/llb/done ] && break; sleep 1; done
    cat /root/llb/done 2>/dev/null; tail -2 /root/llb/build.log 2>/dev/null
    L=(); [ -x /root/llb/b/bin/llama-bench ] && L=(--compare-llama-bench /root/llb/b/bin/llama-bench --compare-llama-batched-bench /root/llb/b/bin/llama-batched-bench)
    timeout 560 python3 -m toolchain.cli bench --contexts 128,4096 --batches 1,2,4,8,16,32 --prompts 512,4096,16384 "${L[@]}" -o "$OUT" 2>&1 | tee "$OUT/$2-bench.log" | tail -45 ;;
  ncu)  # Nsight Compute of the m = 16 step's o / SwiGLU / down GEMMs (second step, layer 0), per-instruction stalls
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    echo "ncu: $NCU"
    timeout ${3:-300} $NCU --clock-control none -k regex:"rms_norm_swiglu_skinny|matmul_add_skinny" --launch-skip 84 --launch-count 3 \
      --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section SourceCounters --section Occupancy \
      --section LaunchStats --section MemoryWorkloadAnalysis --import-source no -o "$OUT/$2-prof" \
      python3 scripts/profile_step.py --batch 16 > "$OUT/$2-ncu-run.log" 2>&1; tail -3 "$OUT/$2-ncu-run.log"
    $NCU -i "$OUT/$2-prof.ncu-rep" --page details > "$OUT/$2-ncu-details.txt" 2>&1; grep -E "^  [a-z_]+ |Duration|Issued Warp|Eligible" "$OUT/$2-ncu-details.txt" | head -30
    $NCU -i "$OUT/$2-prof.ncu-rep" --page source --csv --print-source sass > "$OUT/$2-sass.csv" 2>&1; wc -c "$OUT/$2-sass.csv"; head -c 600 "$OUT/$2-sass.csv" ;;
  san)
    timeout ${3:-280} compute-sanitizer --tool ${4:-memcheck} python3 scripts/sanitize_step.py ${5:-} 2>&1 | tail -6 | tee "$OUT/$2-${4:-memcheck}.log" ;;
esac
echo "$1: $((SECONDS - t0)) s"
