#!/usr/bin/env bash
# Everything the GPU proves, in one call on the lent H100 (the device tool runs this from the repo root):
#   env -> kernels (nvcc, every op) -> tests (kernel + whole-model GPU tests) -> sanitizer -> bench
# With the real GGUF assembled under $QTRT_MODELS_DIR there: STAGES="chat ttft" (qtrt chat through a pseudo-terminal on
# the cuda backend; time to first token against LLAMA_CLI="<llama.cpp command template>", scripts/ttft.py).
# Logs and JSON go to $OUT (the device tool brings that folder back). STAGES="tests bench" runs a subset;
# TESTS="tests/x.py ..." narrows the tests stage; STAGES=tuning times the decode tunings (scripts/decode_tuning.py).
# STAGES=compile: every real-model cubin compiled in parallel into the kernel cache (before tests, when
# toolchain/prebuilt is stale). STAGES=prefill: `qtrt generate` of a ~500- and a ~3,000-token prompt, --batch-size 64 vs 512 (first-token time).
# STAGES=usergen: `qtrt generate` greedy vs sampled in turn, 400 tokens, ROUNDS=5, with the real 1.5B (issue 14's ratio
# on the user path).
# STAGES=sampler: the device sampler's time and phases by logits shape and settings (scripts/sampler_phases.py;
# SAMPLER_BASE=path/to/sampling.cu times that build beside this one).
# STAGES="serve engine": the openai client and the soak against qtrt serve --backend cuda with the real 1.5B, and the
# engine's overhead against the raw batched step (scripts/engine_bench.py; ENGINE_MODEL to use the real GGUF).
set -uo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export QTRT_KERNEL_CACHE=/tmp/qtrt-kernels QTRT_BENCH_DIR=/tmp
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks (gguf), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
STAGES=${STAGES:-"env kernels tests sanitizer bench generate"}
SYNTH=/tmp/qwen2.5-coder-1.5b-synthetic.gguf  # written by the bench / sanitizer stages (synthetic weights)
declare -A RC
run() {  # run STAGE CMD...: log to $OUT/STAGE.log, remember the exit code
  local stage=$1; shift
  local t0=$SECONDS
  echo "=== $stage: $*"
  "$@" > "$OUT/$stage.log" 2>&1
  RC[$stage]=$?
  echo "=== $stage: exit ${RC[$stage]} in $((SECONDS - t0)) s"
  tail -n ${TAIL:-25} "$OUT/$stage.log"
}
for s in $STAGES; do
  case $s in
    env) run env bash -c 'nvidia-smi; nvcc --version; python3 -c "import numpy, onnx, gguf; from cuda.bindings import driver; print(numpy.__version__, onnx.__version__)"' ;;
    kernels) run kernels python3 -m toolchain.kernels ;;
    compile) run compile python3 -c "  # every cubin the real models use, 16 at a time (when toolchain/prebuilt is stale)
from concurrent.futures import ThreadPoolExecutor
from toolchain import kernels as K
b = K.real_model_builds()
with ThreadPoolExecutor(16) as p: list(p.map(lambda od: K.compile_kernel(od[0], od[1], fmt='cubin'), b))
print(len(b), 'builds')" ;;
    tests) run tests python3 -m pytest -p no:cacheprovider -v -rs ${TESTS:-tests/test_kernels_gpu.py tests/test_gemm_gpu.py tests/test_prefill_attention_gpu.py tests/test_cuda_backend.py} ;;
    sanitizer) run sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_step.py ;;
    sampler) run sampler bash -c 'if [ -n "${SAMPLER_BASE:-}" ]; then nvcc -cubin -arch=sm_90 -O3 -std=c++17 -Iplugins "$SAMPLER_BASE" -o /tmp/sampler-base.cubin || exit 1; fi; python3 scripts/sampler_phases.py ${SAMPLER_BASE:+--cubin /tmp/sampler-base.cubin} ${SAMPLER_FUSED:+--cubin-fused} --json "$OUT/sampler.json"' ;;
    usergen) run usergen python3 - "$QTRT_MODELS_DIR/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" "$OUT/usergen.json" <<'USERGEN'
import json, subprocess, sys  # the user path: qtrt generate, 400 tokens, greedy vs sampled (T 0.7, top-p 0.9), in turn
model, out = sys.argv[1:]
base = [sys.executable, "-m", "toolchain.cli", "generate", "--model", model, "--backend", "cuda", "--prompt",
        "Write a quicksort in Python with comments.", "--max-new-tokens", "400", "--seed", "7", "--json"]
