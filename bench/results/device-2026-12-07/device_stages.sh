#!/usr/bin/env bash
# twelfth session. Stage in $1, tag in $2. Carry .whl, scripts/.dev17.sh.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" QTRT_KERNEL_CACHE=/tmp/qtrt-kernels QTRT_BENCH_DIR=/tmp QTRT_GPU_TESTS=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu-$2.txt"
t0=$SECONDS
case "$1" in
  k1)  # the first call: the stream-K GEMMs' kernel tests, then their A/B against the cluster split
    timeout 150 python3 -m pytest -q tests/test_kernels_gpu.py -k "skinny_streamk or skinny_fused" > "$OUT/$2-ktests.log" 2>&1; tail -4 "$OUT/$2-ktests.log"
    timeout 200 python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches 8,16,32 \
      --variants control,skinny_streamk,skinny_streamk_noqkv,skinny_streamk_big 2>&1 | tee "$OUT/$2-tune.log" | tail -16 ;;
  e1)  # the engine's chunks: its tests on the GPU, then the bench's prompts through the engine
    timeout 200 python3 -m pytest -q tests/test_engine.py tests/test_cuda_backend.py -k "engine or under_load_on_cuda or logprobs_through or prompt_piece or launched_ahead or mixed" > "$OUT/$2-tests.log" 2>&1; tail -4 "$OUT/$2-tests.log"
    timeout 200 python3 -m toolchain.cli bench --contexts 128 --batches 1,16 --prompts 512,4096,16384 -o "$OUT" 2>&1 | tee "$OUT/$2-bench.log" | grep -E "prompt of|mixed|batch|tok/s" | head -20 ;;
  pg)  # piece_graphs: its test and the engine's tests on the GPU, then the idle engine's prompts A/B
    timeout 100 python3 -m pytest -q tests/test_cuda_backend.py tests/test_engine.py -k "replay_captured or under_load_on_cuda or logprobs_through" > "$OUT/$2-tests.log" 2>&1; tail -4 "$OUT/$2-tests.log"
    timeout 130 python3 scripts/.dev17.py ${3:-1} 2>&1 | tee "$OUT/$2-pg.log" | tail -6 ;;
  test)
    timeout ${3:-400} python3 -m pytest -q tests/test_cuda_backend.py tests/test_engine.py tests/test_sampling_gpu.py ${4:+-k "$4"} > "$OUT/$2-tests.log" 2>&1; tail -8 "$OUT/$2-tests.log" ;;
  ktest)
    timeout ${3:-300} python3 -m pytest -q tests/test_kernels_gpu.py -k "${4:-skinny}" > "$OUT/$2-ktests.log" 2>&1; tail -5 "$OUT/$2-ktests.log" ;;
  tune)
    timeout ${3:-280} python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches ${4:-8,16,32} \
      --variants ${5:-control,skinny_streamk} 2>&1 | tee "$OUT/$2-tune.log" | tail -14 ;;
  bench)
    timeout 560 python3 -m toolchain.cli bench --contexts 128,4096 --batches 1,2,4,8,16,32 --prompts 512,4096,16384 -o "$OUT" 2>&1 | tee "$OUT/$2-bench.log" | tail -40 ;;
  san)
    timeout ${3:-280} compute-sanitizer --tool ${4:-memcheck} python3 scripts/sanitize_step.py 2>&1 | tail -6 | tee "$OUT/$2-${4:-memcheck}.log" ;;
  ncu)  # the few-token GEMMs at m = 16, the second step's first layer and the lm_head
    timeout 200 ncu --clock-control none -k regex:skinny --launch-skip ${3:-4} --launch-count 5 \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
      python3 scripts/profile_step.py --batch 16 > "$OUT/$2-ncu.log" 2>&1
    grep -E "skinny|Duration|Waves|Achieved Occupancy|Warp Cycles Per Issued|Issued Warp" "$OUT/$2-ncu.log" | head -50 ;;
esac
echo "$1: $((SECONDS - t0)) s"
