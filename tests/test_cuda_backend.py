"""Whole-model proof of the `cuda` backend on a GPU: a synthetic GGUF with the real 1.5B layout (generated where the
test runs; QTRT_GPU_REAL=1: the real 1.5B GGUF), greedy tokens and logits against the CPU reference decoder. Skips
without a GPU."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest

from conftest import cached

# QTRT_GPU_REAL=1: these tests on the real 1.5B GGUF instead of the synthetic one. Their bounds were set on the
# synthetic model; of them, test_greedy_32_tokens_match_reference, test_batched_slots_equal_separate_runs and
# test_sums_of_squares_from_the_producer_keep_the_answers (fused graph) have run on the real one (2026-12-07),
# against the float32-cache reference. Some random-token sequences sat far from it on every kernel path alike, the
# decode core included (bench/results/device-2026-12-07d: one of 40 at 9.4e-2), and the greedy test's prefill bound
# and the batched test's reference bound failed there (5.5e-2, 6.4e-2) while batched == separate held. The float16
# KV cache of docs/ops.md alone moves that sequence by 9.4e-2 on the CPU (docs/perf-notes.md), so in this mode the
# reference keeps a float16 cache (ReferenceModel kv_dtype), the arithmetic the graphs specify; not yet run on a GPU
REAL = os.environ.get("QTRT_GPU_REAL") == "1"
# a batched step's rows against the CPU reference (test_batched_slots_equal_separate_runs says why the real model's)
REF_BOUND = 2.5e-2 if REAL else 5e-3
pytestmark = [pytest.mark.gpu, pytest.mark.real_model] if REAL else pytest.mark.gpu
TIE = 2e-2  # below this top-2 logit margin, float16-cache rounding may legitimately pick the other token


def rel_err(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.fixture(scope="module")
def synth(synth_gguf, request):
    """The model and its CPU reference: the synthetic 1.5B, or with QTRT_GPU_REAL=1 the real Qwen2.5-Coder-1.5B
    Q4_K_M GGUF (`make model`, or QTRT_MODELS_DIR; conftest's real_model / real_reference): the same tests on real
    weights."""
    if REAL:  # the reference with docs/ops.md's float16 KV cache (a copy: the float32 one is shared with other tests)
        ref = copy.copy(request.getfixturevalue("real_reference")("1.5b"))
        ref.kv_dtype = np.dtype(np.float16)
        return request.getfixturevalue("real_model")("1.5b"), ref
    from toolchain.gguf_model import load_gguf
    from toolchain.reference import ReferenceModel

    model = load_gguf(synth_gguf("qwen2.5-coder-1.5b", seed=7))
    return model, cached(("ref-synth-1.5b",), lambda: ReferenceModel(model))


@pytest.fixture(scope="module", params=["fused", "unfused", "tensorrt_builds"])
def backend(synth, request):
    """The cuda backend three ways: its fused graph, the 13-op graph, and the 13-op graph on the very kernel builds
    TensorRT's plugins get (issue 16: no cluster launch, the KV cache by address; cuda_backend.TENSORRT_BUILDS)."""
    from toolchain.cuda_backend import TENSORRT_BUILDS, CudaBackend

    tuning = TENSORRT_BUILDS if request.param == "tensorrt_builds" else None
    if tuning and REAL:
        from toolchain.kernels import nvcc_path

        if nvcc_path() is None:  # (the real model's tests need no nvcc, but these builds are not all prebuilt)
            pytest.skip("needs nvcc: the TensorRT plugins' kernel builds are not all prebuilt")
    be = CudaBackend(synth[0], max_context=4200, n_slots=64, max_tokens=96, fused=request.param == "fused",
                     tuning=tuning)
    if tuning:  # what the plans launch is what TensorRT would: no cluster build, the attention by address
        ops = {x.op for m in (1, 4, 96) for x in be.plan(m)}
        assert "rope_kv_attention_addr" in ops and "rope_kv_attention" not in ops and not ops & {"q4k_gemm", "q6k_gemm"}
        assert all("KSPLIT" not in dict(d) and "QMV1" not in dict(d) for op, d in be._modules if op != "argmax")
        assert all(dict(d).get("ATTN_CLUSTER") == 0 and dict(d).get("ATTN_ADDR") == 1
                   for op, d in be._modules if "attention" in op), sorted(be._modules)
    yield be
    be.close()


def compare_greedy(ref, rcache, be, prompt, start, n):
    """Greedy decode n tokens on both from `start`; tokens must match until a near-tie; returns (matched, errs)."""
    logits_ref = ref.forward(prompt, start, rcache)[-1]
    be.pos = start
    logits_gpu = be.forward(prompt)
    errs = [rel_err(logits_gpu, logits_ref)]
    tok = int(np.argmax(logits_ref))
    assert int(np.argmax(logits_gpu)) == tok or np.sort(logits_ref)[-1] - np.sort(logits_ref)[-2] < TIE
    matched = 1
    gen = be.greedy(tok, n - 1)
    pos = start + len(prompt)
    for got in gen:
        lr = ref.forward([tok], pos, rcache)[-1]
        want = int(np.argmax(lr))
        top2 = np.sort(lr)[-2:]
        if got != want:  # only a near-tie may diverge; compare_greedy's callers then see matched < n
            assert top2[1] - top2[0] < TIE, f"token {matched}: gpu {got}, reference {want}, margin {top2[1] - top2[0]}"
            break
        matched += 1
        tok, pos = want, pos + 1
    return matched, errs


def use_tuning(backend, tuning: dict):
    """Run the backend under `tuning` from now on: its plans and captured graphs are made again."""
    backend.tuning = tuning
    backend._plans.clear()
    backend._graphs.clear()


def test_greedy_32_tokens_match_reference(synth, backend):
    model, ref = synth
    rng = np.random.default_rng()
    for attempt in range(3):  # a near-tie (random weights) may end a run early: then a fresh prompt
        prompt = rng.integers(0, model.config.vocab, 7).tolist()
        matched, errs = compare_greedy(ref, ref.new_cache(64), backend, prompt, 0, 32)
        print(f"\nprefill logits rel err {errs[0]:.2e}, greedy tokens matched {matched}/32")
        assert errs[0] < 5e-3
        if matched == 32:
            break
    assert matched == 32, "three prompts in a row ended at a near-tie"


def test_step_logits_match_reference(synth, backend):
    """Single-token steps through the captured graph: logits at every step within tolerance."""
    model, ref = synth
    rng = np.random.default_rng()
    ids = rng.integers(0, model.config.vocab, 6).tolist()
    rcache = ref.new_cache(16)
    backend.reset()
    for i, t in enumerate(ids):
        lg = backend.forward([t])
        lr = ref.forward([t], i, rcache)[-1]
        assert rel_err(lg, lr) < 5e-3, i


def test_beyond_4096(synth, backend):
    """Decode at positions past 4096 over a cache filled identically (as float16) on both sides."""
    model, ref = synth
    c = model.config
    rng = np.random.default_rng()
    start = 4100
    fill = (rng.standard_normal((c.n_layers, 2, c.n_kv_heads, start, c.head_dim)) * 0.5).astype(np.float16)
    rcache = ref.new_cache(start + 40)
    rcache[:, :, :, :start] = fill.astype(np.float32)
    for i in range(c.n_layers):
        for j, kind in enumerate("kv"):
            full = np.zeros((backend.n_slots, c.n_kv_heads, backend.max_context, c.head_dim), np.float16)
            full[0, :, :start] = fill[i, j]
            backend.buffers[f"{kind}_cache.{i}"].upload(full, backend.stream)
    prompt = rng.integers(0, c.vocab, 3).tolist()
    matched, errs = compare_greedy(ref, rcache, backend, prompt, start, 16)
    print(f"\nat position {start}: logits rel err {errs[0]:.2e}, tokens matched {matched}/16")
    assert errs[0] < 5e-3 and matched >= 8


@pytest.mark.parametrize("m", [3, 5, 16, 40, 64])
def test_batched_slots_equal_separate_runs(synth, backend, m):
    """m tokens of m different sequences (own slot and position) in one step = m separate single steps on the same
    kernels (m = 3: the decode core, 4 tokens per block; from SKINNY_MIN_M up to GEMM_MIN_M - 1: the tensor-core
    GEMMs for few tokens, which the single steps then run too), and the first rows within the reference's bound of
    the CPU reference."""
    model, ref = synth
    c = model.config
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, c.vocab, 3 + s % 5).tolist() for s in range(m)]
    for s, p in enumerate(prompts):  # prefill each slot separately
        backend.step(p, np.arange(len(p)), np.full(len(p), s))
    last = [p[-1] for p in prompts]
    batched = backend.step(last, [len(p) for p in prompts], list(range(m))).copy()
    saved = dict(backend.tuning)
    same_kernels = {**saved, "skinny_min_m": 1} if backend._skinny(m) else saved

    try:
        for s, p in enumerate(prompts):  # replay the same step alone, on the cache re-filled for that slot
            backend.step(p, np.arange(len(p)), np.full(len(p), s))
            use_tuning(backend, same_kernels)
            single = backend.step([p[-1]], [len(p)], [s])
            use_tuning(backend, saved)
            # at m = 3 the single step runs the batch-1 decode builds (qmv1: x quantized per 16 elements), the batched
            # one 4 tokens per block: the two roundings differ by ~1e-4 in the logits (scripts/decode_tuning.py
            # measures 1e-4 - 2e-4); a wrong slot or position gives errors of order 1
            assert rel_err(batched[s], single[0]) < 1e-3, (s, seed)
    finally:
        use_tuning(backend, saved)
    # the step fed p[-1] again, at position len(p), against the CPU reference (the batched == single check above is
    # what catches a wrong slot or position in the batched step; this one, errors both share). On the real 1.5B some
    # random-token sequences sat ~1e-2 (one of 40: 9e-2) from the float32-cache reference on every kernel path
    # (H100, 2026-12-07, bench/results/device-2026-12-07c and -07d), most of it the float16 KV cache's own rounding,
    # which the real model's reference now keeps (the synth fixture); its bound stays the one set against the float32
    # cache (not yet re-calibrated on the GPU): REF_BOUND
    for s, p in enumerate(prompts[:3]):
        want = ref.forward(p + [p[-1]], 0, ref.new_cache(16))[-1]
        assert rel_err(batched[s], want) < REF_BOUND, (s, seed)


