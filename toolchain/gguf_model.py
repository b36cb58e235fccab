"""Open a Qwen2/Qwen2.5 GGUF: hyperparameters, tensors with their own ggml types, and validation.

Every tensor's type is read from the file: the real Q4_K_M files mix Q4_K, Q6_K, Q5_0 and Q8_0 per layer and store an
`output.weight` of their own type even though the embeddings are tied in the original model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .quants import BLOCK, row_bytes

ARCHITECTURES = ("qwen2",)
# Per-layer tensors and whether a bias tensor accompanies them (Qwen2 has Q/K/V biases only).
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
BIASED = ("attn_q", "attn_k", "attn_v")


@dataclass(frozen=True)
class Config:
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    context_length: int
    vocab: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


@dataclass(frozen=True)
class Tensor:
    name: str
    ggml_type: str
    shape: tuple[int, ...]  # numpy order: (rows, k) for matrices; the last dim is contiguous
    data: np.ndarray = field(repr=False)  # raw bytes exactly as in the file (uint8 view of the mapping)


@dataclass
class GGUFModel:
    path: str
    config: Config
    tensors: dict[str, Tensor]
    reader: object = field(repr=False)

    def layer(self, i: int, name: str) -> Tensor:
        return self.tensors[f"blk.{i}.{name}.weight"]

    def tensor_data(self):
        """All tensors' bytes as one uint8 view of the file's memory map (first tensor's start to last tensor's end),
        or None when the tensors are not views of one mapping: what a backend copies to the GPU in one call."""
        arrays = [t.data for t in self.tensors.values()]
        base = arrays[0].base if arrays else None
        if not isinstance(base, np.ndarray) or any(a.base is not base for a in arrays):
            return None
        addr = base.ctypes.data
        lo = min(a.ctypes.data - addr for a in arrays)
        hi = max(a.ctypes.data - addr + a.nbytes for a in arrays)
        return base[lo:hi]

    def bias(self, i: int, name: str) -> Tensor | None:
        return self.tensors.get(f"blk.{i}.{name}.bias")

    @property
    def output(self) -> Tensor:
        """lm_head: `output.weight` when the file has one, else the tied embedding."""
        return self.tensors.get("output.weight") or self.tensors["token_embd.weight"]


def _field(reader, key, path, required=True):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise UserError(f"{path}: GGUF metadata key '{key}' is missing; is this a complete Qwen2 GGUF?")
        return None
    v = f.contents()
    return v


def load_gguf(path: str | os.PathLike) -> GGUFModel:
    """Parse and validate a GGUF file; every problem is a UserError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; run `qtrt fetch` or pass --model PATH to a Qwen2.5 GGUF")
    try:
        from .gguf_file import GGUFFile, GGUFFormatError

        reader = GGUFFile(path)
    except (GGUFFormatError, OSError) as e:  # malformed, truncated or foreign files (GGUFFormatError), unreadable ones (OSError)
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from None
    arch = _field(reader, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: architecture '{arch}' is not supported (only {', '.join(ARCHITECTURES)}: Qwen2/Qwen2.5)")
    g = lambda k, req=True: _field(reader, f"{arch}.{k}", path, req)  # noqa: E731
    n_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    tensors = {}
    size = os.path.getsize(path)
    for t in reader.tensors:
        tname = t.tensor_type.name
        shape = tuple(reversed(t.shape))
        if tname not in BLOCK:
            raise UserError(f"{path}: tensor {t.name} has ggml type {tname}, which is not supported "
                            f"(supported: {', '.join(BLOCK)})")
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"{path}: tensor {t.name} extends past the end of the file; the file is truncated, re-download it")
        if t.n_bytes != row_bytes(tname, shape[-1]) * int(np.prod(shape[:-1], dtype=np.int64)):
            raise UserError(f"{path}: tensor {t.name} holds {t.n_bytes} bytes, not what {tname} {shape} needs")
        tensors[t.name] = Tensor(t.name, tname, shape, t.data)
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: tensor token_embd.weight is missing; the file is incomplete")
    vocab = tensors["token_embd.weight"].shape[0]
    n_layers = int(g("block_count"))
    for i in range(n_layers):
        for name in LAYER_TENSORS:
            for kind in ("weight",) + (("bias",) if name in BIASED else ()):
                if f"blk.{i}.{name}.{kind}" not in tensors:
                    raise UserError(f"{path}: tensor blk.{i}.{name}.{kind} is missing; the file is incomplete")
    if "output_norm.weight" not in tensors:
        raise UserError(f"{path}: tensor output_norm.weight is missing; the file is incomplete")
    n_kv = int(g("attention.head_count_kv", False) or n_heads)
    head_dim = hidden // n_heads
    cfg = Config(
        n_layers=n_layers,
        hidden=hidden,
        ffn=int(g("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        rope_theta=float(g("rope.freq_base", False) or 10000.0),
        rms_eps=float(g("attention.layer_norm_rms_epsilon")),
        context_length=int(g("context_length")),
        vocab=vocab,
        bos_token_id=_opt_int(_field(reader, "tokenizer.ggml.bos_token_id", path, False)),
        eos_token_id=_opt_int(_field(reader, "tokenizer.ggml.eos_token_id", path, False)),
    )
    if n_heads % n_kv or hidden % n_heads or head_dim % 2:
        raise UserError(f"{path}: inconsistent attention shape (hidden {hidden}, heads {n_heads}, kv heads {n_kv})")
    expect = {"attn_q": (cfg.q_dim, hidden), "attn_k": (cfg.kv_dim, hidden), "attn_v": (cfg.kv_dim, hidden),
              "attn_output": (hidden, cfg.q_dim), "ffn_gate": (cfg.ffn, hidden), "ffn_up": (cfg.ffn, hidden),
              "ffn_down": (hidden, cfg.ffn)}
    for i in range(n_layers):
        for name, shp in expect.items():
            if tensors[f"blk.{i}.{name}.weight"].shape != shp:
                raise UserError(f"{path}: tensor blk.{i}.{name}.weight has shape "
                                f"{tensors[f'blk.{i}.{name}.weight'].shape}, expected {shp} from the metadata")
    return GGUFModel(path, cfg, tensors, reader)


def _opt_int(v):
    return None if v is None else int(v)
