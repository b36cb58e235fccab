#!/usr/bin/env bash
# On the lent GPU (the `run` tool): build every kernel specialization of both models, run tests/test_kernels_gpu.py,
# time each projection at the decode shapes (m = 1; GB/s against the measured device-to-device copy bandwidth), the
# fused ops, a few build variants, and a whole synthetic 1.5B decode step (fused graph) captured as one CUDA graph;
# then Nsight Compute on the hot kernels. Writes $OUT/kernels.log and $OUT/kernels.json (OUT defaults to out/device).
#   bash scripts/device_kernels.sh [pytest -k expression]
#   SKIP_TESTS=1 / SKIP_BENCH=1 / SKIP_NCU=1 skip a part. Carry a prebuilt QTRT_KERNEL_CACHE to save the compiles.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QTRT_GPU_TESTS=1 QTRT_KERNEL_CACHE=${QTRT_KERNEL_CACHE:-build/kernels}
PY=${PYTHON:-python3}
main() {
echo "== device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | head -3
$PY -c "import cuda.bindings, numpy; print('cuda.bindings', cuda.bindings.__version__, 'numpy', numpy.__version__)"
nvcc --version | tail -1

echo "== compile (every specialization of both models; cubin resource usage)"
T0=$(date +%s)
$PY - <<'EOF'
import re
from toolchain import kernels as K
n = 0
for model in K.MODEL_ATTRS:
    for op, attrs in K.specializations(model):
        K.compile_kernel(op, K.defines_for(op, attrs), "cubin")
        n += 1
print(f"{n} specializations")
for log in sorted(K.CACHE.glob("*.log")):
    text = log.read_text()
    for ent, props in re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?Used \d+ registers[^\n]*)", text, re.S):
        if ent.endswith(("matmul", "matmul_add", "qkv", "swiglu")):
            d = " ".join(x for x in text.split()[:80] if x.startswith("-D"))
            print(f"{ent:16s} {d[:70]:70s} {' '.join(props.split())[-110:]}")
EOF
echo "compile: $(( $(date +%s) - T0 )) s"

if [ -z "${SKIP_TESTS:-}" ]; then
echo "== tests"
T0=$(date +%s)
$PY -m pytest -v -s -p no:cacheprovider tests/test_kernels_gpu.py ${1:+-k "$1"} 2>&1 | grep -v "^$" | cut -c1-220
echo "pytest exit: ${PIPESTATUS[0]}  ($(( $(date +%s) - T0 )) s)"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
echo "== timings (m = 1 decode shapes; event-timed median, and per launch inside a graph of back-to-back launches;"
echo "   weights rotated past L2)"
$PY - <<'EOF'
import json, os, sys, time, traceback
import numpy as np
sys.path.insert(0, "tests")
sys.path.insert(0, ".")
from toolchain import cuda_runtime as cr, kernels as K
from toolchain.bench import copy_bandwidth, launch_timing
from test_kernels_gpu import random_weights as _random_weights

cr.init()
stream = cr.Stream()
rng = np.random.default_rng(0)
res = {"device": cr.device_name(), "kernels": {}, "variants": {}, "step": {}}
OUTDIR = os.environ.get("OUT", "out/device")
f32 = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
_kern = {}


def load(op, defines):
    key = (op, tuple(sorted(defines.items())))
    if key not in _kern:
        _kern[key] = cr.load_op(op, defines)
    return _kern[key]


def bench(fn_for, n_variants, reps=300):
    """(median us per launch with events around each launch, average us per launch inside a captured graph)"""
    return launch_timing(cr, stream, fn_for, n_variants, reps)


copy_gbs = copy_bandwidth(cr, stream) / 1e9
res["copy_GBps"] = copy_gbs
print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
rows = []


