"""On the GPU: what one dependency between two phases of the decode step costs, a kernel boundary against a grid
barrier or flags inside one persistent kernel, and whether a weight stream that never stops at the dependencies
reaches the copy bandwidth (issue 17; docs/perf-notes.md "Persistent decode" has the results).
scripts/boundary_bench.cu has the phases: each reads the whole x the previous phase wrote, reduces it, writes its
slice of the next x and streams its share of the phase's weight bytes (trivial bodies: the chain is measured, not
the dequantization).

Shapes: uniform phases (--mb), and the decode step of a layout (--step, --context: the bytes each kernel reads;
--hops 3 merges QKV, attention and o). Variants, each one CUDA graph, taking turns round after round:
  plain, pdl, pdl_flag    one kernel per phase: serialized / programmatic dependent launch / PDL launches that
                          wait on the predecessor's counter instead of griddepcontrol.wait
  persistent              one kernel, a counter per phase (a grid barrier)
  persistent_stream       one block per SM, a producer warp streaming every phase's weights into a shared-memory
                          ring (cp.async.bulk, mbarriers), consumers waiting on the counters
  pdl_ll, persistent_stream_ll[_sleepN]   x as (value, flag) pairs (NCCL's LL protocol) instead of waits
  pdl_prefetch_<W>mb      (--prefetch-mb) pdl, each phase also asking the step's next bytes into L2, W MiB ahead of
                          itself (prefetch_plan), to keep the DRAM busy while the small phases wait: slower, in
                          every form measured (docs/perf-notes.md)
  pdl_prefetch_{in,node,side}_<W>mb   (step shapes) only each layer's first phase asks, in its own kernel / in a
                          prefetch kernel of the chain before it / in one on a side stream
  stream_alone            the ring without the dependency (x not waited for: wrong x, timing only)
Every variant's x is checked against a float64 simulation of the phases (reference_x; x0 in the first buffer, NaN in
the second at each replay); --stamps records where stream_ll's phases wait.
The persistent kernels check that all their blocks fit at once (they would deadlock otherwise).

    python3 scripts/boundary_bench.py [--mb 0,7] [--context 128] [--hops 5] [--stages 6] [--prefetch-mb 8,16]
                                      [--only a,b] > out.json
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toolchain import cuda_runtime as cr  # noqa: E402
from toolchain.bench import copy_bandwidth, sizes_arg  # noqa: E402
from toolchain.kernels import LaunchConfig, nvcc_path  # noqa: E402
from toolchain.errors import UserError  # noqa: E402
from toolchain.quants import row_bytes  # noqa: E402
from toolchain.synth import LAYOUTS, layout  # noqa: E402

KX = 1536
NCW, STAGE = 8, 32 * 1024  # boundary_bench.cu: consumer warps and ring stage bytes of stream_persistent
def step_sizes(name: str, ctx: int, hops: int = 5, **overrides) -> list[int]:
    """Bytes each kernel of the fused decode step reads, in order (QKV, the attention's KV cache at `ctx`, o,
    gate + up, down per layer; the lm_head), from the layout's tensor types (toolchain/layouts.json). hops = 3: what
    if QKV, the attention and o were one phase (the same bytes, two dependencies a layer fewer)."""
    cfg, types = layout(name, **overrides)
    h, f, kv = cfg.hidden, cfg.ffn, cfg.kv_dim

    def nbytes(tensor, rows, k):
        return rows * row_bytes(types[tensor], k)

    sizes = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        sizes += [nbytes(p + "attn_q.weight", cfg.q_dim, h) + nbytes(p + "attn_k.weight", kv, h)
                  + nbytes(p + "attn_v.weight", kv, h),
                  2 * kv * ctx * 2,  # K and V, fp16
                  nbytes(p + "attn_output.weight", h, cfg.q_dim),
                  nbytes(p + "ffn_gate.weight", f, h) + nbytes(p + "ffn_up.weight", f, h),
                  nbytes(p + "ffn_down.weight", h, f)]
        if hops == 3:
            sizes[-5:-2] = [sum(sizes[-5:-2])]
    sizes.append(nbytes("output.weight" if "output.weight" in types else "token_embd.weight", cfg.vocab, h))
    return sizes


def reference_x(x0: np.ndarray, phases: int) -> np.ndarray:
    """What every variant must compute (boundary_bench.cu next_x), in float64: x'[e] = mean(x) + x[(e + 1) % KX] / 2."""
    x = x0.astype(np.float64)
    for _ in range(phases):
        x = x.mean() + 0.5 * np.roll(x, -1)
    return x


