"""The Python API: `Decoder.load(model, backend=...)`, `generate`, and a streaming iterator.

A backend only knows how to turn tokens at positions into logits (and, where it can, the greedy next token on the
device). Tokenization, sampling, stop tokens and timing live here once for all backends.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .errors import UserError, check_step, check_token_ids
from .sampling import Sampling, draw_rng, sample, sample_reference  # noqa: F401 - the API's names


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int]  # the new tokens, without a final stop token
    text: str  # their text, cut before a stop string
    prefill_s: float
    decode_s: float
    finish_reason: str  # "stop" (stop token or string), "length" (max_new_tokens or the context's end)
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        n = max(len(self.ids) - 1, 0)  # the first new token comes from the prefill
        return n / self.decode_s if self.decode_s > 0 and n else 0.0


def cpu_weights() -> str:
    """How the cpu backend holds the weights: "quantized" (raw blocks, C kernels: a quarter of the memory, faster
    decode) where a C compiler built toolchain/cpu_kernels.c, else "dense" (float32); $QTRT_CPU_WEIGHTS chooses."""
    choice = os.environ.get("QTRT_CPU_WEIGHTS")
    if choice in ("dense", "quantized"):
        return choice
    from . import cpu_kernels

    return "quantized" if cpu_kernels.available() else "dense"


class CpuBackend:
    """The reference decoder (toolchain/reference.py) behind the backend interface."""

    name = "cpu"
    # the engine's prompt chunk here (toolchain/engine.py): that of prefix reuse, so a prompt is computed in exactly the
    # pieces it gets alone (the bit-exact concurrency test); device backends take the engine's larger default
    prompt_chunk = 32

    def __init__(self, model, max_context: int, progress=None, weights: str | None = None, n_slots: int = 1):
        from .reference import ReferenceModel

        self.ref = ReferenceModel(model, progress=progress, weights=weights or cpu_weights())
        self.max_context, self.n_slots = max_context, n_slots
        self.caches = [self.ref.new_cache(self.max_context) for _ in range(n_slots)]  # one per sequence slot
        self.cache = self.caches[0]  # forward() runs slot 0
        self.pos = 0

    def reset(self, pos: int = 0):
        """Continue at `pos`: cache rows from there on are overwritten by what is fed next."""
        self.pos = pos

    PREFILL_CHUNK = 256  # tokens per reference step: bounds the attention scores of a long prompt (H x 256 x ctx)

    def forward(self, ids) -> np.ndarray:
        """Logits of the last of `ids`, appended at the current position."""
        ids = check_token_ids(ids, self.ref.cfg.vocab)
        if self.pos + len(ids) > self.max_context:
            raise UserError(f"{self.pos + len(ids)} tokens do not fit the context of {self.max_context}")
        for s in range(0, len(ids), self.PREFILL_CHUNK):
            chunk = ids[s:s + self.PREFILL_CHUNK]
            logits = self.ref.forward(chunk, self.pos, self.cache, last_only=True)
            self.pos += len(chunk)
        return logits[-1]

    def step(self, ids, positions, slots, rows=None) -> np.ndarray:
        """One step of tokens from any slots (toolchain/engine.py): each run of consecutive rows of one slot must
        have consecutive positions (a prompt chunk or one decode token). Returns the logits of `rows` (default all),
        [len(rows), vocab]."""
        positions, slots = [int(p) for p in positions], [int(s) for s in slots]
        ids = check_step(ids, positions, slots, self.ref.cfg.vocab, self.max_context, self.n_slots)
        want = set(range(len(ids))) if rows is None else set(rows)
        out: dict[int, np.ndarray] = {}
        i = 0
        while i < len(ids):
            j = i + 1
            while j < len(ids) and slots[j] == slots[i] and positions[j] == positions[j - 1] + 1:
                j += 1
            need = [k for k in range(i, j) if k in want]  # the head (lm_head: 151,936 rows) only where asked
            if need:
                logits = self.ref.forward(ids[i:j], positions[i], self.caches[slots[i]], rows=[k - i for k in need])
                out.update(zip(need, logits))
            else:
                self.ref.forward(ids[i:j], positions[i], self.caches[slots[i]], rows=[])
            i = j
        order = sorted(want) if rows is None else list(rows)
        return np.stack([out[k] for k in order]) if order else np.zeros((0, self.ref.cfg.vocab), np.float32)


BACKENDS = ("cpu", "cuda", "tensorrt")


# The cuda backend's most tokens in one step: a prompt is prefilled in pieces of this size. Pieces of 64 prefilled
# 3.5k tokens at 4,000 tok/s, pieces of 512 at 16,000 (bench/results/device-2026-12-05d; each piece but a prompt's
# last is now a captured graph, and replaying graphs for the others did not make them faster: the launches overlap
# the GPU's work, bench/results/device-2026-12-06f capture-*); 512 is llama.cpp's ubatch. The cost is memory: the activation buffers are sized for it, one per intermediate value of the graphs
# (5.1 MB a token for the 1.5B: 2.6 GB at 512, 0.3 GB at 64); sharing buffers between values whose lifetimes do not
# overlap (toolchain/buffer_plan.py, the cuda tuning share_activations: 58 MB at 512) waits for its GPU run.
BATCH_SIZE = 512


def trt_cache_dir(gguf_path):
    """Where the tensorrt backend keeps the export and plan it builds for a GGUF: <gguf dir>/<stem>.trt/ (a Path)."""
    from pathlib import Path

    g = Path(gguf_path)
    return g.with_name(g.stem + ".trt")


def plan_name(max_context: int, n_slots: int = 1) -> str:
    """The file name of a plan the tensorrt backend builds in trt_cache_dir: model-ctx<C>.plan for one KV-cache slot,
    model-ctx<C>-s<n>.plan for n."""
    return f"model-ctx{max_context}" + (f"-s{n_slots}" if n_slots > 1 else "") + ".plan"


def parse_plan_name(name: str) -> tuple[int, int] | None:
    """(max_context, n_slots) from a plan_name, or None for another name."""
    import re

    m = re.fullmatch(r"model-ctx(\d+)(?:-s(\d+))?\.plan", name)
    return (int(m[1]), int(m[2] or 1)) if m else None


def existing_plan(gguf_path, n_slots: int = 1) -> str | None:
    """A TensorRT plan for this model: $QTRT_PLAN, or one `qtrt`'s TensorRT backend built beside the GGUF (plan_name)
    with at least n_slots KV-cache slots."""
    if os.environ.get("QTRT_PLAN"):
        return os.environ["QTRT_PLAN"]
    plans = [p for p in sorted(trt_cache_dir(gguf_path).glob("model-ctx*.plan"))
             if (parse_plan_name(p.name) or (0, 1))[1] >= n_slots]
    return str(plans[-1]) if plans else None


def backend_problem(name: str) -> str | None:
    """Why `name` cannot run here (one line), or None. Cheap: no model, no kernels."""
    if name == "cpu":
        return None
    from . import cuda_runtime

    problem = cuda_runtime.gpu_problem()
    if problem or name == "cuda":
        return problem
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("TensorRT is not installed (pip install 'qwen-trt[tensorrt]' on a machine with an NVIDIA GPU); "
                "--backend cuda runs the same kernels without it")
    return None


def choose_backend(requested: str, gguf_path=None) -> tuple[str, str]:
    """(backend, why) for --backend `requested`: auto takes tensorrt where it imports, a GPU is present and a plan
    exists, else cuda where a GPU is present, else cpu. An explicit backend that cannot run is a UserError, raised
    before any work."""
    if requested not in ("auto",) + BACKENDS:
        raise UserError(f"--backend {requested}: unknown; choose one of auto, {', '.join(BACKENDS)}")
    if requested != "auto":
        problem = backend_problem(requested)
        if problem:
            raise UserError(f"--backend {requested}: {problem}")
        return requested, "--backend " + requested
    problem = backend_problem("cuda")
    if problem:
        return "cpu", f"auto: {problem}"
    from . import cuda_runtime

    gpu = cuda_runtime.device_name()
    plan = existing_plan(gguf_path) if gguf_path is not None else None
    if plan and backend_problem("tensorrt") is None:
        return "tensorrt", f"auto: {gpu}, TensorRT and the plan {plan}"
    return "cuda", f"auto: {gpu}"


def available_backend(gguf_path=None) -> str:
    """The backend --backend auto runs here (choose_backend without the reason)."""
    return choose_backend("auto", gguf_path)[0]


class StopStrings:
    """Cuts streamed text at the first stop string: push(piece) returns the text that is safe to show (a tail that
    could still begin a stop string is held back) and whether a stop string was found."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if not self.stops:
            return piece
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _common_prefix(a: list[int], b: list[int], step: int = 256) -> int:
    """How many leading tokens a and b share. Compared a slice of `step` at a time (list equality runs in C), then
    token by token inside the first slice that differs: for a chat's next turn, whose prompt repeats a long cached
    one, 0.07 ms instead of 0.47 ms at 16k tokens on this CPU, and the engine compares a prompt with every free
    slot's tokens."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i:i + step] == b[i:i + step]:
        i += step
    for j in range(i, min(i + step, n)):
        if a[j] != b[j]:
            return j
    return n


class Decoder:
    """Tokenization, sampling, stop tokens and strings, context limits and timing, once for all backends.

    The decoder remembers which tokens its backend's KV cache holds (`cached_ids`); with reuse_prefix=True a new
    prompt that starts with them is prefilled from where they end (a chat's next turn re-reads nothing)."""

    def __init__(self, model, tokenizer, backend, max_context: int, backend_reason: str = ""):
        self.model, self.tokenizer, self.backend, self.max_context = model, tokenizer, backend, max_context
        self.backend_reason = backend_reason
        self.cached_ids: list[int] = []
        self.weights_upload = None  # open(backend="cuda"): the weights' copy under way, for start_backend

    @staticmethod
    def check_max_context(max_context, model_context: int) -> int:
        if max_context is None:
            return min(4096, model_context)
        if not 2 <= max_context <= model_context:
            raise UserError(f"--max-context {max_context}: must be between 2 and the model's context length "
                            f"{model_context}")
        return int(max_context)

    @classmethod
    def open(cls, model, max_context: int | None = None, progress=None, backend: str | None = None) -> "Decoder":
        """Read the GGUF and its tokenizer (fast): a decoder with no backend yet, which can already tokenize and
        check prompts. start_backend() then does the slow part. With backend "cuda" (already chosen), the weights'
        copy to the GPU starts first, on a thread (cuda_runtime.upload_weights): the driver runs it without the
        interpreter lock, beside the tokenizer and the step graphs. (Starting the whole cuda backend in a thread
        gained nothing on the H100: its graph building and per-tensor uploads contend with the tokenizer for the
        lock; device run 5 of 2026-12-05.)"""
        from .fetch import resolve_model
        from .gguf_model import GGUFModel, load_gguf
        from .progress import quiet
        from .tokenizer import Tokenizer

        progress = progress or quiet()
        if isinstance(model, GGUFModel):
            gm = model
        else:
            path = resolve_model(None if model is None else str(model))
            with progress.stage(f"reading {path.name}"):
                gm = load_gguf(path)
        dec = cls(gm, None, None, cls.check_max_context(max_context, gm.config.context_length))
        if backend == "cuda":
            from . import cuda_runtime

            dec.weights_upload = cuda_runtime.upload_weights(gm)
        with progress.stage("loading the tokenizer"):
            dec.tokenizer = Tokenizer.from_gguf(gm.reader)
        return dec

    def start_backend(self, backend: str = "auto", progress=None, why: str | None = None,
                      slots: int = 1, sampled=None, batch_size: int = BATCH_SIZE) -> "Decoder":
        """Build the backend (`auto` or a name; choose_backend's error if it cannot run here) with `slots` KV-cache
        slots (sequences at once, toolchain/engine.py). `why`: the reason of an earlier choose_backend call that
        already picked `backend`. `sampled`: the caller will sample with these passes of the device sampler (a
        sampling.Tail; cuda: that step is captured now, not at the second token). `batch_size`: the most tokens
        of one step on the cuda backend (llama.cpp's --batch-size): a prompt is prefilled in pieces of this size."""
        from .progress import quiet

        progress = progress or quiet()
        name, reason = (backend, why) if why else choose_backend(backend, self.model.path)
        if name == "cpu":
            self.backend = CpuBackend(self.model, self.max_context, progress=progress, n_slots=slots)
        elif name == "cuda":
            from .cuda_backend import CudaBackend

            self.backend = CudaBackend(self.model, self.max_context, n_slots=slots, progress=progress, prepare=True,
                                       prepare_sampled=sampled, max_tokens=batch_size,
                                       weights_upload=self.weights_upload)
            self.weights_upload = None
        else:
            from .trt.runtime import TensorRTBackend

            self.backend = TensorRTBackend(self.model, self.max_context, plan=existing_plan(self.model.path, slots),
                                           n_slots=slots)
        self.backend_reason = reason
        self.cached_ids = []
        return self

    @classmethod
    def load(cls, model, backend: str = "auto", max_context: int | None = None, progress=None) -> "Decoder":
        """open() then start_backend(): the whole load. An unknown or unavailable backend fails before the model
        is read."""
        why = choose_backend(backend)[1] if backend != "auto" else None  # auto needs the file (a plan beside it)
        return cls.open(model, max_context, progress, backend).start_backend(backend, progress, why)

    def generate_many(self, prompts, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                      chat: bool = False) -> list[Generation]:
        """Generate for many prompts at once (continuous batching over the backend's slots, toolchain/engine.py):
        one Generation per prompt, in order. Texts are cut at no stop string (use the engine for that)."""
        from .engine import Engine, Params

        ids = [self.encode_prompt(p, chat) for p in prompts]
        for i in ids:
            self.room(i)
        engine = Engine(self, slots=max(1, min(len(ids), getattr(self.backend, "n_slots", 1))))
        try:
            t0 = time.perf_counter()
            handles = engine.generate_many(ids, Params(max_tokens=max_new_tokens, sampling=sampling))
            elapsed = time.perf_counter() - t0
        finally:
            engine.close()
            self.cached_ids = []  # the engine used the cache's slots
        return [Generation(i, h.ids, self.tokenizer.decode(h.ids), h.stats.get("ttft_s") or 0.0,
                           h.stats.get("decode_s") or elapsed,
                           h.finish_reason or "error") for i, h in zip(ids, handles)]

    def room(self, ids) -> int:
        """New tokens that fit after a prompt of `ids` (every one but the last is fed back into the cache); a UserError
        when there is no room."""
        room = self.max_context - len(ids)
        if room < 1:
            raise UserError(f"the prompt has {len(ids)} tokens, which leaves no room in the context of "
                            f"{self.max_context}: shorten the prompt or raise --max-context (model maximum "
                            f"{self.model.config.context_length})")
        return room

    def encode_prompt(self, prompt, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a prompt: text (wrapped in the chat template with chat=True or a system message), a list of
        messages ({"role", "content"} dicts, always templated), or token ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            if chat or system is not None:
                msgs = ([{"role": "system", "content": system}] if system is not None else [])
                prompt = msgs + [{"role": "user", "content": prompt}]
            else:
                ids = self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt))
        elif not isinstance(prompt, str):
            ids = check_token_ids(list(prompt), self.model.config.vocab)
        if not ids:
            raise UserError("the prompt is empty: give at least one token of text")
        return ids

    def reset(self):
        """Forget what the KV cache holds (the next prompt is prefilled from position 0)."""
        self.cached_ids = []
        self.backend.reset()

    def stream(self, prompt, max_new_tokens: int = 64, sampling: Sampling = Sampling(), chat: bool = False,
               stats: dict | None = None, system: str | None = None, reuse_prefix: bool = False) -> Iterator[int]:
        """Yield the new token ids as they are produced (the last one may be a stop token). `stats` (if given)
        receives the prompt ids, timings, the seed and the finish reason ("stop", or "length": max_new_tokens or
        the context's end, stats["context_full"] then True). Generation stops at the end of the context rather than
        failing; only a prompt that leaves no room is an error."""
        ids = self.encode_prompt(prompt, chat, system)
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        n_new = min(max_new_tokens, self.room(ids))
        stats = {} if stats is None else stats
        seed = sampling.seed if sampling.seed is not None or sampling.greedy else int(np.random.SeedSequence().entropy % 2**63)
        stats.update(prompt_ids=ids, finish_reason="length", seed=seed, context_full=n_new < max_new_tokens,
                     decode_s=0.0)
        # prefix reuse: keep the cached tokens the prompt starts with; feed at least one token to get logits
        keep = min(_common_prefix(self.cached_ids, ids), len(ids) - 1) if reuse_prefix else 0
        stats["reused_tokens"] = keep
        self.cached_ids = []  # unknown until the prefill returns (an error mid-way leaves nothing trusted)
        self.backend.reset(keep)
        t0 = time.perf_counter()
        logits = self.backend.forward(ids[keep:])
        self.cached_ids = list(ids)
        # each draw's uniform comes from (seed, position of its logits): the same on every backend (sampling.py)
        tok = sample(logits, sampling, draw_rng(seed or 0, len(ids) - 1), ids)
        stats["prefill_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        if sampling.greedy and not sampling.penalized and hasattr(self.backend, "greedy"):
            rest = self.backend.greedy(tok, n_new - 1)  # device-side argmax, self-advancing CUDA graph
        elif hasattr(self.backend, "sampled"):  # device-side sampling in the same graph
            rest = self.backend.sampled(tok, n_new - 1, sampling, seed or 0, ids + [tok])
        else:
            rest = (None for _ in range(n_new - 1))
        try:
            for n in range(n_new):
                yield tok
                stats["decode_s"] = time.perf_counter() - t1
                if tok in self.tokenizer.stop_token_ids:
                    stats["finish_reason"] = "stop"
                    return
                if n + 1 == n_new:
                    return
                self.cached_ids.append(tok)  # the next step feeds it
                nxt = next(rest)
                if nxt is None:
                    logits = self.backend.forward([tok])
                    nxt = sample(logits, sampling, draw_rng(seed or 0, len(self.cached_ids) - 1), self.cached_ids)
                tok = nxt
        except GeneratorExit:  # closed at a yield: the cache holds exactly cached_ids
            raise
        except BaseException:  # e.g. Ctrl-C inside a step: the last token may or may not be in the cache
            self.cached_ids = self.cached_ids[:-1]
            raise
        finally:
            rest.close()

    def stream_text(self, prompt, max_new_tokens: int = 64, sampling: Sampling = Sampling(), chat: bool = False,
                    stats: dict | None = None, stop=(), system: str | None = None,
                    reuse_prefix: bool = False) -> Iterator[str]:
        """Yield the new text as it becomes complete (UTF-8 characters split across tokens are held back), cut before
        the first of the `stop` strings; stats["ids"] collects the new token ids (without a stop token)."""
        from .tokenizer import StreamDecoder

        stats = {} if stats is None else stats
        stats["ids"] = []
        sd, cut = StreamDecoder(self.tokenizer), StopStrings(stop)
        gen = self.stream(prompt, max_new_tokens, sampling, chat, stats, system, reuse_prefix)
        try:
            for t in gen:
                if t in self.tokenizer.stop_token_ids:
                    stats["finish_reason"] = "stop"
                    break
                stats["ids"].append(t)
                piece = cut.push(sd.push(t))
                if piece:
                    yield piece
                if cut.stopped:
                    stats["finish_reason"] = "stop"
                    return
            tail = cut.push(sd.flush())
            if cut.stopped:
                stats["finish_reason"] = "stop"
            tail += "" if cut.stopped else cut.flush()
            if tail:
                yield tail
        finally:
            gen.close()

    def generate(self, prompt, max_new_tokens: int = 64, sampling: Sampling = Sampling(), chat: bool = False,
                 stop=(), system: str | None = None) -> Generation:
        stats: dict = {}
        text = "".join(self.stream_text(prompt, max_new_tokens, sampling, chat, stats, stop, system))
        return Generation(stats["prompt_ids"], stats["ids"], text, stats["prefill_s"], stats["decode_s"],
                          stats["finish_reason"], {"seed": stats["seed"], "context_full": stats["context_full"]})