runs = {"greedy": [], "sampled": []}
for _ in range(int(__import__("os").environ.get("ROUNDS", "5"))):
    for mode, extra in (("greedy", []), ("sampled", ["--temperature", "0.7", "--top-p", "0.9"])):
        r = json.loads(subprocess.run(base + extra, capture_output=True, text=True, check=True).stdout)
        runs[mode].append({k: r[k] for k in ("tokens_per_s", "new_tokens", "finish_reason", "prefill_s", "startup_s")})
        print(mode, round(r["tokens_per_s"], 1), r["new_tokens"], flush=True)
best = {m: max(x["tokens_per_s"] for x in v) for m, v in runs.items()}
pairs = sorted(s["tokens_per_s"] / g["tokens_per_s"] for g, s in zip(runs["greedy"], runs["sampled"]))
summary = {"runs": runs, "best_tok_s": best, "sampled_vs_greedy": round(best["sampled"] / best["greedy"], 3),
           "pairs": [round(r, 3) for r in pairs], "median_pair": round(pairs[len(pairs) // 2], 3)}
json.dump(summary, open(out, "w"), indent=1)
print("sampled / greedy: best of each", summary["sampled_vs_greedy"], "pairs", summary["pairs"])
USERGEN
    ;;
    prefill) run prefill python3 - "$QTRT_MODELS_DIR/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" "$OUT/prefill.json" <<'PREFILL'
import json, os, subprocess, sys, tempfile  # the user path's prefill: qtrt generate of a long prompt, by --batch-size
model, out = sys.argv[1:]
code = "".join(open(os.path.join("toolchain", n)).read() for n in sorted(os.listdir("toolchain")) if n.endswith(".py"))
rows = []
for chars in (2000, 12000):
    path = os.path.join(tempfile.mkdtemp(), "prompt.txt")
    open(path, "w").write(code[:chars])
    for b in (64, 512):
        best = None
        for _ in range(3):
            r = json.loads(subprocess.run([sys.executable, "-m", "toolchain.cli", "generate", "--model", model,
                                           "--backend", "cuda", "--file", path, "--max-new-tokens", "1", "--json",
                                           "--batch-size", str(b)], capture_output=True, text=True, check=True).stdout)
            best = r["prefill_s"] if best is None else min(best, r["prefill_s"])
        n = len(r["prompt_ids"])
        rows.append({"prompt_tokens": n, "batch_size": b, "prefill_s": round(best, 4), "tok_s": round(n / best, 1)})
        print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(out, "w"), indent=1)
PREFILL
    ;;
    tuning) run tuning python3 scripts/decode_tuning.py ${TUNING_ARGS:-} ;;
    bench) run bench python3 -m toolchain.cli bench -o "$OUT" ${BENCH_ARGS:-} ;;
    chat) run chat env QTRT_CHAT_TRANSCRIPT="$OUT/chat-transcript.txt" python3 -m pytest -p no:cacheprovider -v -rs tests/test_chat.py -k gpu ;;
    ttft) run ttft python3 scripts/ttft.py --model "$QTRT_MODELS_DIR/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" --runs ${RUNS:-5} --no-compiler --drop-caches ${LLAMA_CLI:+--llama "$LLAMA_CLI"} -o "$OUT/ttft.json" ;;
    serve) run serve env QTRT_SERVE_TRANSCRIPT="$OUT/serve-transcript.txt" QTRT_LOAD_REPORT="$OUT/soak.json" python3 -m pytest -p no:cacheprovider -v -rs tests/test_server.py -k cuda ;;
    engine) run engine python3 scripts/engine_bench.py --model "${ENGINE_MODEL:-synthetic:qwen2.5-coder-1.5b}" ${ENGINE_ARGS:-} -o "$OUT/engine.json" ;;
    generate) run generate bash -c "python3 -m toolchain.cli generate --model $SYNTH --backend cuda --prompt 'hello world' --max-new-tokens 32 --json && python3 -m toolchain.cli generate --model $SYNTH --backend cpu --prompt 'hello world' --max-new-tokens 32 --json" ;;
  esac
done
python3 - "$OUT" <<PY
import json, sys
rc = {$(for k in "${!RC[@]}"; do printf '"%s": %s, ' "$k" "${RC[$k]}"; done)}
json.dump({"exit_codes": rc}, open(sys.argv[1] + "/summary.json", "w"), indent=1)
print("summary:", rc)
PY
