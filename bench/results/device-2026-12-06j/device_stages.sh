#!/usr/bin/env bash
# tenth session. Stage in $1, tag in $2. Carry .whl, scripts/.dev15.sh (+ .dev15.py).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" QTRT_KERNEL_CACHE=/tmp/qtrt-kernels QTRT_BENCH_DIR=/tmp QTRT_GPU_TESTS=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu-$2.txt"
t0=$SECONDS
case "$1" in
  test)
    timeout ${3:-280} python3 -m pytest -q -x tests/test_cuda_backend.py tests/test_engine.py ${4:+-k "$4"} > "$OUT/$2-tests.log" 2>&1; tail -8 "$OUT/$2-tests.log" ;;
  ktest)
    timeout ${3:-200} python3 -m pytest -q tests/test_kernels_gpu.py -k "${4:-rope_kv_attention or kv_grid}" > "$OUT/$2-ktests.log" 2>&1; tail -5 "$OUT/$2-ktests.log" ;;
  first)  # the first call of a lease: issue 17's prefetch question, then the branch's tests and its engine A/B
    bash "$0" bb "$2" 55
    timeout 90 python3 -m pytest -q tests/test_kernels_gpu.py -k "rope_kv_attention and (narrow or cluster)" > "$OUT/$2-ktests.log" 2>&1; tail -2 "$OUT/$2-ktests.log"
    timeout 150 python3 -m pytest -q tests/test_cuda_backend.py tests/test_engine.py -k "head or kv_grid or one_block or batched_slots or mixed or prompt_piece or under_load_on_cuda or logprobs_through" > "$OUT/$2-tests.log" 2>&1; tail -4 "$OUT/$2-tests.log"
    timeout 110 python3 scripts/engine_steps_ab.py --rounds 1 2>&1 | tee "$OUT/$2-engine.log" | tail -4 ;;
  all1)  # the one call a short lease allows: the new kernels' and plans' tests, then the A/Bs
    timeout 100 python3 -m pytest -q tests/test_kernels_gpu.py -k "rope_kv_attention and (narrow or cluster)" > "$OUT/$2-ktests.log" 2>&1; tail -2 "$OUT/$2-ktests.log"
    timeout 170 python3 -m pytest -q tests/test_cuda_backend.py tests/test_engine.py -k "head or kv_grid or one_block or batched_slots or mixed or prompt_piece or under_load_on_cuda or logprobs_through" > "$OUT/$2-tests.log" 2>&1; tail -4 "$OUT/$2-tests.log"
    timeout 120 python3 scripts/engine_steps_ab.py --rounds 1 2>&1 | tee "$OUT/$2-engine.log" | tail -4
    timeout 90 python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches 8,16 \
      --variants control,attn_wide 2>&1 | tee "$OUT/$2-tune.log" | tail -8 ;;
  all2)  # a shorter lease: tests, then the narrow attention's A/B, then the engine's
    timeout 90 python3 -m pytest -q tests/test_kernels_gpu.py -k "rope_kv_attention and narrow" > "$OUT/$2-ktests.log" 2>&1; tail -2 "$OUT/$2-ktests.log"
    timeout 150 python3 -m pytest -q tests/test_cuda_backend.py tests/test_engine.py -k "head or kv_grid or one_block or mixed or under_load_on_cuda or logprobs_through" > "$OUT/$2-tests.log" 2>&1; tail -4 "$OUT/$2-tests.log"
    timeout 80 python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches 16 \
      --variants control,attn_wide 2>&1 | tee "$OUT/$2-tune.log" | tail -6
    timeout 100 python3 scripts/engine_steps_ab.py --rounds 1 --variants each_launch,packed_head 2>&1 | tee "$OUT/$2-engine.log" | tail -3 ;;
  engine)
    timeout ${3:-280} python3 scripts/engine_steps_ab.py --rounds ${4:-2} 2>&1 | tee "$OUT/$2-engine.log" | tail -8
    mv -f "$OUT/engine_steps.json" "$OUT/$2-engine_steps.json" ;;
  tune)
    timeout ${3:-280} python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches ${4:-8,12,16,32} \
      --variants control,attn_wide 2>&1 | tee "$OUT/$2-tune.log" | tail -14 ;;
  py)
    timeout ${3:-280} python3 scripts/.dev15.py "$2" 2>&1 | tee "$OUT/$2-py.log" | tail -20 ;;
  bench)
    timeout 340 python3 -m toolchain.cli bench --contexts 128 --batches 1,16 --prompts 512,4096,16384 -o "$OUT" 2>&1 | tee "$OUT/$2-bench.log" | tail -25 ;;
  ncu)  # the batched step's attention: m = 16 and m = 1, the second step's first two layers
    for b in 16 1; do
      timeout 150 ncu --clock-control none -k regex:rope_kv_attention --launch-skip 28 --launch-count 2 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
        python3 scripts/profile_step.py --batch $b > "$OUT/$2-ncu-b$b.log" 2>&1
      grep -E "Duration|Registers|Waves|Achieved Occupancy|Theoretical Occupancy|Block Limit|Cluster|Grid Size|Warp Cycles Per Issued|One or More" "$OUT/$2-ncu-b$b.log" | head -40
    done ;;
  bb)  # issue 17: the trivial chain with the step's bytes prefetched into L2, 5 and 3 hops, contexts 128 / 4,096
    for a in "--context 128" "--context 4096" "--context 128 --hops 3"; do
      only=pdl,pdl_ll; for w in 8 16 24 32; do only+=,pdl_prefetch_${w}mb,pdl_prefetch_in_${w}mb,pdl_prefetch_node_${w}mb,pdl_prefetch_side_${w}mb; done
      [ -f /tmp/bb.cubin ] || nvcc -cubin -arch=sm_90 -O3 -std=c++17 scripts/boundary_bench.cu -o /tmp/bb.cubin
      timeout ${3:-100} python3 scripts/boundary_bench.py --cubin /tmp/bb.cubin --mb 7 $a --prefetch-mb 8,16,24,32 --only $only \
        > "$OUT/$2-bb-${a// /_}.json" 2> >(tee "$OUT/$2-bb-${a// /_}.log" | grep -v "^ " | tail -14)
    done ;;
  san)
    timeout 230 compute-sanitizer --tool memcheck python3 scripts/sanitize_step.py 2>&1 | tail -6 | tee "$OUT/$2-memcheck.log" ;;
esac
echo "$1: $((SECONDS - t0)) s"
