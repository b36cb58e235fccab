"""Real 1.5B: random-token prompts of 5-8 tokens (their prefill on the few-token GEMMs) and one batched step of all
of them, with tuning ssq_by_producer on / off / on, against the float32 reference. Prints per-sequence rel errors."""
import sys, time, numpy as np
from toolchain.gguf_model import load_gguf
from toolchain.reference import ReferenceModel
from toolchain.cuda_backend import CudaBackend
model = load_gguf(sys.argv[1]); ref = ReferenceModel(model)
def rel(a, b): return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
N = int(sys.argv[3]) if len(sys.argv) > 3 else 8
rng = np.random.default_rng(seed)
prompts = [rng.integers(0, model.config.vocab, 5 + s % 4).tolist() for s in range(N)]
t = time.time()
want_pre = [ref.forward(p, 0, ref.new_cache(16))[-1] for p in prompts]
want = [ref.forward(p + [p[-1]], 0, ref.new_cache(16))[-1] for p in prompts]
print(f"reference {time.time() - t:.0f} s", flush=True)
be = CudaBackend(model, max_context=512, n_slots=N, max_tokens=96)
base, got = dict(be.tuning), {}
for k, on in enumerate((True, False, True, "core")):
    be.tuning = {**base, "ssq_by_producer": on is True} | ({"skinny_min_m": 65} if on == "core" else {})
    be._plans.clear(); be._graphs.clear()
    pre = [np.array(be.step(p, np.arange(len(p)), np.full(len(p), s))[-1]) for s, p in enumerate(prompts)]
    out = np.array(be.step([p[-1] for p in prompts], [len(p) for p in prompts], list(range(N))))
    got[k] = (pre, out)
    links = sum(bool((x.defines or {}).get("SK_SSQ_IN")) for x in be.plan(N))
    print(f"ssq {on} (links at m={N}: {links}) prefill:", " ".join(f"{rel(pre[s], want_pre[s]):.2e}" for s in range(N)), flush=True)
    print(f"ssq {on} batched m={N}:     ", " ".join(f"{rel(out[s], want[s]):.2e}" for s in range(N)), flush=True)
print("on vs off prefill:", " ".join(f"{rel(got[0][0][s], got[1][0][s]):.1e}" for s in range(N)))
print("on vs off batched:", " ".join(f"{rel(got[0][1][s], got[1][1][s]):.1e}" for s in range(N)))
print("on twice same bits:", all(np.array_equal(got[0][1], got[2][1]) for _ in [0]),
      all(np.array_equal(a, b) for a, b in zip(got[0][0], got[2][0])))
be.close()
