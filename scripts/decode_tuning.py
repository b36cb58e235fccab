"""On the GPU: time the batch-1 decode step of the synthetic 1.5B layout under each cuda-backend tuning
(toolchain/cuda_backend.py TUNING: programmatic dependent launch, decode builds, the qmv1 core, extra defines), in
one process and one run. Each variant is also checked: its greedy steps' logits against the first variant's (other
builds may round differently: ~1e-4) and two runs of it bit for bit (a race shows up as a difference). Writes
$OUT/tuning.json; exit 1 if a variant is off by more than 1e-3 or not deterministic. The skip:<op> variants leave
one kernel family (or the nodes named o_proj / down_proj) out (wrong results, not checked): the time they save
is that family's cost inside the step. The variants' timings take turns round after round (--rounds); "control"
repeats the default to show the run's noise. docs/perf-notes.md has the results.

    python3 scripts/decode_tuning.py [--contexts 128,4096] [--tokens 64] [--steps 24] [--variants NAME,...]
    python3 scripts/decode_tuning.py --scaling     # one projection kernel's time against its row count
    python3 scripts/decode_tuning.py --batches 1,4,8 --variants control,batched_general   # batched decode steps
    python3 scripts/decode_tuning.py --prompts 512,4096 --variants prefill,prefill_no_gemm_swiglu   # prompts

--batches also times steps of m sequences (slots 0..m-1 at each context), m > 1 for timing only: the batched
builds' numerics are the GPU tests' (tests/test_kernels_gpu.py test_decode_builds, tests/test_cuda_backend.py).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toolchain import cuda_runtime as cr  # noqa: E402
from toolchain import kernels as K  # noqa: E402
from toolchain.bench import (bytes_per_token, copy_bandwidth, kernel_breakdown, launch_timing,  # noqa: E402
                             load_model, time_decode, time_prefill, time_prompt)
from toolchain.cuda_backend import GEMM_MIN_M, SKINNY_MIN_M, TUNING, CudaBackend  # noqa: E402

OFF = {"pdl": False, "m1": False, "qmv1": False, "plain": True, "batched": False, "xmerge": False, "defines": {},
       "pdl_skip": (), "skip": (), "clusters": True, "cache_by_address": False, "share_activations": False,
       "gemm_min_m": GEMM_MIN_M, "skinny_min_m": GEMM_MIN_M, "attn_kv_grid": False,
       "attn_one_block_keys": 0, "skinny_skip": (), "gemm_wgmma": False, "gemm_xh": False,
       "concurrent_projections": False, "prefill_kv_splits": 1,
       "xh_by_producer": False, "gemm_swiglu": False, "gemm_swiglu_split": 2,
       "prefill_pdl": False, "add_rms_norm": False,  # the last nine act on prefill steps only (m >= GEMM_MIN_M)
       "head_rows": True, "attn_narrow": False, "chunks_ahead": True,
       "piece_graphs": True,  # (chunks_ahead, piece_graphs: engine steps only)
       "ssq_by_producer": False}
DEFAULT = {"m1": True, "qmv1": True, "pdl": True, "xmerge": True, "batched": True, "skinny_min_m": SKINNY_MIN_M,
           "attn_kv_grid": True, "attn_one_block_keys": K.ATTN_ONE_BLOCK_KEYS, "attn_narrow": True,
           "ssq_by_producer": True}
PREFILL = {k: TUNING[k] for k in ("gemm_wgmma", "gemm_xh", "concurrent_projections", "prefill_kv_splits",
                                  "xh_by_producer", "gemm_swiglu", "gemm_swiglu_split",
                                  "prefill_pdl", "add_rms_norm")}  # the backend's defaults of those nine


def proj(**defines):  # extra defines for every projection kernel (both cores ignore the other's)
    return {op: defines for op in K.MATMUL_OPS + K.FUSED_OPS}


def attn(**defines):
    return {"defines": {"rope_kv_attention": defines}}


def layout(nbw, kw, g, minb):  # a decode-core layout (plugins/qmv1.cuh): superblocks and warps per row pair, etc.
    return {"QMV1_NBW": nbw, "QMV1_KW": kw, "QMV1_G": g, "QMV1_MINB": minb}


KW3 = dict(layout(2, 3, 2, 4), QMV1_PD=1)  # 6-warp blocks, 4 per SM

VARIANTS = {
    "baseline": {},
    "m1": {"m1": True},
    "m1+pdl": {"m1": True, "pdl": True},
    "qmv1": {"m1": True, "qmv1": True},
    "qmv1+pdl": DEFAULT,
    "control": dict(DEFAULT),  # the default again: the run's noise floor
    # issue 16: the kernel builds TensorRT's plugins get (no cluster launch, the cache by address; general core) on
    # this graph, against "baseline" (the same builds with their clusters), and the default without clusters
    "tensorrt_builds": {"clusters": False, "cache_by_address": True},
    "no_clusters": {**DEFAULT, "clusters": False},
    # ffn_down (k = 8960) layouts before v7: 6 warps of 6 superblocks per row pair, 12-warp blocks (v6) or 2 blocks
    # of 6 warps per SM (v5)
    "down_v6": {**DEFAULT, "defines": {"matmul_add@8960": layout(6, 6, 2, 1)}},
    "ksplit8": {**DEFAULT, "defines": {"matmul_add@8960": layout(6, 6, 1, 2)}},
    "ck1024": {**DEFAULT, **attn(ATTN_CLUSTER_KEYS=1024)},
    "ck512": {**DEFAULT, **attn(ATTN_CLUSTER_KEYS=512)},
    "ck2048": {**DEFAULT, **attn(ATTN_CLUSTER_KEYS=2048)},
    "no_xmerge": {**DEFAULT, "xmerge": False},  # the attention merges its clusters itself
    "push0": {**DEFAULT, **attn(ATTN_PUSH=0)},  # the cluster merge through cluster.sync and remote loads
    "v7": {**DEFAULT, "xmerge": False, **attn(ATTN_PUSH=0)},  # both, as in v7
    # gate/up: 8 or 12 warps per block, 2 blocks per SM (the default: 10, v8); ffn_down with every round's weights
    # in flight from the start
    "swiglu_g8": {**DEFAULT, "defines": {"rms_norm_swiglu": {"QMV1_G": 8}}},
    "swiglu_g12": {**DEFAULT, "defines": {"rms_norm_swiglu": {"QMV1_G": 12}}},
    "down_pd3b": {**DEFAULT, "defines": {"matmul_add@8960": {"QMV1_PD": 3}}},
    "no_xmerge+ck1024": {**DEFAULT, "xmerge": False, **attn(ATTN_CLUSTER_KEYS=1024)},
    "lm_head_v3": {**DEFAULT, "plain": False},  # lm_head on the general core (the layout before)
    "swiglu_g16": {**DEFAULT, "defines": {"rms_norm_swiglu": {"QMV1_G": 16, "QMV1_MINB": 1}}},
    "ck4096": {**DEFAULT, **attn(ATTN_CLUSTER_KEYS=4096)},
    "ck4096+nbuf3": {**DEFAULT, **attn(ATTN_CLUSTER_KEYS=4096, ATTN_NBUF=3)},
    "qmv1+pdl+pd1": {**DEFAULT, "defines": proj(QMV1_PD=1)},
    "qmv1+pdl+pd3": {**DEFAULT, "defines": proj(QMV1_PD=3)},
    "qmv1+pdl+pd4": {**DEFAULT, "defines": proj(QMV1_PD=4)},
    "qmv1+pdl+ns2": {**DEFAULT, "defines": proj(QMV_NS=2)},
    "m1+pdl+ns2": {"m1": True, "pdl": True, "defines": proj(QMV_NS=2)},
    "qmv1+pdl+attn_cg": {**DEFAULT, **attn(ATTN_LDMODE=2)},
    "qmv1+pdl-attn": {**DEFAULT, "pdl_skip": ("rope_kv_attention",)},
    "attn_late": {**DEFAULT, **attn(ATTN_EARLY=0)},
    "down_pd3": {**DEFAULT, "defines": {"matmul_add": {"QMV1_PD": 3}}},
    # k = 1536 projections split over 3 warps of 2 superblocks each (the default of the fused QKV since v7, 4 row
    # pairs per block; qkv_v6: its one-warp layout before)
    "qkv_v6": {**DEFAULT, "defines": {"rms_norm_qkv": layout(6, 1, 8, 2)}},
    "o_kw3": {**DEFAULT, "defines": {"matmul_add@1536": KW3}},
    "o_kw3g4": {**DEFAULT, "defines": {"matmul_add@1536": dict(KW3, QMV1_G=4, QMV1_MINB=2)}},
    "down_g1": {**DEFAULT, "defines": {"matmul_add@8960": layout(4, 9, 1, 2)}},
    "swiglu_kw3": {**DEFAULT, "defines": {"rms_norm_swiglu": dict(KW3, QMV1_PD=2)}},
    # ffn_down with 18 warps of 2 superblocks per row pair, 2 blocks per SM (lost 0.4% against 9 of 4, v7)
    "down_nbw2": {**DEFAULT, "defines": {"matmul_add@8960": layout(2, 18, 1, 2)}},
    # row pairs per block of the 3-warp QKV (default 4)
    "qkv_g2": {**DEFAULT, "defines": {"rms_norm_qkv": layout(2, 3, 2, 4)}},
    "qkv_g6": {**DEFAULT, "defines": {"rms_norm_qkv": layout(2, 3, 6, 1)}},
    "qkv_g8": {**DEFAULT, "defines": {"rms_norm_qkv": layout(2, 3, 8, 1)}},
    "ck1024+nbuf3": {**DEFAULT, **attn(ATTN_CLUSTER_KEYS=1024, ATTN_NBUF=3)},
    "pf256": {**DEFAULT, **attn(ATTN_PF_KEYS=256)},
    "nbuf3": {**DEFAULT, **attn(ATTN_NBUF=3)},
    "nbuf4": {**DEFAULT, **attn(ATTN_NBUF=4)},
    # batched decode (--batches): the general core instead of the decode core's QMV1_MT builds, and every decode-core
    # build at one block per SM (kernels.decode_core keeps 2 for m < 4 and for the matmuls), below skinny_min_m;
    # batched_decode_core: the decode core at every m (no tensor-core GEMMs for few tokens)
    "batched_general": {**DEFAULT, "batched": False},
    "batched_decode_core": {**DEFAULT, "skinny_min_m": GEMM_MIN_M},
    # the GEMMs for few tokens (plugins/quant_gemm_skinny.cu, docs/perf-notes.md): builds other than the default
    # (SK_WARPRING: each warp its own rows' ring of 2 stages, x made fragments 4 superblocks at a time; the scales in
    # half2 arithmetic). skinny_s3x1: 3 stages a warp in two CTAs per SM (x windows of one superblock). (The
    # skinny_l2pf* builds, each warp asking its next superblocks into L2, were timed and removed on 2026-12-07:
    # docs/perf-notes.md.) skinny_cta_ring is the default before 2026-12-07 (one ring for the CTA, a barrier a
    # superblock, x made fragments a stage at a time; the scales in fp32); the skinny_prev ... skinny_w16_s4 builds
    # are that CTA-ring build's own variants (skinny_prev its default before 2026-12-06). (This script's logits check
    # runs steps of 1-3 tokens, below the few-token GEMMs: their builds' bits are tested in tests/test_kernels_gpu.py.)
    # skinny_own_ssq: each fused GEMM for few tokens sums its x^2 itself (a pass over x from L2 in every CTA, the
    # cluster's partials exchanged), as before 2026-12-07's tuning ssq_by_producer
    "skinny_own_ssq": {**DEFAULT, "ssq_by_producer": False},
    **{name: {**DEFAULT, "defines": {op: d for op in K.SKINNY_OPS}} for name, d in (
        ("skinny_cta_ring", {"SK_WARPRING": 0, "QMMA_SCALES_H2": 0}),
        ("skinny_f32_scales", {"QMMA_SCALES_H2": 0}), ("skinny_x3", {"SK_XSB": 3}), ("skinny_s3", {"SK_STAGES": 3}),
        ("skinny_s4x6", {"SK_STAGES": 4, "SK_XSB": 6}), ("skinny_s3x1", {"SK_STAGES": 3, "SK_XSB": 1}),
        *((n, {"SK_WARPRING": 0, "QMMA_SCALES_H2": 0, **d}) for n, d in (
            ("skinny_prev", {"SK_STAGES": 4, "SK_XF16": 0}), ("skinny_s2_f32x", {"SK_STAGES": 2, "SK_XF16": 0}),
            ("skinny_cta_s3", {"SK_STAGES": 3}), ("skinny_cta_s4", {"SK_STAGES": 4}), ("skinny_u1", {"SK_SUB_UNROLL": 1}),
            ("skinny_w16", {"SK_WARPS": 16}), ("skinny_w16_s4", {"SK_WARPS": 16, "SK_STAGES": 4}))))},
    # the attention's full grid (a cluster per query head, all but one per kv head leaving at once at short context
    # and above 16 tokens), as before attn_kv_grid
    "attn_full_grid": {**DEFAULT, "attn_kv_grid": False},
    "attn_wide": {**DEFAULT, "attn_narrow": False},  # clusters of 8 blocks at every m (before attn_narrow)
    # steps of more than 16 tokens: the attention as one block per (token, kv head) at every context, or never
    "attn_one_block": {**DEFAULT, "attn_one_block_keys": 1 << 30},
    "attn_one_block_off": {**DEFAULT, "attn_one_block_keys": 0},
    # the small projections of a few-token step on the decode core (its 8-token blocks), the rest as GEMMs
    "skinny_skip_qkv_o": {**DEFAULT, "skinny_skip": ("rms_norm_qkv", "matmul_add@1536")},
    "skinny_skip_qkv": {**DEFAULT, "skinny_skip": ("rms_norm_qkv",)},
    # the SwiGLU's k split against the rule's 1 (2 before kernels.skinny_split counted two CTAs per SM)
    **{f"skinny_swiglu_s{n}": {**DEFAULT, "defines": {"rms_norm_swiglu_skinny": {"SK_SPLIT": n}}} for n in (2, 3)},
    # the small projections' k splits against the rule's (QKV and o: 6, one superblock per CTA; ffn_down: 7): fewer
    # ranks mean longer CTAs but fewer of them and a shorter cluster reduction
    **{f"skinny_qkv_s{n}": {**DEFAULT, "defines": {"rms_norm_qkv_skinny": {"SK_SPLIT": n}}} for n in (2, 3)},
    **{f"skinny_o_s{n}": {**DEFAULT, "defines": {"matmul_add_skinny@1536": {"SK_SPLIT": n}}} for n in (2, 3)},
    **{f"skinny_down_s{n}": {**DEFAULT, "defines": {"matmul_add_skinny@8960": {"SK_SPLIT": n}}} for n in (4, 8)},
    "batched_minb1": {**DEFAULT, "batched": True, "defines": {op: {"QMV1_MINB": 1} for op in K.FUSED_OPS}},
    # prompts (--prompts): the default, and without the gate/up/SwiGLU GEMM (three launches: gate, up, swiglu)
    "prefill": {**DEFAULT, **PREFILL},
    "prefill_no_gemm_swiglu": {**DEFAULT, **PREFILL, "gemm_swiglu": False},
    # ... with the gate/up/SwiGLU GEMM's k split or without (other bits), with programmatic dependent launches
    **{f"prefill_swiglu_split{n}": {**DEFAULT, **PREFILL, "gemm_swiglu_split": n} for n in (1, 2)},
    "prefill_pdl": {**DEFAULT, **PREFILL, "prefill_pdl": True},
    # ... with the prefill GEMMs releasing their dependents only after their main loop (GEMM_PDL_LATE builds: the next
    # kernel's blocks no longer take SM room during the GEMM's waves; not yet timed)
    "prefill_pdl_late": {**DEFAULT, **PREFILL, "prefill_pdl": True,
                         "defines": {op: {"GEMM_PDL_LATE": 1} for op in K.GEMM_OPS + K.GEMM_SWIGLU_OPS}},
    "prefill_no_add_rms_norm": {**DEFAULT, **PREFILL, "add_rms_norm": False},
    # diagnostics: the step without one kernel family (wrong results; the time saved is what the family costs in
    # the step, PDL overlap included)
    **{f"skip:{op}": {**DEFAULT, "skip": (op,)} for op in ("rope_kv_attention", "rms_norm_qkv", "matmul_add",
                                                            "rms_norm_swiglu", "q6k_matmul", "o_proj",
                                                            "down_proj", "argmax")},
}


def precompile(be, tunings: list[dict], batches=(1,)) -> int:
    """Every kernel build the tunings' decode plans need (batch 1 and `batches`), compiled in parallel (nvcc runs
    are independent processes): a dry planning pass records what the backend would load."""
    jobs, load = set(), be._kernel

    def record(op, defines):  # what the plan would load; the attention's builds loaded for real: the plan asks their
        jobs.add((op, tuple(sorted(defines.items()))))  # registers (CudaBackend._narrow_attention; prebuilt cubins)
        return load(op, defines) if op == "rope_kv_attention" else None
    be._kernel = record
    try:
        for t in tunings:
            be.tuning = t
            be._plans.clear()
            be.plan(1)
            be.plan(1, long_context=True)
            for m in batches:
                be.plan(m)
                be.plan(m, long_context=True)
    finally:
        be._kernel = load
        be._plans.clear()
    with ThreadPoolExecutor(os.cpu_count() or 4) as ex:
        list(ex.map(lambda j: K.compile_kernel(j[0], dict(j[1]), fmt="cubin"), sorted(jobs)))
    return len(jobs)


def greedy_logits(be, first: int, n: int) -> np.ndarray:
    """Logits of the n self-advancing graph replays of CudaBackend.greedy from `first` (read after each step)."""
    return np.array([be.buffers["logits"].download(be.stream, rows=1)[0].astype(np.float64)
                     for _ in be.greedy(first, n)])


def scaling(out: dict, reps: int = 30):
    """Per-launch time of the batch-1 gate/up and down builds against their row count (weights rotated past the
    50 MB L2, back-to-back launches in one graph, serialized and as programmatic dependent launches): the slope is
    the streaming rate, the intercept the fixed cost of a launch."""
    from toolchain.quants import row_bytes
    from toolchain.synth import random_blocks

    rng = np.random.default_rng(0)
    stream = cr.Stream()
    cases = [("rms_norm_swiglu", dict(epsilon=1e-6, gate_type="Q4_K", up_type="Q4_K"), 1536, "ffn"),
             ("matmul_add", dict(w_type="Q4_K", in_features=8960), 8960, "n")]
    for op, attrs, k, dim in cases:
        for n in (560, 1120, 2240, 4480, 8960):
            at = dict(attrs, ffn=n) if dim == "ffn" else dict(attrs, out_features=n)
            defines = K.decode_build(op, at, k)
            kern = cr.load_op(op, defines)
            nw = 2 if op == "rms_norm_swiglu" else 1
            nbytes = nw * n * row_bytes("Q4_K", k)
            copies = max(2, -(-(120 << 20) // nbytes))
            ws = [[cr.DeviceBuffer.from_numpy(random_blocks("Q4_K", n, k, rng, 0.02)) for _ in range(nw)]
                  for _ in range(copies)]
            x = cr.DeviceBuffer.from_numpy(rng.standard_normal(k, dtype=np.float32))
            g = cr.DeviceBuffer.from_numpy(np.ones(k, np.float32))
            y = cr.DeviceBuffer.zeros((max(n, 1536),), np.float32)
            res = cr.DeviceBuffer.zeros((n,), np.float32)
            dims = dict(at, m=1, hidden=k, k=k, n=n, **K.qmv1_dims(defines))
            cfg = K.launch_config(op, dims)
            row = {"op": op, "rows": n, "MB": round(nbytes / 1e6, 2)}
            for pdl in (False, True):  # graph time: launches back to back, serialized or programmatic
                def launch(r):
                    w = ws[r % copies]
                    args = [x, g, *w] if op == "rms_norm_swiglu" else [x, w[0], None, res]
                    kern.launch(cfg, [*args, *cfg.scalars, y], stream, pdl=pdl)
                row["pdl_us" if pdl else "us"] = round(launch_timing(cr, stream, launch, copies, reps=reps,
                                                                     graph_launches=reps)[1], 2)
            out.setdefault("scaling", []).append(row)
            print(f"{op:16s} rows {n:5d} {row['MB']:6.2f} MB  {row['us']:6.2f} us  ({row['MB'] / row['us'] * 1e3:5.0f} GB/s)"
                  f"  with PDL {row['pdl_us']:6.2f} us", flush=True)
            for b in [b for c in ws for b in c] + [x, g, y, res]:
                b.free()


def prompts(sizes: list[int], names: list[str], tunings: dict, model, spec: str, rounds: int) -> int:
    """--prompts: the path `qtrt generate` takes for a prompt (CudaBackend.forward in pieces of 512) under each
    variant: one 512-token prefill step (captured, head on the last row), the time to the first token's logits of
    each prompt size (bench.time_prompt, best of 3), the variants taking turns round after round, and the 512-token
    step's kernel families. Each variant's first-token logits of a 1,000-token prompt are compared with the first
    variant's (bits, relative error) and with its own second run (determinism). Writes $OUT/prompts.json; exit 1 if
    a variant is off by more than 1e-3 or not deterministic."""
    cr.init()
    compare = 1000  # tokens of the prompt whose first-token logits are compared
    be = CudaBackend(model, max_context=max(*sizes, compare, 512) + 64, max_tokens=512, tuning=tunings[names[0]])
    state = {name: ({}, {}) for name in names}  # each variant's plans and captured graphs, kept apart

    def use(name):
        be.tuning, (be._plans, be._graphs) = tunings[name], state[name]

    out = {"device": cr.device_name(), "copy_bandwidth_GBps": round(copy_bandwidth(cr, be.stream) / 1e9, 1),
           "model": spec, "variants": []}
    print(f"{out['device']}: copy bandwidth {out['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
    ids = np.random.default_rng(compare).integers(0, be.cfg.vocab, compare).tolist()
    first = None
    for name in names:
        use(name)
        runs = []
        for _ in range(2):
            be.reset()
            runs.append(be.forward(ids).astype(np.float32))
        first = runs[0] if first is None else first
        same_bits = lambda a, b: bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))  # noqa: E731
        out["variants"].append({"name": name, "tuning": tunings[name],
                                "logits_bits_equal_first": same_bits(runs[0], first),
                                "logits_rel_err_vs_first": float(np.linalg.norm(runs[0] - first.astype(np.float64))
                                                                 / np.linalg.norm(first)),
                                "deterministic": same_bits(runs[0], runs[1])})
    times = {(n, key): [] for n in names for key in ["prefill512", *(f"prompt{s}" for s in sizes)]}
    for r in range(rounds):
        for name in names:
            use(name)
            times[name, "prefill512"].append(512 / time_prefill(be, 512, cr))
            for size in sizes:
                times[name, f"prompt{size}"].append(size / time_prompt(be, size, cr))
            print(r, name, {key: round(v[-1], 1) for (n, key), v in times.items() if n == name}, flush=True)
    for row in out["variants"]:
        use(row["name"])
        row["tok_s"] = {key: round(max(v), 1) for (n, key), v in times.items() if n == row["name"]}
        row["spread"] = {key: round(max(v) / min(v) - 1, 4) for (n, key), v in times.items() if n == row["name"]}
        be._set_inputs(np.zeros(512, np.int32), np.arange(512), np.zeros(512))  # a prompt's first piece
        row["breakdown512_us"] = kernel_breakdown(be, cr, m=512, last_only=True)
        print(f"{row['name']:24s} {row['tok_s']}  logits {'==' if row['logits_bits_equal_first'] else '!='} first "
              f"(rel {row['logits_rel_err_vs_first']:.1e}), "
              f"{'deterministic' if row['deterministic'] else 'NOT DETERMINISTIC'}\n  breakdown 512: "
              f"{row['breakdown512_us']}", flush=True)
    be.close()
    dest = Path(os.environ.get("OUT", ".")) / "prompts.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")
    return 0 if all(v["logits_rel_err_vs_first"] < 1e-3 and v["deterministic"] for v in out["variants"]
                    if not v["tuning"]["skip"]) else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="128,4096")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24, help="greedy steps compared between variants and runs")
    ap.add_argument("--variants", default="", help="comma-separated (default: every one; with --prompts: "
                    "prefill,prefill_no_gemm_swiglu)")
    ap.add_argument("--model", default="synthetic:qwen2.5-coder-1.5b")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (variants take turns in each)")
    ap.add_argument("--scaling", action="store_true", help="only time the gate/up and down builds against rows")
    ap.add_argument("--batches", default="1", help="decode step sizes m timed (comma-separated; m > 1: timing only)")
    ap.add_argument("--prompts", default="", help="time prompts of these sizes to the first token instead of decode "
                    "steps (comma-separated, e.g. 512,4096,16384)")
    a = ap.parse_args()
    if a.scaling:
        cr.init()
        out = {"device": cr.device_name()}
        scaling(out)
        (Path(os.environ.get("OUT", ".")) / "scaling.json").write_text(json.dumps(out, indent=1))
        return 0
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    names = (a.variants or ("prefill,prefill_no_gemm_swiglu" if a.prompts else ",".join(VARIANTS))).split(",")
    if len(set(names)) != len(names):
        ap.error(f"--variants {a.variants!r}: a variant named twice")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    tunings = {n: {**OFF, **VARIANTS[n]} for n in names}
    if a.prompts:
        try:
            sizes = [int(x) for x in a.prompts.split(",")]
        except ValueError:
            ap.error(f"--prompts {a.prompts!r}: comma-separated whole numbers, e.g. 512,4096")
        if min(sizes) < 1:
            ap.error("--prompts: sizes from 1")
        model = load_model(a.model, Path(os.environ.get("QTRT_BENCH_DIR", tempfile.gettempdir())))
        return prompts(sizes, names, tunings, model, a.model, a.rounds)
    model = load_model(a.model, Path(os.environ.get("QTRT_BENCH_DIR", tempfile.gettempdir())))
    contexts = [int(c) for c in a.contexts.split(",")]
    try:  # m = 1 always: the reference of the batched steps
        batches = sorted({1, *(int(m) for m in a.batches.split(","))})
    except ValueError:
        ap.error(f"--batches {a.batches!r}: comma-separated whole numbers, e.g. 2,4,8")
    if min(batches) < 1 or max(batches) >= GEMM_MIN_M:
        ap.error(f"--batches: decode step sizes from 1 to {GEMM_MIN_M - 1}")
    cr.init()
    be = CudaBackend(model, max_context=max(contexts) + a.tokens + 40, n_slots=max(batches),
                     max_tokens=max(16, max(batches)), tuning=OFF)
    t0 = time.time()
    print(f"compiled {precompile(be, list(tunings.values()), batches)} builds in {time.time() - t0:.0f} s")
    bw = copy_bandwidth(cr, be.stream)
    out = {"device": cr.device_name(), "copy_bandwidth_GBps": round(bw / 1e9, 1), "model": a.model, "variants": []}
    print(f"{out['device']}: copy bandwidth {bw / 1e9:.0f} GB/s")
    ref_tokens = ref_logits = None
    graphs = {}
    for name in names:
        be.tuning = tunings[name]
        be._plans.clear()
        be._graphs.clear()
        be.reset()
        runs = []
        for _ in range(2):  # twice: a tuning must also be deterministic
            be.reset()
            first = int(np.argmax(be.forward([11, 22, 33])))
            runs.append(greedy_logits(be, first, a.steps))
        for m in (1, *batches):  # both graphs, kept for the timing rounds (same buffers, their own kernels)
            for long in (False, True):
                be.decode_graph(m, long)
        graphs[name] = dict(be._graphs)
        logits, tokens = runs[0], [int(t) for t in runs[0].argmax(1)]
        ref_tokens = ref_tokens or tokens
        ref_logits = logits if ref_logits is None else ref_logits
        rel = float(np.linalg.norm(logits[0] - ref_logits[0]) / np.linalg.norm(ref_logits[0]))
        steps_rel = np.linalg.norm(logits - ref_logits, axis=1) / np.linalg.norm(ref_logits, axis=1)
        out["variants"].append({"name": name, "tuning": tunings[name], "tokens_match_baseline": tokens == ref_tokens,
                                "logits_rel_err_vs_baseline": rel,
                                "max_step_rel_err_vs_baseline": float(steps_rel.max()),
                                "first_step_differing": int(np.argmax(steps_rel > 0)) if (steps_rel > 0).any() else -1,
                                "deterministic": bool(np.array_equal(runs[0], runs[1]))})
    # timing: the variants take turns, round after round (a drift of clocks or temperature during the run then
    # touches all of them alike); each variant's best round counts, the spread of its rounds is reported
    times = {(n, c, m): [] for n in names for c in contexts for m in batches}
    for _ in range(a.rounds):
        for name in names:
            be.tuning, be._graphs = tunings[name], graphs[name]  # the tuning picks its graph per position
            for ctx in contexts:
                for m in batches:
                    times[name, ctx, m].append(time_decode(be, ctx, m, a.tokens, cr))
    for row in out["variants"]:
        name = row["name"]
        for ctx in contexts:
            for m in batches:
                s, worst = min(times[name, ctx, m]), max(times[name, ctx, m])
                key = f"ctx{ctx}" if m == 1 else f"m{m}_ctx{ctx}"  # m > 1: aggregate tok/s of the m sequences
                row[f"{key}_tok_s"] = round(m / s, 1)
                row[f"{key}_spread"] = round(worst / s - 1, 4)
                if m == 1:
                    row[f"{key}_roofline_fraction"] = round(bytes_per_token(model, ctx) / (bw * s), 3)
        print(f"{name:22s} " + "  ".join(f"ctx {c}: {row[f'ctx{c}_tok_s']:7.1f} tok/s "
                                          f"({row[f'ctx{c}_roofline_fraction'] * 100:4.1f}%, spread "
                                          f"{row[f'ctx{c}_spread'] * 100:.1f}%)" for c in contexts)
              + f"  tokens {'==' if row['tokens_match_baseline'] else '!='} first, logits rel "
              f"{row['logits_rel_err_vs_baseline']:.1e} (max over steps {row['max_step_rel_err_vs_baseline']:.1e} "
              f"from step {row['first_step_differing']}), "
              f"{'deterministic' if row['deterministic'] else 'NOT DETERMINISTIC'}", flush=True)
        for m in (m for m in batches if m > 1):
            print(f"{'':22s} m={m:2d} " + "  ".join(f"ctx {c}: {row[f'm{m}_ctx{c}_tok_s']:8.1f} tok/s aggregate "
                                                    f"(spread {row[f'm{m}_ctx{c}_spread'] * 100:.1f}%)"
                                                    for c in contexts), flush=True)
    be.close()
    dest = Path(os.environ.get("OUT", ".")) / "tuning.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")
    ok = all(v["max_step_rel_err_vs_baseline"] < 1e-3 and v["deterministic"] for v in out["variants"]
             if not v["tuning"]["skip"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