def merged_streamers(n: int, blocks: int) -> list[int]:
    """Per phase of a 3-hop step (merged, gate + up, down per layer; the lm_head): `blocks` for the merged phases,
    0 (all) for the rest."""
    return [blocks if p % 3 == 0 and p < n - 1 else 0 for p in range(n)]


PF_PIECES = 4  # boundary_bench.cu: (address, bytes) pairs a phase's L2 prefetch takes


def prefetch_plan(offs: list[int], sizes: list[int], window: int, at=None) -> list[list[tuple[int, int]]]:
    """What each phase asks into L2 before its dependency (the `pdl_prefetch_*` variants): the step's bytes in order
    (phase p at offs[p], sizes[p] bytes) kept `window` bytes ahead of the phase being read: phase p (of those in
    `at`, default all; the others ask for nothing) asks for the bytes after its own end up to window past it, less
    what earlier phases asked for, as (offset, bytes) pieces
    (neighbouring phases' bytes merged across their <= 255-byte alignment gaps, widened to 16-byte boundaries).
    Beyond those boundaries no byte is asked for twice, and no phase asks for its own: a phase larger than the window
    reads its rest from DRAM."""
    ends = np.cumsum(sizes).tolist()
    starts = [e - s for e, s in zip(ends, sizes)]
    plan, frontier = [], ends[0] if sizes else 0
    for p in range(len(sizes)):
        if at is not None and p not in at:
            plan.append([])
            continue
        lo, hi = max(frontier, ends[p]), min(ends[p] + window, ends[-1])
        pieces = []
        for q in range(p + 1, len(sizes)):
            a, b = max(lo, starts[q]), min(hi, ends[q])
            if a >= b:
                if starts[q] >= hi:
                    break
                continue
            off, n = offs[q] + a - starts[q], b - a
            if pieces and 0 <= off - sum(pieces[-1]) < 256:
                pieces[-1] = (pieces[-1][0], off + n - pieces[-1][0])
            else:
                pieces.append((off, n))
        pieces = [(o & ~15, (o + n - (o & ~15) + 15) // 16 * 16) for o, n in pieces]  # bulk prefetch: 16-aligned
        if len(pieces) > PF_PIECES:
            raise ValueError(f"phase {p}: {len(pieces)} prefetch pieces, the kernel takes {PF_PIECES}")
        plan.append(pieces)
        frontier = max(frontier, hi)
    return plan


def build(cubin: str | None) -> bytes:
    if cubin:
        return Path(cubin).read_bytes()
    out = Path(tempfile.mkdtemp()) / "bb.cubin"
    src = Path(__file__).with_name("boundary_bench.cu")
    subprocess.run([nvcc_path() or "nvcc", "-cubin", "-arch=sm_90", "-O3", "-std=c++17", str(src), "-o", str(out)],
                   check=True)
    return out.read_bytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", type=int, default=140)
    ap.add_argument("--mb", default="0,7", help="uniform phases of these MB of weights ('' for none)")
    ap.add_argument("--blocks-per-sm", type=int, default=2)
    ap.add_argument("--threads", type=int, default=384)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cubin")
    ap.add_argument("--step", default="qwen2.5-coder-1.5b", help="a layout of toolchain/layouts.json ('' for none)")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--hops", type=int, choices=(3, 5), default=5, help="dependent phases per layer (see step_sizes)")
    ap.add_argument("--merged-blocks", default="", help="with --hops 3: also the PDL chain with each merged phase "
                    "(QKV + attention + o) streamed by only this many blocks, e.g. 16,32 (a fused kernel on the "
                    "attention's clusters)")
    ap.add_argument("--prefetch-mb", default="", help="also the PDL chain with the step's bytes asked into L2 this "
                    "many MiB ahead of the phase being read (prefetch_plan), e.g. 8,16,32 (slower in every form: "
                    "docs/perf-notes.md)")
    ap.add_argument("--stamps", action="store_true", help="time stamps of stream_ll's phases, per block")
    ap.add_argument("--only", default="", help="comma-separated variants (the persistent reference always runs)")
    ap.add_argument("--stages", type=int, default=6, help="ring stages of 32 KB (persistent_stream)")
    args = ap.parse_args()
    try:  # every size checked before any GPU work: one line and exit 2 for a mistyped one
        mbs = [float(v) for v in args.mb.split(",")] if args.mb else []
        merged = sizes_arg(args.merged_blocks, "--merged-blocks") if args.merged_blocks else []
        windows = sizes_arg(args.prefetch_mb, "--prefetch-mb") if args.prefetch_mb else []
        if min(mbs, default=0) < 0 or args.step and args.step not in LAYOUTS:
            raise ValueError
    except (UserError, ValueError) as e:
        why = e if isinstance(e, UserError) else f"--mb {args.mb!r} / --step {args.step!r}: give MB >= 0 separated " \
            f"by commas and a layout of {', '.join(LAYOUTS)}"
        print(f"boundary_bench: {why}", file=sys.stderr)
        sys.exit(2)
    if not cr.gpu_available():
        print(f"boundary_bench: needs an NVIDIA GPU with cuda-python ({cr.gpu_problem()})", file=sys.stderr)
        sys.exit(2)
    cr.init()
    d = cr.driver()
    mod = cr.Module(build(args.cubin))
    phase, persistent, stream_k = mod.kernel("phase"), mod.kernel("persistent"), mod.kernel("stream_persistent")
    phase_ll, stream_ll = mod.kernel("phase_ll"), mod.kernel("stream_ll")
    prefetch_node = mod.kernel("prefetch_node")
    side, fork, join = cr.Stream(), cr.Event(), cr.Event()  # the side stream's prefetch nodes (pdl_prefetch_side)
    nsm = cr.sm_count()
    grid = nsm * args.blocks_per_sm
    # deadlock guard of the persistent kernel: every block must be resident at once
    per_sm = cr.check(d.cuOccupancyMaxActiveBlocksPerMultiprocessor(persistent.handle, args.threads, 0), "occupancy")
    if per_sm < args.blocks_per_sm:
        sys.exit(f"boundary_bench: only {per_sm} blocks per SM fit, {args.blocks_per_sm} asked: would deadlock")
    total_w = 1 << 30
    w = cr.DeviceBuffer.empty(total_w)
    w.fill_u8(7)
    xa, xb = cr.DeviceBuffer.empty(4 * KX), cr.DeviceBuffer.empty(4 * KX)
    stream = cr.Stream()
    x0 = np.random.default_rng(0).standard_normal(KX).astype(np.float32)
    cfg = LaunchConfig((grid, 1, 1), (args.threads, 1, 1), 0, ())
    # the streaming persistent kernel: one block per SM, the ring in dynamic shared memory
    ring = args.stages * STAGE + 16 * args.stages
    for k in (stream_k, stream_ll):
        cr.check(d.cuFuncSetAttribute(k.handle, d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                      ring), "cuFuncSetAttribute")
        if cr.check(d.cuOccupancyMaxActiveBlocksPerMultiprocessor(k.handle, 32 * (NCW + 1), ring), "occupancy") < 1:
            sys.exit("boundary_bench: the streaming kernel's ring does not fit one block per SM")
    la, lb = cr.DeviceBuffer.empty(8 * KX), cr.DeviceBuffer.empty(8 * KX)  # (value, flag) pairs
    x0_ll = np.stack([x0.view(np.uint32), np.zeros(KX, np.uint32)], axis=1).copy()

    def reset():  # x0 in xa, NaN in xb: a phase that reads x before it is written shows in the result
        xb.fill_u32(0x7FC00000, stream)
        xa.upload(x0, stream=stream, wait=False)

    def ll_reset():  # no flag of an earlier replay left to be mistaken for this one's
        la.fill_u32(0xFFFFFFFF, stream)
        lb.fill_u32(0xFFFFFFFF, stream)
        la.upload(x0_ll, stream=stream, wait=False)
    scfg = LaunchConfig((nsm, 1, 1), (32 * (NCW + 1), 1, 1), ring, ())
    copy = copy_bandwidth(cr, stream)
    shapes = [(f"uniform {mb:g} MB", [int(mb * 1e6) // (16 * grid) * 16 * grid] * args.phases) for mb in mbs]
    if args.step:
        shapes.append((f"{args.step} step, context {args.context}" + (f", {args.hops} hops" if args.hops != 5 else ""),
                       step_sizes(args.step, args.context, args.hops)))
    rows = []
    for shape, sizes in shapes:
        n = len(sizes)
        offs, o = [], 0
        for s in sizes:  # consecutive, 256-aligned, wrapping inside the buffer (past L2 either way)
            if o + s > total_w:
                o = 0
            offs.append(o)
            o += (s + 255) // 256 * 256
        woff = cr.DeviceBuffer.from_numpy(np.array(offs, np.uint64))
        wsize = cr.DeviceBuffer.from_numpy(np.array(sizes, np.uint64))
        ctr = cr.DeviceBuffer.empty(4 * (n + 1))

        hops = args.hops if "step" in shape else 1
        firsts = set(range(0, n - 1, hops))  # each layer's first phase (QKV, or the merged one)
        pf_tables = {}
        for mb in windows:  # per phase PF_PIECES (address, bytes) pairs, absolute addresses
            for where, at in (("every", None), ("first", firsts)):
                table = np.zeros((n, 2 * PF_PIECES), np.uint64)
                for p, pieces in enumerate(prefetch_plan(offs, sizes, mb << 20, at)):
                    for i, (o, b) in enumerate(pieces):
                        table[p, 2 * i:2 * i + 2] = (cr._addr(w) + o, b)
                pf_tables[mb, where] = cr.DeviceBuffer.from_numpy(table)
        ncfg = LaunchConfig((32, 1, 1), (32, 1, 1), 0, ())

        # streamers[p]: the blocks that stream phase p's bytes (0: all). pf: the phases ask for later bytes in their
        # own kernels ("in"), in a prefetch kernel of the chain before each asking phase ("node"), or in one on a
        # side stream forked there and joined at the end ("side")
        def chain(mode, pdl, streamers=None, pf=None, how="in"):
            def fn():
                ctr.fill_u32(0, stream)
                reset()
                forked = False
                for p in range(n):
                    src, dst = (xb, xa) if p & 1 else (xa, xb)
                    pf_p = cr._addr(pf) + p * 16 * PF_PIECES if pf else 0
                    if pf and how == "node" and p in firsts:
                        prefetch_node.launch(ncfg, [pf_p, 1], stream, pdl=p > 0)
                    if pf and how == "side" and p in firsts:
                        fork.record(stream)
                        side.wait(fork)
                        prefetch_node.launch(ncfg, [pf_p, 0], side)
                        forked = True
                    phase.launch(cfg, [src, dst, cr._addr(w) + offs[p], sizes[p], ctr, p, mode,
                                       streamers[p] if streamers else 0, pf_p if how == "in" else 0],
                                 stream, pdl=pdl and (p > 0 or how == "node"))
                if forked:
                    join.record(side)
                    stream.wait(join)
            return fn

        def pers():
            ctr.fill_u32(0, stream)
            reset()
            persistent.launch(cfg, [xa, xb, w, woff, wsize, ctr, n], stream)

        def streamed():
            ctr.fill_u32(0, stream)
            reset()
            stream_k.launch(scfg, [xa, xb, w, woff, wsize, ctr, n, args.stages], stream)

        def chain_ll():
            ll_reset()
            for p in range(n):
                src, dst = (lb, la) if p & 1 else (la, lb)
                phase_ll.launch(cfg, [src, dst, cr._addr(w) + offs[p], sizes[p], p], stream, pdl=p > 0)

        def streamed_ll(nowait=0, sleep_ns=0):
            def fn():
                ll_reset()
                stream_ll.launch(scfg, [la, lb, w, woff, wsize, n, args.stages, nowait, sleep_ns, 0], stream)
            return fn

        fns = {"plain": chain(0, False), "pdl": chain(0, True), "pdl_flag": chain(1, True), "persistent": pers,
               **{f"pdl_merged_on_{b}_blocks": chain(0, True, merged_streamers(n, b))
                  for b in merged if args.hops == 3 and "step" in shape},
               **{f"pdl_prefetch_{mb}mb": chain(0, True, pf=t) for (mb, at), t in pf_tables.items() if at == "every"},
               **{f"pdl_prefetch_{how}_{mb}mb": chain(0, True, pf=t, how=how) for (mb, at), t in pf_tables.items()
                  if at == "first" and hops > 1 for how in ("in", "node", "side")},
               "persistent_stream": streamed, "pdl_ll": chain_ll, "persistent_stream_ll": streamed_ll(),
               "persistent_stream_ll_sleep100": streamed_ll(0, 100),
               "persistent_stream_ll_sleep500": streamed_ll(0, 500),
               "stream_alone": streamed_ll(1)}  # stream_alone: no dependency (x not waited for): wrong x
        if args.only:
            fns = {k: f for k, f in fns.items() if k in args.only.split(",") + ["persistent"]}
        ll = ("pdl_ll", "persistent_stream_ll", "persistent_stream_ll_sleep100", "persistent_stream_ll_sleep500",
              "stream_alone")
        graphs = {k: cr.capture(stream, f) for k, f in fns.items()}
        outs, times = {}, {k: [] for k in graphs}
        for r in range(args.reps + 2):
            for k, g in graphs.items():  # the variants take turns, round after round
                t = cr.time_ms(stream, lambda: g.launch(stream))
                if r >= 2:
                    times[k].append(t)
                if r == 0:
                    stream.synchronize()
                    if k in ll:
                        pairs = (lb if n & 1 else la).download(shape=(KX, 2), dtype=np.uint32)
                        assert k == "stream_alone" or (pairs[:, 1] == n).all(), f"{k}: flags {np.unique(pairs[:, 1])}"
                        outs[k] = pairs[:, 0].view(np.float32)
                    else:
                        outs[k] = (xb if n & 1 else xa).download(shape=(KX,), dtype=np.float32)
        ref = reference_x(x0, n)
        total = sum(sizes)
        for k, t in times.items():
            best = min(t) * 1e3
            row = {"shape": shape, "phases": n, "mb_total": total / 1e6, "variant": k, "us_total": best,
                   "us_per_phase": best / n, "median_us_total": float(np.median(t)) * 1e3,
                   "same_x": bool(np.allclose(outs[k], ref, rtol=1e-4, atol=1e-6))}  # float32 sums vs float64
            if total:
                row["gb_s"] = total / (best * 1e-6) / 1e9
                row["of_copy"] = total / (best * 1e-6) / copy
            rows.append(row)
            print(f"{shape:40s} {k:22s} {best:8.1f} us  {best / n:6.2f} us/phase  "
                  f"{row.get('of_copy', 0):6.1%} of copy  same x {row['same_x']}", file=sys.stderr)
        if args.stamps:  # where a phase of stream_ll waits: its x, its weights, or neither (globaltimer, ns)
            st = cr.DeviceBuffer.empty(8 * 3 * nsm * n)
            ll_reset()
            stream_ll.launch(scfg, [la, lb, w, woff, wsize, n, args.stages, 0, 0, st], stream)
            stream.synchronize()
            t = st.download(shape=(nsm, n, 3), dtype=np.uint64).astype(np.int64)
            st.free()
            t -= t.min()
            x_ready, w_ready, y_done = t[:, :, 0], t[:, :, 1], t[:, :, 2]
            last_y = np.concatenate([[0], y_done.max(axis=0)[:-1]])  # when the previous phase's last block wrote
            per = {"x_wait_us": (x_ready - last_y[None, :]) / 1e3,   # last writer -> this block sees all of x
                   "weights_wait_us": (w_ready - x_ready) / 1e3,      # x seen -> this phase's stages consumed
                   "write_us": (y_done - w_ready) / 1e3}
            stamp_rows = []
            for p in range(n):
                r = {"phase": p, "mb": sizes[p] / 1e6, "phase_us": (y_done[:, p].max() - last_y[p]) / 1e3}
                for k, v in per.items():
                    r[k + "_median"] = float(np.median(v[:, p]))
                    r[k + "_max"] = float(v[:, p].max())
                stamp_rows.append(r)
            agg = {k: float(np.sum(np.median(v, axis=0))) for k, v in per.items()}
            print(f"{shape}: stream_ll stamps, medians over blocks summed over phases (us): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in agg.items())
                  + f"; phases summed {sum(r['phase_us'] for r in stamp_rows):.1f}", file=sys.stderr)
            for r in stamp_rows[:10] + stamp_rows[-3:]:
                print("  " + " ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
                      file=sys.stderr)
            rows.append({"shape": shape, "variant": "stream_ll_stamps", "sums_us": agg, "phases": stamp_rows})
        for b in (woff, wsize, ctr, *pf_tables.values()):
            b.free()
    print(json.dumps({"device": cr.device_name(), "sms": nsm, "grid": grid, "threads": args.threads,
                      "stages": args.stages, "copy_gb_s": copy / 1e9, "rows": rows}, indent=1))
    if not all(r["same_x"] for r in rows if r["variant"] not in ("stream_alone", "stream_ll_stamps")):
        sys.exit("boundary_bench: a chain's x differs from the persistent kernel's")


if __name__ == "__main__":
    main()
