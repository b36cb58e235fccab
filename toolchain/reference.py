"""CPU reference decoder for Qwen2 (float32 numpy): the model every other backend is compared with.

Kept short on purpose (gpt-fast's model.py is the model): the layer is written out in full, the KV cache is float32
(kv_dtype=float16: the cache of docs/ops.md's contract, which the ONNX graphs and every GPU backend keep; a few random
token sequences of the real 1.5B move by ~1e-1 between the two, docs/perf-notes.md).
Its projections are `Dense` (weights dequantized once to float32: the exact reference, proven against Hugging Face
transformers in tests/golden) or `Quantized` (weights left in their ggml blocks and decoded row by row inside each
matmul by toolchain/cpu_kernels.c: the same decoded values, float32 sums in another order; 1.1 GB instead of 6.2 GB
for the 1.5B, and what the `cpu` backend runs where a C compiler is present).
"""
from __future__ import annotations

import numpy as np

from . import ops
from .gguf_model import GGUFModel
from .quants import dequantize


def _dense(t):
    return dequantize(t.data, t.ggml_type, t.shape).astype(np.float32, copy=False)


class Dense:
    """Projection by float32 weights: the file's [out, in] rows of each part stacked, used transposed (x @ W.T: BLAS
    reads them either way, so no transposed copy is ever made)."""

    def __init__(self, parts):
        self.w = np.concatenate([_dense(t) for t in parts]) if len(parts) > 1 else _dense(parts[0])

    def __call__(self, x):
        return x @ self.w.T


class Quantized:
    """Projection straight from the raw blocks of each part (toolchain/cpu_kernels.py); outputs concatenated."""

    def __init__(self, parts):
        from . import cpu_kernels

        self.parts, self._matmul = parts, cpu_kernels.matmul

    def __call__(self, x):
        ys = [self._matmul(x, t) for t in self.parts]
        return ys[0] if len(ys) == 1 else np.concatenate(ys, axis=1)


WEIGHTS = {"dense": Dense, "quantized": Quantized}


class Layer:
    def __init__(self, model: GGUFModel, i: int, proj=Dense):
        w = lambda n: model.layer(i, n)  # noqa: E731
        b = lambda n: _dense(model.bias(i, n))  # noqa: E731
        self.attn_norm, self.ffn_norm = _dense(w("attn_norm")), _dense(w("ffn_norm"))
        # q, k and v share their input: one [q+k+v] projection per token (gate and up likewise).
        self.qkv = proj([w("attn_q"), w("attn_k"), w("attn_v")])
        self.bqkv = np.concatenate([b("attn_q"), b("attn_k"), b("attn_v")])
        self.o = proj([w("attn_output")])
        self.gate_up = proj([w("ffn_gate"), w("ffn_up")])
        self.down = proj([w("ffn_down")])


def _release_pages(model: GGUFModel):
    """Drop the file's pages from this process's memory once everything is dequantized (they stay in the OS page
    cache; the embedding rows read later fault back in on demand): ~1.1 GB less resident for the 1.5B."""
    mapping = getattr(model.reader, "_map", None)
    if mapping is not None and hasattr(mapping, "madvise"):
        import mmap

        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


class ReferenceModel:
    def __init__(self, model: GGUFModel, progress=None, weights: str = "dense", kv_dtype=np.float32):
        """weights: "dense" (float32, the exact reference) or "quantized" (raw blocks, needs cpu_kernels). kv_dtype:
        the caches new_cache makes (float16: keys and values rounded as docs/ops.md's append rounds them)."""
        from .progress import quiet

        self.cfg = model.config
        self.kv_dtype = np.dtype(kv_dtype)
        self.model = model
        self.weights = weights
        proj = WEIGHTS[weights]
        text = "dequantizing layers" if weights == "dense" else "preparing layers"
        self.layers = [Layer(model, i, proj) for i in (progress or quiet()).bar(range(self.cfg.n_layers),
                                                                              text=text, unit="layer")]
        self.output_norm = _dense(model.tensors["output_norm.weight"])
        self.lm_head = proj([model.output])
        if weights == "dense":
            _release_pages(model)

    def new_cache(self, max_len: int):
        c = self.cfg
        shape = (c.n_layers, 2, c.n_kv_heads, max_len, c.head_dim)
        return np.zeros(shape, self.kv_dtype)

    def layer_forward(self, L: Layer, x, pos, cache, mask):
        """One decoder layer on hidden states x [m, hidden] at positions pos; cache [2, kv, T, D] is filled."""
        c, m = self.cfg, len(pos)
        start, end = int(pos[0]), int(pos[-1]) + 1
        group = c.n_heads // c.n_kv_heads
        h = ops.rms_norm(x, L.attn_norm, c.rms_eps)
        qkv = L.qkv(h) + L.bqkv
        q, k, v = np.split(qkv, [c.q_dim, c.q_dim + c.kv_dim], axis=1)
        q = ops.rope(q.reshape(m, c.n_heads, c.head_dim), pos, c.head_dim, c.rope_theta)
        k = ops.rope(k.reshape(m, c.n_kv_heads, c.head_dim), pos, c.head_dim, c.rope_theta)
        cache[0, :, start:end] = k.transpose(1, 0, 2)
        cache[1, :, start:end] = v.reshape(m, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        keys = np.repeat(cache[0, :, :end], group, axis=0)  # [H, end, D]
        vals = np.repeat(cache[1, :, :end], group, axis=0)
        s = np.einsum("mhd,htd->hmt", q, keys) / np.float32(np.sqrt(c.head_dim)) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        attn = np.einsum("hmt,htd->mhd", p, vals).reshape(m, c.q_dim)
        x = x + L.o(attn)
        h = ops.rms_norm(x, L.ffn_norm, c.rms_eps)
        gate, up = np.split(L.gate_up(h), 2, axis=1)
        return x + L.down(ops.swiglu(gate, up))

    def forward(self, tokens, start_pos: int, cache: np.ndarray, last_only: bool = False, rows=None) -> np.ndarray:
        """Run tokens at positions start_pos.. and return their logits [m, vocab] (last_only: the last token's only,
        [1, vocab]: a prompt needs no more; rows: those tokens' only, in that order); fills cache in place."""
        c = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64)
        m = len(tokens)
        if start_pos + m > cache.shape[3]:
            raise ValueError(f"{start_pos + m} tokens do not fit the cache of {cache.shape[3]}")
        emb = self.model.tensors["token_embd.weight"]
        x = ops.quant_gather(emb.data.reshape(emb.shape[0], -1), tokens, emb.ggml_type, c.hidden)
        pos = np.arange(start_pos, start_pos + m)
        mask = np.where(pos[:, None] >= np.arange(start_pos + m)[None, :], 0.0, -np.inf).astype(np.float32)  # causal
        for li, L in enumerate(self.layers):
            x = self.layer_forward(L, x, pos, cache[li], mask)
        if last_only:
            x = x[-1:]
        elif rows is not None:
            if not len(rows):
                return np.zeros((0, c.vocab), np.float32)
            x = x[np.asarray(rows, np.int64)]
        return self.lm_head(ops.rms_norm(x, self.output_norm, c.rms_eps))
