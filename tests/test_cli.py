"""User-facing behaviour: every user mistake is one line on stderr and exit 2; the happy paths print what they say."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY
from toolchain.decoder import Sampling, sample
from toolchain.errors import UserError


def qtrt(*args, check_rc=None):
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", *map(str, args)], capture_output=True, text=True)
    if check_rc is not None:
        assert r.returncode == check_rc, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return r


def assert_user_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qtrt: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def tiny(synth_gguf):
    return synth_gguf(**TINY)


def test_truncated_gguf(tiny, tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    assert_user_error(qtrt("info", bad), str(bad))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, this is not a model\n" * 10)
    assert_user_error(qtrt("info", bad), str(bad))


def _write(path, arch="qwen2", tensors=()):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_head_count(4)
    for name, data, t in tensors:
        w.add_tensor(name, data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_wrong_architecture(tmp_path):
    p = _write(tmp_path / "llama.gguf", arch="llama")
    assert_user_error(qtrt("info", p), "llama", "not supported")


def test_unsupported_tensor_type(tmp_path):
    import gguf

    p = _write(tmp_path / "q4_0.gguf", tensors=[("token_embd.weight", np.zeros((4, 8 * 18), np.uint8),
                                                  gguf.GGMLQuantizationType.Q4_0)])
    assert_user_error(qtrt("info", p), "Q4_0", "not supported")


def test_missing_tensor(tmp_path):
    from toolchain.synth import layout, write_synthetic_gguf

    cfg, types = layout("qwen2.5-coder-1.5b", **TINY)
    p = write_synthetic_gguf(tmp_path / "missing.gguf", cfg, types, skip=("blk.1.ffn_up.weight",))
    assert_user_error(qtrt("info", p), "blk.1.ffn_up.weight", "missing")


def test_missing_file(tmp_path):
    assert_user_error(qtrt("info", tmp_path / "nope.gguf"), "nope.gguf")
    assert_user_error(qtrt("generate", "--model", tmp_path / "nope.gguf", "--prompt", "x"), "nope.gguf")


def test_prompt_longer_than_context(tiny):
    r = qtrt("generate", "--model", tiny, "--backend", "cpu", "--max-context", 16, "--prompt", "abc " * 40)
    assert_user_error(r, "context")


@pytest.mark.parametrize("args,word", [(("--temperature", "-1"), "--temperature"), (("--top-p", "0"), "--top-p"),
                                       (("--top-k", "-2"), "--top-k"), (("--max-new-tokens", "0"), "--max-new-tokens"),
                                       (("--backend", "quantum"), "--backend"), (("--temperature", "nan"), "--temperature")])
def test_impossible_sampling(tiny, args, word):
    assert_user_error(qtrt("generate", "--model", tiny, "--backend", "cpu", "--prompt", "hi", *args), word)


def test_bad_arguments():
    assert_user_error(qtrt("generate"), "--prompt")
    assert_user_error(qtrt("fetch", "no-such-model"), "no-such-model")


def test_info_and_generate_json(tiny):
    r = qtrt("info", tiny, "--json", check_rc=0)
    info = json.loads(r.stdout)
    assert info["config"]["hidden"] == TINY["hidden"] and info["tensors_by_type"]
    r = qtrt("generate", "--model", tiny, "--backend", "cpu", "--prompt", "hello world", "--max-new-tokens", 5,
             "--json", check_rc=0)
    out = json.loads(r.stdout)
    assert out["backend"] == "cpu" and 1 <= len(out["ids"]) <= 5 and out["prompt_ids"]
    # greedy through the CLI equals greedy straight from the reference decoder
    from toolchain.gguf_model import load_gguf
    from toolchain.reference import ReferenceModel

    ref = ReferenceModel(load_gguf(tiny))
    cache = ref.new_cache(64)
    want = [int(np.argmax(ref.forward(out["prompt_ids"], 0, cache)[-1]))]
    for i in range(len(out["ids"]) - 1):
        want.append(int(np.argmax(ref.forward([want[-1]], len(out["prompt_ids"]) + i, cache)[-1])))
    assert out["ids"] == want


def test_sampling_rules():
    rng = np.random.default_rng()
    logits = rng.standard_normal(1000).astype(np.float32)
    best = int(np.argmax(logits))
    assert sample(logits, Sampling(), rng) == best
    assert sample(logits, Sampling(temperature=1.0, top_k=1), rng) == best
    assert sample(logits, Sampling(temperature=5.0, top_p=1e-6), rng) == best
    seed = int(rng.integers(1 << 30))
    a = [sample(logits, Sampling(temperature=1.0, seed=seed), np.random.default_rng(seed)) for _ in range(5)]
    b = [sample(logits, Sampling(temperature=1.0, seed=seed), np.random.default_rng(seed)) for _ in range(5)]
    assert a == b
    top5 = set(np.argsort(-logits)[:5].tolist())
    draws = {sample(logits, Sampling(temperature=2.0, top_k=5), rng) for _ in range(200)}
    assert draws <= top5 and len(draws) > 1
    with pytest.raises(UserError):
        Sampling(top_p=1.5)


def test_backend_choice_without_gpu(tmp_path, monkeypatch):
    """No GPU here: auto picks the CPU reference; a plan beside the GGUF (or $QTRT_PLAN) is what TensorRT would use."""
    from toolchain.decoder import available_backend, existing_plan

    monkeypatch.delenv("QTRT_PLAN", raising=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert existing_plan(gguf) is None
    (tmp_path / "m.trt").mkdir()
    (tmp_path / "m.trt" / "model-ctx4096.plan").write_bytes(b"")
    assert existing_plan(gguf) == str(tmp_path / "m.trt" / "model-ctx4096.plan")
    monkeypatch.setenv("QTRT_PLAN", "/x.plan")
    assert existing_plan(gguf) == "/x.plan"
    try:
        from toolchain.cuda_runtime import gpu_available

        has_gpu = gpu_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        assert available_backend(gguf) == "cpu"


FAKE_LLAMA_BENCH = """#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
assert args[args.index("-o") + 1] == "json"
if "{fail}" == "1":
    print("ggml_cuda_init: no CUDA devices", file=sys.stderr)
    sys.exit(3)
