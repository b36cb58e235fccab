"""CPU: does fp16 rounding (KV cache; projection inputs) explain the real 1.5B's outliers against the float32 reference?
The probe's sequences (seed 3, 40 prompts of 5-8 random tokens; the step feeds p[-1] again at position len(p))."""
import sys, numpy as np
sys.path.insert(0, "/work/main")
from toolchain.gguf_model import load_gguf
from toolchain.reference import ReferenceModel, Layer
from toolchain import ops

f16 = lambda a: a.astype(np.float16).astype(np.float32)

class Emu(ReferenceModel):
    kv16 = x16 = False
    def layer_forward(self, L, x, pos, cache, mask):
        c, m = self.cfg, len(pos)
        start, end = int(pos[0]), int(pos[-1]) + 1
        group = c.n_heads // c.n_kv_heads
        r = f16 if self.x16 else (lambda a: a)
        h = ops.rms_norm(x, L.attn_norm, c.rms_eps)
        qkv = L.qkv(r(h)) + L.bqkv
        q, k, v = np.split(qkv, [c.q_dim, c.q_dim + c.kv_dim], axis=1)
        q = ops.rope(q.reshape(m, c.n_heads, c.head_dim), pos, c.head_dim, c.rope_theta)
        k = ops.rope(k.reshape(m, c.n_kv_heads, c.head_dim), pos, c.head_dim, c.rope_theta)
        kk = k.transpose(1, 0, 2); vv = v.reshape(m, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        if self.kv16: kk, vv = f16(kk), f16(vv)
        cache[0, :, start:end] = kk
        cache[1, :, start:end] = vv
        keys = np.repeat(cache[0, :, :end], group, axis=0)
        vals = np.repeat(cache[1, :, :end], group, axis=0)
        s = np.einsum("mhd,htd->hmt", q, keys) / np.float32(np.sqrt(c.head_dim)) + mask
        p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
        attn = np.einsum("hmt,htd->mhd", p, vals).reshape(m, c.q_dim)
        x = x + L.o(r(attn))
        h = ops.rms_norm(x, L.ffn_norm, c.rms_eps)
        gate, up = np.split(L.gate_up(r(h)), 2, axis=1)
        return x + L.down(r(ops.swiglu(gate, up)))

def rel(a, b): return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))
model = load_gguf("/work/main/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
ref = Emu(model)
rng = np.random.default_rng(3)
prompts = [rng.integers(0, model.config.vocab, 5 + s % 4).tolist() for s in range(40)]
which = [int(a) for a in sys.argv[1:]] or list(range(12))
for s in which:
    p = prompts[s] + [prompts[s][-1]]
    out = {}
    for name, kv, x in (("f32", False, False), ("kv16", True, False), ("x16", False, True), ("kv16+x16", True, True)):
        ref.kv16, ref.x16 = kv, x
        out[name] = ref.forward(p, 0, ref.new_cache(16))[-1]
    print(s, " ".join(f"{n} {rel(out[n], out['f32']):.2e}" for n in ("kv16", "x16", "kv16+x16")), flush=True)
