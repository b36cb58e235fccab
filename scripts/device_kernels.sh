#!/usr/bin/env bash
# On the lent GPU (the `run` tool): build every kernel, run tests/test_kernels_gpu.py, then time each kernel at the
# 1.5B decode shapes (m = 1) with CUDA events and report GB/s of the matmuls against the measured device-to-device
# copy bandwidth. Writes $OUT/kernels.log and $OUT/kernels.json (OUT defaults to out/device).
#   bash scripts/device_kernels.sh [pytest -k expression]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QTRT_GPU_TESTS=1 QTRT_KERNEL_CACHE=${QTRT_KERNEL_CACHE:-build/kernels}
PY=${PYTHON:-python3}
main() {
echo "== device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | head -3
$PY -c "import cuda.bindings, numpy; print('cuda.bindings', cuda.bindings.__version__, 'numpy', numpy.__version__)"
nvcc --version | tail -1

echo "== compile (cubin resource usage)"
$PY - <<'EOF'
import re
from toolchain import kernels as K
specs = [(op, {}) for op in K.KERNEL_OPS if op != "rope_kv_attention"] + [
    ("rope_kv_attention", K.defines_for("rope_kv_attention", dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6))),
    ("rope_kv_attention", K.defines_for("rope_kv_attention", dict(n_heads=14, n_kv_heads=2, head_dim=64, rope_theta=1e6)))]
seen = set()
for op, d in specs:
    K.compile_kernel(op, d, "ptx")
    K.compile_kernel(op, d, "cubin")
    key = (K.source_file(op), tuple(sorted(d.items())))
    if key in seen:
        continue
    seen.add(key)
    logs = sorted(K.CACHE.glob(K.source_file(op).stem + "-*.log"), key=lambda p: p.stat().st_mtime)
    text = logs[-1].read_text() if logs else ""
    for ent, props in re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?Used \d+ registers[^\n]*)", text, re.S):
        props = " ".join(props.split())
        print(f"{ent:20s} {d if d else ''} {props}")
EOF

echo "== tests"
$PY -m pytest -v -s -p no:cacheprovider tests/test_kernels_gpu.py ${1:+-k "$1"} 2>&1 | grep -v "^$"
echo "pytest exit: ${PIPESTATUS[0]}"

echo "== timings (m = 1 decode shapes, median of CUDA-event-timed launches, weights rotated past L2)"
$PY - <<'EOF'
import json, os, sys
import numpy as np
sys.path.insert(0, "tests")
from toolchain import cuda_runtime as cr, kernels as K
from test_kernels_gpu import random_weights, BLOCK

cr.init()
stream = cr.Stream()
rng = np.random.default_rng(0)
res = {"device": cr.device_name(), "kernels": {}}


def bench(fn_for, n_variants, reps=400):
    """fn_for(i) launches variant i on `stream`. Returns (median us per launch with events around each launch,
    average us per launch inside a captured graph of back-to-back launches)."""
    for i in range(min(n_variants, 5)):
        fn_for(i)
    stream.synchronize()
    ev = [(cr.Event(), cr.Event()) for _ in range(reps)]
    for r, (a, b) in enumerate(ev):
        a.record(stream)
        fn_for(r % n_variants)
        b.record(stream)
    stream.synchronize()
    med = float(np.median([b.elapsed_ms(a) for a, b in ev])) * 1e3
    n = max(100, min(n_variants, 400))  # graph of n back-to-back launches; n_variants buffers stay past L2
    g = cr.capture(stream, lambda: [fn_for(r % n_variants) for r in range(n)])
    g.launch(stream)
    stream.synchronize()
    t = [cr.time_ms(stream, lambda: g.launch(stream)) for _ in range(5)]
    return med, float(np.median(t)) * 1e3 / n


# copy bandwidth (bytes read + written)
nb = 1 << 30
A, B = cr.DeviceBuffer(nb), cr.DeviceBuffer(nb)
A.fill_u8(1)
ts = [cr.time_ms(stream, lambda: cr.memcpy_dtod(B, A, nb, stream)) for _ in range(12)][2:]
copy_gbs = 2 * nb / (np.median(ts) / 1e3) / 1e9
A.free(); B.free()
res["copy_GBps"] = copy_gbs
print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")

rows = []


def report(name, us, us_graph, nbytes=None):
    gbs = nbytes / (us * 1e-6) / 1e9 if nbytes else None
    gbs_g = nbytes / (us_graph * 1e-6) / 1e9 if nbytes else None
    res["kernels"][name] = dict(us=round(us, 2), us_graph=round(us_graph, 2), bytes=nbytes,
                                GBps=gbs and round(gbs), GBps_graph=gbs_g and round(gbs_g))
    extra = f" {gbs:7.0f} GB/s ({100 * gbs / copy_gbs:3.0f}% of copy)  graph {gbs_g:6.0f} GB/s" if nbytes else ""
    line = f"{name:34s} {us:8.2f} us  graph {us_graph:8.2f} us{extra}"
    rows.append(line)
    print(line)


MM = {"Q4_K": "q4k_matmul", "Q6_K": "q6k_matmul", "Q5_0": "q5_0_matmul", "Q8_0": "q8_0_matmul"}
cases = [("Q4_K", 1536, 1536, 1, "q/o proj"), ("Q4_K", 256, 1536, 1, "k/v proj"), ("Q6_K", 256, 1536, 1, "v proj"),
         ("Q4_K", 8960, 1536, 1, "gate/up"), ("Q4_K", 1536, 8960, 1, "down"), ("Q6_K", 1536, 8960, 1, "down"),
         ("Q6_K", 151936, 1536, 1, "lm_head"), ("Q5_0", 4864, 896, 1, "0.5B gate/up"),
         ("Q8_0", 4864, 896, 1, "0.5B gate/up"), ("Q5_0", 896, 4864, 1, "0.5B down"), ("Q8_0", 896, 4864, 1, "0.5B down"),
         ("Q4_K", 8960, 1536, 4, "gate/up"), ("Q4_K", 8960, 1536, 16, "gate/up"), ("Q4_K", 8960, 1536, 64, "gate/up")]
