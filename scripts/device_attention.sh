#!/usr/bin/env bash
# On the lent GPU (the `run` tool): rope_kv_attention only. Builds the kernel (resource usage), probes the mma
# fragment layouts the kernel assumes, runs the attention tests of tests/test_kernels_gpu.py, checks extra cases
# (long contexts, multi-cluster merges with in-step appends, many slots, long prefill, repeated launches) for every
# variant, then times m = 1 decode of the 1.5B layout (12 q heads, 2 kv heads, head dim 128) at contexts 128, 1k,
# 4k, 32k: median of CUDA-event-timed launches and the mean launch inside a captured graph of back-to-back launches,
# caches rotated past L2. Variants: the previous kernel (build/attn_dev/rope_kv_attention_old.cu when carried:
# `git show 1bd688c:plugins/rope_kv_attention.cu`) and the current one with compile-time knobs (ATTN_CLUSTER_KEYS,
# ATTN_NBUF, ATTN_PF_KEYS, ATTN_LDMODE, ATTN_THREADS; ATTN_VARIANTS picks them). ATTN_NCU=0 skips the ncu pass.
# Writes $OUT/attention.log and $OUT/attention.json (OUT defaults to out/device).
#   bash scripts/device_attention.sh            (carry build/attn_dev for the old-kernel baseline)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QTRT_GPU_TESTS=1 QTRT_KERNEL_CACHE=${QTRT_KERNEL_CACHE:-/tmp/qtrt-attn-kernels}
export ATTN_VARIANTS=${ATTN_VARIANTS:-"default LD1 LD2 NBUF3 PF512 CK256 CK512 CK2048 T128"}
PY=${PYTHON:-python3}
main() {
echo "== device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | head -3
nvcc --version | tail -1

echo "== compile (resource usage)"
for cfg in "12 2 128" "14 2 64"; do
  set -- $cfg
  nvcc -cubin -arch=sm_90 -O3 -std=c++17 --resource-usage -DN_HEADS=$1 -DN_KV_HEADS=$2 -DHEAD_DIM=$3 \
    -DROPE_THETA=1000000.0 plugins/rope_kv_attention.cu -o /tmp/attn_$3.cubin 2>&1 | grep -E "registers|stack|error"
done

echo "== mma fragment layout probe (m16n8k16, m16n8k8; f16 in, f32 out)"
cat > /tmp/mma_probe.cu <<'EOF'
#include <cuda_fp16.h>
#include <stdint.h>
__device__ uint32_t pk(float a, float b) { __half2 h = __halves2half2(__float2half_rn(a), __float2half_rn(b)); return *(uint32_t*)&h; }
extern "C" __global__ void probe(const float* A, const float* B, const float* A8, const float* B8, float* C, float* C8) {
  int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t a[4], b[2], a8[2], b8;
  for (int r = 0; r < 4; ++r) { int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1); a[r] = pk(A[row * 16 + col], A[row * 16 + col + 1]); }
  for (int r = 0; r < 2; ++r) { int k = 2 * t + 8 * r; b[r] = pk(B[k * 8 + g], B[(k + 1) * 8 + g]); }
  for (int r = 0; r < 2; ++r) { int row = g + 8 * r; a8[r] = pk(A8[row * 8 + 2 * t], A8[row * 8 + 2 * t + 1]); }
  b8 = pk(B8[2 * t * 8 + g], B8[(2 * t + 1) * 8 + g]);
  float d[4] = {0, 0, 0, 0}, e[4] = {0, 0, 0, 0};
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
      : "+f"(e[0]), "+f"(e[1]), "+f"(e[2]), "+f"(e[3]) : "r"(a8[0]), "r"(a8[1]), "r"(b8));
  for (int r = 0; r < 4; ++r) { int row = g + 8 * (r >> 1), col = 2 * t + (r & 1); C[row * 8 + col] = d[r]; C8[row * 8 + col] = e[r]; }
}
EOF
nvcc -cubin -arch=sm_90 -O3 /tmp/mma_probe.cu -o /tmp/mma_probe.cubin && $PY - <<'EOF'
import numpy as np
from toolchain import cuda_runtime as cr
from toolchain.kernels import LaunchConfig
rng = np.random.default_rng(0)
A, B = (rng.standard_normal(s).astype(np.float16).astype(np.float32) for s in ((16, 16), (16, 8)))
A8, B8 = (rng.standard_normal(s).astype(np.float16).astype(np.float32) for s in ((16, 8), (8, 8)))
bufs = [cr.DeviceBuffer.from_numpy(x) for x in (A, B, A8, B8)]
C, C8 = cr.DeviceBuffer(16 * 8 * 4), cr.DeviceBuffer(16 * 8 * 4)
kern = cr.Module(open("/tmp/mma_probe.cubin", "rb").read()).kernel("probe")
kern.launch(LaunchConfig((1, 1, 1), (32, 1, 1), 0, ()), [*bufs, C, C8])
cr.synchronize()
for name, got, ref in (("m16n8k16", C.download((16, 8), np.float32), A @ B), ("m16n8k8", C8.download((16, 8), np.float32), A8 @ B8)):
    err = np.abs(got - ref).max()
    print(f"{name}: max abs err {err:.2e} -> {'layout OK' if err < 1e-3 else 'LAYOUT MISMATCH'}")