def test_sums_of_squares_from_the_producer_keep_the_answers(synth, backend):
    """With ssq_by_producer (the default) a step on the GEMMs for few tokens passes each RMSNorm's sums of x^2 from
    the o / down projection (matmul_add_skinny, SK_SSQ_OUT) to the fused GEMM after it (SK_SSQ_IN): every layer's
    SwiGLU and every QKV but layer 0's (it reads the embedding). A 16-token step of 16 slots gives the logits of the
    step without it within 1e-3 (the same sum in another order; the 1 / rms that differ in their last bit move some
    fp16 operands by one rounding, as the decode core's builds differ from the GEMMs': on the H100, 2026-12-07,
    2.9e-4 synthetic and 4.7e-4 real), and its rows the CPU reference's within the batched test's bound."""
    model, ref = synth
    c = model.config
    m = 16
    from toolchain.kernels import SSQ_CONSUMERS

    if not backend._skinny(m) or not any(ln.op in SSQ_CONSUMERS for ln in backend.plan(m)):
        pytest.skip("no fused GEMMs for few tokens at m = 16 in this build (the 13-op graph has no fused ops)")
    rng = np.random.default_rng()
    prompts = [rng.integers(0, c.vocab, 2 + s % 4).tolist() for s in range(m)]
    for s, p in enumerate(prompts):
        backend.step(p, np.arange(len(p)), np.full(len(p), s))
    saved, got, plans = dict(backend.tuning), {}, {}
    try:
        for on in (True, False):
            use_tuning(backend, {**saved, "ssq_by_producer": on})
            plans[on] = backend.plan(m)
            got[on] = backend.step([p[-1] for p in prompts], [len(p) for p in prompts], list(range(m))).copy()
    finally:
        use_tuning(backend, saved)
    n = c.n_layers
    uses = [ln.op for ln in plans[True] if (ln.defines or {}).get("SK_SSQ_IN")]
    assert uses.count("rms_norm_swiglu_skinny") == n and uses.count("rms_norm_qkv_skinny") == n - 1
    assert sum(bool((ln.defines or {}).get("SK_SSQ_OUT")) for ln in plans[True]) == 2 * n - 1
    assert not any({"SK_SSQ_IN", "SK_SSQ_OUT"} & (ln.defines or {}).keys() for ln in plans[False])
    assert rel_err(got[True], got[False]) < 1e-3
    for s, p in enumerate(prompts[:3]):
        assert rel_err(got[True][s], ref.forward(p + [p[-1]], 0, ref.new_cache(16))[-1]) < REF_BOUND, s


@pytest.mark.parametrize("chunk", [32, "gemm"])
def test_a_mixed_step_equals_its_rows_alone(synth, backend, chunk):
    """What the engine runs under load: one step of decode rows of three slots then a prompt chunk of a fourth (the
    engine's order; chunk 32: m = 35, the few-token GEMMs and each token's decode attention; chunk GEMM_MIN_M: the
    prefill GEMMs, the chunk's attention as the prefill pair, piece_from = 3) = the chunk in a step of its own (the
    same GEMMs and attention) and each decode row in a step of its own."""
    from toolchain.cuda_backend import GEMM_MIN_M

    n = GEMM_MIN_M if chunk == "gemm" else chunk
    model, _ = synth
    rng = np.random.default_rng()
    prompts = [rng.integers(0, model.config.vocab, n).tolist() for n in (8 + n, 5, 9, 17)]

    def prefill():  # slot 0: its first 8 tokens; slots 1-3: all but their last token
        backend.step(prompts[0][:8], np.arange(8), np.zeros(8))
        for s in (1, 2, 3):
            p = prompts[s]
            backend.step(p[:-1], np.arange(len(p) - 1), np.full(len(p) - 1, s))

    prefill()
    ids = [prompts[s][-1] for s in (1, 2, 3)] + prompts[0][8:]
    positions = [len(prompts[s]) - 1 for s in (1, 2, 3)] + list(range(8, 8 + n))
    mixed = backend.step(ids, positions, [1, 2, 3] + [0] * n).copy()
    prefill()
    alone = backend.step(prompts[0][8:], np.arange(8, 8 + n), np.zeros(n))
    errs = [rel_err(mixed[3 + j], alone[j]) for j in range(n)]
    for k, s in enumerate((1, 2, 3)):
        single = backend.step([prompts[s][-1]], [len(prompts[s]) - 1], [s])
        errs.append(rel_err(mixed[k], single[0]))
    # the chunk rows run the same GEMMs either way (the first six printed 0.0 on the H100 with the 32-token chunk on
    # the prefill GEMMs, before GEMM_MIN_M was 65); a decode row beside the chunk runs a tensor-core GEMM (float16
    # activations), alone the batch-1 matvec (int8 activations per 16): measured 1.2e-3 and 1.6e-3 apart on the
    # H100 (2026-12-05), the GEMM's own bound against the reference is 5e-3 (above); a wrong slot or position gives
    # errors of order 1
    assert max(errs[:n]) < 1e-3 and max(errs) < 5e-3, [round(e, 6) for e in errs]


