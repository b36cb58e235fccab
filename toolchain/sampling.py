"""What a sampled token is: the parameters (`Sampling`), their definition in numpy (`sample_reference`), the fast host
sampler (`sample`), the per-token random number, and the per-slot parameter words the device sampler reads
(plugins/sampling.cu: the same definition inside the captured step).

The chain, as HF transformers orders it (llama.cpp differs only in applying the temperature last):
penalties on the raw logits -> temperature -> top-k -> top-p (nucleus, over the top-k set's or the whole
vocabulary's mass) -> min-p (tokens whose probability is at least min_p times the most likely one's) -> one draw.
Penalties look at the last PENALTY_WINDOW tokens of the sequence, prompt included (llama.cpp's penalty_last_n = 64):
for each distinct token there with count c, a repetition penalty r divides a positive logit by r and multiplies a
negative one by r, then c * frequency + presence is subtracted (llama.cpp's formula, the OpenAI fields' meaning).

The random number of a draw depends only on the request's seed and the position of the logits it samples from:
u = Philox4x64-10(key = seed, counter = (position + 1, 0, 0, 0)), word 0 >> 11, times 2^-53 — exactly numpy's
`Generator(Philox(key=seed, counter=position)).random()`, so the host and the device draw from the same uniform,
whatever else runs in the batch and on whichever backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError

PENALTY_WINDOW = 64
PARAM_WORDS = 12  # int32 words per slot of the device parameter array (layout: device_params)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise UserError(f"--temperature {self.temperature}: must be a finite number >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: must be >= 0 (0 disables top-k)")
        if not (0 < self.top_p <= 1):
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]")
        if not (0 <= self.min_p <= 1):
            raise UserError(f"--min-p {self.min_p}: must be in [0, 1] (0 disables min-p)")
        if not (0 < self.repetition_penalty <= 10):
            raise UserError(f"--repeat-penalty {self.repetition_penalty}: must be in (0, 10] (1 disables it)")
        for name, v in (("presence", self.presence_penalty), ("frequency", self.frequency_penalty)):
            if not (-2 <= v <= 2):
                raise UserError(f"--{name}-penalty {v}: must be in [-2, 2] (0 disables it)")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            raise UserError(f"--seed {self.seed}: must be an integer in [0, 2^64)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def uniform(seed: int, position: int) -> float:
    """The draw's uniform in [0, 1) for the logits at `position` of a request with `seed` (module docstring)."""
    return float(draw_rng(seed, position).random())


def draw_rng(seed: int, position: int) -> np.random.Generator:
    """A generator whose first random() is uniform(seed, position): what the samplers below take."""
    return np.random.Generator(np.random.Philox(key=int(seed), counter=int(position)))


def apply_penalties(logits: np.ndarray, history, s: Sampling) -> np.ndarray:
    """The logits after the penalties for the last PENALTY_WINDOW tokens of `history` (a copy; the same array when
    no penalty is set)."""
    if not s.penalized or not len(history):
        return logits
    out = np.array(logits, np.float32)
    toks, counts = np.unique(np.asarray(list(history)[-PENALTY_WINDOW:], np.int64), return_counts=True)
    ok = (toks >= 0) & (toks < len(out))
    toks, counts = toks[ok], counts[ok]
    z = out[toks]
    if s.repetition_penalty != 1:
        r = np.float32(s.repetition_penalty)
        z = np.where(z > 0, z / r, z * r)
    out[toks] = (z - (counts.astype(np.float32) * np.float32(s.frequency_penalty) + np.float32(s.presence_penalty))
                 ).astype(np.float32)
    return out


def kept_tokens(logits: np.ndarray, s: Sampling, history=()) -> tuple[np.ndarray, np.ndarray]:
    """The definition's kept set of a sampled (temperature > 0) draw: token ids in draw order (descending logit, ties
    by id) and their probabilities, with a full sort of the vocabulary."""
    logits = apply_penalties(logits, history, s)
    z = logits.astype(np.float64) / s.temperature
    order = np.argsort(-z, kind="stable")
    if s.top_k:
        order = order[: s.top_k]
    p = np.exp(z[order] - z[order[0]])
    x = p.copy()  # probability relative to the most likely token (min-p)
    p /= p.sum()
    keep = len(order)
    if s.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), s.top_p) + 1)
    if s.min_p > 0:
        keep = min(keep, max(1, int(np.count_nonzero(x >= s.min_p))))
    return order[:keep], p[:keep] / p[:keep].sum()


def sample_reference(logits: np.ndarray, s: Sampling, rng: np.random.Generator, history=()) -> int:
    """The definition (module docstring), with a full sort of the vocabulary (~18 ms for Qwen's 151,936 tokens on 2
    cores): `sample` and the device sampler are tested against it."""
    if s.greedy:
        return int(np.argmax(apply_penalties(logits, history, s)))
    order, p = kept_tokens(logits, s, history)
    return int(order[rng.choice(len(order), p=p)])


SAMPLE_CANDIDATES = 1024  # the most likely tokens sorted on the fast path; the rest only when they matter


