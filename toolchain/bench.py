"""`qtrt bench`: batch-1 decode tokens/s against the bandwidth roofline measured in the same run.

The roofline: a decode step must read every weight byte once (plus the KV cache up to the current position and
one embedding row), so tokens/s can be no more than copy_bandwidth / bytes_per_token. The bench measures the device
copy bandwidth itself (read + write bytes of a large device-to-device copy), replays the captured decode graph for
each context, and times every kernel family with CUDA events to show where the time goes.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import UserError
from .sampling import Sampling, Tail


# llama.cpp on the lent H100 with the 1.5B Q4_K_M layout (issue 6, 2026-11-25), named as llama_bench() names its
# results: stored figures, printed as "anchors" (a ratio against llama.cpp measured in the same run needs
# --compare-llama-bench)
LLAMA_CPP_ANCHORS = {"tg128": 553, "tg128@d4096": 496, "pp512": 26200}


def tg_name(ctx: int) -> str:
    """llama-bench's name of batch-1 decode at our context ctx (context 128 is its plain tg128)."""
    return "tg128" if ctx == 128 else f"tg128@d{ctx}"


def bytes_per_token(model, ctx: int) -> int:
    """Fewest bytes one decode step reads: all weights but the embedding table, one embedding row, the KV cache."""
    c = model.config
    weights = sum(t.data.nbytes for n, t in model.tensors.items() if n != "token_embd.weight")
    emb = model.tensors["token_embd.weight"]
    kv = 2 * c.n_layers * c.n_kv_heads * ctx * c.head_dim * 2
    return weights + emb.data.nbytes // emb.shape[0] + kv


def copy_bandwidth(cr, stream, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median of reps)."""
    a, b = cr.DeviceBuffer.empty(nbytes), cr.DeviceBuffer.empty(nbytes)
    times = []
    for i in range(reps + 3):
        t = cr.time_ms(stream, lambda: cr.memcpy_dtod(b, a, nbytes, stream))
        if i >= 3:
            times.append(t)
    a.free()
    b.free()
    return 2 * nbytes / (np.median(times) / 1e3)


def launch_timing(cr, stream, fn_for, n_variants: int, reps: int = 300, warm: int = 5,
                  graph_launches: int | None = None, graph_reps: int = 5) -> tuple[float, float]:
    """The one kernel-timing harness of the device scripts: fn_for(i) enqueues variant i on `stream` (variants rotate
    buffers, e.g. weights past L2). Returns (median us of event-timed single launches, us per launch inside one
    captured graph of `graph_launches` back-to-back launches, median of `graph_reps` replays). The event times include
    the host's enqueue gaps; the graph time is what a kernel costs inside a captured decode step."""
    for i in range(warm):
        fn_for(i % n_variants)
    stream.synchronize()
    events = [(cr.Event(), cr.Event()) for _ in range(reps)]
    for r, (a, b) in enumerate(events):
        a.record(stream)
        fn_for(r % n_variants)
        b.record(stream)
    stream.synchronize()
    single = float(np.median([b.elapsed_ms(a) for a, b in events])) * 1e3
    n = graph_launches or max(100, min(n_variants, 400))
    g = cr.capture(stream, lambda: [fn_for(r % n_variants) for r in range(n)])
    g.launch(stream)
    stream.synchronize()
    t = [cr.time_ms(stream, lambda: g.launch(stream)) for _ in range(graph_reps)]
    return single, float(np.median(t)) * 1e3 / n


def load_model(spec: str, workdir: Path):
    from .fetch import resolve_model
    from .gguf_model import load_gguf

    if spec.startswith("synthetic:"):
        from .synth import layout, write_synthetic_gguf

        name = spec.split(":", 1)[1]
        path = workdir / f"{name}-synthetic.gguf"
        if not path.exists():
            cfg, types = layout(name)
            write_synthetic_gguf(path, cfg, types, seed=1)
        return load_gguf(path)
    return load_gguf(resolve_model(spec))


SAMPLED = {"temperature": 0.7, "top_p": 0.9}  # issue 14's sampled-decode setting
SAMPLED_ROUNDS = 5  # greedy and sampled timed in turn, best of each and every pair's ratio