rows = [dict(n_prompt=int(p), n_gen=0, n_depth=0, avg_ts=26000.5 + int(p)) for p in args[args.index("-p") + 1].split(",")]
rows += [dict(n_prompt=0, n_gen=128, n_depth=0, avg_ts=553.25)]
rows += [dict(n_prompt=0, n_gen=128, n_depth=int(d), avg_ts=496.0) for d in args[args.index("-d") + 1].split(",") if d != "0"]
print(json.dumps(rows) if "{garbage}" != "1" else "| model | size |")
"""


def _fake_llama_bench(tmp_path, fail=0, garbage=0):
    path = tmp_path / "llama-bench"
    path.write_text(FAKE_LLAMA_BENCH.replace("{fail}", str(fail)).replace("{garbage}", str(garbage)))
    path.chmod(0o755)
    return str(path)


def test_llama_bench_side_by_side(tmp_path):
    """--compare-llama-bench: llama-bench's JSON (pp512, tg128, tg128 at depth 4096) next to our figures."""
    from toolchain.bench import llama_bench, side_by_side

    got = llama_bench(_fake_llama_bench(tmp_path), tmp_path / "m.gguf")
    assert got == {"pp512": 26512.5, "tg128": 553.25, "tg128@d4096": 496.0}
    results = {"llama_bench": got, "prefill": [{"graph": "fused", "m": 512, "tok_s": 33000.0}],
               "decode": [{"graph": "fused", "context": 128, "tok_s": 1100.0},
                          {"graph": "fused", "context": 4096, "tok_s": 992.0},
                          {"graph": "unfused", "context": 128, "tok_s": 700.0}]}
    lines = side_by_side(results)
    assert len(lines) == 3 and "1.99x" in lines[1] and "2.00x" in lines[2] and lines[0].split()[0] == "pp512"


