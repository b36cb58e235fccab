"""scripts/boundary_bench.py (the kernel-boundary study of issue 17, run on the GPU): its step shape is the bytes
each kernel of the fused decode step reads, checked here against the tensors a synthetic GGUF of the layout holds
(written by toolchain.synth, read back by gguf_model), and its CUDA source compiles for sm_90 with every kernel the
script launches. CPU only; the timings themselves are device runs (docs/perf-notes.md "Persistent decode")."""
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain import kernels as K
from toolchain.gguf_model import load_gguf

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import boundary_bench  # noqa: E402


@pytest.mark.parametrize("name", ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"])
def test_step_sizes_are_the_tensors_bytes(synth_gguf, name):
    model = load_gguf(synth_gguf(name, n_layers=3, vocab=1024))
    ctx = 200
    sizes = boundary_bench.step_sizes(name, ctx, n_layers=3, vocab=1024)
    t = {n: x.data.nbytes for n, x in model.tensors.items()}
    c = model.config
    want = []
    for i in range(c.n_layers):
        p = f"blk.{i}."
        want += [t[p + "attn_q.weight"] + t[p + "attn_k.weight"] + t[p + "attn_v.weight"],
                 2 * c.n_kv_heads * c.head_dim * ctx * 2,
                 t[p + "attn_output.weight"],
                 t[p + "ffn_gate.weight"] + t[p + "ffn_up.weight"],
                 t[p + "ffn_down.weight"]]
    want.append(t.get("output.weight", t["token_embd.weight"]))
    assert sizes == want
    # three hops a layer: QKV, attention and o merged into one phase, the same bytes
    merged = boundary_bench.step_sizes(name, ctx, hops=3, n_layers=3, vocab=1024)
    assert len(merged) == 3 * c.n_layers + 1 and sum(merged) == sum(want)
    assert merged[:3] == [sum(want[:3]), want[3], want[4]]


@pytest.mark.skipif(K.nvcc_path() is None, reason="nvcc not found")
def test_boundary_kernels_compile(tmp_path):
    out = tmp_path / "bb.cubin"
    res = subprocess.run([K.nvcc_path(), "-cubin", "-arch=sm_90", "-O3", "-std=c++17",
                          str(SCRIPTS / "boundary_bench.cu"), "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    image = out.read_bytes()
    for name in ("phase", "persistent", "stream_persistent", "phase_ll", "stream_ll"):
        assert name.encode() + b"\0" in image, name
