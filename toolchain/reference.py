"""CPU reference decoder for Qwen2 (float32 numpy): the model every other backend is compared with.

Kept short on purpose (gpt-fast's model.py is the model): weights are dequantized once to float32, the KV cache is
float32, and the layer is written out in full. It is proven against Hugging Face transformers (tests/golden).
"""
from __future__ import annotations

import numpy as np

from . import ops
from .gguf_model import GGUFModel
from .quants import dequantize


def _dense(t):
    return dequantize(t.data, t.ggml_type, t.shape).astype(np.float32, copy=False)


class Layer:
    """One layer's weights, dequantized. Matrices keep the file's [out, in] layout and are used transposed (x @ W.T:
    BLAS reads them either way), so no transposed copy is ever made: the load peaks at the weights' own size."""

    def __init__(self, model: GGUFModel, i: int):
        w = lambda n: _dense(model.layer(i, n))  # noqa: E731
        b = lambda n: _dense(model.bias(i, n))  # noqa: E731
        self.attn_norm, self.ffn_norm = w("attn_norm"), w("ffn_norm")
        # q, k and v share their input: one [q+k+v, hidden] matrix makes one matmul per token.
        self.wqkv = np.concatenate([w("attn_q"), w("attn_k"), w("attn_v")]).T
        self.bqkv = np.concatenate([b("attn_q"), b("attn_k"), b("attn_v")])
        self.wo = w("attn_output").T
        self.wgate_up = np.concatenate([w("ffn_gate"), w("ffn_up")]).T
        self.wdown = w("ffn_down").T


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
    def __init__(self, model: GGUFModel, progress=None):
        from .progress import quiet

        self.cfg = model.config
        self.model = model
        self.layers = [Layer(model, i) for i in (progress or quiet()).bar(range(self.cfg.n_layers),
                                                                        text="dequantizing layers", unit="layer")]
        self.output_norm = _dense(model.tensors["output_norm.weight"])
        self.lm_head = _dense(model.output).T  # [hidden, vocab], a view
        _release_pages(model)

    def new_cache(self, max_len: int):
        c = self.cfg
        shape = (c.n_layers, 2, c.n_kv_heads, max_len, c.head_dim)
        return np.zeros(shape, np.float32)

    def layer_forward(self, L: Layer, x, pos, cache, mask):
        """One decoder layer on hidden states x [m, hidden] at positions pos; cache [2, kv, T, D] is filled."""
        c, m = self.cfg, len(pos)
        start, end = int(pos[0]), int(pos[-1]) + 1
        group = c.n_heads // c.n_kv_heads
        h = ops.rms_norm(x, L.attn_norm, c.rms_eps)
        qkv = h @ L.wqkv + L.bqkv
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
        x = x + attn @ L.wo
        h = ops.rms_norm(x, L.ffn_norm, c.rms_eps)
        gate, up = np.split(h @ L.wgate_up, 2, axis=1)
        return x + ops.swiglu(gate, up) @ L.wdown

    def forward(self, tokens, start_pos: int, cache: np.ndarray) -> np.ndarray:
        """Run tokens at positions start_pos.. and return their logits [m, vocab]; fills cache in place."""
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
        return ops.rms_norm(x, self.output_norm, c.rms_eps) @ self.lm_head