EOF

echo "== tests"
$PY -m pytest -p no:cacheprovider -q -rs tests/test_kernels_gpu.py -k attention 2>&1 | grep -v "^$" | tail -25
echo "pytest exit: ${PIPESTATUS[0]}"

echo "== extra checks and timings"
$PY - <<'EOF'
import dataclasses, json, os, subprocess, sys, time
import numpy as np
sys.path.insert(0, "tests")
from toolchain import cuda_runtime as cr, kernels as K
from toolchain.bench import copy_bandwidth, launch_timing
from test_kernels_gpu import attention_case, rel_err, NAN

cr.init()
stream = cr.Stream()
A15 = dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6)
A05 = dict(n_heads=14, n_kv_heads=2, head_dim=64, rope_theta=1e6)
KNOBS = {"default": {}, "CK256": {"ATTN_CLUSTER_KEYS": 256}, "CK512": {"ATTN_CLUSTER_KEYS": 512},
         "CK1024": {"ATTN_CLUSTER_KEYS": 1024},
         "CK2048": {"ATTN_CLUSTER_KEYS": 2048}, "NBUF3": {"ATTN_NBUF": 3}, "PF0": {"ATTN_PF_KEYS": 0},
         "PF512": {"ATTN_PF_KEYS": 512}, "PF1024": {"ATTN_PF_KEYS": 1024}, "T128": {"ATTN_THREADS": 128},
         "LD1": {"ATTN_LDMODE": 1}, "LD2": {"ATTN_LDMODE": 2}}
variants = [v for v in os.environ["ATTN_VARIANTS"].split() if v in KNOBS]
OLD = "build/attn_dev/rope_kv_attention_old.cu"
_kern = {}


def kernel(variant, a):
    key = (variant, a["head_dim"])
    if key not in _kern:
        d = K.defines_for("rope_kv_attention", a)
        if variant == "old":
            cub = f"/tmp/attn_old_{a['head_dim']}.cubin"
            subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-O3", "-std=c++17", *[f"-D{k}={v}" for k, v in d.items()],
                            OLD, "-o", cub], check=True)
            _kern[key] = cr.Module(open(cub, "rb").read()).kernel("rope_kv_attention")
        else:
            _kern[key] = cr.load_op("rope_kv_attention", {**d, **KNOBS[variant]})
    return _kern[key]


def launch(kern, a, m, n_slots, max_seq, bufs, stream=None, variant="default"):
    q, k, v, kc, vc, pb, sb, ob = bufs
    cfg = K.launch_config("rope_kv_attention", dict(m=m, n_heads=a["n_heads"], n_slots=n_slots, max_seq=max_seq))
    threads = KNOBS.get(variant, {}).get("ATTN_THREADS")
    if threads:
        cfg = dataclasses.replace(cfg, block=(threads, 1, 1))
    kern.launch_op(cfg, [q, k, v, kc, vc, pb, sb], [ob, kc, vc], stream)


rng = np.random.default_rng(1234)


def make_case(a, slots, positions, n_slots, max_seq):
    return attention_case(rng, a, slots, positions, n_slots, max_seq)