@pytest.mark.parametrize("m", [4, 20])
def test_attention_kv_grid_keeps_the_bits(synth, backend, m):
    """The attention launched as one cluster per (token, kv head) where that is all it uses (tuning attn_kv_grid:
    plugins/rope_kv_attention.cu ATTN_KVGRID; steps of more than ATTN_MSCR tokens, and shorter steps whose furthest
    row is within one cluster's keys) = the same steps on the full grid, bit for bit, at a short and a long context;
    a short step past the cluster's keys takes the full grid (its clusters spread over the context). The TensorRT
    builds have no cluster grid to trim. Where its 8-block clusters would not all be resident at once (m = 20 on the
    1.5B's build), tuning attn_narrow launches clusters of 4 blocks (grid x = 4): the same keys merged over 4 ranks
    instead of 8, so within rounding of the 8-block step, not its bits."""
    from toolchain import cuda_runtime as cr
    from toolchain.kernels import ATTN_CLUSTER_KEYS, ATTN_MSCR, ATTN_SPLITS, ATTN_THREADS, resident_blocks

    model, _ = synth
    c = model.config
    rng = np.random.default_rng()
    ids = rng.integers(0, c.vocab, m).tolist()
    slots = np.arange(m, dtype=np.int32) % backend.n_slots
    saved = dict(backend.tuning)

    for base in (100, ATTN_CLUSTER_KEYS + 900):  # the furthest row: within one cluster's keys, beyond them
        positions = base - np.arange(m) * 3
        outs, grids, kernels = [], [], []
        try:
            # (the one-block plan of more tokens off: test_attention_one_block_plan)
            for on, narrow in ((False, False), (True, False), (True, True)):
                use_tuning(backend, {**saved, "attn_kv_grid": on, "attn_one_block_keys": 0, "attn_narrow": narrow})
                backend.reset()
                outs.append(backend.step(ids, positions, slots).copy())
                long = backend.long_context(int(positions.max()), m)
                attention = [x for x in backend.plan(m, long_context=long) if x.op.startswith("rope_kv_attention")]
                grids.append({x.cfg.grid[:2] for x in attention})
                kernels.append(attention[0].kernel)
        finally:
            use_tuning(backend, saved)
        assert np.isfinite(outs[0]).all() and np.array_equal(outs[0], outs[1]), base
        # narrow where the 8-block clusters of the kv-grid build are more blocks than fit the GPU at once
        k8 = kernels[1]
        fit = resident_blocks(k8.attribute("NUM_REGS"), ATTN_THREADS, cr.sm_count(), k8.attribute("SHARED_SIZE_BYTES"))
        narrowed = bool(saved["clusters"]) and m * c.n_kv_heads * ATTN_SPLITS > fit
        assert max(rel_err(a, b) for a, b in zip(outs[2], outs[1])) <= (1e-3 if narrowed else 0), base
        assert {x for x, _ in grids[2]} == ({4} if narrowed else {x for x, _ in grids[1]}), (base, grids)
        grids = [{y for _, y in g} for g in grids[:2]]
        if saved["clusters"]:  # kv heads instead of query heads on grid y, where the tuning trims it
            trimmed = m > ATTN_MSCR or base + 1 <= ATTN_CLUSTER_KEYS
            assert grids == [{c.n_heads}, {c.n_kv_heads if trimmed else c.n_heads}], (base, grids)


def test_attention_one_block_plan(synth, backend):
    """A step of more than ATTN_MSCR tokens within attn_one_block_keys runs the attention as one block per (token, kv
    head) without a cluster (grid x = 1): the same logits as the one-cluster plan within the batched-decode gate (rel
    1e-3: another partition of the keys, rounded differently through the layers), and beyond those keys the
    one-cluster plan itself (the same bits as with the tuning off)."""
    from toolchain.kernels import ATTN_MSCR

    model, _ = synth
    m = ATTN_MSCR + 4
    ids = np.random.default_rng().integers(0, model.config.vocab, m).tolist()
    slots = np.arange(m, dtype=np.int32) % backend.n_slots
    saved = dict(backend.tuning)
    keys = 1024

    try:
        for base, near in ((100, True), (keys + 500, False)):  # the furthest row within the keys, beyond them
            positions = base - np.arange(m) * 3
            outs, grids = [], []
            for k in (0, keys):  # (the one-cluster plan's clusters of 8: attn_narrow off)
                use_tuning(backend, {**saved, "attn_kv_grid": True, "attn_one_block_keys": k, "attn_narrow": False})
                outs.append(backend.step(ids, positions, slots).copy())
                long = backend.long_context(int(positions.max()), m)
                grids.append({x.cfg.grid[0] for x in backend.plan(m, long_context=long)
                              if x.op == "rope_kv_attention"})
            assert np.isfinite(outs[1]).all(), base
            if near and saved["clusters"]:
                rel = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
                assert rel < 1e-3 and grids == [{8}, {1}], (rel, grids)  # the batched-decode gate (H100: 2.9e-4)
            else:  # beyond the keys, or the TensorRT builds (no clusters): the tuning changes nothing
                assert np.array_equal(outs[0], outs[1]) and grids[0] == grids[1], (base, grids)
    finally:
        use_tuning(backend, saved)


def test_long_prompt_prefill(synth, backend):
    """A 90-token prompt in one step: tensor-core GEMMs and the tiled prefill attention (m >= GEMM_MIN_M)."""
    from toolchain.cuda_backend import GEMM_MIN_M

    model, ref = synth
    rng = np.random.default_rng()
    prompt = rng.integers(0, model.config.vocab, 90).tolist()
    assert len(prompt) >= GEMM_MIN_M
    backend.reset()
    got = backend.forward(prompt)
    want = ref.forward(prompt, 0, ref.new_cache(96))[-1]
    err = rel_err(got, want)
    print(f"\n90-token prefill: logits rel err {err:.2e}")
    assert err < 5e-3
    nxt = backend.forward([int(np.argmax(want))])  # decode continues from the prefilled cache
    rc = ref.new_cache(96)
    ref.forward(prompt, 0, rc)
    assert rel_err(nxt, ref.forward([int(np.argmax(want))], 90, rc)[-1]) < 5e-3


