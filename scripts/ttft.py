"""Time to first token of a fresh process, as a user meets it: `qtrt generate` against llama.cpp's CLI on the same
GGUF, prompt and machine, side by side (issue 13).

Each command is started anew; the clock runs from the start of the process until the first byte of generated text
arrives on its stdout (both print only the generated text there: our backend line and llama.cpp's logs go to
stderr), and on until the process exits. Run 1 of ours uses an empty kernel cache and, with --no-compiler, a PATH
without nvcc (the prebuilt cubins alone); --drop-caches empties the OS page cache before it (root only). Prints a table
and writes JSON.

    python3 scripts/ttft.py --model M.gguf --runs 5 --llama "/path/llama-completion -m {model} -p {prompt} -n 16 ..."
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


def first_byte(cmd: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = os.read(p.stdout.fileno(), 1)
    t1 = time.perf_counter()
    out, err = p.communicate(timeout=600)
    t2 = time.perf_counter()
    return {"ttft_s": round(t1 - t0, 3), "total_s": round(t2 - t0, 3), "rc": p.returncode,
            "stdout": (first + out).decode(errors="replace")[:300], "stderr_tail": err.decode(errors="replace")[-600:]}


def no_compiler_env(env: dict) -> dict:
    """The environment of a machine with only the driver: no nvcc on PATH, no CUDA_HOME, no NVCC."""
    env = dict(env)
    env.pop("NVCC", None)
    env["CUDA_HOME"] = "/nonexistent"
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if d and not os.path.exists(os.path.join(d, "nvcc")))
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--llama", help="llama.cpp command template with {model}, {prompt} and {tokens}")
    ap.add_argument("--no-compiler", action="store_true", help="run ours without nvcc reachable")
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before the first run")
    ap.add_argument("-o", "--output", default="ttft.json")
    a = ap.parse_args()
    env = dict(os.environ, QTRT_KERNEL_CACHE=tempfile.mkdtemp(prefix="qtrt-kernels-"))
    if a.no_compiler:
        env = no_compiler_env(env)
    ours = [sys.executable, "-m", "toolchain.cli", "generate", "--model", a.model, "--backend", "cuda",
            "--prompt", a.prompt, "--max-new-tokens", str(a.tokens), "--quiet"]
    rows = {"qtrt": []}
    if a.drop_caches:
        subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)
    for _ in range(a.runs):
        rows["qtrt"].append(first_byte(ours, env))
    if a.llama:
        cmd = [part.format(model=a.model, prompt=a.prompt, tokens=a.tokens) for part in shlex.split(a.llama)]
        rows["llama.cpp"] = [first_byte(cmd, dict(os.environ)) for _ in range(a.runs)]
    summary = {}
    for name, runs in rows.items():
        ok = [r for r in runs if r["rc"] == 0]
        summary[name] = {"first_run_ttft_s": runs[0]["ttft_s"], "runs": len(runs), "failed": len(runs) - len(ok),
                         "median_ttft_s": statistics.median(r["ttft_s"] for r in ok[1:] or ok) if ok else None,
                         "median_total_s": statistics.median(r["total_s"] for r in ok[1:] or ok) if ok else None}
    json.dump({"model": a.model, "prompt": a.prompt, "tokens": a.tokens, "no_compiler": a.no_compiler,
               "summary": summary, "runs": rows}, open(a.output, "w"), indent=1)
    for name, s in summary.items():
        print(f"{name:10s} first run {s['first_run_ttft_s']:.2f} s; warm median TTFT {s['median_ttft_s']} s, "
              f"whole run {s['median_total_s']} s ({s['failed']} failed of {s['runs']})")
        print("  output:", rows[name][-1]["stdout"][:120].replace("\n", " "))
        if s["failed"]:
            print("  stderr:", rows[name][-1]["stderr_tail"])


if __name__ == "__main__":
    main()