def check(variant, cs, reps=1):
    a, m = cs["a"], len(cs["slots"])
    kern = kernel(variant, a)
    worst = 0.0
    for _ in range(reps):  # repeated launches: the cross-cluster counters must come back to 0 each time
        bufs = [cr.DeviceBuffer.from_numpy(x) for x in (cs["q"], cs["k"], cs["v"], cs["kc"], cs["vc"], cs["positions"], cs["slots"])]
        ob = cr.DeviceBuffer(m * a["n_heads"] * a["head_dim"] * 4)
        ob.fill_u32(NAN)
        launch(kern, a, m, cs["n_slots"], cs["max_seq"], [*bufs, ob], variant=variant)
        cr.synchronize()
        out = ob.download((m, a["n_heads"] * a["head_dim"]), np.float32)
        kc_dev = bufs[3].download(cs["kc"].shape, np.float16)
        vc_dev = bufs[4].download(cs["vc"].shape, np.float16)
        for b in bufs + [ob]:
            b.free()
        rel, mx = rel_err(out, cs["ref"])
        written = np.zeros(cs["kc"].shape[:3], bool)
        written[cs["slots"], :, cs["positions"]] = True
        ok = np.isfinite(out).all() and rel < 2e-3
        ok &= np.array_equal(kc_dev[~written], cs["kc"][~written]) and np.array_equal(vc_dev[~written], cs["vc"][~written])
        ok &= np.array_equal(vc_dev[written], cs["vc_ref"][written])
        kd, kr = kc_dev[written].astype(np.float32), cs["kc_ref"][written].astype(np.float32)
        bound = np.spacing(np.maximum(np.abs(cs["kc_ref"][written]), np.abs(kc_dev[written]))).astype(np.float32) \
            + 1e-7 * float(cs["positions"].max()) * float(np.abs(cs["k"]).max())
        ok &= bool(np.all(np.abs(kd - kr) <= bound))
        worst = max(worst, rel if np.isfinite(rel) else 1e9)
        if not ok:
            return False, rel
    return True, worst


t_ref = time.time()
CASES = {
    "1.5B m=1 pos=32767": make_case(A15, [0], [32767], 1, 32768),
    "1.5B m=1 pos=4095": make_case(A15, [0], [4095], 1, 4096),
    "1.5B m=1 pos=1024": make_case(A15, [1], [1024], 2, 2048),
    "1.5B m=1 pos=7": make_case(A15, [0], [7], 1, 64),
    "1.5B m=2 same slot 510,511": make_case(A15, [0, 0], [510, 511], 1, 1024),
    "1.5B m=16 prefill 6000..6015": make_case(A15, [1] * 16, list(range(6000, 6016)), 2, 8192),
    "1.5B m=16 slots x16": make_case(A15, list(range(16)), list(rng.integers(0, 4096, 16)), 16, 4096),
    "1.5B m=300 prefill 0..299": make_case(A15, [0] * 300, list(range(300)), 1, 512),
    "1.5B m=40 prefill 3000..3039 + decode": make_case(A15, [2] * 40 + [0], list(range(3000, 3040)) + [999], 3, 4096),
    "0.5B m=1 pos=20000": make_case(A05, [0], [20000], 1, 20480),
    "0.5B m=16 prefill 2500..2515": make_case(A05, [0] * 16, list(range(2500, 2516)), 1, 4096),
}
print(f"(references: {time.time() - t_ref:.1f} s)")
res = {"device": cr.device_name(), "checks": {}, "timings": {}}
all_ok = True
for variant in variants:
    for name, cs in CASES.items():
        ok, rel = check(variant, cs, reps=3 if "32767" in name or "slots x16" in name else 1)
        all_ok &= ok
        res["checks"][f"{variant} {name}"] = dict(ok=bool(ok), rel=float(rel))
        print(f"check {variant:8s} {name:40s} {'ok' if ok else 'FAIL'}  rel {rel:.2e}")
print("extra checks:", "ALL OK" if all_ok else "FAILURES")

# copy bandwidth (bytes read + written)
copy_gbs = copy_bandwidth(cr, stream) / 1e9
res["copy_GBps"] = copy_gbs
print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")


def bench(fn_for, n_variants, reps=400):
    return launch_timing(cr, stream, fn_for, n_variants, reps, graph_reps=7)


