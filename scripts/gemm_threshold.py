"""On the GPU: where the prefill GEMMs should take over from the tensor-core GEMMs for few tokens (cuda_backend
GEMM_MIN_M), on both sides of the threshold in one process. Two cases that differ by it:
- a prompt's last piece (r tokens at depth d, what `qtrt generate` runs after the whole pieces): the few-token GEMMs
  with each token's decode attention over the cache, or the prefill GEMMs with the prefill attention;
- a batched decode step of m sequences at a context: the same choice of GEMMs (`qtrt bench --batches` times it at
  the first context only).
Thresholds in turn, best of 5 rounds; writes JSON (docs/perf-notes.md "The prefill GEMMs from 65 tokens").

    python3 scripts/gemm_threshold.py out.json [--thresholds 33,65] [--pieces 40,64] [--depths 0,4096,16384]
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toolchain import cuda_runtime as cr  # noqa: E402
from toolchain.bench import load_model, sizes_arg, time_decode_with  # noqa: E402
from toolchain.cuda_backend import CudaBackend  # noqa: E402
from toolchain.errors import UserError  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--model", default="synthetic:qwen2.5-coder-1.5b")
    ap.add_argument("--thresholds", default="33,65")
    ap.add_argument("--pieces", default="40,64")
    ap.add_argument("--depths", default="0,4096,16384")
    ap.add_argument("--batched", default="128:72,80,88,96;4096:40,64,80,96", help="context:m,m,...;...")
    a = ap.parse_args()
    try:  # every size checked before any GPU work: one line and exit 2 for a mistyped one
        thresholds, pieces = sizes_arg(a.thresholds, "--thresholds"), sizes_arg(a.pieces, "--pieces")
        depths = [int(x) for x in a.depths.split(",")]
        cases = [(int(c), sizes_arg(ms, "--batched")) for c, ms in (p.split(":") for p in a.batched.split(";") if p)]
        if min(depths) < 0 or any(c < 1 for c, _ in cases):
            raise ValueError
    except (UserError, ValueError) as e:
        why = e if isinstance(e, UserError) else f"--depths {a.depths!r} / --batched {a.batched!r}: give depths as " \
            "whole numbers >= 0 and batched steps as context:m,m;context:m,..."
        print(f"gemm_threshold: {why}", file=sys.stderr)
        sys.exit(2)
    if not cr.gpu_available():
        print(f"gemm_threshold: needs an NVIDIA GPU with cuda-python ({cr.gpu_problem()})", file=sys.stderr)
        sys.exit(2)
    model = load_model(a.model, Path("/tmp"))
    cr.init()
    out = {"device": cr.device_name(), "model": a.model, "pieces": [], "batched": []}
    be = CudaBackend(model, max_context=max(depths) + 600, n_slots=1, max_tokens=512)
    base = dict(be.tuning)
    state = {t: ({}, {}) for t in thresholds}  # plans and graphs of each threshold, kept apart
    for d in depths:
        for r in pieces:
            ids = list(range(100, 100 + r))
            best = {t: float("inf") for t in thresholds}
            for rnd in range(6):  # round 0: plans built, kernels loaded
                for t in thresholds:
                    be.tuning, (be._plans, be._graphs) = {**base, "gemm_min_m": t}, state[t]
                    be.reset(d)
                    be.stream.synchronize()
                    t0 = time.perf_counter()
                    be.forward(ids)  # reads the logits: the piece has finished when it returns
                    if rnd:
                        best[t] = min(best[t], time.perf_counter() - t0)
            row = {"depth": d, "tokens": r, **{f"ms_gemm_min_m_{t}": round(v * 1e3, 3) for t, v in best.items()}}
            out["pieces"].append(row)
            print(json.dumps(row), flush=True)
    be.close()
    if cases:
        be = CudaBackend(model, max_context=max(c for c, _ in cases) + 104,
                         n_slots=max(max(ms) for _, ms in cases), max_tokens=max(max(ms) for _, ms in cases))
        for ctx, ms in cases:
            for m in ms:
                row = {"ctx": ctx, "m": m}
                for name, tun in (("skinny", {"skinny_min_m": 1, "gemm_min_m": m + 1}),
                                  ("prefill_gemm", {"gemm_min_m": 1})):
                    row[name + "_us"] = round(min(time_decode_with(be, tun, ctx, m, 32, cr) for _ in range(2)) * 1e6, 1)
                out["batched"].append(row)
                print(json.dumps(row), flush=True)
        be.close()
    Path(a.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
