"""The engine's eager steps (`qtrt serve`'s prompt chunks, and its mixed steps of decode rows beside a chunk), A/B in
one process, variants taking turns round after round (synthetic weights of the 1.5B Q4_K_M layout, H100):

  each_launch  kernel arguments packed at every launch, the head over every row of a step (before)
  packed       arguments packed once per value list (cuda_runtime.Kernel._packed_args)
  packed_head  and the head on the rows that want tokens only (cuda_backend tuning head_rows)
  ahead        and a lone prompt's chunks launched one ahead of the host (tuning chunks_ahead)

Per variant and round: one mixed step's wall time (bench.time_mixed_step: 4 decode rows + a 507-token chunk wanting
no token, and the same with its last row wanted), an idle engine's time to first token (4,096 / 16,384 tokens), and
the load test (4 streams decoding beside an 8,192-token prompt: its first token, the streams' gaps meanwhile).
Writes $OUT/engine_steps.json.

    python3 scripts/engine_steps_ab.py [--rounds 2] [--variants each_launch,packed,packed_head,ahead]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toolchain import cuda_runtime as cr  # noqa: E402
from toolchain.bench import first_token_seconds, load_model, time_mixed_step  # noqa: E402
from toolchain.decoder import Decoder  # noqa: E402
from toolchain.engine import Engine, Params  # noqa: E402

VARIANTS = {"each_launch": (False, False, False), "packed": (True, False, False), "packed_head": (True, True, False),
            "ahead": (True, True, True)}
PACKED_ONCE = cr.Kernel._packed_args


def use(be, variant: str):
    packed, head, ahead = VARIANTS[variant]
    cr.Kernel._packed_args = PACKED_ONCE if packed else cr.Kernel._pack
    be.tuning = dict(be.tuning, head_rows=head, chunks_ahead=ahead)
    be._plans.clear()  # a plan's key holds its head's rows, not the tuning: rebuilt (host work; modules stay loaded)


def load(eng, V: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    stamps = [[] for _ in range(4)]
    handles = [eng.submit(rng.integers(0, V, 32).tolist(), Params(max_tokens=300)) for _ in range(4)]

    def consume(i):
        for kind, _ in handles[i]:
            if kind == "token":
                stamps[i].append(time.perf_counter())
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    t_wait = time.perf_counter()
    while min(len(s) for s in stamps) < 20:  # every stream decoding before the prompt comes
        if time.perf_counter() - t_wait > 60:
            raise RuntimeError("the streams did not reach 20 tokens in 60 s")
        time.sleep(0.001)
    t0 = time.perf_counter()
    first = first_token_seconds(eng, rng.integers(0, V, 8192).tolist())
    t1 = t0 + first
    [t.join() for t in threads]
    gaps = sorted(b - a for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < t1) or [float("nan")]
    return {"prompt_ttft_s": round(first, 4), "gap_p50_ms": round(gaps[len(gaps) // 2] * 1e3, 2),
            "gap_max_ms": round(gaps[-1] * 1e3, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    bad = [v for v in a.variants.split(",") if v not in VARIANTS]
    if bad or a.rounds < 1:
        why = f"--variants: unknown {bad}; known: {', '.join(VARIANTS)}" if bad else f"--rounds {a.rounds}: at least 1"
        print(f"engine_steps_ab: {why}", file=sys.stderr)
        sys.exit(2)
    if not cr.gpu_available():
        print(f"engine_steps_ab: needs an NVIDIA GPU with cuda-python ({cr.gpu_problem()})", file=sys.stderr)
        sys.exit(2)
    model = load_model("synthetic:qwen2.5-coder-1.5b", Path("/tmp"))
    dec = Decoder.open(model, 16384 + 600)
    dec.start_backend("cuda", slots=5)
    be, V = dec.backend, model.config.vocab
    out, path = [], Path(os.environ.get("OUT", "/tmp"), "engine_steps.json")
    for rnd in range(a.rounds):
        for variant in a.variants.split(","):
            use(be, variant)
            r = {"round": rnd, "variant": variant,
                 "mixed_step_ms": round(time_mixed_step(be, 4, 507, 200, False) * 1e3, 3),
                 "mixed_step_last_wanted_ms": round(time_mixed_step(be, 4, 507, 200, True) * 1e3, 3)}
            eng = Engine(dec, slots=5)
            for n in (4096, 16384):
                s = first_token_seconds(eng, np.random.default_rng([rnd, n]).integers(0, V, n).tolist())
                r[f"idle_ttft_{n}_ms"] = round(s * 1e3, 2)
            r["load"] = load(eng, V, rnd + 7)
            r["chunk"] = eng.scheduler.prefill_chunk
            eng.close()
            out.append(r)
            print(json.dumps(r), flush=True)
            path.write_text(json.dumps(out, indent=1))
    use(be, "ahead")


if __name__ == "__main__":
    main()
