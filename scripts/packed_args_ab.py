"""Kernel arguments packed once per value list (Kernel._packed_args, branch prepared/packed-args) against packed at every launch,
on the engine's eager steps: an idle engine's time to first token (4,096 / 16,384 tokens), and the load test's
prompt TTFT and stream gaps (4 streams decoding beside an 8,192-token prompt). Same process, alternating."""
import json, os, sys, threading, time
from pathlib import Path
import numpy as np
sys.path.insert(0, ".")
from toolchain import cuda_runtime as cr
from toolchain.bench import load_model
from toolchain.decoder import Decoder
from toolchain.engine import Engine, Params
model = load_model("synthetic:qwen2.5-coder-1.5b", Path("/tmp"))
dec = Decoder.open(model, 16384 + 600)
dec.start_backend("cuda", slots=5)
V = model.config.vocab
kept = cr.Kernel._packed_args
out = []
def save(r):
    out.append(r); print(json.dumps(r), flush=True)
    Path(os.environ.get("OUT", "/tmp"), "packed.json").write_text(json.dumps(out, indent=1))
for rnd in range(2):
    for how in ("packed_once", "packed_each_launch"):
        cr.Kernel._packed_args = kept if how == "packed_once" else cr.Kernel._pack
        eng = Engine(dec, slots=5)
        for n in (4096, 16384):
            ids = np.random.default_rng([rnd, n, len(out)]).integers(0, V, n).tolist()
            t0 = time.perf_counter(); ttft = None
            for kind, _ in eng.submit(ids, Params(max_tokens=1)):
                if kind in ("token", "done") and ttft is None:
                    ttft = time.perf_counter() - t0
            save({"round": rnd, "how": how, "test": "idle", "tokens": n, "ttft_s": round(ttft, 4), "tok_s": round(n / ttft)})
        rng = np.random.default_rng(rnd + 7)
        stamps = [[] for _ in range(4)]
        hs = [eng.submit(rng.integers(0, V, 32).tolist(), Params(max_tokens=300)) for _ in range(4)]
        def consume(i):
            for kind, _ in hs[i]:
                if kind == "token":
                    stamps[i].append(time.perf_counter())
        th = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
        [t.start() for t in th]
        while min(len(s) for s in stamps) < 20:
            time.sleep(0.001)
        t0 = time.perf_counter(); ttft = None
        for kind, _ in eng.submit(rng.integers(0, V, 8192).tolist(), Params(max_tokens=1)):
            if kind in ("token", "done") and ttft is None:
                ttft = time.perf_counter() - t0
        t1 = t0 + ttft
        [t.join() for t in th]
        gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < t1]
        dec_gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if a > t1 + 0.05]
        save({"round": rnd, "how": how, "test": "load", "chunk": eng.scheduler.prefill_chunk, "prompt_ttft_s": round(ttft, 4),
              "gap_max_ms": round(max(gaps) * 1e3, 2), "gap_p50_ms": round(sorted(gaps)[len(gaps) // 2] * 1e3, 2),
              "decode_gap_p50_ms": round(sorted(dec_gaps)[len(dec_gaps) // 2] * 1e3, 3) if dec_gaps else None})
        eng.close()
cr.Kernel._packed_args = kept