def report(name, us, us_graph, nbytes=None, table="kernels"):
    gbs = nbytes / (us * 1e-6) / 1e9 if nbytes else None
    gbs_g = nbytes / (us_graph * 1e-6) / 1e9 if nbytes else None
    res[table][name] = dict(us=round(us, 2), us_graph=round(us_graph, 2), bytes=nbytes,
                            GBps=gbs and round(gbs), GBps_graph=gbs_g and round(gbs_g))
    extra = f"  graph {gbs_g:6.0f} GB/s ({100 * gbs_g / copy_gbs:3.0f}% of copy)" if nbytes else ""
    line = f"{name:52s} {us:8.2f} us  graph {us_graph:8.2f} us{extra}"
    rows.append(line)
    print(line)


CFG = None  # variant sweep: a function (op, dims) -> LaunchConfig replacing kernels.launch_config


def bench_op(name, op, defines, dims, weights, others, outputs, table="kernels", reps=300):
    """weights: list of host uint8 arrays (rotated copies on device), others: host arrays or None (shared), in
    kernel input order given by ORDER[op] ('w' a weight, 'o' another input)."""
    kern = load(op, defines)
    wbytes = sum(w.nbytes for w in weights)
    copies = int(min(200, max(3, np.ceil(300e6 / wbytes))))
    wb = [[cr.DeviceBuffer.from_numpy(w) for w in weights] for _ in range(copies)]
    ob = [None if o is None else cr.DeviceBuffer.from_numpy(o) for o in others]
    outs = [cr.DeviceBuffer(nbytes) for nbytes in outputs]
    cfg = CFG(op, dims) if CFG else K.launch_config(op, dims)

    def args(i):  # interleave per the op's input order
        wi, oi, lst = iter(wb[i]), iter(ob), []
        for kind in ORDER[op]:
            lst.append(next(wi) if kind == "w" else next(oi))
        return lst

    argl = [args(i) for i in range(copies)]
    us, usg = bench(lambda i: kern.launch_op(cfg, argl[i], outs, stream), copies, reps)
    report(name, us, usg, wbytes, table)
    for lst in wb:
        for b in lst:
            b.free()
    for b in ob + outs:
        if b is not None:
            b.free()
    return usg


# kernel input order: 'w' a (rotated) weight, 'o' another input (x, norm weight, bias, residual)
ORDER = {**{op: "owo" for op in K.MATMUL_OPS}, "matmul_add": "owoo", "rms_norm_qkv": "oowowowo",
         "rms_norm_swiglu": "ooww"}
MM = {"Q4_K": "q4k_matmul", "Q6_K": "q6k_matmul", "Q5_0": "q5_0_matmul", "Q8_0": "q8_0_matmul"}
EPS = 9.999999974752427e-07
_host = {}


def random_weights(rng_, t, n, k):  # host weights are reused between cases (each case rotates device copies)
    if (t, n, k) not in _host:
        _host[(t, n, k)] = _random_weights(rng_, t, n, k)
    return _host[(t, n, k)]


def matmul(t, n, k, m, what, extra=None, table="kernels", generic=False):
    op = MM[t]
    d = {} if generic else K.defines_for(op, dict(in_features=k, out_features=n))
    d.update(extra or {})
    w = random_weights(rng, t, n, k)
    return bench_op(f"{op} {what} m={m} {n}x{k} {d if d else ''}", op, d, dict(m=m, n=n, k=k), [w],
                    [f32(m, k), None], [m * n * 4], table)


def matmul_add(t, n, k, m, what, extra=None, table="kernels"):
    attrs = dict(w_type=t, in_features=k, out_features=n)
    d = dict(K.defines_for("matmul_add", attrs), **(extra or {}))
    w = random_weights(rng, t, n, k)
    return bench_op(f"matmul_add {what} {t} m={m} {n}x{k}", "matmul_add", d, dict(attrs, m=m, n=n, k=k), [w],
                    [f32(m, k), np.zeros(n, np.float32), f32(m, n)], [m * n * 4], table)


