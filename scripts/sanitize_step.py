"""A full decode step of the 1.5B layout (synthetic weights) for compute-sanitizer: prefill (m = 5, plain launches)
and three self-advancing CUDA-graph replays, fused and unfused graphs. Exits non-zero on any CUDA error."""
import sys
import tempfile
from pathlib import Path

import numpy as np

from toolchain.cuda_backend import CudaBackend, fused_available
from toolchain.gguf_model import load_gguf
from toolchain.synth import layout, write_synthetic_gguf

path = Path(tempfile.gettempdir()) / "qwen2.5-coder-1.5b-synthetic.gguf"
if not path.exists():
    cfg, types = layout("qwen2.5-coder-1.5b")
    write_synthetic_gguf(path, cfg, types, seed=1)
model = load_gguf(path)
for fused in ((True, False) if fused_available() else (False,)):
    be = CudaBackend(model, max_context=64, n_slots=2, max_tokens=8, fused=fused)
    logits = be.forward(np.arange(5) * 1000 + 7)
    toks = list(be.greedy(int(np.argmax(logits)), 3))
    assert np.isfinite(logits).all(), "non-finite logits"
    print(f"fused={fused}: step ok, tokens {toks}")
    be.close()
sys.exit(0)
