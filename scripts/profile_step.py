"""On the GPU: decode steps of the synthetic 1.5B layout launched one kernel at a time (no CUDA graph, so
that Nsight Compute can replay each kernel), for a per-kernel profile of the step:

    python3 scripts/profile_step.py --context 4096 --count          # launches per step (for ncu --launch-skip)
    python3 scripts/profile_step.py --batch 16                      # a step of 16 sequences (slots 0..15)
    python3 scripts/profile_step.py --prefill 512                   # a 512-token prompt piece (slot 0)
    ncu --clock-control none --launch-skip N --launch-count N --section SpeedOfLight ... \\
        python3 scripts/profile_step.py --context 4096

The first step warms up (module loads); the second is the one to profile. Kernels are the decode builds of the
default tuning, with programmatic dependent launch (ncu serializes them anyway).
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toolchain.bench import load_model  # noqa: E402
from toolchain.cuda_backend import CudaBackend  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=128, help="position of the profiled token")
    ap.add_argument("--batch", type=int, default=1, help="sequences in the step (slots 0..batch-1, all at --context)")
    ap.add_argument("--count", action="store_true", help="print the launches of one step and exit")
    ap.add_argument("--prefill", type=int, default=0,
                    help="instead: a prompt piece of this many tokens in slot 0 from position --context (the plan "
                         "`qtrt generate` runs, the head on its last row)")
    a = ap.parse_args()
    if a.context < 0:
        ap.error("--context must be >= 0")
    if a.batch < 1 or a.prefill < 0:
        ap.error("--batch must be >= 1, --prefill >= 0")
    if a.prefill and a.batch != 1:
        ap.error("--prefill is one slot's prompt piece: leave --batch out")
    model = load_model("synthetic:qwen2.5-coder-1.5b", Path(os.environ.get("QTRT_BENCH_DIR", tempfile.gettempdir())))
    m = a.prefill or a.batch
    be = CudaBackend(model, max_context=a.context + m + 8, n_slots=1 if a.prefill else m, max_tokens=m)
    # the plan a step at this position takes (a prompt piece: as CudaBackend.forward picks it, by its furthest row)
    long = be.long_context(a.context + m - 1, m) if a.prefill else be.long_context(a.context, m)
    launches = [x for x in be.plan(m, last_only=bool(a.prefill), long_context=long) if x.op != "decode_advance"]
    if a.count:
        print(len(launches))
        return
    for step in range(2):
        if a.prefill:
            be._set_inputs([7 + step] * m, list(range(a.context, a.context + m)), [0] * m)
        else:
            be._set_inputs([7 + step] * m, [a.context] * m, list(range(m)))
        be.run_plan(m, last_only=bool(a.prefill), long_context=long)
        be.stream.synchronize()
    print("kernels of one step:", ", ".join(f"{x.node}:{x.op}" for x in launches))


if __name__ == "__main__":
    main()