def qkv(types, hidden, q_dim, kv_dim, m, what, extra=None, table="kernels"):
    attrs = dict(epsilon=EPS, q_type=types[0], k_type=types[1], v_type=types[2], q_dim=q_dim, kv_dim=kv_dim)
    d = dict(K.defines_for("rms_norm_qkv", attrs), **(extra or {}))
    ws = [random_weights(rng, t, n, hidden) for t, n in zip(types, (q_dim, kv_dim, kv_dim))]
    return bench_op(f"rms_norm_qkv {what} {'/'.join(types)} m={m}", "rms_norm_qkv", d,
                    dict(attrs, m=m, hidden=hidden), ws,
                    [f32(m, hidden), f32(hidden), f32(q_dim), f32(kv_dim), f32(kv_dim)],
                    [m * q_dim * 4, m * kv_dim * 4, m * kv_dim * 4], table)


def swiglu(types, hidden, ffn, m, what, extra=None, table="kernels"):
    attrs = dict(epsilon=EPS, gate_type=types[0], up_type=types[1], ffn=ffn)
    d = dict(K.defines_for("rms_norm_swiglu", attrs), **(extra or {}))
    ws = [random_weights(rng, t, ffn, hidden) for t in types]
    return bench_op(f"rms_norm_swiglu {what} {'/'.join(types)} m={m}", "rms_norm_swiglu", d,
                    dict(attrs, m=m, hidden=hidden), ws, [f32(m, hidden), f32(hidden)], [m * ffn * 4], table)


