"""The cpu backend's quantized weights (toolchain/cpu_kernels.c): dequantization bit for bit equal to the numpy
dequantizers (themselves bit-equal to gguf-py), matmuls against float64 on fresh random inputs for every format and
both paths (fused few-token kernel, per-matrix decode + BLAS), the whole model against the dense float32 reference,
and the memory it saves, measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, require_real
from toolchain import cpu_kernels as C
from toolchain.gguf_model import Tensor
from toolchain.quants import dequantize, quantize

pytestmark = pytest.mark.skipif(not C.available(), reason="no C compiler to build toolchain/cpu_kernels.c")


def _random_tensor(ggml_type, n, k, rng):
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 1.0, (n, 1)).astype(np.float32)
    raw = quantize(w, ggml_type).reshape(-1).view(np.uint8)
    return Tensor("w", ggml_type, (n, k), raw)


@pytest.mark.parametrize("ggml_type", sorted(C.TYPES))
@pytest.mark.parametrize("m", [1, 3, 8, 9, 40])
def test_matmul_and_dequantize_every_format(ggml_type, m):
    rng = np.random.default_rng()
    t = _random_tensor(ggml_type, 97, 512, rng)
    ref = dequantize(t.data, ggml_type, t.shape)
    assert np.array_equal(C.dequantize(t).view(np.uint32), ref.view(np.uint32))
    x = rng.standard_normal((m, 512)).astype(np.float32)
    y = C.matmul(x, t)
    want = x.astype(np.float64) @ ref.astype(np.float64).T
    assert not np.isnan(y).any() and y.shape == (m, 97)
    assert np.linalg.norm(y - want) / np.linalg.norm(want) < 1e-5


def test_real_tensors_dequantize_bit_for_bit(real_model):
    m = real_model("0.5b")
    for t in m.tensors.values():
        if t.ggml_type in C.TYPES and len(t.shape) == 2 and t.shape[0] <= 8960:
            assert np.array_equal(C.dequantize(t).view(np.uint32),
                                  dequantize(t.data, t.ggml_type, t.shape).view(np.uint32)), t.name


def test_quantized_model_equals_the_dense_reference(synth_gguf):
    from toolchain.gguf_model import load_gguf
    from toolchain.reference import ReferenceModel

    model = load_gguf(synth_gguf(**TINY))
    dense, quant = ReferenceModel(model, weights="dense"), ReferenceModel(model, weights="quantized")
    ids = list(np.random.default_rng().integers(0, TINY["vocab"], 20))
    cd, cq = dense.new_cache(64), quant.new_cache(64)
    a, b = dense.forward(ids, 0, cd), quant.forward(ids, 0, cq)
    for i in range(12):  # greedy steps on each model's own tokens
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5
        ta, tb = int(np.argmax(a[-1])), int(np.argmax(b[-1]))
        assert ta == tb
        a, b = dense.forward([ta], 20 + i, cd), quant.forward([tb], 20 + i, cq)


@pytest.mark.real_model
@pytest.mark.slow
def test_cpu_backend_peak_memory_of_the_1_5b():
    """`qtrt generate --backend cpu` with the real 1.5B: peak resident memory under 4 GB (it was 8.1 GB with
    float32 weights), and the same greedy tokens as the dense reference."""
    path = require_real("1.5b")
    args = [sys.executable, "-m", "toolchain.cli", "generate", "--model", str(path), "--backend", "cpu",
            "--prompt", "def quicksort(arr):", "--max-new-tokens", "6", "--json", "--quiet"]
    # a fresh parent whose only child is the command: its RUSAGE_CHILDREN peak is that command's
    probe = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True,"
             " check=True); print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.stdout]))")
    peak_kb, out = json.loads(subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                                             check=True).stdout)
    assert 100_000 < peak_kb < 4 * 2**20, f"peak {peak_kb / 2**20:.2f} GB"
    quant = json.loads(out)
    dense = json.loads(subprocess.run(args, capture_output=True, text=True, check=True,
                                      env={**os.environ, "QTRT_CPU_WEIGHTS": "dense"}).stdout)
    assert quant["ids"] == dense["ids"]
