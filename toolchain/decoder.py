"""The Python API: `Decoder.load(model, backend=...)`, `generate`, and a streaming iterator.

A backend only knows how to turn tokens at positions into logits (and, where it can, the greedy next token on the
device). Tokenization, sampling, stop tokens and timing live here once for all backends.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise UserError(f"--temperature {self.temperature}: must be a finite number >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: must be >= 0 (0 disables top-k)")
        if not (0 < self.top_p <= 1):
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """Temperature, then top-k, then top-p (nucleus) over what remains, as llama.cpp and HF order them."""
    if s.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    order = np.argsort(-z, kind="stable")
    if s.top_k:
        order = order[: s.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if s.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), s.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int]
    text: str
    prefill_s: float
    decode_s: float
    finish_reason: str
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        n = max(len(self.ids) - 1, 0)  # the first new token comes from the prefill
        return n / self.decode_s if self.decode_s > 0 and n else 0.0


class CpuBackend:
    """The numpy reference decoder behind the backend interface."""

    name = "cpu"

    def __init__(self, model, max_context: int):
        from .reference import ReferenceModel

        self.ref = ReferenceModel(model)
        self.max_context = max_context
        self.reset()

    def reset(self):
        self.cache = self.ref.new_cache(self.max_context)
        self.pos = 0

    def forward(self, ids) -> np.ndarray:
        """Logits of the last of `ids`, appended at the current position."""
        logits = self.ref.forward(ids, self.pos, self.cache)
        self.pos += len(ids)
        return logits[-1]


BACKENDS = ("cpu", "cuda", "tensorrt")


def existing_plan(gguf_path) -> str | None:
    """A TensorRT plan for this model: $QTRT_PLAN, or one `qtrt`'s TensorRT backend built beside the GGUF."""
    import os
    from pathlib import Path

    if os.environ.get("QTRT_PLAN"):
        return os.environ["QTRT_PLAN"]
    g = Path(gguf_path)
    plans = sorted(g.with_name(g.stem + ".trt").glob("model-ctx*.plan"))
    return str(plans[-1]) if plans else None


def available_backend(gguf_path=None) -> str:
    """The best backend that can run here: tensorrt when it imports, a GPU is present and a plan exists; else cuda
    when cuda-python sees a GPU; else cpu."""
    try:
        from . import cuda_runtime

        gpu = cuda_runtime.gpu_available()
    except Exception:
        gpu = False
    if not gpu:
        return "cpu"
    try:
        import tensorrt  # noqa: F401

        if gguf_path is not None and existing_plan(gguf_path):
            return "tensorrt"
    except ImportError:
        pass
    return "cuda"


class Decoder:
    def __init__(self, model, tokenizer, backend, max_context: int):
        self.model, self.tokenizer, self.backend, self.max_context = model, tokenizer, backend, max_context

    @classmethod
    def load(cls, model, backend: str = "auto", max_context: int | None = None) -> "Decoder":
        from .fetch import resolve_model
        from .gguf_model import GGUFModel, load_gguf
        from .tokenizer import Tokenizer

        gm = model if isinstance(model, GGUFModel) else load_gguf(resolve_model(None if model is None else str(model)))
        max_context = max_context or min(4096, gm.config.context_length)
        if max_context < 2 or max_context > gm.config.context_length:
            raise UserError(f"--max-context {max_context}: must be between 2 and the model's context "
                            f"length {gm.config.context_length}")
        backend = available_backend(gm.path) if backend == "auto" else backend
        if backend == "cpu":
            be = CpuBackend(gm, max_context)
        elif backend == "cuda":
            from .cuda_backend import CudaBackend

            be = CudaBackend(gm, max_context)
        elif backend == "tensorrt":
            from .trt.runtime import TensorRTBackend

            be = TensorRTBackend(gm, max_context, plan=existing_plan(gm.path))
        else:
            raise UserError(f"--backend {backend}: unknown; choose one of {', '.join(BACKENDS)}")
        return cls(gm, Tokenizer.from_gguf(gm.reader), be, max_context)

    def encode_prompt(self, prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
            ids = self.tokenizer.encode(text)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise UserError("the prompt is empty: give at least one token of text")
        return ids

    def stream(self, prompt, max_new_tokens: int = 64, sampling: Sampling = Sampling(), chat: bool = False,
               stats: dict | None = None) -> Iterator[int]:
        """Yield new token ids as they are produced; `stats` (if given) receives timings and the finish reason."""
        ids = self.encode_prompt(prompt, chat)
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        if len(ids) + max_new_tokens > self.max_context:
            raise UserError(f"the prompt has {len(ids)} tokens; with {max_new_tokens} new tokens that exceeds the "
                            f"context of {self.max_context}: shorten the prompt, lower --max-new-tokens or raise "
                            f"--max-context (model maximum {self.model.config.context_length})")
        stats = {} if stats is None else stats
        stats.update(prompt_ids=ids, finish_reason="length")
        rng = np.random.default_rng(sampling.seed)
        self.backend.reset()
        t0 = time.perf_counter()
        logits = self.backend.forward(ids)
        tok = sample(logits, sampling, rng)
        stats["prefill_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        if sampling.greedy and hasattr(self.backend, "greedy"):  # device-side argmax, self-advancing CUDA graph
            rest = self.backend.greedy(tok, max_new_tokens - 1)
        else:
            rest = (None for _ in range(max_new_tokens - 1))
        for n in range(max_new_tokens):
            yield tok
            stats["decode_s"] = time.perf_counter() - t1
            if tok in self.tokenizer.stop_token_ids:
                stats["finish_reason"] = "stop"
                return
            if n + 1 == max_new_tokens:
                return
            nxt = next(rest)
            tok = nxt if nxt is not None else sample(self.backend.forward([tok]), sampling, rng)

    def generate(self, prompt, max_new_tokens: int = 64, sampling: Sampling = Sampling(), chat: bool = False) -> Generation:
        stats: dict = {}
        out = list(self.stream(prompt, max_new_tokens, sampling, chat, stats))
        text_ids = [t for t in out if t not in self.tokenizer.stop_token_ids]
        return Generation(stats["prompt_ids"], out, self.tokenizer.decode(text_ids), stats["prefill_s"],
                          stats.get("decode_s", 0.0), stats["finish_reason"])
