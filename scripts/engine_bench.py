"""Engine overhead on the GPU (issue 14): N concurrent streaming requests through toolchain/engine.py against the raw
batched decode step at the same m, in one process on one model, greedy and sampled (temperature 0.7, top-p 0.9).

raw: the captured decode graph of m = N tokens replayed back to back (bench.time_decode; with sampling, the device
sampler in the graph). engine: N requests submitted at once, each consumed by its own thread as a stream; the
aggregate rate is counted over the window where all N are decoding (after the last first token, before the first
last token), and each stream's inter-token gaps give p50 / p99. Writes JSON.

    python3 scripts/engine_bench.py --model M.gguf --streams 1,4,16 --tokens 256 -o engine.json
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolchain import cuda_runtime as cr  # noqa: E402
from toolchain.bench import load_model, time_decode  # noqa: E402
from toolchain.cuda_backend import CudaBackend  # noqa: E402
from toolchain.decoder import Decoder  # noqa: E402
from toolchain.engine import Engine, Params  # noqa: E402
from toolchain.sampling import Sampling  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def engine_run(dec, n: int, tokens: int, sampling: Sampling, prompt_len: int) -> dict:
    eng = Engine(dec, slots=dec.backend.n_slots)
    rng = np.random.default_rng(0)
    stamps = [[] for _ in range(n)]
    errors = []
    # the stop tokens are never fed: a request ends at max_tokens (a random model may still emit one: counted)
    prompts = [list(map(int, rng.integers(0, 150000, prompt_len))) for _ in range(n)]
    handles = [eng.submit(p, Params(max_tokens=tokens, sampling=sampling)) for p in prompts]

    def consume(i):
        for kind, payload in handles[i]:
            if kind == "token":
                stamps[i].append(time.perf_counter())
            elif kind == "error":
                errors.append(payload)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    eng.close()
    start = max(s[0] for s in stamps if s)
    end = min(s[-1] for s in stamps if s)
    inside = sum(sum(start < t <= end for t in s) for s in stamps)
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return {"tok_s": round(inside / (end - start), 1) if end > start else None,
            "itl_p50_ms": round(pct(gaps, 0.5) * 1e3, 3), "itl_p99_ms": round(pct(gaps, 0.99) * 1e3, 3),
            "tokens": [len(s) for s in stamps], "errors": errors[:3]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:qwen2.5-coder-1.5b")
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("-o", "--output", default="engine.json")
    a = ap.parse_args()
    streams = [int(x) for x in a.streams.split(",")]
    model = load_model(a.model, Path("/tmp"))
    cr.init()
    ctx = 1024
    dec = Decoder.open(model, ctx)
    dec.backend = CudaBackend(model, ctx, n_slots=max(streams), max_tokens=64)
    out = {"device": cr.device_name(), "model": a.model, "tokens": a.tokens, "rows": []}
    for sampled in (False, True):
        s = Sampling(0.7, 0, 0.9, seed=1) if sampled else Sampling()
        for n in streams:
            raw = time_decode(dec.backend, a.prompt + a.tokens // 2, n, 200, cr, s if sampled else None)
            eng = engine_run(dec, n, a.tokens, s, a.prompt)
            row = {"sampled": sampled, "streams": n, "raw_step_tok_s": round(n / raw, 1), **eng,
                   "engine_vs_raw": round(eng["tok_s"] / (n / raw), 3) if eng["tok_s"] else None}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(a.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
