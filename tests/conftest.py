"""Shared fixtures: real models (when present), synthetic GGUFs of real layouts, and cached heavy objects."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from toolchain.fetch import MODELS, models_dir

REAL = {"1.5b": "qwen2.5-coder-1.5b", "0.5b": "qwen2.5-coder-0.5b"}


def real_path(key: str) -> Path:
    return models_dir() / MODELS[REAL[key]].filename


def default_sigint():
    """preexec_fn of a child a test interrupts: SIGINT back to its default before exec, so that Python installs its
    KeyboardInterrupt handler even where the test runner was started with SIGINT ignored (a background job of a
    shell without job control, as `cmd &` in a script)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def require_real(key: str) -> Path:
    p = real_path(key)
    if not p.is_file():
        pytest.skip(f"{p} is absent: run `make model` (qtrt fetch --all) to get the real GGUFs")
    return p


_cache: dict = {}


def cached(key, make):
    """Session-wide memo for expensive objects (a dequantized reference model takes seconds and gigabytes)."""
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


@pytest.fixture(scope="session")
def real_model():
    from toolchain.gguf_model import load_gguf

    return lambda key: cached(("gguf", key), lambda: load_gguf(require_real(key)))


@pytest.fixture(scope="session")
def real_reference(real_model):
    from toolchain.reference import ReferenceModel

    return lambda key: cached(("ref", key), lambda: ReferenceModel(real_model(key)))


@pytest.fixture(scope="session")
def synth_gguf(tmp_path_factory):
    """synth_gguf(layout, **overrides) -> path of a synthetic GGUF with that layout (cached per arguments)."""
    from toolchain.synth import layout, write_synthetic_gguf

    def make(name="qwen2.5-coder-1.5b", seed=0, **overrides):
        key = ("synth", name, seed, tuple(sorted(overrides.items())))

        def build():
            cfg, types = layout(name, **overrides)
            path = tmp_path_factory.mktemp("synth") / f"{name}-{abs(hash(key))}.gguf"
            return write_synthetic_gguf(path, cfg, types, seed=seed)
        return cached(key, build)
    return make


# The seed's test shapes: the 1.5B layer (hidden 1536, ffn 8960, q_dim 1536, kv_dim 256) with a small vocabulary.
SMALL_1_5B = dict(n_layers=2, vocab=4096)
TINY = dict(n_layers=2, hidden=256, ffn=512, n_heads=4, n_kv_heads=2, vocab=1024, context_length=512)


def xh_layout(y):
    """The prefill GEMMs' fp16 input as numpy makes it (plugins/xh_store.cuh, gemm_x_f16): per 16-element chunk the
    even elements, then the odd ones, rounded to nearest even. The GPU tests' independent reference for it."""
    import numpy as np

    ch = y.reshape(-1, 16)
    return np.concatenate([ch[:, 0::2], ch[:, 1::2]], 1).astype(np.float16).reshape(y.shape)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("QTRT_GPU_TESTS"):
        return
    for item in items:
        if "gpu" in item.keywords:
            try:
                from toolchain.cuda_runtime import gpu_available

                ok = gpu_available()
            except Exception:
                ok = False
            if not ok:
                item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with cuda-python (see scripts/device_check.sh)"))
            elif "real_model" not in item.keywords:
                from toolchain.kernels import nvcc_path

                if nvcc_path() is None:  # synthetic layouts have no prebuilt kernels (toolchain/prebuilt)
                    item.add_marker(pytest.mark.skip(reason="needs nvcc: its synthetic layouts' kernels are not prebuilt"))