def time_decode(be, ctx: int, m: int, tokens: int, cr, sampling=None) -> float:
    """Seconds per decode step of m tokens (m sequences in slots 0..m-1 at position ctx), graph replays (the graph
    of position ctx: CudaBackend.long_context). With `sampling`, every slot samples on the device with it."""
    be.pos = ctx
    if sampling is not None:
        for slot in range(m):
            be.set_sampling(slot, sampling, 1234 + slot, [0] * (ctx + 1), ctx)
        be.sampler.set_rows(range(m), be.stream)
    be._set_inputs(np.zeros(m, np.int32), np.full(m, ctx), np.arange(m))
    g = be.decode_graph(m, be.long_context(ctx, m), Tail(penalties=sampling.penalized) if sampling else None)
    g.launch(be.stream)
    be.stream.synchronize()
    be._set_inputs(np.zeros(m, np.int32), np.full(m, ctx), np.arange(m))
    ms = cr.time_ms(be.stream, lambda: [g.launch(be.stream) for _ in range(tokens)])
    return ms / 1e3 / tokens


def batched_paths(m: int) -> dict[str, dict]:
    """The tunings that put a batched step of m tokens on each kernel path: the decode core (QMV1_MT), the
    tensor-core GEMMs for few tokens, the prefill GEMMs (toolchain/cuda_backend.py)."""
    return {"decode_core": {"skinny_min_m": m + 1, "gemm_min_m": m + 1},
            "skinny_gemm": {"skinny_min_m": 1, "gemm_min_m": m + 1},
            "prefill_gemm": {"gemm_min_m": 1}}


def time_decode_with(be, tuning: dict, ctx: int, m: int, tokens: int, cr) -> float:
    """time_decode under other tuning values (e.g. {"gemm_min_m": 1}: the step on the GEMMs), then the backend's
    own tuning back, with the plans and graphs of either kept apart."""
    saved = be.tuning, be._plans, be._graphs
    be.tuning, be._plans, be._graphs = {**be.tuning, **tuning}, {}, {}
    try:
        return time_decode(be, ctx, m, tokens, cr)
    finally:
        be.tuning, be._plans, be._graphs = saved


def time_prompt(be, n: int, cr, reps: int = 3) -> float:
    """Seconds to the first token's logits of an n-token prompt through the path `qtrt generate` takes
    (CudaBackend.forward: pieces of its max_tokens, slot 0 from position 0), best of reps."""
    ids = np.random.default_rng(n).integers(0, be.cfg.vocab, n).tolist()
    best = float("inf")
    for _ in range(reps):
        be.reset(0)
        be.stream.synchronize()
        t0 = time.perf_counter()
        be.forward(ids)  # reads the last logits: the prefill has finished when it returns
        best = min(best, time.perf_counter() - t0)
    return best


def time_first_prompt(model, n: int, max_tokens: int) -> float:
    """Seconds to the first token's logits of a fresh backend's first prompt of n tokens: the backend prepared as the
    Decoder prepares it (its start-up not counted), then one forward. What time_prompt's best of reps hides: the
    work a backend's first prompt does once (plans, module loads, the piece's graph capture). Within the bench's
    process: the CUDA context and the kernel cache are warm already, as they are not in a fresh `qtrt generate`."""
    from .cuda_backend import CudaBackend

    be = CudaBackend(model, max_context=n + 8, max_tokens=max_tokens, prepare=True)
    try:
        ids = np.random.default_rng(n + 1).integers(0, be.cfg.vocab, n).tolist()
        be.stream.synchronize()
        t0 = time.perf_counter()
        be.forward(ids)
        return time.perf_counter() - t0
    finally:
        be.close()


def time_engine_prompt(be, model, n: int, reps: int = 2) -> float:
    """Seconds from submitting an n-token prompt to an idle engine on `be` until its first token arrives, best of
    reps: the path of `qtrt serve` (its default 4 slots, or the backend's slots where fewer; the engine's prompt
    chunks; the first token drawn on the device). A fresh prompt each time, so no prefix is reused."""
    from .decoder import Decoder
    from .engine import Engine
    from .tokenizer import Tokenizer

    dec = Decoder(model, Tokenizer.from_gguf(model.reader), be, be.max_context)
    eng = Engine(dec, slots=min(4, be.n_slots))
    try:
        return min(first_token_seconds(eng, np.random.default_rng([n, rep]).integers(0, be.cfg.vocab, n).tolist())
                   for rep in range(reps))
    finally:
        eng.close()


