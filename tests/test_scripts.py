"""CPU tests of the performance scripts' own logic (their GPU work runs on the device only)."""
import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toolchain import kernels as K

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw_csv(path, kernels):
    """An `ncu --csv --page raw` file: header row, units row, one row per kernel."""
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    cols = ["ID", "Kernel Name", "Block Size", "Grid Size", "gpu__time_duration.sum", "launch__registers_per_thread",
            stall.format("long_scoreboard"), stall.format("barrier")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(cols)
        w.writerow(["", "", "", "", "ns", "register/thread", "", ""])
        for i, k in enumerate(kernels):
            w.writerow([i, k["name"], k["block"], "(132, 1, 1)", f"{k['ns']:,}", k["regs"], k["long"], k["barrier"]])


def test_ncu_summary_means_and_labels(tmp_path):
    rng = np.random.default_rng()
    down = [dict(name="matmul_add", block="(576, 1, 1)", ns=int(rng.integers(5000, 20000)), regs=96,
                 long=float(rng.uniform(1, 6)), barrier=float(rng.uniform(0, 1))) for _ in range(3)]
    o = [dict(name="matmul_add", block="(256, 1, 1)", ns=int(rng.integers(2000, 8000)), regs=101, long=0.5,
              barrier=2.0)]
    path = tmp_path / "raw.csv"
    _raw_csv(path, [down[0], o[0], down[1], down[2]])
    ns = _load("ncu_summary")
    ks = ns.read(str(path))
    assert [ns.label(k) for k in ks] == ["matmul_add (ffn_down)", "matmul_add (o_proj)", *["matmul_add (ffn_down)"] * 2]
    line = ns.line("down", [k for k in ks if ns.label(k).endswith("(ffn_down)")])
    assert f"{np.mean([d['ns'] for d in down]) / 1e3:7.2f} us" in line
    assert line.index("long_scoreboard") < line.index("barrier")  # largest stall first (long > 1 > barrier)
    assert f"long_scoreboard {np.mean([d['long'] for d in down]):.2f}" in line


def test_ncu_summary_bad_input_one_line_exit_2(tmp_path):
    bad = tmp_path / "not_ncu.csv"
    bad.write_text("hello\n")
    for path in (bad, tmp_path / "missing.csv"):
        r = subprocess.run([sys.executable, str(SCRIPTS / "ncu_summary.py"), str(path)], capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "", r
        assert len(r.stderr.strip().splitlines()) == 1 and str(path) in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"])
def test_boundary_bench_step_sizes_are_the_tensors_bytes(synth_gguf, name):
    """scripts/boundary_bench.py's step shape (issue 17's study): the bytes each kernel of the fused decode step reads,
    against the tensors a synthetic GGUF of the layout holds (toolchain.synth writes them, gguf_model reads back)."""
    from toolchain.gguf_model import load_gguf

    bb = _load("boundary_bench")
    model = load_gguf(synth_gguf(name, n_layers=3, vocab=1024))
    ctx = 200
    sizes = bb.step_sizes(name, ctx, n_layers=3, vocab=1024)
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
    merged = bb.step_sizes(name, ctx, hops=3, n_layers=3, vocab=1024)
    assert len(merged) == 3 * c.n_layers + 1 and sum(merged) == sum(want)
    assert merged[:3] == [sum(want[:3]), want[3], want[4]]
    # the blocks that stream each of those phases (--merged-blocks): the merged ones only, never the lm_head
    assert bb.merged_streamers(len(merged), 16) == [16, 0, 0] * c.n_layers + [0]


@pytest.mark.parametrize("seed", range(6))
def test_boundary_bench_prefetch_plan_slides_a_window_over_the_bytes(seed):
    """prefetch_plan (the pdl_prefetch variants): on fresh random phases laid out as the script lays them (256-aligned,
    wrapping inside the buffer), byte by byte against its definition: phase p asks for exactly the bytes of later
    phases from max(what earlier phases asked, its own end) to its end + window, each at its physical address."""
    bb = _load("boundary_bench")
    rng = np.random.default_rng([seed, 17])
    n = int(rng.integers(2, 40))
    sizes = [int(v) for v in rng.integers(1, 4000, n)]
    buf = int(rng.integers(max(sizes) + 256, sum(sizes) + 512 * n))
    offs, o = [], 0
    for s in sizes:
        if o + s > buf:
            o = 0
        offs.append(o)
        o += (s + 255) // 256 * 256
    window = int(rng.integers(1, 3 * max(sizes)))
    at = None if seed % 2 else set(rng.choice(n, int(rng.integers(1, n + 1)), replace=False).tolist())
    plan = bb.prefetch_plan(offs, sizes, window, at)
    ends = np.cumsum(sizes)
    where = np.concatenate([offs[q] + np.arange(sizes[q]) for q in range(n)])  # logical byte -> physical address
    asked = np.zeros(ends[-1], bool)
    for p in range(n):
        if at is not None and p not in at:  # a phase not asking: nothing, and the window does not move
            assert plan[p] == [], p
            continue
        want = np.zeros(ends[-1], bool)
        want[max(ends[p], asked.nonzero()[0].max() + 1 if asked.any() else 0):min(ends[p] + window, ends[-1])] = True
        want &= ~asked
        got = np.zeros(buf + 16, bool)
        for off, nb in plan[p]:
            assert off % 16 == 0 and nb % 16 == 0 and nb > 0
            got[off:off + nb] = True
        assert got[where[want]].all(), p  # every byte it should ask for
        pad = np.zeros(buf + 16, bool)  # the phases' alignment gaps: a piece may run across them
        for q in range(n):
            pad[offs[q] + sizes[q]:offs[q] + (sizes[q] + 255) // 256 * 256] = True
        later = np.zeros(buf + 16, bool)  # where the buffer wraps, later phases reuse earlier ones' addresses
        later[where[ends[p]:]] = True
        slack = 32 * len(plan[p])  # each piece widened to 16-byte boundaries
        stray = got.copy()
        stray[where[want]] = False
        assert (stray & ~pad).sum() <= slack, p  # nothing else
        own = np.zeros(buf + 16, bool)
        own[where[:ends[p]]] = True  # its own bytes and earlier phases', never asked for
        if asked.any():
            own[where[asked]] = True  # nor what earlier phases asked
        assert (got & own & ~later & ~pad).sum() <= slack, p
        asked |= want
    if at is None:
        assert asked[ends[0]:].all() == (window >= max(sizes[1:], default=0))  # a window below a phase leaves it bytes


@pytest.mark.skipif(K.nvcc_path() is None, reason="nvcc not found")
def test_boundary_bench_kernels_compile(tmp_path):
    """Its CUDA source builds for sm_90 with every kernel the script launches (the timings are device runs)."""
    out = tmp_path / "bb.cubin"
    res = subprocess.run([K.nvcc_path(), "-cubin", "-arch=sm_90", "-O3", "-std=c++17",
                          str(SCRIPTS / "boundary_bench.cu"), "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    image = out.read_bytes()
    for name in ("phase", "persistent", "stream_persistent", "phase_ll", "stream_ll", "prefetch_node"):
        assert name.encode() + b"\0" in image, name


@pytest.mark.parametrize("script", ["boundary_bench", "gemm_threshold", "engine_steps_ab"])
def test_gpu_scripts_without_a_gpu_say_so_in_one_line(script, tmp_path):
    """The device scripts, where no GPU can run them: one line naming the reason, a non-zero exit, nothing written
    (before any synthetic model is made)."""
    from toolchain.cuda_runtime import gpu_available

    if gpu_available():
        pytest.skip("a GPU is here: the script would run")
    out = tmp_path / "out.json"
    args = [str(out)] if script == "gemm_threshold" else []
    res = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), *args], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith(f"{script}: needs an NVIDIA GPU"), res.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("script, args, names", [
    ("gemm_threshold", ["--thresholds", "33,x"], "--thresholds"), ("gemm_threshold", ["--depths", "0,-5"], "--depths"),
    ("gemm_threshold", ["--batched", "128:0"], "--batched"), ("boundary_bench", ["--mb", "7,y"], "--mb"),
    ("boundary_bench", ["--step", "qwen9"], "--step"),
    ("boundary_bench", ["--merged-blocks", "16,-1"], "--merged-blocks"),
    ("boundary_bench", ["--prefetch-mb", "8,x"], "--prefetch-mb"),
    ("engine_steps_ab", ["--variants", "packed,nope"], "--variants"), ("engine_steps_ab", ["--rounds", "0"], "--rounds")])
def test_gpu_scripts_refuse_bad_sizes_in_one_line(script, args, names, tmp_path):
    """A mistyped size: one line naming the option, exit 2, before any GPU work (so on any machine), nothing written."""
    out = tmp_path / "out.json"
    lead = [str(out)] if script == "gemm_threshold" else []
    res = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), *lead, *args], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith(f"{script}: ") and names in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())
