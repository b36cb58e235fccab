"""Numpy reference semantics of every op in the graph (docs/ops.md is the table; these functions are the contract).

The CUDA kernels and TensorRT plugins are checked against these functions, and the ONNX ReferenceEvaluator runs
them for our custom nodes. The CPU reference decoder uses the same building blocks, so one definition of RoPE,
RMSNorm and attention serves everywhere.
"""
from __future__ import annotations

import numpy as np

from .quants import dequantize

# ONNX op_type of the projection / embedding node for each ggml weight type.
MATMUL_OP = {"Q4_K": "q4k_matmul", "Q6_K": "q6k_matmul", "Q5_0": "q5_0_matmul", "Q8_0": "q8_0_matmul"}
GATHER_OP = {"Q4_K": "q4k_gather", "Q6_K": "q6k_gather", "Q5_0": "q5_0_gather", "Q8_0": "q8_0_gather"}
TYPE_OF_OP = {op: t for d in (MATMUL_OP, GATHER_OP) for t, op in d.items()}


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight).astype(np.float32)


def quant_matmul(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, ggml_type: str) -> np.ndarray:
    """y = x @ W.T + bias, W dequantized from its raw GGUF rows `w` (uint8 [n, row_bytes])."""
    n = w.shape[0]
    k = x.shape[-1]
    y = x.astype(np.float32) @ dequantize(w, ggml_type, (n, k)).T
    return y if bias is None else (y + bias).astype(np.float32)


def quant_gather(w: np.ndarray, ids: np.ndarray, ggml_type: str, hidden: int) -> np.ndarray:
    """Embedding lookup: dequantize only the rows asked for."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return dequantize(np.ascontiguousarray(w[ids]), ggml_type, (len(ids), hidden))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return (silu(gate.astype(np.float32)) * up).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, head_dim: int, theta: float) -> np.ndarray:
    """Rotate-half RoPE (Qwen2 / GPT-NeoX layout). x: [m, heads, head_dim], positions: [m]."""
    half = head_dim // 2
    inv_freq = (np.float32(theta) ** (-np.arange(0, half, dtype=np.float32) * np.float32(2.0 / head_dim))).astype(np.float32)
    ang = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # [m, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(np.float32)


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One token's grouped-query attention. q: [H, D]; keys/values: [KV, T, D] (all visible positions)."""
    n_heads, d = q.shape
    group = n_heads // keys.shape[0]
    k = np.repeat(keys.astype(np.float32), group, axis=0)  # [H, T, D]
    v = np.repeat(values.astype(np.float32), group, axis=0)
    s = np.einsum("hd,htd->ht", q, k) / np.float32(np.sqrt(d))
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("ht,htd->hd", p, v).astype(np.float32)


def rope_kv_attention(q, k, v, k_cache, v_cache, positions, slots, *, n_heads, n_kv_heads, head_dim, rope_theta):
    """RoPE on q and k, append k/v to the float16 cache at (slot, position), then causal GQA attention.

    Returns (out [m, n_heads*head_dim], k_cache, v_cache); the caches are updated in place and returned, mirroring
    the CUDA kernel, whose cache outputs alias their inputs. (The TensorRT export passes the caches by address
    instead, rope_kv_attention_addr: same semantics, docs/ops.md.)
    """
    m = q.shape[0]
    positions = np.asarray(positions).reshape(-1).astype(np.int64)
    slots = np.asarray(slots).reshape(-1).astype(np.int64)
    qr = rope(q.reshape(m, n_heads, head_dim), positions, head_dim, rope_theta)
    kr = rope(k.reshape(m, n_kv_heads, head_dim), positions, head_dim, rope_theta)
    vv = v.reshape(m, n_kv_heads, head_dim)
    if positions.max(initial=0) >= k_cache.shape[2]:
        raise ValueError(f"position {positions.max()} is beyond the KV cache length {k_cache.shape[2]}")
    for i in range(m):  # every append of the step happens before any attention of the step
        k_cache[slots[i], :, positions[i], :] = kr[i].astype(np.float16)
        v_cache[slots[i], :, positions[i], :] = vv[i].astype(np.float16)
    out = np.empty((m, n_heads, head_dim), np.float32)
    for i in range(m):
        t = positions[i] + 1
        out[i] = attend(qr[i], k_cache[slots[i], :, :t], v_cache[slots[i], :, :t])
    return out.reshape(m, n_heads * head_dim), k_cache, v_cache


# Fused ops (toolchain/fusion.py): compositions of the ops above, so their reference is the composition itself.
def rms_norm_qkv(x, norm_w, wq, bq, wk, bk, wv, bv, *, epsilon, q_type, k_type, v_type):
    h = rms_norm(x, norm_w, epsilon)
    return quant_matmul(h, wq, bq, q_type), quant_matmul(h, wk, bk, k_type), quant_matmul(h, wv, bv, v_type)


def matmul_add(x, w, bias, residual, *, w_type):
    return (residual + quant_matmul(x, w, bias, w_type)).astype(np.float32)


def rms_norm_swiglu(x, norm_w, w_gate, w_up, *, epsilon, gate_type, up_type):
    h = rms_norm(x, norm_w, epsilon)
    return swiglu(quant_matmul(h, w_gate, None, gate_type), quant_matmul(h, w_up, None, up_type))