def first_token_seconds(eng, ids: list[int]) -> float:
    """Seconds from submitting the prompt `ids` to `eng` until its first token arrives (or its end, where a stop token
    is drawn first: no token event). A request the engine fails raises, naming its length."""
    from .engine import Params

    t0 = time.perf_counter()
    for kind, payload in eng.submit(ids, Params(max_tokens=1)):
        if kind == "error":
            raise RuntimeError(f"the engine failed a {len(ids)}-token prompt: {payload}")
        if kind in ("token", "done"):
            return time.perf_counter() - t0
    raise RuntimeError(f"the engine ended a {len(ids)}-token prompt without a token or an end")


def time_mixed_step(be, d: int, chunk: int, ctx: int, last_wanted: bool, reps: int = 7) -> float:
    """Seconds for one of the engine's mixed steps through step_tokens (what `qtrt serve` runs while a prompt arrives
    beside d decoding streams), median of reps: d decode rows (slots 0..d-1, at position ctx) then a prompt chunk of
    `chunk` tokens in slot d from position ctx, the decode rows' tokens drawn on the device, and with last_wanted the
    chunk's last row's too (a prompt's last chunk). Host time included: the step is launched from Python."""
    ids = np.random.default_rng([d, chunk]).integers(0, be.cfg.vocab, d + chunk).tolist()
    pos = [ctx] * d + list(range(ctx, ctx + chunk))
    slots = list(range(d)) + [d] * chunk
    rows = list(range(d)) + ([d + chunk - 1] if last_wanted else [])
    if not rows:  # a step wanting no token returns before it has run (chunks_ahead): nothing would be timed
        raise ValueError("time_mixed_step: give decode rows (d > 0) or last_wanted")
    times = []
    for _ in range(reps + 1):  # the first builds its plan
        t0 = time.perf_counter()
        be.step_tokens(ids, pos, slots, rows=rows, tail=Tail(penalties=False))  # returns after the tokens' copy
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def time_prefill(be, m: int, cr, reps: int = 5) -> float:
    """Seconds for one prompt prefill step of m tokens (slot 0, positions 0..m-1), head on the last token only."""
    be._set_inputs(np.zeros(m, np.int32), np.arange(m), np.zeros(m))
    g = cr.capture(be.stream, lambda: be.run_plan(m, last_only=True))
    g.launch(be.stream)
    return cr.time_ms(be.stream, lambda: [g.launch(be.stream) for _ in range(reps)]) / 1e3 / reps


def kernel_breakdown(be, cr, reps: int = 20, m: int = 1, last_only: bool = False,
                     ctx: int | None = None, tail: Tail | None = None) -> dict[str, float]:
    """Microseconds per step by kernel family: the family's launches of one step (m tokens) captured alone into a
    CUDA graph and replayed (events around single launches would mostly time the events themselves). With ctx, the
    m tokens sit at position ctx (slots 0..m-1) before each family (decode_advance moves them on): the attention's
    time depends on it. tail: the device sampler's passes at the argmax."""
    plan = be.plan(m, last_only, long_context=ctx is not None and be.long_context(ctx, m), tail=tail)
    out = {}
    for op in sorted({launch.op for launch in plan}):
        if ctx is not None:
            be._set_inputs(np.zeros(m, np.int32), np.full(m, ctx), np.arange(m))
        mine = [launch for launch in plan if launch.op == op]
        g = cr.capture(be.stream, lambda mine=mine: [x.kernel.launch(x.cfg, x.args, be.stream) for x in mine])
        g.launch(be.stream)
        out[op] = cr.time_ms(be.stream, lambda: [g.launch(be.stream) for _ in range(reps)]) * 1e3 / reps
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def check_llama_bench(path: str, tool: str = "llama-bench"):
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise UserError(f"{path}: no {tool} executable there; pass the path of a built {tool} binary")