def test_prompt_piece_below_the_gemm_threshold(synth, backend):
    """A prompt of a whole piece (96 tokens: the prefill GEMMs) and one of GEMM_MIN_M - 1 tokens at depth 96: the
    few-token GEMMs with each token's decode attention over the cache, as a long prompt's last piece runs; the last
    logits and the next step against the CPU reference."""
    from toolchain.cuda_backend import GEMM_MIN_M

    model, ref = synth
    n = backend.max_tokens + GEMM_MIN_M - 1
    prompt = np.random.default_rng().integers(0, model.config.vocab, n).tolist()
    backend.reset()
    got = backend.forward(prompt)
    rc = ref.new_cache(n + 8)
    want = ref.forward(prompt, 0, rc)[-1]
    nxt = int(np.argmax(want))
    assert rel_err(got, want) < 5e-3
    assert rel_err(backend.forward([nxt]), ref.forward([nxt], n, rc)[-1]) < 5e-3


def test_prepared_backend_loads_and_captures_nothing_for_a_prompt(synth):
    """prepare=True (what `qtrt generate` / `qtrt serve` build) does a first prompt's start-up work at start-up: a
    prompt of whole pieces, a last piece on each kernel path (prefill GEMMs, few-token GEMMs, the decode core's
    2- and 4-token builds), a whole piece deep in the cache (past the decode attention's short-context plans) and
    a chat's next turn then load no module and capture no graph; the prompt's logits against the CPU reference."""
    from toolchain.cuda_backend import GEMM_MIN_M, SKINNY_MIN_M, CudaBackend

    model, ref = synth
    be = CudaBackend(model, max_context=4300, max_tokens=96, prepare=True)
    try:
        modules, graphs = set(be._modules), set(be._graphs)
        rng = np.random.default_rng()
        for last in (GEMM_MIN_M, GEMM_MIN_M - 1, SKINNY_MIN_M, SKINNY_MIN_M - 1, 2):
            prompt = rng.integers(0, model.config.vocab, 2 * be.max_tokens + last).tolist()
            be.reset()
            got = be.forward(prompt)
            if last == GEMM_MIN_M - 1:
                assert rel_err(got, ref.forward(prompt, 0, ref.new_cache(len(prompt)))[-1]) < 5e-3
            be.forward(rng.integers(0, model.config.vocab, 7).tolist())  # the next turn
        be.reset(4100)  # a whole piece at positions 4100..4195: the same graph as at 0
        be.forward(rng.integers(0, model.config.vocab, be.max_tokens).tolist())
        assert set(be._modules) == modules, sorted(set(be._modules) - modules)
        assert set(be._graphs) == graphs, sorted(set(be._graphs) - graphs, key=str)
    finally:
        be.close()


def test_prompt_chunks_launched_ahead_keep_the_bits(synth):
    """Tuning chunks_ahead: a prompt's chunks that want no token (step_tokens with no rows, the engine's chunks of a
    prompt alone) return while they run, one ahead of the host, which meanwhile stages the next chunk's inputs.
    Three chunks so run, then the last piece: its logits bit for bit those of the same prompt in another slot with
    every chunk waited for, and near the CPU reference's (fresh random prompt); and each chunk run ahead records one
    event and waits for the one before it (the other of the two), never for the whole stream."""
    from toolchain.cuda_backend import GEMM_MIN_M, CudaBackend

    model, ref = synth
    be = CudaBackend(model, max_context=400, n_slots=3, max_tokens=96)
    log = []

    class Spy:  # one of the backend's two events, its calls logged
        def __init__(self, event, name):
            self.event, self.name = event, name

        def record(self, stream):
            log.append(("record", self.name))
            self.event.record(stream)

        def synchronize(self):
            log.append(("wait", self.name))
            self.event.synchronize()

    try:
        n, last = be.max_tokens, GEMM_MIN_M + 3
        seed = int(np.random.default_rng().integers(1 << 31))
        prompt = np.random.default_rng(seed).integers(0, model.config.vocab, 3 * n + last).tolist()
        be._ahead = [Spy(e, k) for k, e in enumerate(be._ahead)]
        stream_wait = be.stream.synchronize
        be.stream.synchronize = lambda: (log.append(("stream",)), stream_wait())[1]
        got = {}
        for slot, ahead in ((2, False), (0, True), (1, False)):  # slot 2: the plans built before anything is logged
            be.tuning = dict(be.tuning, chunks_ahead=ahead)
            log.clear()
            for c in range(3):
                span = list(range(c * n, (c + 1) * n))
                assert len(be.step_tokens(prompt[c * n:(c + 1) * n], span, [slot] * n, rows=[])) == 0
            assert slot == 2 or log == ([("record", 0), ("wait", 1), ("record", 1), ("wait", 0), ("record", 0),
                                         ("wait", 1)] if ahead else [("stream",)] * 3), (seed, log)
            got[slot] = be.step(prompt[3 * n:], list(range(3 * n, 3 * n + last)), [slot] * last, rows=[last - 1])[0]
        assert np.array_equal(got[0], got[1]) and np.array_equal(got[0], got[2]), seed
        assert rel_err(got[0], ref.forward(prompt, 0, ref.new_cache(len(prompt)))[-1]) < 5e-3, seed
    finally:
        be.close()


def test_an_engine_prompt_piece_in_any_slot_runs_as_forward_does(synth):
    """The engine's prompt chunks while nothing decodes beside them (CudaBackend._prompt_piece): a prompt of a whole
    piece then a GEMM_MIN_M + 5-token piece in slot 2 runs the prefill attention with the head on the last row
    alone; its logits against the CPU reference, its draw (step_tokens, top-k 50 at temperature 1, fresh seeds) the
    reference sampler's with the last row's position, which a draw keyed by another row's would miss."""
    from toolchain.cuda_backend import GEMM_MIN_M, CudaBackend
    from toolchain.sampling import Sampling, Tail, draw_rng, sample_reference

    model, ref = synth
    be = CudaBackend(model, max_context=400, n_slots=3, max_tokens=96)
    try:
        rng = np.random.default_rng()
        n1, n2 = be.max_tokens, GEMM_MIN_M + 5
        prompt = rng.integers(0, model.config.vocab, n1 + n2).tolist()
        pos = list(range(n1 + n2))
        assert len(be.step(prompt[:n1], pos[:n1], [2] * n1, rows=[])) == 0
        got = be.step(prompt[n1:], pos[n1:], [2] * n2, rows=[n2 - 1])[0]
        assert any(k[0] == n2 and k[1] for k in be._plans), "the piece ran the last-row plan"
        ops = [x.op for x in be.plan(n2, last_only=True)]
        assert ops.count("prefill_attention") == model.config.n_layers and "rope_kv_attention" not in ops, ops
        assert rel_err(got, ref.forward(prompt, 0, ref.new_cache(n1 + n2))[-1]) < 5e-3
        s = Sampling(1.0, 50)
        for seed in rng.integers(0, 1 << 30, 6).tolist():
            be.set_sampling(2, s, seed, prompt, n1 + n2 - 1)
            tok = be.step_tokens(prompt[n1:], pos[n1:], [2] * n2, rows=[n2 - 1], tail=Tail(penalties=False))
            want = sample_reference(got, s, draw_rng(seed, n1 + n2 - 1))
            assert tok.tolist() == [want], (seed, tok, want)
    finally:
        be.close()


