"""Synthetic Qwen2 GGUFs: the real files' layout (shapes and per-tensor ggml types) with random weights.

Used where a real file cannot go (the GPU machine receives 64 MiB per call) and for fast CPU tests. Quantized
weights are random *valid blocks* rather than quantized random floats: the blocks are what every kernel reads, and
drawing them directly costs seconds at the 1.5B size where a numpy quantizer would take minutes. The block scales
are then set so each weight matrix has standard deviation ~1/sqrt(k), which keeps activations in a sane range.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .gguf_model import Config
from .quants import BLOCK, dequantize

LAYOUTS = json.loads((Path(__file__).with_name("layouts.json")).read_text())

# Byte offsets of the float16 scale fields in each block: (offset, role). Q4_K's second half is dmin.
_HALF_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,), "Q8_0": (0,)}


def layout(name: str, **overrides) -> tuple[Config, dict[str, str]]:
    """The config and tensor-type map of a real model (or a shrunken copy with `overrides`, e.g. n_layers=2)."""
    spec = LAYOUTS[name]
    cfg = dict(spec["config"], **overrides)
    cfg["head_dim"] = cfg["hidden"] // cfg["n_heads"]
    types = {k: v for k, v in spec["types"].items()
             if not k.startswith("blk.") or int(k.split(".")[1]) < cfg["n_layers"]}
    return Config(**cfg), types


def random_blocks(ggml_type: str, rows: int, k: int, rng: np.random.Generator, std: float) -> np.ndarray:
    """Random raw blocks [rows, row_bytes] whose dequantized values have about the given standard deviation."""
    elems, nbytes = BLOCK[ggml_type]
    nblk = k // elems
    raw = rng.integers(0, 256, size=(rows, nblk, nbytes), dtype=np.uint8)
    offs = _HALF_FIELDS[ggml_type]
    d = np.full((rows, nblk), 1.0, np.float16)
    raw[:, :, offs[0]:offs[0] + 2] = d.view(np.uint8).reshape(rows, nblk, 2)
    if ggml_type == "Q4_K":  # dmin ~ d * mean(q) keeps the weights centred on zero
        raw[:, :, 2:4] = np.full((rows, nblk), 7.5, np.float16).view(np.uint8).reshape(rows, nblk, 2)
    sample = dequantize(raw[: min(rows, 64)].reshape(-1), ggml_type, (min(rows, 64), k))
    scale = std / float(sample.std())
    for o in offs:
        h = raw[:, :, o:o + 2].copy().view(np.float16).astype(np.float32) * scale
        raw[:, :, o:o + 2] = h.astype(np.float16).view(np.uint8).reshape(rows, nblk, 2)
    return raw.reshape(rows, nblk * nbytes)


def synthetic_vocab(vocab: int):
    """A byte-level BPE vocabulary of `vocab` tokens: 256 byte tokens, letter-pair merges, filler, ChatML specials."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = [chr(c) for c in cs]  # GPT-2's bytes_to_unicode order is irrelevant here; any bijection works
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [f"{a} {b}" for a in letters for b in letters] + [f"Ġ {a}" for a in letters]
    tokens += [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [f"<|filler_{i}|>" for i in range(vocab - len(tokens) - len(specials))] + specials
    types = [1] * (vocab - len(specials)) + [3] * len(specials)
    return tokens, types, merges, {s: vocab - len(specials) + i for i, s in enumerate(specials)}


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_synthetic_gguf(path: str | os.PathLike, cfg: Config, types: dict[str, str], seed: int = 0,
                         skip: tuple[str, ...] = ()) -> Path:
    """Write a valid qwen2 GGUF with random weights; atomic (temporary file, then rename). `skip` leaves tensors
    out (to test how incomplete files are reported)."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "qwen2")
    w.add_name("synthetic qwen2")
    w.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M, as the real files (llama.cpp labels the model with it)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.hidden)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    tokens, ttypes, merges, special = synthetic_vocab(cfg.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(special["<|endoftext|>"])
    w.add_eos_token_id(special["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def quant(name, rows, k, std):
        t = types.get(name, "Q8_0")
        if name in skip:
            return
        w.add_tensor(name, random_blocks(t, rows, k, rng, std), raw_dtype=gguf.GGMLQuantizationType[t])

    def f32(name, x):
        if name not in skip:
            w.add_tensor(name, np.asarray(x, np.float32))

    c = cfg
    quant("token_embd.weight", c.vocab, c.hidden, 1.0)
    for i in range(c.n_layers):
        b = f"blk.{i}."
        f32(b + "attn_norm.weight", 1 + 0.1 * rng.standard_normal(c.hidden))
        f32(b + "ffn_norm.weight", 1 + 0.1 * rng.standard_normal(c.hidden))
        for n, rows in (("attn_q", c.q_dim), ("attn_k", c.kv_dim), ("attn_v", c.kv_dim)):
            quant(b + n + ".weight", rows, c.hidden, c.hidden ** -0.5)
            f32(b + n + ".bias", 0.1 * rng.standard_normal(rows))
        quant(b + "attn_output.weight", c.hidden, c.q_dim, c.q_dim ** -0.5)
        quant(b + "ffn_gate.weight", c.ffn, c.hidden, c.hidden ** -0.5)
        quant(b + "ffn_up.weight", c.ffn, c.hidden, c.hidden ** -0.5)
        quant(b + "ffn_down.weight", c.hidden, c.ffn, c.ffn ** -0.5)
    f32("output_norm.weight", 1 + 0.1 * rng.standard_normal(c.hidden))
    if "output.weight" in types:
        quant("output.weight", c.vocab, c.hidden, c.hidden ** -0.5 * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path