for t, n, k, m, what in cases:
    op = MM[t]
    kern = cr.load_op(op)
    w = random_weights(rng, t, n, k)
    copies = int(min(400, max(3, np.ceil(400e6 / w.nbytes))))
    wb = [cr.DeviceBuffer.from_numpy(w) for _ in range(copies)]
    x = cr.DeviceBuffer.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
    y = cr.DeviceBuffer(m * n * 4)
    cfg = K.launch_config(op, dict(m=m, n=n, k=k))
    us, usg = bench(lambda i: kern.launch_op(cfg, [x, wb[i], None], [y], stream), copies)
    report(f"{op} {what} m={m} {n}x{k}", us, usg, w.nbytes)
    for b in wb + [x, y]:
        b.free()

# small ops at the 1.5B decode shapes
def small(op, dims, inputs, outputs, defines=None, label=None):
    kern = cr.load_op(op, defines or {})
    bufs = [cr.DeviceBuffer.from_numpy(a) for a in inputs]
    outs = [cr.DeviceBuffer(n) for n in outputs]
    cfg = K.launch_config(op, dims)
    us, usg = bench(lambda i: kern.launch_op(cfg, bufs, outs, stream), 1)
    report(label or f"{op} {dims}", us, usg)
    for b in bufs + outs:
        b.free()

f32 = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
small("rms_norm", dict(m=1, hidden=1536), [f32(1536), f32(1536)], [1536 * 4], {"RMS_EPS": 1e-6}, "rms_norm m=1 1536")
small("add", dict(numel=1536), [f32(1536), f32(1536)], [1536 * 4], label="add 1536")
small("swiglu", dict(numel=8960), [f32(8960), f32(8960)], [8960 * 4], label="swiglu 8960")
small("argmax", dict(m=1, vocab=151936), [f32(151936)], [8], label="argmax 151936")
emb = random_weights(rng, "Q6_K", 1000, 1536)
small("q6k_gather", dict(m=1, hidden=1536), [emb, np.array([3], np.int32)], [1536 * 4], label="q6k_gather m=1 1536")

# attention, 1.5B, one decode token at context T (caches rotated so they come from HBM)
a15 = dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6)
kern = cr.load_op("rope_kv_attention", K.defines_for("rope_kv_attention", a15))
for T in (128, 1024, 4096, 32768):
    max_seq = T
    cache_bytes = 2 * max_seq * 128 * 2
    copies = int(min(16, max(2, np.ceil(200e6 / (2 * cache_bytes)))))
    caches = [(cr.DeviceBuffer.from_numpy(rng.standard_normal((1, 2, max_seq, 128)).astype(np.float16)),
               cr.DeviceBuffer.from_numpy(rng.standard_normal((1, 2, max_seq, 128)).astype(np.float16)))
              for _ in range(copies)]
    q, k, v = (cr.DeviceBuffer.from_numpy(f32(1, n)) for n in (1536, 256, 256))
    pos, slot = cr.DeviceBuffer.from_numpy(np.array([T - 1], np.int32)), cr.DeviceBuffer.from_numpy(np.zeros(1, np.int32))
    out = cr.DeviceBuffer(1536 * 4)
    cfg = K.launch_config("rope_kv_attention", dict(m=1, n_heads=12, n_slots=1, max_seq=max_seq))
    us, usg = bench(lambda i: kern.launch_op(cfg, [q, k, v, caches[i][0], caches[i][1], pos, slot],
                                             [out, caches[i][0], caches[i][1]], stream), copies)
    report(f"rope_kv_attention 1.5B m=1 T={T}", us, usg, 2 * 2 * T * 128 * 2)
    for c in caches:
        c[0].free(); c[1].free()

with open(os.path.join(os.environ.get("OUT", "out/device"), "kernels.json"), "w") as f:
    json.dump(res, f, indent=1)
print("\n== summary (copy bandwidth %.0f GB/s)" % copy_gbs)
print("\n".join(rows))
EOF
echo "bench exit: $?"

echo "== ncu (q4k gate/up and q6k lm_head at m = 1; --clock-control none: the card's clocks are left alone)"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  cat > /tmp/qtrt_prof.py <<'EOF'
import numpy as np, sys
sys.path.insert(0, "tests")
from toolchain import cuda_runtime as cr, kernels as K
from test_kernels_gpu import random_weights
rng = np.random.default_rng(0)
for op, t, n, k in (("q4k_matmul", "Q4_K", 8960, 1536), ("q6k_matmul", "Q6_K", 151936, 1536)):
    kern = cr.load_op(op)
    w = cr.DeviceBuffer.from_numpy(random_weights(rng, t, n, k))
    x = cr.DeviceBuffer.from_numpy(rng.standard_normal((1, k), dtype=np.float32))
    y = cr.DeviceBuffer(n * 4)
    for _ in range(3):
        kern.launch_op(K.launch_config(op, dict(m=1, n=n, k=k)), [x, w, None], [y])
    cr.synchronize()
EOF
  timeout 150 "$NCU" --clock-control none --target-processes all -k regex:matmul --launch-skip 2 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
    env PYTHONPATH="$PWD" $PY /tmp/qtrt_prof.py 2>&1 | grep -vE "^==PROF==|^\s*$" | head -150 || true
else
  echo "ncu not found"
fi
}

main "$@" 2>&1 | tee "$OUT/kernels.log"