rows = []
timing_variants = (["old"] if os.path.exists(OLD) else []) + variants
for a, label, Ts in ((A15, "1.5B", (128, 1024, 4096, 32768)), (A05, "0.5B", (128, 4096, 32768))):
    h, kvh, d = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    for T in Ts:
        max_seq = T
        cache_bytes = kvh * max_seq * d * 2
        copies = int(min(16, max(2, np.ceil(200e6 / (2 * cache_bytes)))))
        caches = [(cr.DeviceBuffer.from_numpy(rng.standard_normal((1, kvh, max_seq, d)).astype(np.float16)),
                   cr.DeviceBuffer.from_numpy(rng.standard_normal((1, kvh, max_seq, d)).astype(np.float16)))
                  for _ in range(copies)]
        q, k, v = (cr.DeviceBuffer.from_numpy(rng.standard_normal((1, n), dtype=np.float32)) for n in (h * d, kvh * d, kvh * d))
        pos, slot = cr.DeviceBuffer.from_numpy(np.array([T - 1], np.int32)), cr.DeviceBuffer.from_numpy(np.zeros(1, np.int32))
        ob = cr.DeviceBuffer(h * d * 4)
        for variant in timing_variants:
            if label == "0.5B" and variant not in ("old", "default"):
                continue
            kern = kernel(variant, a)
            us, usg = bench(lambda i: launch(kern, a, 1, 1, max_seq, [q, k, v, caches[i][0], caches[i][1], pos, slot, ob], stream, variant), copies)
            nbytes = 2 * kvh * T * d * 2
            gbs = nbytes / (usg * 1e-6) / 1e9
            res["timings"][f"{label} T={T} {variant}"] = dict(us=round(us, 2), us_graph=round(usg, 2), GBps_graph=round(gbs))
            line = f"{label} T={T:6d} {variant:8s} events {us:8.2f} us   graph {usg:8.2f} us  ({gbs:5.0f} GB/s of KV in graph)"
            rows.append(line)
            print(line)
        for c in caches:
            c[0].free(); c[1].free()
        for b in (q, k, v, pos, slot, ob):
            b.free()

with open(os.path.join(os.environ.get("OUT", "out/device"), "attention.json"), "w") as f:
    json.dump(res, f, indent=1)
print("\n== summary (copy bandwidth %.0f GB/s; extra checks %s)" % (copy_gbs, "ALL OK" if all_ok else "FAILURES"))
print("\n".join(rows))
EOF
echo "checks+timings exit: $?"

if [ "${ATTN_NCU:-1}" = 1 ]; then
  echo "== ncu (default variant, 1.5B m = 1; --clock-control none: the card's clocks are left alone)"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  cat > /tmp/attn_prof.py <<'EOF'
import sys
import numpy as np
from toolchain import cuda_runtime as cr, kernels as K
T = int(sys.argv[1])
a = dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6)
kern = cr.load_op("rope_kv_attention", K.defines_for("rope_kv_attention", a))
rng = np.random.default_rng(0)
kc, vc = (cr.DeviceBuffer.from_numpy(rng.standard_normal((1, 2, T, 128)).astype(np.float16)) for _ in range(2))
q, k, v = (cr.DeviceBuffer.from_numpy(rng.standard_normal((1, n), dtype=np.float32)) for n in (1536, 256, 256))
pos, slot = cr.DeviceBuffer.from_numpy(np.array([T - 1], np.int32)), cr.DeviceBuffer.from_numpy(np.zeros(1, np.int32))
out = cr.DeviceBuffer(1536 * 4)
cfg = K.launch_config("rope_kv_attention", dict(m=1, n_heads=12, n_slots=1, max_seq=T))
for _ in range(4):
    kern.launch_op(cfg, [q, k, v, kc, vc, pos, slot], [out, kc, vc])
cr.synchronize()
EOF
  if [ -n "$NCU" ]; then
    for T in 128 32768; do
      echo "-- T=$T"
      timeout 100 "$NCU" --clock-control none --cache-control all -k regex:rope_kv_attention --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --metrics \
smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_membar_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio \
        env PYTHONPATH="$PWD" $PY /tmp/attn_prof.py $T 2>&1 | grep -vE "^==PROF==|^\s*$|^    -----" | grep -E "Duration|DRAM Throughput|L2 Cache|SM Active|Warp Cycles Per Issued|stalled|Error|ERROR" | head -30 || true
    done
  else
    echo "ncu not found"
  fi
fi
}

main "$@" 2>&1 | tee "$OUT/attention.log"