def run_llama_tool(path: str, tool: str, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool (checked first), its failure as one line naming the command to rerun."""
    check_llama_bench(path, tool)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{path}: {tool} exited with {r.returncode} ({last}); run `{' '.join(cmd)}` to see why")
    return r


def llama_batched_bench(path: str, gguf: str, batches, pp: int = 128, tg: int = 128) -> dict[int, float]:
    """Run a llama-batched-bench binary on the same GGUF (B sequences of a pp-token prompt each, then tg tokens each,
    fully offloaded, flash attention; its JSONL output) and return {B: aggregate decode tok/s (S_TG)}: the figure
    our batched decode of B sequences compares with."""
    batches = sorted({int(b) for b in batches})
    cmd = [path, "-m", str(gguf), "-npp", str(pp), "-ntg", str(tg), "-npl", ",".join(map(str, batches)),
           "-c", str(max(batches) * (pp + tg)), "-ngl", "99", "-fa", "on", "--output-format", "jsonl"]
    r = run_llama_tool(path, "llama-batched-bench", cmd)
    out = {}
    for line in (r.stdout + "\n" + r.stderr).splitlines():
        if line.startswith("{"):
            try:
                e = json.loads(line)
                out[int(e["pl"])] = float(e["speed_tg"])
            except (ValueError, KeyError, TypeError):
                continue
    if sorted(out) != batches:
        raise UserError(f"{path}: llama-batched-bench printed no JSONL results (pl, speed_tg) for B = "
                        f"{','.join(map(str, batches))}; run `{' '.join(cmd)}` to see why")
    return out


def batched_side_by_side(results: dict) -> list[str]:
    """Lines comparing our batched decode aggregate with llama-batched-bench's (results['llama_batched_bench'])."""
    lb = results.get("llama_batched_bench", {})
    return [f"  B = {r['m']:2d}         qwen-trt {r['tok_s']:9.1f} tok/s   llama.cpp {lb[r['m']]:9.1f} tok/s   "
            f"{r['tok_s'] / lb[r['m']]:.2f}x" for r in results.get("batched", []) if r["m"] in lb]


def llama_bench(path: str, gguf: str, depths=(0, 4096), prompts=(512,)) -> dict:
    """Run a llama-bench binary on the same GGUF (pp of each prompt length and tg128, at each depth; its JSON output)
    and return {"pp512": tok/s, "pp4096": tok/s, "tg128": tok/s, "tg128@d4096": tok/s, ...}."""
    cmd = [path, "-m", str(gguf), "-p", ",".join(map(str, prompts)), "-n", "128", "-d", ",".join(map(str, depths)),
           "-fa", "on", "-o", "json"]
    r = run_llama_tool(path, "llama-bench", cmd)
    try:
        out = {}
        for e in json.loads(r.stdout):
            name = f"pp{e['n_prompt']}" if e["n_prompt"] else f"tg{e['n_gen']}"
            out[name + (f"@d{e['n_depth']}" if e.get("n_depth") else "")] = float(e["avg_ts"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: llama-bench printed no JSON list of results with n_prompt, n_gen, avg_ts ({err})")
    return out


def side_by_side(results: dict) -> list[str]:
    """Lines comparing our fused decode / prefill with a llama-bench run of the same bench (results['llama_bench'])."""
    lb = results.get("llama_bench", {})
    ours = {tg_name(r["context"]): r["tok_s"] for r in results["decode"] if r["graph"] == "fused"}
    ours |= {f"pp{r['m']}": r["tok_s"] for r in results.get("prefill", []) if r["graph"] == "fused"}
    ours |= {f"pp{r['tokens']}": r["tok_s"] for r in results.get("prompts", [])}  # the user path, where timed
    return [f"  {k:14s} qwen-trt {ours[k]:9.1f} tok/s   llama.cpp {v:9.1f} tok/s   {ours[k] / v:.2f}x"
            for k, v in lb.items() if k in ours]


def sizes_arg(text: str, flag: str) -> list[int]:
    """A comma-separated list of positive sizes from the command line (one-line error otherwise)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise UserError(f"{flag} {text!r}: give positive whole numbers separated by commas, e.g. 512,4096")
    return out


def run_bench(a):
    from . import cuda_runtime as cr

    contexts, batches = sizes_arg(a.contexts, "--contexts"), sizes_arg(a.batches, "--batches")
    prompts = sizes_arg(a.prompts, "--prompts") if getattr(a, "prompts", "") else []
    if getattr(a, "compare_llama_bench", None):
        check_llama_bench(a.compare_llama_bench)  # before the GPU work, not after it
    if getattr(a, "compare_llama_batched_bench", None):
        check_llama_bench(a.compare_llama_batched_bench, "llama-batched-bench")
    if not cr.gpu_available():
        raise UserError("qtrt bench needs an NVIDIA GPU with cuda-python (pip install 'qwen-trt[cuda]')")
    from .cuda_backend import GEMM_MIN_M, SKINNY_MIN_M, CudaBackend
    from .kernels import QMV1_MT_MAX

    pp_anchor = LLAMA_CPP_ANCHORS["pp512"]
    workdir = Path(os.environ.get("QTRT_BENCH_DIR", tempfile.gettempdir()))
    model = load_model(a.model, workdir)
    cr.init()
    stream = cr.Stream()
    bw = copy_bandwidth(cr, stream)
    results = {"device": cr.device_name(), "model": a.model, "layout": vars(model.config),
               "copy_bandwidth_GBps": round(bw / 1e9, 1),
               "anchors": {"llama.cpp tg128 tok/s": LLAMA_CPP_ANCHORS["tg128"],
                           "llama.cpp tg128 @4096 tok/s": LLAMA_CPP_ANCHORS["tg128@d4096"],
                           "llama.cpp pp512 tok/s": LLAMA_CPP_ANCHORS["pp512"]},
               "decode": [], "batched": [], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    max_ctx = max(contexts + [a.prefill] + prompts) + a.tokens + 8
    modes = (True, False)  # fused graph first: it is what the decoder runs
    for fused in modes:
        be = CudaBackend(model, max_context=max_ctx, n_slots=max(batches), max_tokens=max(batches + [a.prefill]),
                         fused=fused)
        s = time_prefill(be, a.prefill, cr)
        results.setdefault("prefill", []).append({"graph": "fused" if fused else "unfused", "m": a.prefill,
                                                  "tok_s": round(a.prefill / s, 1), "ms": round(s * 1e3, 2),
                                                  "vs_llama_cpp_pp512": round(a.prefill / s / pp_anchor, 2)})
        print(f"{'fused' if fused else 'unfused':8s} prefill {a.prefill}: {a.prefill / s:9.1f} tok/s "
              f"({s * 1e3:.2f} ms, {a.prefill / s / pp_anchor:.2f}x llama.cpp's stored pp512 anchor)")
        if fused == modes[0]:  # the user path: a whole prompt to its first token's logits, in pieces of a step
            for n in prompts:
                first = time_first_prompt(model, n, be.max_tokens)
                s = time_prompt(be, n, cr)
                served = time_engine_prompt(be, model, n)
                results.setdefault("prompts", []).append({"tokens": n, "pieces_of": be.max_tokens,
                                                          "s": round(s, 4), "tok_s": round(n / s, 1),
                                                          "first_s": round(first, 4),
                                                          "first_tok_s": round(n / first, 1),
                                                          "engine_s": round(served, 4),
                                                          "engine_tok_s": round(n / served, 1)})
                print(f"prompt of {n:6d} tokens to its first token: {s * 1e3:8.1f} ms, {n / s:9.1f} tok/s "
                      f"(pieces of {be.max_tokens}); a fresh backend's first prompt: {first * 1e3:8.1f} ms; "
                      f"through the engine: {served * 1e3:8.1f} ms")
            if be.n_slots > 1 and be.max_tokens > 2 * be.n_slots:  # the engine's step while a prompt arrives
                d = min(4, be.n_slots - 1)
                chunk = min(be.prompt_chunk, be.max_tokens - d)  # the engine's chunk beside d decode rows
                mixed = {"decode_rows": d, "chunk": chunk, "ctx": contexts[0],
                         "ms": round(time_mixed_step(be, d, chunk, contexts[0], False) * 1e3, 3),
                         "last_wanted_ms": round(time_mixed_step(be, d, chunk, contexts[0], True) * 1e3, 3)}
                results["mixed_step"] = mixed
                print(f"the engine's mixed step ({d} decode rows + a {chunk}-token prompt chunk, launched from "
                      f"Python): {mixed['ms']:.2f} ms, {mixed['last_wanted_ms']:.2f} ms with the chunk's last row "
                      "drawn too")
            results["crossover"] = {"decode_core_below_m": SKINNY_MIN_M, "skinny_gemm_from_m": SKINNY_MIN_M,
                                    "prefill_gemm_from_m": GEMM_MIN_M}
            print(f"kernels by step size: m = 1 the batch-1 decode core, 1 < m < {SKINNY_MIN_M} the decode core with "
                  f"up to {QMV1_MT_MAX} tokens per block, {SKINNY_MIN_M} <= m < {GEMM_MIN_M} the tensor-core GEMMs for "
                  f"few tokens, m >= {GEMM_MIN_M} the prefill GEMMs (toolchain/cuda_backend.py SKINNY_MIN_M, "
                  "GEMM_MIN_M; each batched m below is timed on all three)")
        for ctx in contexts:
            if fused:  # greedy and sampled steps alternate: the GPU's clock drifts by ~2% between runs; a first
                # pair warms both (it ran ~1% low, bench/results/device-2026-12-05d)
                pairs = [(time_decode(be, ctx, 1, a.tokens, cr), time_decode(be, ctx, 1, a.tokens, cr,
                                                                              Sampling(**SAMPLED)))
                         for _ in range(SAMPLED_ROUNDS + 1)][1:]
                s, ss = min(g for g, _ in pairs), min(x for _, x in pairs)
            else:
                s = time_decode(be, ctx, 1, a.tokens, cr)
            bpt = bytes_per_token(model, ctx + a.tokens // 2)
            row = {"graph": "fused" if fused else "unfused", "context": ctx, "tok_s": round(1 / s, 1),
                   "us_per_token": round(s * 1e6, 1), "bytes_per_token": bpt,
                   "roofline_tok_s": round(bw / bpt, 1), "roofline_fraction": round(bpt / (bw * s), 3),
                   "vs_llama_cpp_tg128": round((1 / s) / LLAMA_CPP_ANCHORS["tg128"], 2),
                   "launches_per_token": len(be.plan(1))}
            anchor = LLAMA_CPP_ANCHORS.get(tg_name(ctx))
            if anchor:
                row["vs_llama_cpp_same_depth"] = round((1 / s) / anchor, 2)
            if fused:  # the same step with the device sampler (issue 14: >= 97% of greedy)
                ratios = sorted(g / x for g, x in pairs)
                row |= {"sampled": SAMPLED, "sampled_tok_s": round(1 / ss, 1), "sampled_vs_greedy": round(s / ss, 3),
                        "sampled_vs_greedy_pairs": [round(r, 3) for r in ratios],
                        "sampled_vs_greedy_median": round(ratios[len(ratios) // 2], 3)}
                print(f"         ctx {ctx:5d} sampled {SAMPLED}: {1 / ss:8.1f} tok/s, {s / ss:.3f} of greedy (best "
                      f"of {SAMPLED_ROUNDS} each; pairs {row['sampled_vs_greedy_pairs']})")
                sk = kernel_breakdown(be, cr, ctx=ctx, tail=Tail(penalties=True, logprobs=True))
                row["sampled_kernels_us"] = {k: v for k, v in sk.items()
                                             if k in ("apply_penalties", "sample_tokens", "token_logprobs")}
                print(f"         sampler kernels (us): {row['sampled_kernels_us']}")
            results["decode"].append(row)
            depth = f", {row['vs_llama_cpp_same_depth']:.2f}x its anchor at depth {ctx}" if anchor else ""
            print(f"{row['graph']:8s} ctx {ctx:5d}: {row['tok_s']:8.1f} tok/s  {row['us_per_token']:7.1f} us/token  "
                  f"{row['roofline_fraction'] * 100:5.1f}% of roofline ({bpt / 1e9:.3f} GB/token)  "
                  f"{row['vs_llama_cpp_tg128']:.2f}x llama.cpp's stored tg128 anchor{depth}  "
                  f"{row['launches_per_token']} launches")
        results.setdefault("kernels_us_per_token", {})["fused" if fused else "unfused"] = {
            f"ctx{ctx}": kernel_breakdown(be, cr, ctx=ctx) for ctx in contexts}
        if fused == modes[0]:
            be._set_inputs(np.zeros(a.prefill, np.int32), np.arange(a.prefill), np.zeros(a.prefill))
            results["prefill_kernels_us"] = kernel_breakdown(be, cr, reps=3, m=a.prefill, last_only=True)
        if fused == modes[0]:
            for m in batches:
                s = time_decode(be, contexts[0], m, a.tokens, cr)
                fam = kernel_breakdown(be, cr, m=m, ctx=contexts[0])
                row = {"m": m, "tok_s": round(m / s, 1), "us_per_step": round(s * 1e6, 1), "kernels_us": fam}
                other = ""
                if m > 1:  # every side of the crossovers: the same step on each kernel path
                    row["paths_us_per_step"] = {
                        name: round(time_decode_with(be, tuning, contexts[0], m, a.tokens, cr) * 1e6, 1)
                        for name, tuning in batched_paths(m).items()}
                    other = "; paths (us/step): " + ", ".join(f"{k} {v}" for k, v in row["paths_us_per_step"].items())
                results["batched"].append(row)
                step1 = results["batched"][0]["us_per_step"] if results["batched"][0]["m"] == 1 else None
                rel = f", {s * 1e6 / step1:.2f}x the m=1 step" if step1 else ""
                print(f"batched m={m:2d}: {m / s:9.1f} tok/s aggregate ({s * 1e6:.1f} us/step{rel}{other}); by "
                      "family (us): " + ", ".join(f"{k} {v}" for k, v in list(fam.items())[:5]))
            fastest = {r["m"]: min(r["paths_us_per_step"], key=r["paths_us_per_step"].get)
                       for r in results["batched"] if "paths_us_per_step" in r}
            if fastest:
                results["crossover"]["measured_fastest_path"] = fastest
                print("measured fastest path by m: " + ", ".join(f"{m}: {p}" for m, p in fastest.items())
                      + f" (thresholds: skinny GEMMs from {SKINNY_MIN_M}, prefill GEMMs from {GEMM_MIN_M})")
        be.close()
    if getattr(a, "compare_llama_bench", None):
        results["llama_bench"] = llama_bench(a.compare_llama_bench, model.path,
                                             prompts=sorted(set([a.prefill] + prompts)))
        print("side by side, same GGUF, same GPU, same run:\n" + "\n".join(side_by_side(results)))
    if getattr(a, "compare_llama_batched_bench", None):
        results["llama_batched_bench"] = llama_batched_bench(a.compare_llama_batched_bench, model.path, batches,
                                                             pp=contexts[0])
        for r in results["batched"]:
            r["vs_llama_batched_bench"] = round(r["tok_s"] / results["llama_batched_bench"][r["m"]], 3)
        print(f"batched decode side by side (ours at context {contexts[0]}; llama-batched-bench -npp {contexts[0]} "
              "-ntg 128: its tg phase), same GGUF, same GPU, same run:\n" + "\n".join(batched_side_by_side(results)))
    print(f"copy bandwidth {results['copy_bandwidth_GBps']} GB/s on {results['device']}")
    per_ctx = results["kernels_us_per_token"]["fused" if modes[0] else "unfused"]
    print("kernel families, launches of one step back to back (us/token): " + "  ".join(f"{c:>9s}" for c in per_ctx))
    for fam in per_ctx[f"ctx{contexts[0]}"]:
        print(f"  {fam:20s} " + "  ".join(f"{per_ctx[c].get(fam, 0):9.1f}" for c in per_ctx))
    print(f"prefill {a.prefill} by kernel family (us): {results['prefill_kernels_us']}")
    write_results(results, Path(a.output))
    return results


def write_results(results: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    js = out / f"bench-{stamp}.json"
    tmp = js.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, js)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {js} (no plot: pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for graph in ("fused", "unfused"):
        rows = [r for r in results["decode"] if r["graph"] == graph]
        ax.plot([r["context"] for r in rows], [r["tok_s"] for r in rows], "o-", label=f"qwen-trt cuda ({graph})")
    rows = [r for r in results["decode"] if r["graph"] == results["decode"][0]["graph"]]
    ax.plot([r["context"] for r in rows], [r["roofline_tok_s"] for r in rows], "k--", label="bandwidth roofline")
    ax.plot([128, 4096], [LLAMA_CPP_ANCHORS[tg_name(c)] for c in (128, 4096)], "s:", label="llama.cpp (tg128 anchors)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title(f"Qwen2.5-1.5B Q4_K_M layout on {results['device']}")
    ax.legend()
    ax.grid(alpha=0.3)
    png = js.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {js} and {png}")