def _draw(p: np.ndarray, u: float) -> int:
    """Index drawn from weights p by the uniform u, as numpy's Generator.choice(len(p), p=p) does (cdf, searchsorted
    right)."""
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return int(np.searchsorted(cdf, u, side="right"))


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator, history=()) -> int:
    """sample_reference without sorting the vocabulary: only the SAMPLE_CANDIDATES most likely tokens (or top-k) are
    sorted (argpartition, O(vocab)), and the rest is needed only when the kept set or the drawn uniform reaches past
    them, which falls back to the full sort. Same order (ties by token id), same single uniform per draw as
    Generator.choice: the same token as the reference except where float sums in another order move a boundary."""
    logits = apply_penalties(logits, history, s)
    if s.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    vocab = len(z)
    c = min(vocab, s.top_k or SAMPLE_CANDIDATES)
    if c < vocab:
        part = np.argpartition(-z, c - 1)[:c]
        part = np.union1d(part, np.flatnonzero(z == z[part].min()))  # ties at the cut: the stable sort's first ones
    else:
        part = np.arange(vocab)
    cand = part[np.lexsort((part, -z[part]))][: s.top_k or None]  # descending z, ties by id
    zmax = z[cand[0]]
    p = np.exp(z[cand] - zmax)
    whole = bool(s.top_k) or len(cand) == vocab  # the candidates are everything that can be drawn
    n_min = int(np.count_nonzero(z >= zmax + np.log(s.min_p))) if s.min_p > 0 else vocab  # min-p keeps a prefix
    if n_min > len(cand) and not whole and s.min_p > 0:
        return sample_reference(logits, s, rng)  # min-p keeps more than the candidates
    keep = min(len(cand), n_min)
    p /= p.sum() if whole else np.exp(z - zmax).sum()
    if s.top_p < 1:
        cums = np.cumsum(p)
        if cums[-1] < s.top_p and not whole and n_min > len(cand):
            return sample_reference(logits, s, rng)  # the nucleus is wider than the candidates
        keep = min(keep, int(np.searchsorted(cums, s.top_p) + 1))
    if s.top_p < 1 or s.min_p > 0:
        return int(cand[_draw(p[:keep] / p[:keep].sum(), rng.random())])
    u = rng.random()
    if whole:
        return int(cand[_draw(p, u)])
    cdf = np.cumsum(p)  # over the whole vocabulary's mass
    if u < cdf[-1] * (1 - 1e-12):  # the draw lands among the candidates
        return int(cand[np.searchsorted(cdf, u, side="right")])
    order = np.argsort(-z, kind="stable")  # the tail matters: the whole sorted vocabulary, the same uniform
    return int(order[_draw(np.exp(z[order] - zmax), u)])


def device_params(s: Sampling, seed: int) -> np.ndarray:
    """The PARAM_WORDS int32 words of one slot for plugins/sampling.cu: temperature, top_k, top_p, min_p, repetition,
    presence, frequency (float32 bits where a float), a flags word (bit 0: a penalty is set), the seed's low and high
    32 bits, two unused."""
    w = np.zeros(PARAM_WORDS, np.int32)
    f = np.array([s.temperature, 0, s.top_p, s.min_p, s.repetition_penalty, s.presence_penalty, s.frequency_penalty],
                 np.float32).view(np.int32)
    w[:7] = f
    w[1] = min(int(s.top_k), 2**31 - 1)  # beyond any vocabulary: the same as no cut
    w[7] = int(s.penalized)
    seed = int(seed) % 2**64
    w[8:10] = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32).view(np.int32)
    return w


def history_window(tokens, position: int) -> np.ndarray:
    """The device's penalty ring of a slot whose sequence is `tokens` up to and including `position`: entry
    (p % PENALTY_WINDOW) holds the token at position p for the last PENALTY_WINDOW positions, -1 where none."""
    ring = np.full(PENALTY_WINDOW, -1, np.int32)
    for p in range(max(0, position - PENALTY_WINDOW + 1), position + 1):
        ring[p % PENALTY_WINDOW] = tokens[p]
    return ring


MAX_LOGPROBS = 20  # alternatives per token, OpenAI's top_logprobs limit


@dataclass(frozen=True)
class Tail:
    """Which of the sampler's passes a step runs: the penalties (before the argmax; they need the draw pass, which
    keeps the penalty rings), the draw (greedy rows keep the argmax), the log-probabilities. A step with none of
    them is the plain argmax step. One captured graph per (step, Tail): a batch without penalties does not pay for
    their pass, one without logprobs not for theirs."""
    penalties: bool = True
    draw: bool = True
    logprobs: bool = False

    @classmethod
    def of(cls, rows) -> "Tail | None":
        """The Tail a step of requests needs, from (Sampling, wants logprobs) per row; None: the argmax alone."""
        rows = list(rows)
        penalties = any(s.penalized for s, _ in rows)
        draw = penalties or any(not s.greedy for s, _ in rows)
        logprobs = any(lp for _, lp in rows)
        return cls(penalties, draw, logprobs) if draw or logprobs else None


def token_logprobs(logits: np.ndarray, token: int, top: int = 0) -> dict:
    """Log-probabilities a request asked for, of the distribution the draw starts from: the model's softmax after
    the penalties, before temperature and the cuts (so they do not depend on the sampling settings). Returns
    {"token": id, "logprob": float, "top": [(id, logprob), ...]} with the `top` most likely tokens, most likely
    first (ties by id)."""
    z = np.asarray(logits, np.float64)
    zmax = z.max()
    lse = zmax + np.log(np.exp(z - zmax).sum())
    out = {"token": int(token), "logprob": float(z[token] - lse), "top": []}
    if top:
        part = np.argpartition(-z, top - 1)[:top]
        part = part[np.lexsort((part, -z[part]))]
        out["top"] = [(int(i), float(z[i] - lse)) for i in part]
    return out
