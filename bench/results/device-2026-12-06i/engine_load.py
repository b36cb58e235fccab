"""Ninth session: the engine's prompt chunk under load: 4 streams decoding while an 8,192-token prompt arrives;
the prompt's time to first token and the streams' largest inter-token gap, by prefill chunk."""
import json, os, sys, threading, time
from pathlib import Path
import numpy as np
sys.path.insert(0, ".")
from toolchain.bench import load_model
from toolchain.decoder import Decoder
from toolchain.engine import Engine, Params
model = load_model("synthetic:qwen2.5-coder-1.5b", Path("/tmp"))
dec = Decoder.open(model, 8192 + 600)
dec.start_backend("cuda", slots=5)
V = model.config.vocab
out = []
for chunk in (256, 512, 256, 512):
    eng = Engine(dec, slots=5, prefill_chunk=chunk)
    rng = np.random.default_rng(chunk + len(out))
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
    t0 = time.perf_counter()
    ttft = None
    for kind, _ in eng.submit(rng.integers(0, V, 8192).tolist(), Params(max_tokens=1)):
        if kind in ("token", "done") and ttft is None:
            ttft = time.perf_counter() - t0
    t1 = t0 + ttft
    [t.join() for t in th]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < t1]
    r = {"chunk": eng.scheduler.prefill_chunk, "prompt_ttft_s": round(ttft, 4), "prompt_tok_s": round(8192 / ttft),
         "gap_max_ms": round(max(gaps) * 1e3, 2), "gap_p50_ms": round(sorted(gaps)[len(gaps) // 2] * 1e3, 2),
         "tokens_during": len(gaps)}
    out.append(r); print(json.dumps(r), flush=True)
    eng.close()
Path(os.environ.get("OUT", "/tmp"), "load.json").write_text(json.dumps(out, indent=1))
