"""Where the device sampler's time goes (plugins/sampling.cu, issue 14): sample_tokens timed alone over logits of
several shapes and settings, and, from a -DSAMPLER_TRACE=1 build, clock64() stamps of rank 0's phases.

    python scripts/sampler_phases.py [--cubin OLD.cubin] [--json OUT.json]

Each timing is the step's sampler tail, 20 back to back in a captured graph, per step: this build's sample_tokens
(which takes the row's argmax itself), or for --cubin (an older build of sample_tokens, e.g. the last commit's,
compiled with nvcc by hand, which reads the argmax kernel's result) the argmax kernel and the draw; same run.
A row's in_order: -1 no top-k / top-p, 0 sorted candidates, 1 drawn in index order (edge modes), 2 the argmax
alone (a peaked row under top-p, or top-k 1: decided at the first cluster barrier).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolchain import cuda_runtime as cr  # noqa: E402
from toolchain.device_sampler import DeviceSampler  # noqa: E402
from toolchain.kernels import launch_config  # noqa: E402
from toolchain.sampling import Sampling  # noqa: E402

VOCAB = 151936
PHASES = ["loads+argmax", "cluster_wait", "histogram", "sync1", "decide", "refine", "gather+sync2", "sort", "draw"]


def shapes(rng):
    def lm(scale, peaks):
        x = (rng.standard_normal(VOCAB) * scale).astype(np.float32)
        x[rng.integers(0, VOCAB, len(peaks))] += np.asarray(peaks, np.float32)
        return x
    return {"peaked (code-like)": lm(2.0, [18, 15, 14, 12, 11, 10]),
            "lm body 3, peaks": lm(3.0, [12, 10, 9, 8, 6, 5]),
            "broad body 1.3": lm(1.3, []),
            "near-flat 0.01": lm(0.01, [])}


SETTINGS = {"T0.7 p0.9": Sampling(0.7, 0, 0.9), "T1.0": Sampling(1.0), "T0.8 k40": Sampling(0.8, 40),
            "T0.8 k40 p0.95": Sampling(0.8, 40, 0.95), "T0.7 p0.9 minp0.05": Sampling(0.7, 0, 0.9, min_p=0.05)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cubin", help="another build of sample_tokens to time beside this one")
    ap.add_argument("--cubin-fused", action="store_true",
                    help="that build takes the argmax itself too (else it reads the argmax kernel's)")
    ap.add_argument("--json")
    a = ap.parse_args()
    cr.init()
    d = cr.driver()
    clock_khz = cr.check(d.cuDeviceGetAttribute(d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CLOCK_RATE, 0), "clock")
    stream = cr.Stream()
    builds = {"this": cr.load_op("sample_tokens", {})}
    if a.cubin:
        builds["other"] = cr.Module(Path(a.cubin).read_bytes()).kernel("sample_tokens")
    trace_kernel = cr.load_op("sample_tokens", {"SAMPLER_TRACE": 1})
    trace_ptr = cr.check(d.cuModuleGetGlobal(trace_kernel.module.handle, b"sampler_trace"), "cuModuleGetGlobal")[0]
    argmax = cr.load_op("argmax", {})
    sampler = DeviceSampler(VOCAB, 1, 1)
    logits = cr.DeviceBuffer.zeros((1, VOCAB), np.float32)
    next_token = cr.DeviceBuffer.zeros((1,), np.int64)
    zeros = cr.DeviceBuffer.zeros((1,), np.int32)
    acfg = launch_config("argmax", {"m": 1, "vocab": VOCAB})
    draw = sampler.launches(1, logits.ptr, next_token.ptr, zeros.ptr, zeros.ptr)[1][0]
    dcfg, dargs = draw[3], draw[4]

    def am():
        argmax.launch(acfg, [logits.ptr, *acfg.scalars, next_token.ptr], stream)

    def per_step(kernel, with_argmax):
        """us of a step's sampler tail: the draw (which takes the argmax itself), or for an older build the argmax
        kernel and the draw; 20 back to back in a graph, best of 5."""
        g = cr.capture(stream, lambda: [((am() if with_argmax else None), kernel.launch(dcfg, dargs, stream))
                                        for _ in range(20)])
        g.launch(stream)
        return min(cr.time_ms(stream, lambda: [g.launch(stream) for _ in range(10)]) for _ in range(5)) * 1e3 / 200

    rng = np.random.default_rng(0)
    out = {"clock_mhz": clock_khz / 1e3, "rows": []}
    for shape, z in shapes(rng).items():
        logits.upload(z[None], stream)
        for sname, s in SETTINGS.items():
            sampler.set_slot(0, s, 1234, [0], 0, stream)
            row = {"logits": shape, "sampling": sname}
            for b, k in builds.items():
                row[f"us_{b}"] = round(per_step(k, with_argmax=b != "this" and not a.cubin_fused), 2)
            am()
            trace_kernel.launch(dcfg, dargs, stream)
            stream.synchronize()
            t = np.zeros(16, np.int64)
            cr.check(d.cuMemcpyDtoH(t.ctypes.data, trace_ptr, t.nbytes), "cuMemcpyDtoH")
            stamps = {i: int(t[i]) for i in range(10) if t[i]}
            keys = sorted(stamps)
            row["phases_us"] = {PHASES[j - 1]: round((stamps[j] - stamps[i]) / clock_khz * 1e3, 2)
                                for i, j in zip(keys, keys[1:])}
            row["in_order"], row["n_cand"] = int(t[14]), int(t[15])
            cr.check(d.cuMemsetD8(trace_ptr, 0, t.nbytes), "cuMemsetD8")
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
