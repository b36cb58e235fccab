"""cuda_runtime.upload_many (weights through two pinned staging buffers) against the plain per-array upload: fresh
random arrays of many sizes and dtypes, some larger than a staging buffer, some filling one exactly, each downloaded
again and compared byte for byte. Skips without a GPU."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["pinned", "pageable"])
def test_upload_many_round_trips(monkeypatch, mode):
    from toolchain import cuda_runtime as cr

    if mode == "pageable":
        monkeypatch.setenv("QTRT_UPLOAD", "pageable")
    rng = np.random.default_rng()
    staging = 1 << 16
    sizes = [1, 7, 4096, staging, staging - 3, 3 * staging + 5, 100, staging // 2, staging // 2 + 1, 12345]
    arrays = {}
    for i, n in enumerate(sizes):
        dtype = [np.uint8, np.float32, np.float16, np.int32][i % 4]
        arrays[f"t{i}"] = (rng.integers(0, 255, n * np.dtype(dtype).itemsize, dtype=np.uint8)).view(dtype)
    stream = cr.Stream()
    out = cr.upload_many(arrays.items(), stream, staging=staging)
    assert list(out) == list(arrays)
    for name, a in arrays.items():
        got = out[name].download()
        assert got.dtype == a.dtype and got.shape == a.shape
        assert got.tobytes() == a.tobytes(), name
        out[name].free()
