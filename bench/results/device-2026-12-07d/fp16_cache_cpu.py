"""CPU, the real 1.5B: the probe's sequences (accuracy_probe.py, seed 3: 40 prompts of 5-8 random tokens, the step
feeding p[-1] again at position len(p)), float16-cache reference (docs/ops.md's cache) against the float32 one."""
import sys
import numpy as np
from toolchain.gguf_model import load_gguf
from toolchain.reference import ReferenceModel


def rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


model = load_gguf(sys.argv[1])
ref = ReferenceModel(model)
rng = np.random.default_rng(3)
prompts = [rng.integers(0, model.config.vocab, 5 + s % 4).tolist() for s in range(40)]
for s in range(12):
    p = prompts[s] + [prompts[s][-1]]
    out = {}
    for kv in (np.float16, np.float32):  # the same weights, the cache new_cache makes
        ref.kv_dtype = np.dtype(kv)
        out[kv] = ref.forward(p, 0, ref.new_cache(16))[-1]
    a, b = out[np.float16], out[np.float32]
    print(f"sequence {s}: float16 cache vs float32 cache, last logits rel {rel(a, b):.2e}", flush=True)
