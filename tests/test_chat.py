"""`qtrt chat` in a real terminal (a pseudo-terminal driven by pexpect): a question, a follow-up that needs the first
answer, the KV cache reused between turns, Ctrl-C stopping one answer without leaving the chat, /reset, /exit.

On the CPU with the real 0.5B in CI; on the GPU (cuda backend, the real 1.5B) on the lent H100 where
QTRT_CHAT_TRANSCRIPT names a file for the transcript (scripts/device_check.sh)."""
from __future__ import annotations

import os
import re
import sys
import time

import pexpect
import pytest

from conftest import default_sigint, require_real


def drive_chat(model_path, backend: str, transcript=None) -> dict:
    """One scripted session; returns what it saw. Greedy decoding, so the answers are deterministic."""
    log = open(transcript, "w") if transcript else None
    t0 = time.perf_counter()
    c = pexpect.spawn(sys.executable, ["-m", "toolchain.cli", "chat", "--model", str(model_path), "--backend", backend,
                                       "--max-new-tokens", "48", "--quiet"],
                      encoding="utf-8", timeout=600, dimensions=(40, 200), env=dict(os.environ, PYTHONUNBUFFERED="1"),
                      preexec_fn=default_sigint)  # Ctrl-C must reach it whatever the runner ignores
    c.logfile_read = log
    seen = {}
    try:
        c.expect("> ")
        seen["ready_s"] = time.perf_counter() - t0
        c.sendline("My name is Zorblax. Please remember it and greet me.")
        c.expect("greet me\\.\r\n")
        c.expect("\r\n> ")
        seen["greeting"] = c.before
        c.sendline("What is my name?")
        c.expect("my name\\?\r\n")
        c.expect("\r\n> ")
        seen["name"] = c.before
        c.sendline("/stats")
        c.expect("\r\n> ")
        seen["stats"] = c.before
        c.sendline("Write a long essay about the history of computing, with many details.")
        c.expect("details\\.\r\n")
        c.expect(r"\w+ \w+")  # the answer has started
        c.sendintr()
        c.expect(r"\[stopped\]")
        c.expect("> ")
        c.sendline("/reset")
        c.expect("conversation cleared")
        c.expect("> ")
        c.sendline("What is my name?")
        c.expect("my name\\?\r\n")
        c.expect("\r\n> ")
        seen["after_reset"] = c.before
        c.sendline("/exit")
        c.expect(pexpect.EOF)
    finally:
        c.close()
        if log:
            log.close()
    seen["exit"] = c.exitstatus
    return seen


def _check(seen):
    assert seen["exit"] == 0
    assert "Zorblax" in seen["greeting"] and "Zorblax" in seen["name"], seen
    m = re.search(r"prompt (\d+) tokens \((\d+) reused", seen["stats"])
    assert m and 0 < int(m.group(2)) < int(m.group(1)), seen["stats"]  # the follow-up re-read only its own tokens
    assert "Zorblax" not in seen["after_reset"], seen["after_reset"]


@pytest.mark.real_model
@pytest.mark.slow
def test_chat_on_the_cpu():
    _check(drive_chat(require_real("0.5b"), "cpu"))


@pytest.mark.gpu
@pytest.mark.real_model
def test_chat_on_the_gpu_real_1_5b():
    _check(drive_chat(require_real("1.5b"), "cuda", os.environ.get("QTRT_CHAT_TRANSCRIPT")))
