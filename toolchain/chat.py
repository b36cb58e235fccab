"""`qtrt chat`: an interactive conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the model's chat template, and the decoder prefills only what its
cache does not already hold (Decoder.stream(reuse_prefix=True): the common prefix of the cached tokens and the new
prompt is kept), so a follow-up question costs its own tokens, not the history's. Ctrl-C stops the answer being
written and keeps the chat; Ctrl-D or /exit leaves.
"""
from __future__ import annotations

import sys
from typing import Iterator

from .decoder import Decoder, Sampling
from .errors import UserError

COMMANDS = {
    "/help": "this list",
    "/reset": "forget the conversation (and the cache)",
    "/system TEXT": "set the system message and start over",
    "/stats": "tokens and speed of the last answer",
    "/exit": "leave (also /quit or Ctrl-D)",
}


class Chat:
    """A conversation over one Decoder: the messages so far, the sampling settings, and the last turn's stats."""

    def __init__(self, decoder: Decoder, system: str | None = None, sampling: Sampling = Sampling(),
                 max_new_tokens: int = 512, stop=()):
        self.decoder, self.sampling, self.max_new_tokens, self.stop = decoder, sampling, max_new_tokens, tuple(stop)
        self.system = system
        self.messages: list[dict] = []
        self.last: dict = {}
        self.reset(system)

    def reset(self, system: str | None = None):
        self.system = system
        self.messages = [{"role": "system", "content": system}] if system else []
        self.decoder.reset()

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`; the answer joins the conversation even when the stream is cut short."""
        self.messages.append({"role": "user", "content": text})
        self.last = {}
        pieces: list[str] = []
        try:
            for piece in self.decoder.stream_text(self.messages, self.max_new_tokens, self.sampling, stats=self.last,
                                                  stop=self.stop, reuse_prefix=True):
                pieces.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def stats_line(self) -> str:
        s = self.last
        if "prefill_s" not in s:
            return "no answer yet (or the last one was stopped during its prompt)"
        n = len(s.get("ids", []))
        tps = (n - 1) / s["decode_s"] if n > 1 and s.get("decode_s") else 0.0
        return (f"[{self.decoder.backend.name}] prompt {len(s['prompt_ids'])} tokens ({s['reused_tokens']} reused "
                f"from the cache) in {s['prefill_s']:.2f} s; {n} new tokens at {tps:.1f} tok/s; "
                f"finish: {s['finish_reason']}{' (context full)' if s.get('context_full') else ''}")


def repl(chat: Chat, stdin=None, stdout=None) -> int:
    """The interactive loop (a person at a terminal, or a program through a pseudo-terminal)."""
    stdout = stdout or sys.stdout
    read = input if stdin is None else (lambda prompt: _readline(stdin, stdout, prompt))
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    print("qtrt chat: type a message; /help lists the commands, Ctrl-C stops an answer, Ctrl-D leaves.", file=stdout)
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=stdout)
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit leaves)", file=stdout)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                chat.reset(chat.system)
                print("(conversation cleared)", file=stdout)
            elif cmd == "/system":
                chat.reset(arg.strip() or None)
                print("(system message set; conversation cleared)", file=stdout)
            elif cmd == "/stats":
                print(chat.stats_line(), file=stdout)
            else:
                print("\n".join(f"  {k:14s} {v}" for k, v in COMMANDS.items()), file=stdout)
            continue
        answer = chat.ask(text)
        try:
            for piece in answer:
                stdout.write(piece)
                stdout.flush()
            stdout.write("\n")
            if chat.last.get("context_full"):
                print("(the context is full: /reset to start over, or restart with a larger --max-context)",
                      file=stdout)
        except KeyboardInterrupt:
            answer.close()
            stdout.write("\n[stopped]\n")
        except UserError as e:  # e.g. the conversation no longer fits the context: say so, keep the chat
            answer.close()
            chat.messages = chat.messages[:-2]
            stdout.write(f"qtrt: {e}\n")
        finally:
            answer.close()
        stdout.flush()


def _readline(stdin, stdout, prompt: str) -> str:
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line