def guarded(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except Exception:
        traceback.print_exc()
        return float("nan")


# unfused projections (the same shapes as the earlier measurements, .dev/run3_kernels.log)
for t, n, k, m, what in [("Q4_K", 1536, 1536, 1, "q/o proj"), ("Q4_K", 256, 1536, 1, "k/v proj"),
                         ("Q6_K", 256, 1536, 1, "v proj"), ("Q4_K", 8960, 1536, 1, "gate/up"),
                         ("Q4_K", 1536, 8960, 1, "down"), ("Q6_K", 1536, 8960, 1, "down"),
                         ("Q6_K", 151936, 1536, 1, "lm_head"), ("Q5_0", 4864, 896, 1, "0.5B gate/up"),
                         ("Q8_0", 4864, 896, 1, "0.5B gate/up"), ("Q5_0", 896, 4864, 1, "0.5B down"),
                         ("Q8_0", 896, 4864, 1, "0.5B down"), ("Q8_0", 151936, 896, 1, "0.5B lm_head"),
                         ("Q4_K", 8960, 1536, 4, "gate/up"), ("Q4_K", 8960, 1536, 16, "gate/up"),
                         ("Q4_K", 8960, 1536, 64, "gate/up")]:
    guarded(matmul, t, n, k, m, what)
guarded(matmul, "Q4_K", 1536, 8960, 1, "down (generic build, no cluster)", generic=True)

# fused ops, 1.5B and 0.5B decode shapes
fused = {}
fused["qkv6"] = guarded(qkv, ("Q4_K", "Q4_K", "Q6_K"), 1536, 1536, 256, 1, "1.5B")
fused["qkv4"] = guarded(qkv, ("Q4_K", "Q4_K", "Q4_K"), 1536, 1536, 256, 1, "1.5B")
fused["o"] = guarded(matmul_add, "Q4_K", 1536, 1536, 1, "o 1.5B")
fused["swiglu"] = guarded(swiglu, ("Q4_K", "Q4_K"), 1536, 8960, 1, "1.5B")
fused["down4"] = guarded(matmul_add, "Q4_K", 1536, 8960, 1, "down 1.5B")
fused["down6"] = guarded(matmul_add, "Q6_K", 1536, 8960, 1, "down 1.5B")
guarded(qkv, ("Q5_0", "Q5_0", "Q8_0"), 896, 896, 128, 1, "0.5B")
guarded(matmul_add, "Q5_0", 896, 896, 1, "o 0.5B")
guarded(swiglu, ("Q5_0", "Q5_0"), 896, 4864, 1, "0.5B")
guarded(matmul_add, "Q6_K", 896, 4864, 1, "down 0.5B")
guarded(swiglu, ("Q4_K", "Q4_K"), 1536, 8960, 4, "1.5B")

# ---- build variants of plugins/qmv.cuh (defines) with their own grids: which knob moves what
def variant_cfg(nw, minb, cluster=None):
    def cfg(op, dims):
        base = K.launch_config(op, dims)
        if op == "rms_norm_swiglu":
            units, per, c = -(-dims["ffn"] // 2), nw // 2, 1
        elif op == "rms_norm_qkv":
            units, per, c = -(-dims["q_dim"] // 2) + 2 * -(-dims["kv_dim"] // 2), nw, 1
        else:
            t = K.MATMUL_TYPE[op] if op in K.MATMUL_OPS else dims["w_type"]
            units, per, c = -(-dims["n"] // 2), nw, K.matmul_split(dims["n"], dims["k"], t)
        c = cluster or c
        return K.LaunchConfig((K.qmv_grid_x(units, per, c, K.QMV_SMS * minb), base.grid[1], 1), (32 * nw, 1, 1), 0,
                              base.scalars)
    return cfg


VARIANTS = [("base", {}, 6, 4), ("pair", {"QMV_PAIR": 1}, 6, 4), ("ns2", {"QMV_NS": 2}, 6, 4),
            ("nw8m3", {"QMV_NW": 8, "QMV_MINB": 3}, 8, 3)]
vt = {}
for vname, extra, nw, minb in VARIANTS:
    print(f"-- variant {vname}: {extra} NW={nw} MINB={minb}")
    CFG = variant_cfg(nw, minb)
    vt[(vname, "swiglu")] = guarded(swiglu, ("Q4_K", "Q4_K"), 1536, 8960, 1, f"1.5B [{vname}]", extra, "variants")
    vt[(vname, "down4")] = guarded(matmul_add, "Q4_K", 1536, 8960, 1, f"down [{vname}]", extra, "variants")
    vt[(vname, "down6")] = guarded(matmul_add, "Q6_K", 1536, 8960, 1, f"down [{vname}]", extra, "variants")
    vt[(vname, "o")] = guarded(matmul_add, "Q4_K", 1536, 1536, 1, f"o [{vname}]", extra, "variants")
    vt[(vname, "qkv6")] = guarded(qkv, ("Q4_K", "Q4_K", "Q6_K"), 1536, 1536, 256, 1, f"[{vname}]", extra, "variants")
    vt[(vname, "lm_head")] = guarded(matmul, "Q6_K", 151936, 1536, 1, f"lm_head [{vname}]", extra, "variants")
    vt[(vname, "gateup")] = guarded(matmul, "Q4_K", 8960, 1536, 1, f"gate/up [{vname}]", extra, "variants")
print("-- variant: cluster k-split of ffn_down (KSPLIT)")
for c in (2, 3):
    CFG = variant_cfg(6, 4, c)
    for t in ("Q4_K", "Q6_K"):
        vt[(f"ksplit{c}", f"down{t[1]}")] = guarded(matmul_add, t, 1536, 8960, 1, f"down [KSPLIT={c}]",
                                                    {"KSPLIT": c}, "variants")
CFG = None
shapes = ["swiglu", "down4", "down6", "o", "qkv6", "lm_head", "gateup"]
print("\n== variants: graph us per launch (m = 1)")
print(f"{'variant':10s}" + "".join(f"{s:>9s}" for s in shapes))
for vname, *_ in VARIANTS:
    print(f"{vname:10s}" + "".join(f"{vt.get((vname, s), float('nan')):9.2f}" for s in shapes))
for c in (2, 3):
    print(f"ksplit{c:<4d}" + "".join(f"{vt.get((f'ksplit{c}', s), float('nan')):9.2f}" if s.startswith("down")
                                      else f"{'':9s}" for s in shapes))
res["variant_table"] = {f"{a}/{b}": v for (a, b), v in vt.items()}

# small ops at the 1.5B decode shapes
def small(op, dims, inputs, outputs, defines=None, label=None):
    kern = load(op, defines or {})
    bufs = [cr.DeviceBuffer.from_numpy(a) for a in inputs]
    outs = [cr.DeviceBuffer(n) for n in outputs]
    cfg = K.launch_config(op, dims)
    us, usg = bench(lambda i: kern.launch_op(cfg, bufs, outs, stream), 1)
    report(label or f"{op} {dims}", us, usg)
    for b in bufs + outs:
        b.free()
    return usg

smalls = {}
smalls["rms"] = guarded(small, "rms_norm", dict(m=1, hidden=1536), [f32(1536), f32(1536)], [1536 * 4],
                        {"RMS_EPS": 1e-6}, "rms_norm m=1 1536")
smalls["argmax"] = guarded(small, "argmax", dict(m=1, vocab=151936), [f32(151936)], [8], label="argmax 151936")
emb = random_weights(rng, "Q4_K", 1000, 1536)
smalls["gather"] = guarded(small, "q4k_gather", dict(m=1, hidden=1536), [emb, np.array([3], np.int32)], [1536 * 4],
                           label="q4k_gather m=1 1536")


# ---- a whole 1.5B decode step, fused graph, captured once and replayed (synthetic weights, real layout)
def decode_step(T0s=(128, 1024), replays=64, max_seq=2048, uniform=False):
    """The real layout alternates Q6_K / Q4_K (v, down) layers; uniform=True makes every layer Q4_K (the same 4
    kernels each layer: shows what kernel-code locality is worth)."""
    hidden, ffn, q_dim, kv_dim, vocab, L = 1536, 8960, 1536, 256, 151936, 28
    a15 = dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6)
    layer_types = [("Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q4_K", "Q6_K"),
                   ("Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K")]
    if uniform:
        layer_types = layer_types[1:]
    host = {}

    def hw(t, n, k):
        if (t, n, k) not in host:
            host[(t, n, k)] = random_weights(rng, t, n, k)
        return host[(t, n, k)]

    dev = []  # every buffer, freed at the end
    def D(a):
        b = cr.DeviceBuffer.from_numpy(a)
        dev.append(b)
        return b
    def E(nbytes):
        b = cr.DeviceBuffer(nbytes)
        b.fill_u8(0)
        dev.append(b)
        return b

    t0 = time.time()
    A, Bf = E(hidden * 4), E(hidden * 4)
    q, k, v, att, g = E(q_dim * 4), E(kv_dim * 4), E(kv_dim * 4), E(q_dim * 4), E(ffn * 4)
    hf, logits, nxt = E(hidden * 4), E(vocab * 4), E(8)
    tok, pos, slot = D(np.array([7], np.int32)), D(np.array([0], np.int32)), D(np.zeros(1, np.int32))
    zeros_h = D(np.zeros(hidden, np.float32))
    launches = []
    w_emb = D(hw("Q4_K", vocab, hidden))
    wbytes = 0
    launches.append((load("q4k_gather", {}), K.launch_config("q4k_gather", dict(m=1, hidden=hidden)),
                      [w_emb, tok], [A]))
    attn_k = load("rope_kv_attention", K.defines_for("rope_kv_attention", a15))
    attn_cfg = K.launch_config("rope_kv_attention", dict(m=1, n_heads=12, n_slots=1, max_seq=max_seq))
    for i in range(L):
        tq, tk, tv, to, tg, tu, td = layer_types[i % len(layer_types)]
        ws = [D(hw(tq, q_dim, hidden)), D(hw(tk, kv_dim, hidden)), D(hw(tv, kv_dim, hidden)),
              D(hw(to, hidden, q_dim)), D(hw(tg, ffn, hidden)), D(hw(tu, ffn, hidden)), D(hw(td, hidden, ffn))]
        wbytes += sum(b.nbytes for b in ws)
        nw1, nw2 = D(f32(hidden)), D(f32(hidden))
        bq, bk, bv = D(f32(q_dim)), D(f32(kv_dim)), D(f32(kv_dim))
        kc = D(np.zeros((1, 2, max_seq, 128), np.float16))
        vc = D(np.zeros((1, 2, max_seq, 128), np.float16))
        at = dict(epsilon=EPS, q_type=tq, k_type=tk, v_type=tv, q_dim=q_dim, kv_dim=kv_dim)
        launches.append((load("rms_norm_qkv", K.defines_for("rms_norm_qkv", at)),
                         K.launch_config("rms_norm_qkv", dict(at, m=1, hidden=hidden)),
                         [A, nw1, ws[0], bq, ws[1], bk, ws[2], bv], [q, k, v]))
        launches.append((attn_k, attn_cfg, [q, k, v, kc, vc, pos, slot], [att, kc, vc]))
        ao = dict(w_type=to, in_features=q_dim, out_features=hidden)
        launches.append((load("matmul_add", K.defines_for("matmul_add", ao)),
                         K.launch_config("matmul_add", dict(ao, m=1, n=hidden, k=q_dim)), [att, ws[3], zeros_h, A], [Bf]))
        asw = dict(epsilon=EPS, gate_type=tg, up_type=tu, ffn=ffn)
        launches.append((load("rms_norm_swiglu", K.defines_for("rms_norm_swiglu", asw)),
                         K.launch_config("rms_norm_swiglu", dict(asw, m=1, hidden=hidden)), [Bf, nw2, ws[4], ws[5]], [g]))
        ad = dict(w_type=td, in_features=ffn, out_features=hidden)
        launches.append((load("matmul_add", K.defines_for("matmul_add", ad)),
                         K.launch_config("matmul_add", dict(ad, m=1, n=hidden, k=ffn)), [g, ws[6], zeros_h, Bf], [A]))
    nwf = D(f32(hidden))
    launches.append((load("rms_norm", {"RMS_EPS": EPS}), K.launch_config("rms_norm", dict(m=1, hidden=hidden)),
                     [A, nwf], [hf]))
    w_out = D(hw("Q6_K", vocab, hidden))
    wbytes += w_out.nbytes
    lo = dict(in_features=hidden, out_features=vocab)
    launches.append((load("q6k_matmul", K.defines_for("q6k_matmul", lo)),
                     K.launch_config("q6k_matmul", dict(m=1, n=vocab, k=hidden)), [hf, w_out, None], [logits]))
    launches.append((load("argmax", {}), K.launch_config("argmax", dict(m=1, vocab=vocab)), [logits], [nxt]))
    adv = load("decode_advance", {})
    adv_cfg = K.launch_config("decode_advance", dict(m=1))
    print(f"decode step: {len(launches) + 1} kernels, {wbytes / 1e9:.3f} GB of projection weights "
          f"(+ one embedding row), set up in {time.time() - t0:.0f} s")

    def step():
        for kern, cfg, ins, outs in launches:
            kern.launch_op(cfg, ins, outs, stream)
        adv.launch(adv_cfg, [nxt, *adv_cfg.scalars, tok, pos], stream)

    step()
    stream.synchronize()
    graph = cr.capture(stream, step)
    for T0 in T0s:
        pos.upload(np.array([T0], np.int32))
        graph.launch(stream)
        stream.synchronize()
        ms = cr.time_ms(stream, lambda: [graph.launch(stream) for _ in range(replays)]) / replays
        res["step"][f"T{T0}{'_q4k' if uniform else ''}"] = dict(us=round(ms * 1e3, 1), tok_s=round(1e3 / ms), GBps=round(wbytes / (ms * 1e-3) / 1e9))
        line = (f"decode step 1.5B fused{' (all Q4_K)' if uniform else ''}, positions {T0}..{T0 + replays}: {ms * 1e3:7.1f} us/token = "
                f"{1e3 / ms:6.0f} tok/s ({wbytes / (ms * 1e-3) / 1e9:.0f} GB/s of weights)")
        rows.append(line)
        print(line)
    for b in dev:
        b.free()


try:
    decode_step()
    decode_step(T0s=(128,), uniform=True)
except Exception:
    traceback.print_exc()

# attention alone, 1.5B, one decode token at context T (its share of the step)
try:
    a15 = dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6)
    kern = load("rope_kv_attention", K.defines_for("rope_kv_attention", a15))
    for T in (128, 1024, 4096):
        max_seq = max(T, 2048)
        copies = 8
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
except Exception:
    traceback.print_exc()

# sum of the per-kernel graph times (attention from T=128 of the old measurement if not timed here)
try:
    est = 14 * (fused["qkv6"] + fused["down6"]) + 14 * (fused["qkv4"] + fused["down4"]) + 28 * (fused["o"] + fused["swiglu"])
    lm = res["kernels"].get("q6k_matmul lm_head m=1 151936x1536 ", {}).get("us_graph", float("nan"))
    line = (f"sum of per-kernel graph times, 28 layers w/o attention: {est:.1f} us; + lm_head {lm} us + "
            f"argmax {smalls['argmax']:.1f} + rms {smalls['rms']:.1f} + gather {smalls['gather']:.1f}")
    rows.append(line)
    print(line)
except Exception:
    traceback.print_exc()

with open(os.path.join(OUTDIR, "kernels.json"), "w") as f:
    json.dump(res, f, indent=1)
print("\n== summary (copy bandwidth %.0f GB/s)" % copy_gbs)
print("\n".join(rows))
EOF
echo "bench exit: $?"
fi

if [ -z "${SKIP_NCU:-}" ]; then
echo "== ncu (fused swiglu, matmul_add down, lm_head at m = 1; --clock-control none: the card's clocks are left alone)"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  cat > /tmp/qtrt_prof.py <<EOF
import sys
sys.path.insert(0, "$REPO"); sys.path.insert(0, "$REPO/tests")
import numpy as np
from toolchain import cuda_runtime as cr, kernels as K
from test_kernels_gpu import random_weights
rng = np.random.default_rng(0)
EPS = 9.999999974752427e-07
f32 = lambda *s: cr.DeviceBuffer.from_numpy(rng.standard_normal(s, dtype=np.float32))
at = dict(epsilon=EPS, gate_type="Q4_K", up_type="Q4_K", ffn=8960)
sw = cr.load_op("rms_norm_swiglu", K.defines_for("rms_norm_swiglu", at))
wg, wu = (cr.DeviceBuffer.from_numpy(random_weights(rng, "Q4_K", 8960, 1536)) for _ in range(2))
x, g, y = f32(1, 1536), f32(1536), cr.DeviceBuffer(8960 * 4)
ad = dict(w_type="Q4_K", in_features=8960, out_features=1536)
ma = cr.load_op("matmul_add", K.defines_for("matmul_add", ad))
wd = cr.DeviceBuffer.from_numpy(random_weights(rng, "Q4_K", 1536, 8960))
gx, r, z, y2 = f32(1, 8960), f32(1, 1536), f32(1536), cr.DeviceBuffer(1536 * 4)
lm = cr.load_op("q6k_matmul", K.defines_for("q6k_matmul", dict(in_features=1536, out_features=151936)))
wl = cr.DeviceBuffer.from_numpy(random_weights(rng, "Q6_K", 151936, 1536))
h, lg = f32(1, 1536), cr.DeviceBuffer(151936 * 4)
for _ in range(2):
    sw.launch_op(K.launch_config("rms_norm_swiglu", dict(at, m=1, hidden=1536)), [x, g, wg, wu], [y])
    ma.launch_op(K.launch_config("matmul_add", dict(ad, m=1, n=1536, k=8960)), [gx, wd, z, r], [y2])
    lm.launch_op(K.launch_config("q6k_matmul", dict(m=1, n=151936, k=1536)), [h, wl, None], [lg])
cr.synchronize()
EOF
  timeout 200 "$NCU" --clock-control none --target-processes all -k regex:"swiglu|matmul" --launch-skip 3 \
    --launch-count 3 --section SpeedOfLight --section Occupancy --section SchedulerStats --section LaunchStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active,launch__cluster_max_active_count" \
    $PY /tmp/qtrt_prof.py 2>&1 | grep -vE "^==PROF==|^\s*$|^    -----|^\s+(OPT|INF|WRN) |^          " | cut -c1-150 | head -300 || true
else
  echo "ncu not found"
fi
fi
}

main "$@" 2>&1 | tee "$OUT/kernels.log"
