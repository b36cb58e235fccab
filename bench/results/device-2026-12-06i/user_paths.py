"""Ninth session: a first prompt on the user paths. (1) forward (qtrt generate's path): fresh backend as the Decoder
builds it, prepared the old way (decode step only) or the new (prompt steps too): start-up, first prompt, warm.
(2) the engine (qtrt serve's path): one request alone, time to its first token, by prefill chunk, against forward."""
import json, os, sys, tempfile, time, threading
from pathlib import Path
import numpy as np
sys.path.insert(0, ".")
from toolchain import cuda_runtime as cr
from toolchain.bench import load_model
from toolchain.cuda_backend import CudaBackend
from toolchain.decoder import Decoder
from toolchain.engine import Engine, Params

out = Path(os.environ.get("OUT", "/tmp")) / f"{sys.argv[1]}-user.json"
model = load_model("synthetic:qwen2.5-coder-1.5b", Path(os.environ.get("QTRT_BENCH_DIR", tempfile.gettempdir())))
cr.init()
V = model.config.vocab
rows = []
def save(r):
    rows.append(r); print(json.dumps(r), flush=True); out.write_text(json.dumps(rows, indent=1))
part = sys.argv[2] if len(sys.argv) > 2 else "all"
if part in ("all", "forward"):
    for n in (576, 3482, 16384):
        for how in ("decode_only", "prepared"):
            t0 = time.perf_counter()
            be = CudaBackend(model, max_context=n + 64, max_tokens=512, prepare=how == "decode_only")
            if how == "prepared":
                be.decode_graph(1); be.prepare_prompt_steps()
            be.stream.synchronize()
            start = time.perf_counter() - t0
            ids = np.random.default_rng(n).integers(0, V, n).tolist()
            t0 = time.perf_counter(); be.forward(ids); first = time.perf_counter() - t0
            warm = []
            for _ in range(2):
                be.reset(); be.stream.synchronize()
                t0 = time.perf_counter(); be.forward(ids); warm.append(time.perf_counter() - t0)
            save({"path": "forward", "how": how, "tokens": n, "startup_s": round(start, 4), "first_s": round(first, 4),
                  "warm_s": round(min(warm), 4), "first_tok_s": round(n / first), "warm_tok_s": round(n / min(warm))})
            be.close()
if part in ("all", "engine"):
    dec = Decoder.open(model, 16384 + 600)
    dec.start_backend("cuda", slots=4)
    be = dec.backend
    for n in (512, 4096, 16384):
        ids = np.random.default_rng(n + 1).integers(0, V, n).tolist()
        best = 1e9
        for _ in range(2):
            be.reset(); be.stream.synchronize()
            t0 = time.perf_counter(); be.forward(ids); best = min(best, time.perf_counter() - t0)
        save({"path": "forward_same_backend", "tokens": n, "warm_s": round(best, 4), "tok_s": round(n / best)})
    piece = CudaBackend.__dict__["_piece_from"]
    for chunk, how in ((256, "piece"), (508, "piece"), (256, "all_rows"), (508, "all_rows")):
        CudaBackend._piece_from = piece if how == "piece" else staticmethod(lambda *a: None)
        eng = Engine(dec, slots=4, prefill_chunk=chunk)
        for n in (512, 4096, 16384):
            for rep in range(2):
                ids = np.random.default_rng(1000 * rep + n + chunk).integers(0, V, n).tolist()
                m0 = dict(eng.metrics)
                t0 = time.perf_counter()
                h = eng.submit(ids, Params(max_tokens=1))
                ttft = None
                for kind, payload in h:
                    if kind in ("token", "done") and ttft is None:
                        ttft = time.perf_counter() - t0
                    if kind == "error":
                        print("error", payload)
                m1 = eng.metrics
                save({"path": "engine", "how": how, "chunk": eng.scheduler.prefill_chunk, "tokens": n, "rep": rep,
                      "ttft_s": round(ttft, 4), "tok_s": round(n / ttft),
                      "steps": m1["steps"] - m0["steps"], "step_s": round(m1["step_seconds"] - m0["step_seconds"], 4)})
        eng.close()
