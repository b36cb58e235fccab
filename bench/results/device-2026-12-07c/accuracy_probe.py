import sys, numpy as np
sys.path.insert(0, "tests")
from toolchain.gguf_model import load_gguf
from toolchain.reference import ReferenceModel
from toolchain.cuda_backend import CudaBackend, GEMM_MIN_M
model = load_gguf(sys.argv[1]); ref = ReferenceModel(model)
def rel(a, b): return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))
rng = np.random.default_rng(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
m = 5
prompts = [rng.integers(0, model.config.vocab, 3 + s % 5).tolist() for s in range(m)]
want = [ref.forward(p + [p[-1]], 0, ref.new_cache(16))[-1] for p in prompts]
for name, tun in (("default", {}), ("decode_core", {"skinny_min_m": GEMM_MIN_M}), ("skinny_everywhere", {"skinny_min_m": 1})):
    be = CudaBackend(model, max_context=512, n_slots=8, max_tokens=96, tuning=tun)
    for s, p in enumerate(prompts):
        be.step(p, np.arange(len(p)), np.full(len(p), s))
    out = be.step([p[-1] for p in prompts], [len(p) for p in prompts], list(range(m)))
    if name == "default":
        one = []
        for s, p in enumerate(prompts):
            be.step(p, np.arange(len(p)), np.full(len(p), s))
            one.append(be.step([p[-1]], [len(p)], [s])[0])
        print("m1_steps", " ".join(f"{rel(one[s], want[s]):.2e}" for s in range(m)), flush=True)
        big = max(float(np.abs(v).max()) for v in want)
        print("max |logit|", big, flush=True)
    print(name, " ".join(f"{rel(out[s], want[s]):.2e}" for s in range(m)), flush=True)
    be.close()
