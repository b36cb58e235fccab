"""piece_graphs A/B (twelfth session, not part of the repository): an idle engine's time to first token at 512 / 1,024
/ 4,096 / 16,384 tokens, the engine's whole chunks launched from Python against replayed graphs, alternating; forward
beside it. Greedy and sampled (temperature 0.7, top-p 0.9) first tokens."""
import json, os, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toolchain import cuda_runtime as cr  # noqa: E402
from toolchain.bench import load_model, first_token_seconds, time_prompt  # noqa: E402
from toolchain.cuda_backend import CudaBackend  # noqa: E402
from toolchain.decoder import Decoder  # noqa: E402
from toolchain.engine import Engine, Params  # noqa: E402
from toolchain.sampling import Sampling  # noqa: E402
from toolchain.tokenizer import Tokenizer  # noqa: E402

model = load_model("synthetic:qwen2.5-coder-1.5b", Path("/tmp"))
be = CudaBackend(model, max_context=16384 + 640, n_slots=4, max_tokens=512, prepare=True)
dec = Decoder(model, Tokenizer.from_gguf(model.reader), be, be.max_context)
eng = Engine(dec, slots=4)
out = []
try:
    for rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
        for graphs in (False, True):
            be.tuning = dict(be.tuning, piece_graphs=graphs)
            r = {"round": rnd, "piece_graphs": graphs}
            for n in (512, 1024, 4096, 16384):
                for kind, samp in (("greedy", Sampling()), ("sampled", Sampling(0.7, 0, 0.9, seed=1))):
                    best = 1e9
                    for rep in range(3):
                        ids = np.random.default_rng([n, rep, rnd, int(graphs)]).integers(0, be.cfg.vocab, n).tolist()
                        t0 = time.perf_counter()
                        for k, _ in eng.submit(ids, Params(max_tokens=1, sampling=samp)):
                            if k in ("token", "done", "error"):
                                break
                        best = min(best, time.perf_counter() - t0)
                    r[f"{kind}_{n}_ms"] = round(best * 1e3, 2)
                if rnd == 0 and graphs:

                    r[f"forward_{n}_ms"] = round(time_prompt(be, n, cr) * 1e3, 2)
            out.append(r)
            print(json.dumps(r), flush=True)
            Path(os.environ.get("OUT", "/tmp"), "piece_ab.json").write_text(json.dumps(out, indent=1))
finally:
    eng.close()