def test_engine_prompt_pieces_replay_captured_graphs(synth):
    """Tuning piece_graphs: the engine's whole chunks of a prompt alone (step_tokens wanting no token, then its last
    row's draw; step for logits) replay prompt_graph instead of launching their plan from Python: the same draw
    (fresh seed, top-k 50 at temperature 1) and the same logits bit for bit as launched, in another slot, and one
    graph per sampler tail."""
    from toolchain.cuda_backend import CudaBackend
    from toolchain.sampling import Sampling, Tail

    model, ref = synth
    be = CudaBackend(model, max_context=400, n_slots=3, max_tokens=96)
    try:
        rng = np.random.default_rng()
        n = be.max_tokens
        prompt = rng.integers(0, model.config.vocab, 2 * n).tolist()
        seed, s, tail = int(rng.integers(1 << 30)), Sampling(1.0, 50), Tail(penalties=False)
        got = {}
        for slot, graphs in ((0, False), (1, True), (2, True)):
            be.tuning = dict(be.tuning, piece_graphs=graphs)
            be.set_sampling(slot, s, seed, prompt, 2 * n - 1)
            before = set(be._graphs)
            assert len(be.step_tokens(prompt[:n], list(range(n)), [slot] * n, rows=[])) == 0
            tok = be.step_tokens(prompt[n:], list(range(n, 2 * n)), [slot] * n, rows=[n - 1], tail=tail)
            logits = be.step(prompt[n:], list(range(n, 2 * n)), [slot] * n, rows=[n - 1])[0]
            got[slot] = (tok.tolist(), logits)
            new = {k for k in set(be._graphs) - before if k[0] == "prompt"}
            assert new == ({("prompt", n, False, None), ("prompt", n, False, tail)} if slot == 1 else set()), new
        for slot in (1, 2):
            assert got[slot][0] == got[0][0] and np.array_equal(got[slot][1], got[0][1]), (seed, slot)
        assert rel_err(got[0][1], ref.forward(prompt, 0, ref.new_cache(2 * n))[-1]) < 5e-3, seed
    finally:
        be.close()


