#!/usr/bin/env bash
# thirteenth session. Stage in $1, tag in $2. Carry .whl, scripts/.dev18.sh (and .dev/llama-src.tgz for llb).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" QTRT_KERNEL_CACHE=/tmp/qtrt-kernels QTRT_BENCH_DIR=/tmp QTRT_GPU_TESTS=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu-$2.txt"
t0=$SECONDS
# from call a on: the default it picked (/root/pick), set in this call's copy of the tree too
[ "$1" != wr ] && [ "$1" != all ] && [ -f /root/pick ] && python3 scripts/.dev18_flip.py $(cat /root/pick) | tee "$OUT/$2-flip.txt"
llb() {  # starts a build of llama.cpp (llama-cpp-python 0.3.36 sdist, vendor tree) in /root/llb in the background
  :  # (the build commands are not kept in the repository)
}
case "$1" in
  wr)  # the first call: the warp-ring GEMMs' kernel tests, then their A/B against the default
    llb
    timeout 200 python3 -m pytest -q tests/test_kernels_gpu.py -k "skinny_warp_rings or skinny_variants or scales_h2" > "$OUT/$2-ktests.log" 2>&1; tail -4 "$OUT/$2-ktests.log"
    timeout 330 python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches 8,16,32 \
      --variants ${3:-control,skinny_wr,skinny_wr_x3,skinny_wr_s3,skinny_wr_s4x6,skinny_h2s,skinny_wr_h2s} 2>&1 | tee "$OUT/$2-tune.log" | tail -30
    cp "$OUT/tuning.json" /root/a-tuning.json; cp "$OUT/$2-ktests.log" /root/a-ktests.log
    python3 scripts/.dev18_pick.py /root/a-tuning.json /root/a-ktests.log > /root/pick; cat /root/pick
    tail -3 /root/llb/build.log 2>/dev/null; cat /root/llb/done 2>/dev/null ;;
  all)  # one call: the variants' kernel tests and A/B, the pick set, then the bench (with llama.cpp if built by then)
    llb
    timeout 150 python3 -m pytest -q tests/test_kernels_gpu.py -k "skinny_warp_rings or scales_h2" > "$OUT/$2-ktests.log" 2>&1; tail -3 "$OUT/$2-ktests.log"
    timeout 200 python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches 8,16,32 \
      --variants ${3:-control,skinny_wr,skinny_wr_x3,skinny_wr_h2s,skinny_wr_s3} 2>&1 | tee "$OUT/$2-tune.log" | grep -E "m=|tok/s \(" | head -24
    cp "$OUT/tuning.json" /root/a-tuning.json; cp "$OUT/$2-ktests.log" /root/a-ktests.log
    python3 scripts/.dev18_pick.py /root/a-tuning.json /root/a-ktests.log > /root/pick; cat /root/pick
    python3 scripts/.dev18_flip.py $(cat /root/pick) | tee "$OUT/$2-flip.txt"
    while [ $((SECONDS - t0)) -lt ${4:-330} ] && [ ! -f /root/llb/done ]; do sleep 2; done
    echo "llama: $(cat /root/llb/done 2>/dev/null) at $((SECONDS - t0)) s"; tail -2 /root/llb/build.log 2>/dev/null
    L=(); [ -x /root/llb/b/bin/llama-bench ] && L=(--compare-llama-bench /root/llb/b/bin/llama-bench --compare-llama-batched-bench /root/llb/b/bin/llama-batched-bench)
    timeout $((588 - (SECONDS - t0))) python3 -m toolchain.cli bench --contexts 128 --batches 1,2,4,8,16,32 --prompts 512,4096,16384 "${L[@]}" -o "$OUT" 2>&1 | tee "$OUT/$2-bench.log" | tail -30 ;;
  flipbench)  # pick the default from call a's tuning, set it (the same edit is made on this machine after), bench
    for i in $(seq 1 ${3:-0}); do [ -f /root/llb/done ] && break; sleep 1; done
    cat /root/llb/done 2>/dev/null; tail -2 /root/llb/build.log 2>/dev/null
    L=(); [ -x /root/llb/b/bin/llama-bench ] && L=(--compare-llama-bench /root/llb/b/bin/llama-bench --compare-llama-batched-bench /root/llb/b/bin/llama-batched-bench)
    timeout 540 python3 -m toolchain.cli bench --contexts 128,4096 --batches 1,2,4,8,16,32 --prompts 512,4096,16384 "${L[@]}" -o "$OUT" 2>&1 | tee "$OUT/$2-bench.log" | tail -45 ;;
  test)
    llb
    timeout ${3:-400} python3 -m pytest -q ${5:-tests/test_cuda_backend.py tests/test_engine.py tests/test_sampling_gpu.py} ${4:+-k "$4"} > "$OUT/$2-tests.log" 2>&1; tail -8 "$OUT/$2-tests.log" ;;
  ktest)
    llb
    timeout ${3:-300} python3 -m pytest -q tests/test_kernels_gpu.py tests/test_gemm_gpu.py -k "${4:-skinny}" > "$OUT/$2-ktests.log" 2>&1; tail -5 "$OUT/$2-ktests.log" ;;
  tune)
    timeout ${3:-280} python3 scripts/decode_tuning.py --contexts 128 --rounds 2 --tokens 32 --steps 8 --batches ${4:-8,16,32} \
      --variants ${5:-control,skinny_wr} 2>&1 | tee "$OUT/$2-tune.log" | tail -14 ;;
  bench)  # with llama.cpp once its build is done (waits for it up to $3 s)
    for i in $(seq 1 ${3:-0}); do [ -f /root/llb/done ] && break; sleep 1; done
    cat /root/llb/done 2>/dev/null; tail -2 /root/llb/build.log 2>/dev/null
    L=(); [ -x /root/llb/b/bin/llama-bench ] && L=(--compare-llama-bench /root/llb/b/bin/llama-bench --compare-llama-batched-bench /root/llb/b/bin/llama-batched-bench)
    timeout 560 python3 -m toolchain.cli bench --contexts 128,4096 --batches 1,2,4,8,16,32 --prompts 512,4096,16384 "${L[@]}" -o "$OUT" 2>&1 | tee "$OUT/$2-bench.log" | tail -45 ;;
  san)
    timeout ${3:-280} compute-sanitizer --tool ${4:-memcheck} python3 scripts/sanitize_step.py ${5:-} 2>&1 | tail -6 | tee "$OUT/$2-${4:-memcheck}.log" ;;
esac
echo "$1: $((SECONDS - t0)) s"
