"""Sampling on the GPU, inside the step (plugins/sampling.cu; the definition is toolchain/sampling.py's).

A DeviceSampler owns what the kernels read besides the logits: per slot, the parameter words and the penalty ring
(set when a request takes the slot), and the list of the step's rows to sample. Its `launches` are appended to a
step's plan around the argmax — penalties before it, the draw after it — so a captured decode step samples every
slot with its own settings, and the host reads back only token ids.
"""
from __future__ import annotations

import numpy as np

from . import cuda_runtime as cr
from .errors import UserError
from .kernels import SAMPLE_MAX_VOCAB, launch_config
from .sampling import PARAM_WORDS, PENALTY_WINDOW, Sampling, device_params, history_window


class DeviceSampler:
    def __init__(self, vocab: int, n_slots: int, max_rows: int):
        if vocab > SAMPLE_MAX_VOCAB:
            raise UserError(f"a vocabulary of {vocab} tokens is beyond the device sampler's {SAMPLE_MAX_VOCAB}")
        self.vocab, self.n_slots = vocab, n_slots
        self.params = cr.DeviceBuffer.zeros((n_slots, PARAM_WORDS), np.int32)
        self.history = cr.DeviceBuffer.from_numpy(np.full((n_slots, PENALTY_WINDOW), -1, np.int32))
        self.rows = cr.DeviceBuffer.from_numpy(np.arange(max_rows, dtype=np.int32))  # identity: every row sampled
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

    def launches(self, n: int, logits: int, next_token: int, slots: int, positions: int):
        """(name, op, kernel, cfg, args) of the penalty pass (before the argmax) and the draw (after it) for n rows
        of a step, given the step's buffer addresses."""
        dims = {"m": n, "vocab": self.vocab}
        pen, draw = launch_config("apply_penalties", dims), launch_config("sample_tokens", dims)
        return (("penalties", "apply_penalties", self._kernel("apply_penalties"), pen,
                 [self.rows.ptr, slots, self.params.ptr, self.history.ptr, *pen.scalars, logits]),
                ("sample", "sample_tokens", self._kernel("sample_tokens"), draw,
                 [logits, self.rows.ptr, slots, positions, self.params.ptr, *draw.scalars, next_token,
                  self.history.ptr]))

    def free(self):
        for b in (self.params, self.history, self.rows):
            b.free()
