"""A full decode step of the 1.5B layout (synthetic weights) for compute-sanitizer: a 72-token prompt prefill
(GEMM_MIN_M or more: tensor-core GEMMs + tiled prefill attention), three self-advancing CUDA-graph decode replays, two more at position
2100 (two attention clusters per kv head: the cluster pushes and the o projection's merge of their partials), 5-, 2-
and 13-token steps on the matvec path (the decode core's batched builds), 20-token steps (the attention's one-block and
one-cluster plans), the engine's prompt steps (a decode row beside a prompt piece, a piece alone), 40-token prompt chunks (below GEMM_MIN_M: the GEMMs for few tokens); the device sampler (plugins/sampling.cu:
penalties, top-k/top-p/min-p, a wide nucleus, temperature alone) in a sampled graph and in steps that sample some
rows, and its log-probabilities; fused and unfused graphs, and the unfused graph on TensorRT's builds (no clusters,
the KV cache by address: issue 16); then rows with a token id outside the vocabulary or a slot or position outside
the cache, which every backend refuses before any kernel runs, given to the kernels directly (their guards read and
write nothing of such rows). `--long N`: then an N-token prompt in 512-token pieces and three decode steps after it.
Exits non-zero on any CUDA error."""
import sys
import tempfile
from pathlib import Path

import numpy as np

from toolchain.cuda_backend import GEMM_MIN_M, TENSORRT_BUILDS, CudaBackend
from toolchain.gguf_model import load_gguf
from toolchain.sampling import Sampling, Tail
from toolchain.synth import layout, write_synthetic_gguf

path = Path(tempfile.gettempdir()) / "qwen2.5-coder-1.5b-synthetic.gguf"
if not path.exists():
    cfg, types = layout("qwen2.5-coder-1.5b")
    write_synthetic_gguf(path, cfg, types, seed=1)
model = load_gguf(path)
assert 40 < GEMM_MIN_M <= 72, "the steps below are sized for both sides of the GEMM threshold"
for fused, tuning in ((True, None), (False, None), (False, TENSORRT_BUILDS)):
    be = CudaBackend(model, max_context=2112, n_slots=2, max_tokens=80, fused=fused, tuning=tuning)
    logits = be.forward(np.arange(72) * 1000 + 7)
    toks = list(be.greedy(int(np.argmax(logits)), 3))
    be.pos = 2100
    toks += list(be.greedy(toks[-1], 2))
    be.step(np.arange(5) * 7, np.arange(50, 55), np.ones(5))
    # batched steps on the decode core's QMV1_MT builds: 2 tokens, and 13 (two blocks of 8, the second partial)
    be.step([3, 4], [60, 60], [0, 1])
    be.step(np.arange(13) * 11, np.r_[np.arange(61, 68), np.arange(61, 67)], np.r_[np.zeros(7), np.ones(6)])
    # 20 tokens (the GEMMs for few tokens): the attention as one block per (token, kv head) (within
    # attn_one_block_keys), and as one cluster (the plan beyond them, here by the tuning)
    tuning = be.tuning
    for keys in (tuning["attn_one_block_keys"], 0):
        be.tuning, be._plans = {**tuning, "attn_one_block_keys": keys}, {}
        be.step(np.arange(20) * 5, np.r_[np.arange(600, 610), np.arange(600, 610)], np.r_[np.zeros(10), np.ones(10)])
    be.tuning, be._plans = tuning, {}
    mixed = Sampling(0.8, 40, 0.9, seed=3, min_p=0.02, repetition_penalty=1.2, frequency_penalty=0.3)
    toks += list(be.sampled(toks[-1], 3, mixed, 3, [7] * be.pos + [toks[-1]]))
    for slot, s in ((0, Sampling(1.5, 0, 0.95, seed=4)), (1, Sampling(1.0, seed=5))):  # wide nucleus; temperature
        be.set_sampling(slot, s, 11 + slot, [9] * 60, 49)
    toks += [int(t) for t in be.step_tokens(np.arange(5) * 7, np.arange(50, 55), [0, 0, 1, 1, 1], rows=[1, 4])]
    # the log-probabilities pass, in a plan (rows of a mixed step) and in a captured decode graph
    drawn = [int(t) for t in be.step_tokens(np.arange(5) * 7, np.arange(50, 55), [0, 0, 1, 1, 1], rows=[1, 4],
                                            tail=Tail(logprobs=True))]
    lps = be.last_logprobs(drawn, [5, 20])
    drawn = [int(t) for t in be.step_tokens([3, 4], [60, 61], [0, 1], rows=[0, 1], tail=Tail(False, True, True))]
    lps += be.last_logprobs(drawn, [20, 0])
    assert all(len(r["top"]) == k for r, k in zip(lps, [5, 20, 20, 0])), lps
    # the engine's prompt steps on the prefill GEMMs: a decode row beside a 72-token piece of slot 1 (decode
    # attention for the one, the prefill pair for the other), and a piece alone drawing its last row's token
    be.step([5] + list(range(72)), [70] + list(range(100, 172)), [0] + [1] * 72)
    toks += [int(t) for t in be.step_tokens(list(range(72)), list(range(172, 244)), [1] * 72, rows=[71])]
    # rows no backend lets through (their checks skipped here: _set_inputs), for the kernels' own guards: a slot or
    # position outside the cache in a one-token step, a two-token step and a prompt prefill; memcheck must stay clean
    vocab = model.config.vocab
    for ids, positions, slots in (([5], [2112 + 9], [0]), ([5, 6], [-4, 30], [0, 7]), ([5, 6], [3, 4], [-1, 1]),
                                  ([vocab], [3], [0]), ([-1, 2**31 - 1], [3, 4], [0, 1])):
        be._set_inputs(np.array(ids), np.array(positions), np.array(slots))
        be.run_plan(len(ids))
    for m in (40, 72):  # prompt chunks below and from GEMM_MIN_M: slot 5 of 2; slot 0 at positions past 2112
        be._set_inputs(np.arange(m) * 7, np.arange(2100, 2100 + m), np.full(m, 5))
        be.run_plan(m, last_only=True)
        be._set_inputs(np.arange(m) * 7, np.arange(2100, 2100 + m), np.zeros(m))
        be.run_plan(m, last_only=True)
    be.stream.synchronize()
    assert np.isfinite(logits).all(), "non-finite logits"
    print(f"fused={fused} tuning={tuning}: step ok, tokens {toks}")
    be.close()
if "--long" in sys.argv:  # a long prompt as the engine runs it: whole 512-token pieces, the keys split, then decode
    n = int(sys.argv[sys.argv.index("--long") + 1])
    be = CudaBackend(model, max_context=n + 64, n_slots=1, max_tokens=512)
    logits = be.forward(np.arange(n) * 37 % model.config.vocab)
    toks = list(be.greedy(int(np.argmax(logits)), 3))
    be.stream.synchronize()
    assert np.isfinite(logits).all(), "non-finite logits"
    print(f"long prompt of {n}: ok, tokens {toks}")
    be.close()
sys.exit(0)