def test_llama_bench_prompts_are_compared_on_the_user_path(tmp_path):
    """--prompts: llama-bench runs pp of each length; our figure for ppN is the whole prompt through qtrt generate's
    path (results['prompts']) where timed, not the one-step prefill."""
    from toolchain.bench import llama_bench, side_by_side

    got = llama_bench(_fake_llama_bench(tmp_path), tmp_path / "m.gguf", prompts=(512, 4096, 16384))
    assert {k: v for k, v in got.items() if k.startswith("pp")} == {"pp512": 26512.5, "pp4096": 30096.5,
                                                                      "pp16384": 42384.5}
    results = {"llama_bench": got, "decode": [], "prefill": [{"graph": "fused", "m": 512, "tok_s": 33000.0}],
               "prompts": [{"tokens": 512, "tok_s": 13256.25}, {"tokens": 4096, "tok_s": 15048.25}]}
    lines = {line.split()[0]: line for line in side_by_side(results)}
    assert sorted(lines) == ["pp4096", "pp512"] and "0.50x" in lines["pp512"] and "0.50x" in lines["pp4096"]


@pytest.mark.parametrize("args,flag", [(("--prompts", "512,x"), "--prompts"), (("--batches", "0"), "--batches"),
                                       (("--contexts", ""), "--contexts")])
def test_bench_sizes_are_checked_before_the_gpu(args, flag):
    assert_user_error(qtrt("bench", *args), flag)


@pytest.mark.parametrize("case,words", [("missing", "no llama-bench executable"), ("fail", "exited with 3"),
                                        ("garbage", "no JSON")])
def test_llama_bench_errors(tmp_path, case, words):
    from toolchain.bench import llama_bench

    path = str(tmp_path / "nope") if case == "missing" else _fake_llama_bench(tmp_path, **{case: 1})
    with pytest.raises(UserError, match=words):
        llama_bench(path, tmp_path / "m.gguf")


def test_bench_bad_llama_bench_path_is_one_line(tmp_path):
    r = qtrt("bench", "--compare-llama-bench", str(tmp_path / "nope"))
    assert_user_error(r, "llama-bench")
    r = qtrt("bench", "--compare-llama-batched-bench", str(tmp_path / "nope"))
    assert_user_error(r, "llama-batched-bench")


# llama-batched-bench as its source prints it with --output-format jsonl (tools/batched-bench/batched-bench.cpp of
# the llama-cpp-python 0.3.36 vendor tree): logs on stderr, one JSON object per (pp, tg, pl) on stdout;
# S_TG = pl * tg / t_tg
FAKE_LLAMA_BATCHED_BENCH = """#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
assert args[args.index("--output-format") + 1] == "jsonl" and args[args.index("-fa") + 1] == "on"
pp, tg = int(args[args.index("-npp") + 1]), int(args[args.index("-ntg") + 1])
pls = [int(x) for x in args[args.index("-npl") + 1].split(",")]
assert int(args[args.index("-c") + 1]) >= max(pls) * (pp + tg)
print("llama_batched_bench: n_kv_max = 8192 ...", file=sys.stderr)
for pl in pls[:len(pls) - {drop}]:
    t_tg = pl * tg / (500.0 * pl ** 0.75)
    print(json.dumps({"pp": pp, "tg": tg, "pl": pl, "n_kv": pl * (pp + tg), "t_pp": 0.01, "speed_pp": 1e4,
                      "t_tg": t_tg, "speed_tg": pl * tg / t_tg, "t": 1.0, "speed": 1.0}))
"""


@pytest.mark.parametrize("drop", [0, 1])
def test_llama_batched_bench_side_by_side(tmp_path, drop):
    """--compare-llama-batched-bench: its aggregate decode (speed_tg) per B next to our batched aggregate; a B it did
    not report is a one-line error, not a missing comparison."""
    from toolchain.bench import batched_side_by_side, llama_batched_bench

    path = tmp_path / "llama-batched-bench"
    path.write_text(FAKE_LLAMA_BATCHED_BENCH.replace("{drop}", str(drop)))
    path.chmod(0o755)
    if drop:
        with pytest.raises(UserError, match="no JSONL results"):
            llama_batched_bench(str(path), tmp_path / "m.gguf", [1, 4, 16])
        return
    got = llama_batched_bench(str(path), tmp_path / "m.gguf", [16, 1, 4])
    assert sorted(got) == [1, 4, 16] and abs(got[16] - 500.0 * 16 ** 0.75) < 1e-6
    lines = batched_side_by_side({"llama_batched_bench": got,
                                  "batched": [{"m": 1, "tok_s": 1000.0}, {"m": 4, "tok_s": 500.0 * 4 ** 0.75 * 3}]})
    assert len(lines) == 2 and "2.00x" in lines[0] and "3.00x" in lines[1]
