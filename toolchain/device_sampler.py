"""Sampling on the GPU, inside the step (plugins/sampling.cu; the definition is toolchain/sampling.py's).

A DeviceSampler owns what the kernels read besides the logits: per slot, the parameter words and the penalty ring
(set when a request takes the slot), the list of the step's rows to sample, and the rows' log-probability records.
Its `launches` are inserted into a step's plan at the argmax — penalties before it, the draw in its place (the draw
takes the argmax itself), the log-probabilities after, each only where the step's Tail asks — so a captured decode
step samples every slot with its own settings, and the host reads back only token ids (and, when asked,
LOGPROB_WORDS words per row).
"""
from __future__ import annotations

import numpy as np

from . import cuda_runtime as cr
from .errors import UserError
from .kernels import LOGPROB_TOP, LOGPROB_WORDS, SAMPLE_MAX_VOCAB, launch_config
from .sampling import PARAM_WORDS, PENALTY_WINDOW, Sampling, Tail, device_params, history_window


def parse_logprobs(words: np.ndarray, token: int, top: int) -> dict:
    """One row's LOGPROB_WORDS int32 words (plugins/sampling.cu token_logprobs) as sampling.token_logprobs returns
    them: {"token", "logprob", "top": [(id, logprob), ...][:top]}."""
    w = np.asarray(words, np.int32)
    f = w.view(np.float32)
    k = min(int(w[1]), LOGPROB_TOP, top)
    return {"token": int(token), "logprob": float(f[0]),
            "top": [(int(w[2 + 2 * a]), float(f[3 + 2 * a])) for a in range(k)]}


class DeviceSampler:
    def __init__(self, vocab: int, n_slots: int, max_rows: int):
        if vocab > SAMPLE_MAX_VOCAB:
            raise UserError(f"a vocabulary of {vocab} tokens is beyond the device sampler's {SAMPLE_MAX_VOCAB}")
        self.vocab, self.n_slots = vocab, n_slots
        self.params = cr.DeviceBuffer.zeros((n_slots, PARAM_WORDS), np.int32)
        self.history = cr.DeviceBuffer.from_numpy(np.full((n_slots, PENALTY_WINDOW), -1, np.int32))
        self.rows = cr.DeviceBuffer.from_numpy(np.arange(max_rows, dtype=np.int32))  # identity: every row sampled
        self.logprobs = cr.DeviceBuffer.zeros((max_rows, LOGPROB_WORDS), np.int32)  # per sampled row (its index)
        self._rows_now = None
        self._kernels = {}

    def _kernel(self, op):
        if op not in self._kernels:
            self._kernels[op] = cr.load_op(op, {})
        return self._kernels[op]

    def set_slot(self, slot: int, sampling: Sampling, seed: int, tokens, position: int, stream=None):
        """The request in `slot` samples with `sampling` and `seed`; `tokens` is its sequence, known up to and
        including `position` (the penalty window's last entry)."""
        self.params.upload(device_params(sampling, seed), stream, offset=slot * PARAM_WORDS * 4)
        self.history.upload(history_window(tokens, position), stream, offset=slot * PENALTY_WINDOW * 4)

    def set_rows(self, rows, stream=None):
        """Sample only these rows of the next steps (default: all, the identity)."""
        rows = np.asarray(rows, np.int32)
        if self._rows_now is None or not np.array_equal(rows, self._rows_now):
            self.rows.upload(rows, stream)
            self._rows_now = rows

    def launches(self, n: int, logits: int, next_token: int, slots: int, positions: int, tail: Tail = Tail()):
        """(before, after): the (name, op, kernel, cfg, args) launches of `tail`'s passes for n rows of a step, to
        run before the argmax (the penalties) and after it (the draw, which replaces the argmax kernel: it writes
        every listed row's argmax or draw; then the log-probabilities), given the step's buffer addresses."""
        dims = {"m": n, "vocab": self.vocab}
        before, after = [], []
        if tail.penalties:
            cfg = launch_config("apply_penalties", dims)
            before.append(("penalties", "apply_penalties", self._kernel("apply_penalties"), cfg,
                           [self.rows.ptr, slots, self.params.ptr, self.history.ptr, *cfg.scalars, logits]))
        if tail.draw:
            cfg = launch_config("sample_tokens", dims)
            after.append(("sample", "sample_tokens", self._kernel("sample_tokens"), cfg,
                          [logits, self.rows.ptr, slots, positions, self.params.ptr, *cfg.scalars, next_token,
                           self.history.ptr]))
        if tail.logprobs:
            cfg = launch_config("token_logprobs", dims)
            after.append(("logprobs", "token_logprobs", self._kernel("token_logprobs"), cfg,
                          [logits, self.rows.ptr, *cfg.scalars, next_token, self.logprobs.ptr]))
        return before, after

    def read_logprobs(self, tokens, tops, stream=None) -> list[dict]:
        """The log-probability records of the last step's first len(tokens) sampled rows (their drawn tokens, and
        how many alternatives each asks for)."""
        words = self.logprobs.download(stream, rows=len(tokens))
        return [parse_logprobs(w, t, k) for w, t, k in zip(words, tokens, tops)]

    def free(self):
        for b in (self.params, self.history, self.rows, self.logprobs):
            b.free()