@pytest.mark.parametrize("decoding", [1, 2])
def test_decode_rows_beside_a_prompt_piece(synth, decoding):
    """The engine's mixed step: one or two decode rows (slots 0 and 1, each after its own prompt) then a prompt
    piece of GEMM_MIN_M + 3 tokens in slot 2, one step on the prefill GEMMs: the decode rows' attention over their
    caches (one row: the attention's one-token path), the piece's as the prefill pair (plan piece_from = the decode
    rows); every row's logits against the CPU reference."""
    from toolchain.cuda_backend import GEMM_MIN_M, CudaBackend

    model, ref = synth
    be = CudaBackend(model, max_context=200, n_slots=3, max_tokens=128)
    try:
        rng = np.random.default_rng()
        a, b, c = (rng.integers(0, model.config.vocab, n).tolist() for n in (20, 30, GEMM_MIN_M + 3))
        for slot, p in enumerate((a, b)):
            be.step(p[:-1], list(range(len(p) - 1)), [slot] * (len(p) - 1), rows=[])
        d = decoding
        got = be.step([a[-1], b[-1]][:d] + c, [len(a) - 1, len(b) - 1][:d] + list(range(len(c))),
                      [0, 1][:d] + [2] * len(c))
        assert any(k[0] == len(c) + d and k[-1] == d for k in be._plans), "the step ran the piece plan"
        ops = [(x.op, x.node.endswith(".decode")) for x in be.plan(len(c) + d, piece_from=d)]
        layers = model.config.n_layers
        assert ops.count(("prefill_attention", False)) == ops.count(("rope_kv_attention", True)) == layers, ops
        for row, p in list(enumerate((a, b)))[:d]:
            assert rel_err(got[row], ref.forward(p, 0, ref.new_cache(len(p)))[-1]) < 5e-3, row
        want = ref.forward(c, 0, ref.new_cache(len(c)))
        for j in (0, len(c) // 2, len(c) - 1):
            assert rel_err(got[d + j], want[j]) < 5e-3, j
    finally:
        be.close()


@pytest.mark.parametrize("decoding", [1, 2, 6])
def test_a_mixed_steps_head_on_its_decode_rows_alone(synth, decoding):
    """The engine's mixed step whose prompt chunk wants no token yet (its rows = the decode rows): the head runs on
    the decode rows alone (plan head_rows; 1-2 rows on the decode core, 6 on the GEMMs for few tokens), their logits
    (poisoned before) and draws against the CPU reference; the chunk's cache rows are whole: the next step (decode
    rows again, and the prompt's rest wanting its last row: the head gathers that row, head_last) agrees with the
    reference too, logits (poisoned) and draws (the last row's position and slot are the head's own)."""
    from toolchain.cuda_backend import GEMM_MIN_M, HEAD_NODES, CudaBackend
    from toolchain.kernels import GEMM_OPS
    from toolchain.sampling import Sampling, Tail, draw_rng, sample_reference

    model, ref = synth
    d = decoding
    be = CudaBackend(model, max_context=300, n_slots=d + 1, max_tokens=128)
    try:
        rng = np.random.default_rng()
        V = model.config.vocab
        prompts = [rng.integers(0, V, int(rng.integers(8, 40))).tolist() for _ in range(d)]
        c = rng.integers(0, V, 2 * GEMM_MIN_M).tolist()
        c1, c2 = c[:GEMM_MIN_M + 3], c[GEMM_MIN_M + 3:]
        for slot, p in enumerate(prompts):
            be.step(p[:-1], list(range(len(p) - 1)), [slot] * (len(p) - 1), rows=[])
        ids = [p[-1] for p in prompts] + c1
        pos = [len(p) - 1 for p in prompts] + list(range(len(c1)))
        slots = list(range(d)) + [d] * len(c1)
        be.buffers["logits"].upload(np.full((d, V), np.nan, np.float32))
        got = be.step(ids, pos, slots, rows=list(range(d)))
        m = len(ids)
        assert any(k[0] == m and k[-3:] == (d, False, d) for k in be._plans), "the step ran a head of d rows"
        head = [x for x in be.plan(m, piece_from=d, head_rows=d) if x.node in HEAD_NODES]
        assert head and not any(x.op in GEMM_OPS for x in head), [x.op for x in head]
        for row, p in enumerate(prompts):
            assert rel_err(got[row], ref.forward(p, 0, ref.new_cache(len(p)))[-1]) < 5e-3, row
        s = Sampling(1.0, 50)
        seeds = rng.integers(0, 1 << 30, d).tolist()
        for slot, (p, seed) in enumerate(zip(prompts, seeds)):
            be.set_sampling(slot, s, seed, p, len(p) - 1)
        toks = be.step_tokens(ids, pos, slots, rows=list(range(d)), tail=Tail(penalties=False))
        want = [sample_reference(got[r], s, draw_rng(seeds[r], pos[r])) for r in range(d)]
        assert toks.tolist() == want, (toks, want)
        # the next step: each stream's drawn token, and the prompt's rest with its last row wanted
        ids2 = want + c2
        pos2 = [len(p) for p in prompts] + list(range(len(c1), len(c)))
        slots2 = list(range(d)) + [d] * len(c2)
        rows2, m2 = list(range(d)) + [len(ids2) - 1], len(ids2)
        be.buffers["logits"].upload(np.full((d + 1, V), np.nan, np.float32))
        got2 = be.step(ids2, pos2, slots2, rows=rows2)
        assert any(k[0] == m2 and k[-3:-1] == (d + 1, True) for k in be._plans), "the head gathered the last row"
        for row, p in enumerate(prompts):
            full = p + [want[row]]
            assert rel_err(got2[row], ref.forward(full, 0, ref.new_cache(len(full)))[-1]) < 5e-3, row
        assert rel_err(got2[d], ref.forward(c, 0, ref.new_cache(len(c)))[-1]) < 5e-3
        # its draws: each row's own slot and position (the prompt's last row's from head.positions / head.slots)
        seeds = rng.integers(0, 1 << 30, d + 1).tolist()
        for slot, (p, seed) in enumerate(zip(prompts + [c], seeds)):
            be.set_sampling(slot, s, seed, p + [want[slot]] if slot < d else p, pos2[rows2[slot]])
        toks2 = be.step_tokens(ids2, pos2, slots2, rows=rows2, tail=Tail(penalties=False))
        want2 = [sample_reference(got2[j], s, draw_rng(seeds[j], pos2[r])) for j, r in enumerate(rows2)]
        assert toks2.tolist() == want2, (toks2, want2)
    finally:
        be.close()


def test_prefill_gemm_on_wgmma(synth, backend):
    """On compute capability 9.0 (H100, H200) the prefill steps' GEMMs are the wgmma build (tuning gemm_wgmma,
    plugins/quant_gemm_wgmma.cuh; with gemm_xh its input made fp16 once by gemm_x_f16), not silently the mma.sync
    one; a 200-token prompt (pieces of 96) prefilled on each build agrees with the CPU reference, and the builds with
    each other."""
    from toolchain import cuda_runtime as cr
    from toolchain.kernels import GEMM_OPS, GEMM_SMEM, GEMM_WGMMA_SMEM, GEMM_XH_SMEM

    if not backend.tuning["clusters"]:
        pytest.skip("the TensorRT builds have no prefill GEMM (its k split is a cluster)")
    if cr.compute_capability() != (9, 0):
        pytest.skip("the wgmma build is sm_90a: compute capability 9.0 only")
    model, ref = synth
    prompt = np.random.default_rng().integers(0, model.config.vocab, 200).tolist()
    want = ref.forward(prompt, 0, ref.new_cache(208))[-1]
    saved, got = dict(backend.tuning), {}
    builds = {"wgmma, fp16 x": (True, True, GEMM_XH_SMEM), "wgmma": (True, False, GEMM_WGMMA_SMEM),
              "mma.sync": (False, False, GEMM_SMEM)}
    try:
        for name, (wgmma, xh, smem) in builds.items():
            use_tuning(backend, {**saved, "gemm_wgmma": wgmma, "gemm_xh": xh})
            plan = backend.plan(backend.max_tokens, last_only=True)
            gemms = [ln for ln in plan if ln.op in GEMM_OPS]
            assert gemms and all(ln.cfg.shared_mem == smem[ln.op] for ln in gemms), name
            # the fp16 x made by gemm_x_f16 launches, or by the producers' XH_OUT builds (tuning xh_by_producer)
            fp16_x = [ln for ln in plan if ln.op == "gemm_x_f16" or "XH_OUT" in (ln.defines or {})]
            assert bool(fp16_x) == xh, name
            backend.reset()
            got[name] = backend.forward(prompt)
            err = rel_err(got[name], want)
            print(f"\n200-token prefill, {name}: logits rel err {err:.2e}")
            assert err < 5e-3
    finally:
        use_tuning(backend, saved)
    assert all(rel_err(got[b], got["mma.sync"].astype(np.float64)) < 1e-3 for b in builds if b != "mma.sync")


def test_prefill_split_keys_through_the_model(synth, backend):
    """prefill_attention's split keys (plugins/prefill_attention.cu "Split keys") through the whole model: a
    300-token prompt in pieces of 96 with splits of 2 tiles (64 keys), so the later pieces' row blocks take 2-4
    splits, against the CPU reference and against one split (no partials, no merge); twice, for the same bits."""
    from toolchain.kernels import PREFILL_KV_SPLITS

    model, ref = synth
    prompt = np.random.default_rng().integers(0, model.config.vocab, 300).tolist()
    want = ref.forward(prompt, 0, ref.new_cache(304))[-1]
    saved, got = dict(backend.tuning), {}
    deep = {"prefill_attention": {"PA_SPLIT_TILES": 2}}
    try:
        for name, splits in (("one split", 1), ("split keys", PREFILL_KV_SPLITS), ("again", PREFILL_KV_SPLITS)):
            use_tuning(backend, {**saved, "prefill_kv_splits": splits, "defines": saved["defines"] | deep})
            if not any(ln.op == "prefill_attention" for ln in backend.plan(backend.max_tokens, last_only=True)):
                pytest.skip("this build runs no prefill_attention")
            backend.reset()
            got[name] = backend.forward(prompt)
            print(f"\n300-token prefill, {name}: logits rel err {rel_err(got[name], want):.2e}")
            assert rel_err(got[name], want) < 5e-3
    finally:
        use_tuning(backend, saved)
    assert rel_err(got["split keys"], got["one split"].astype(np.float64)) < 1e-3
    # the merge's other rounding: proof that the splits ran (the same bits would mean one split both times)
    assert not np.array_equal(got["split keys"].view(np.uint32), got["one split"].view(np.uint32))
    assert np.array_equal(got["split keys"].view(np.uint32), got["again"].view(np.uint32))
    count = backend.buffers["prefill.attn_count"]
    assert not count.download(count.shape, np.int32).any(), "split counters left non-zero"


def test_producers_write_the_gemm_input_with_the_same_bits(synth, backend):
    """With xh_by_producer (the default) the fp16 input of the wgmma GEMMs' GEMM_XH build is written by the kernels
    that produce it (rms_norm, prefill_attention, and swiglu or the gate/up/SwiGLU GEMM, built with XH_OUT=1), not by
    gemm_x_f16 launches: the plan
    has none left, and a 264-token prompt (two captured pieces of 96, then an eager 72, from GEMM_MIN_M; the
    attention's keys split every 2 tiles, so its merge writes the copy too) gives the same bits as with the
    conversions."""
    from toolchain import cuda_runtime as cr

    if not backend.tuning["clusters"] or cr.compute_capability() != (9, 0) or not backend.tuning["gemm_xh"]:
        pytest.skip("no GEMM_XH build here (compute capability 9.0 with clusters only)")
    model, _ = synth
    prompt = np.random.default_rng().integers(0, model.config.vocab, 264).tolist()
    saved, got, ops = dict(backend.tuning), {}, {}
    try:
        deep = saved["defines"] | {"prefill_attention": {"PA_SPLIT_TILES": 2}}
        for by_producer in (True, False):
            use_tuning(backend, {**saved, "xh_by_producer": by_producer, "defines": deep})
            plan = backend.plan(backend.max_tokens, last_only=True)
            ops[by_producer] = [ln.op for ln in plan]
            backend.reset()
            got[by_producer] = backend.forward(prompt)
    finally:
        use_tuning(backend, saved)
    n = backend.cfg.n_layers
    assert ops[False].count("gemm_x_f16") == 4 * n and "gemm_x_f16" not in ops[True]
    assert len(ops[True]) == len(ops[False]) - 4 * n
    assert np.array_equal(got[True].view(np.uint32), got[False].view(np.uint32))


@pytest.mark.parametrize("xh", [True, False], ids=["fp16 x", "float32 x"])
def test_gate_up_swiglu_keeps_the_bits(synth, backend, xh):
    """Where the prefill GEMMs run their wgmma build, each layer's gate and up projections and SwiGLU are one launch
    (tuning gemm_swiglu, plugins/quant_gemm.cu q4k_gemm_swiglu): the plan has one per layer and no gate, up or swiglu
    launch, and a 264-token prompt (two captured pieces of 96, then an eager 72, from GEMM_MIN_M) gives the bits of
    the three launches, with the GEMMs' input as fp16 (its fp16 copy for the down projection written instead of its
    float32 output) and as float32. The fused GEMM's k-split build (gemm_swiglu_split 2): the sums of the split plain
    GEMMs (the unsplit default's are checked in test_gate_up_swiglu_without_the_k_split)."""
    from toolchain import cuda_runtime as cr

    if not backend.tuning["clusters"] or cr.compute_capability() != (9, 0):
        pytest.skip("no wgmma GEMM here (compute capability 9.0 with clusters only)")
    model, _ = synth
    prompt = np.random.default_rng().integers(0, model.config.vocab, 264).tolist()
    saved, got, plans = dict(backend.tuning), {}, {}
    try:
        for fused in (True, False):
            use_tuning(backend, {**saved, "gemm_swiglu": fused, "gemm_xh": xh, "gemm_swiglu_split": 2})
            plans[fused] = backend.plan(backend.max_tokens, last_only=True)
            backend.reset()
            got[fused] = backend.forward(prompt)
    finally:
        use_tuning(backend, saved)
    n = backend.cfg.n_layers
    ops = {f: [ln.op for ln in plan] for f, plan in plans.items()}
    assert ops[True].count("q4k_gemm_swiglu") == n and "swiglu" not in ops[True], ops[True]
    assert ops[False].count("swiglu") == n and len(ops[True]) == len(ops[False]) - 2 * n
    fused = [ln for ln in plans[True] if ln.op == "q4k_gemm_swiglu"]
    assert all(bool(ln.defines.get("XH_OUT")) == xh for ln in fused)  # the fp16 copy instead of the float32 output
    assert np.array_equal(got[True].view(np.uint32), got[False].view(np.uint32))


def test_add_rms_norm_keeps_the_bits(synth, backend):
    """Each residual Add and the RMSNorm of its sum as one launch in prompt steps (tuning add_rms_norm,
    plugins/rms_norm.cu add_rms_norm; its XH_OUT build where the GEMMs read fp16): 2 n_layers - 1 of them in the plan,
    no add or norm launch left but the final norm and the last layer's residual Add, and a 264-token prompt's logits
    bit for bit those of the separate launches, then the same greedy steps."""
    if not backend.tuning["clusters"]:
        pytest.skip("the TensorRT builds have no prefill graph (their prompt steps run the decode graph)")
    model, _ = synth
    prompt = np.random.default_rng().integers(0, model.config.vocab, 264).tolist()
    saved, got, ops = dict(backend.tuning), {}, {}
    try:
        for fused in (True, False):
            use_tuning(backend, {**saved, "add_rms_norm": fused})
            ops[fused] = [ln.op for ln in backend.plan(backend.max_tokens, last_only=True)]
            backend.reset()
            logits = backend.forward(prompt)
            steps = [backend.buffers["logits"].download(backend.stream, rows=1)[0]
                     for _ in backend.greedy(int(np.argmax(logits)), 4)]
            got[fused] = np.concatenate([logits[None], np.array(steps)])
    finally:
        use_tuning(backend, saved)
        backend.reset()
    n = backend.cfg.n_layers
    assert ops[True].count("add_rms_norm") == 2 * n - 1 and ops[True].count("add") == 1
    assert ops[True].count("rms_norm") == 2 and ops[False].count("add") == 2 * n
    assert np.array_equal(got[True].view(np.uint32), got[False].view(np.uint32))


def test_gate_up_swiglu_without_the_k_split(synth, backend):
    """The gate/up/SwiGLU GEMM built without its k split (tuning gemm_swiglu_split = 1: each CTA all of k, grid z 1):
    the plan launches that build, and a 264-token prompt's last logits stay within 1e-3 of the split build's (other
    bits: one chain of sums over k instead of two halves, and an fp16 rounding of the down projection's input may
    flip: the bound of decode_tuning's comparisons), the same every run."""
    from toolchain import cuda_runtime as cr

    if not backend.tuning["clusters"] or cr.compute_capability() != (9, 0):
        pytest.skip("no wgmma GEMM here (compute capability 9.0 with clusters only)")
    model, _ = synth
    prompt = np.random.default_rng().integers(0, model.config.vocab, 264).tolist()
    saved, got = dict(backend.tuning), {}
    try:
        for split in (1, 2, 1):
            use_tuning(backend, {**saved, "gemm_swiglu": True, "gemm_swiglu_split": split})
            fused = [ln for ln in backend.plan(backend.max_tokens, last_only=True) if ln.op.endswith("_gemm_swiglu")]
            assert fused and all(ln.defines.get("GEMM_SPLIT", 2) == split and ln.cfg.grid[2] == split for ln in fused)
            backend.reset()
            got.setdefault(split, []).append(backend.forward(prompt))
    finally:
        use_tuning(backend, saved)
    one, two = got[1][0].astype(np.float64), got[2][0].astype(np.float64)
    assert np.array_equal(got[1][0].view(np.uint32), got[1][1].view(np.uint32)), "not deterministic"
    err = np.linalg.norm(one - two) / np.linalg.norm(two)
    print(f"\nno k split vs split: rel {err:.1e}, argmax {int(one.argmax())} / {int(two.argmax())}")
    assert 0 < err < 1e-3 and one.argmax() == two.argmax()


@pytest.mark.parametrize("side_by_side,late", [(True, False), (False, False), (True, True)],
                         ids=["side streams", "one stream", "late trigger"])
def test_prefill_pdl_keeps_the_bits(synth, backend, side_by_side, late):
    """Prompt steps as programmatic dependent launches (tuning prefill_pdl; the prefill GEMMs issue their first weight
    copies before their wait) give exactly the bits of the same launches one after another, through a whole
    264-token prompt (two captured 96-token pieces, then an eager 72) and the greedy decode steps after it, twice;
    with q, k and v on side streams (the launch after their join an ordinary one) and all on one stream, and with
    the GEMMs releasing their dependents only after their main loop (GEMM_PDL_LATE builds)."""
    model, _ = synth
    prompt = np.random.default_rng().integers(0, model.config.vocab, 264).tolist()
    saved, got = dict(backend.tuning), {}
    try:
        for pdl in (True, False, True):
            late_defines = {op: {"GEMM_PDL_LATE": 1} for op in ("q4k_gemm", "q6k_gemm", "q4k_gemm_swiglu",
                                                                 "q6k_gemm_swiglu")} if late else {}
            use_tuning(backend, {**saved, "prefill_pdl": pdl, "concurrent_projections": side_by_side,
                                 "defines": saved["defines"] | late_defines})
            backend.reset()
            logits = backend.forward(prompt)
            steps = [backend.buffers["logits"].download(backend.stream, rows=1)[0]
                     for _ in backend.greedy(int(np.argmax(logits)), 8)]
            got.setdefault(pdl, []).append(np.concatenate([logits[None], np.array(steps)]))
    finally:
        use_tuning(backend, saved)
        backend.reset()
    assert np.array_equal(got[True][0].view(np.uint32), got[True][1].view(np.uint32)), "PDL prompt not deterministic"
    assert np.array_equal(got[True][0].view(np.uint32), got[False][0].view(np.uint32)), "PDL changed the bits"


def test_concurrent_projections_keep_the_bits(synth, backend):
    """q, k and v (gate and up) of a prefill step launched side by side on forked streams (tuning
    concurrent_projections; captured: parallel graph branches) give exactly the bits of the same launches one after
    another, through a whole 264-token prompt (pieces of 96: two captured graphs, then an eager 72-token step, from
    GEMM_MIN_M)."""
    from toolchain.cuda_backend import sibling_projections

    if not backend.tuning["clusters"]:
        pytest.skip("the TensorRT builds have no prefill GEMM: nothing runs side by side")
    plan = backend.plan(backend.max_tokens, last_only=True)
    groups = sibling_projections(plan)
    gate_up = not any(ln.op.endswith("_gemm_swiglu") for ln in plan)  # else one launch (tuning gemm_swiglu)
    assert sum(len(g) > 1 for g in groups) == (1 + gate_up) * backend.cfg.n_layers  # q, k, v (and gate, up)
    model, _ = synth
    prompt = np.random.default_rng().integers(0, model.config.vocab, 264).tolist()
    saved, got = dict(backend.tuning), {}
    try:
        for side_by_side in (True, False):
            use_tuning(backend, {**saved, "concurrent_projections": side_by_side})
            backend.reset()
            got[side_by_side] = backend.forward(prompt)
    finally:
        use_tuning(backend, saved)
    assert np.array_equal(got[True].view(np.uint32), got[False].view(np.uint32))


@pytest.mark.parametrize("defines", [{}, {op: {"QMV1_PD": 3} for op in ("rms_norm_swiglu", "matmul_add")}],
                         ids=["default", "pd3"])
def test_pdl_matches_serialized_launches(synth, backend, defines):
    """Programmatic dependent launch must not change a single bit: 24 self-advancing graph steps with every kernel a
    programmatic dependent launch vs the same kernels launched one after another, for the default builds and for
    QMV1_PD=3. (A QMV1_PD=2 build was the one whose x loads ptxas hoisted above griddepcontrol.wait before x was
    read with ld_produced (plugins/pdl.cuh): wrong logits from the second step on, different on every run.)"""
    model, _ = synth
    prompt = np.random.default_rng().integers(0, model.config.vocab, 5).tolist()
    saved = dict(backend.tuning)
    runs = {}
    try:
        for pdl in (False, True, True):
            use_tuning(backend, {**saved, "pdl": pdl, "defines": defines})
            backend.reset()
            first = int(np.argmax(backend.forward(prompt)))
            steps = [backend.buffers["logits"].download(backend.stream, rows=1)[0] for _ in backend.greedy(first, 24)]
            runs.setdefault(pdl, []).append(np.array(steps))
    finally:
        use_tuning(backend, saved)
        backend.reset()
    assert np.array_equal(runs[True][0], runs[True][1]), "PDL steps differ between two runs"
    assert np.array_equal(runs[True][0], runs[False][0]), "PDL steps differ from serialized launches"


@pytest.mark.parametrize("keys", [1024, 512], ids=["ck1024", "ck512"])
def test_xmerge_matches_the_attention_merge(synth, backend, keys):
    """xmerge (the o projection merges the attention's cluster partials while it reads x) must give the very bits of
    the attention's own cross-cluster merge: greedy graph steps from position 2100 of a filled cache, where 3 (1024
    keys per cluster, xmerge's default) or 5 (512) clusters per kv head work; from position 1021, where the replays
    switch from the plain graph to the xmerge one at 1024 keys; and from position 3 (the plain graph)."""
    if backend.onnx is backend.prefill_graphs[False, False]:
        pytest.skip("the unfused graph's o projection is a plain matmul: no xmerge pairing")
    model, _ = synth
    c = model.config
    rng = np.random.default_rng()
    start = 2100
    fill = (rng.standard_normal((c.n_layers, 2, c.n_kv_heads, start, c.head_dim)) * 0.5).astype(np.float16)
    prompt = rng.integers(0, c.vocab, 3).tolist()
    saved = dict(backend.tuning)
    runs = {}
    try:
        for xmerge in (False, True):
            use_tuning(backend, {**saved, "xmerge": xmerge,
                                 "defines": {"rope_kv_attention": {"ATTN_CLUSTER_KEYS": keys}}})
            xpart = backend.buffers["attn.xpart"].ptr
            paired = [x.op for x in backend.plan(1, long_context=True) if xpart in x.args]  # attentions, o projections
            assert len(paired) == (2 * c.n_layers if xmerge else 0), paired
            for pos in (start, 1018, 0):
                for i in range(c.n_layers):
                    for j, kind in enumerate("kv"):
                        full = np.zeros((backend.n_slots, c.n_kv_heads, backend.max_context, c.head_dim), np.float16)
                        full[0, :, :start] = fill[i, j]
                        backend.buffers[f"{kind}_cache.{i}"].upload(full, backend.stream)
                backend.pos = pos
                first = int(np.argmax(backend.forward(prompt)))
                steps = [backend.buffers["logits"].download(backend.stream, rows=1)[0].copy()
                         for _ in backend.greedy(first, 8)]
                runs[xmerge, pos] = np.array(steps)
    finally:
        use_tuning(backend, saved)
        backend.reset()
    for pos in (start, 1018, 0):
        assert np.array_equal(runs[True, pos], runs[False, pos]), f"xmerge changed the logits from position {pos}"
