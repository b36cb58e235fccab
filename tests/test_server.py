"""`qtrt serve` as clients meet it, started by the test on 127.0.0.1: the official `openai` package against the real
0.5B on the cpu backend (streaming and not, 4 concurrent clients), bad requests answered with a 4xx JSON error naming
the field while the server keeps serving, the API key, a client that disconnects mid-stream (its slot is freed), and
/health and /metrics after all of it."""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import httpx
import openai
import pytest

from conftest import TINY, require_real


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(model, *args, backend="cpu"):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "serve", "--model", str(model), "--backend", backend,
                          "--port", str(port), "--quiet", *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if p.poll() is not None:
                raise AssertionError(f"server exited {p.returncode}: {p.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def _health(url) -> dict:
    return json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())


def _post(url, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=data, headers={"content-type": "application/json", **(headers or {})},
                   timeout=60)
    return r.status_code, r.json()


@pytest.fixture(scope="module")
def tiny_server(synth_gguf):
    with server(synth_gguf(**dict(TINY, context_length=8192)), "--slots", "2", "--max-context", "8192",
                "--max-tokens-limit", "8000", "--model-name", "tiny") as url:
        yield url


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 8001}, 400, "max_tokens"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": [TINY["vocab"] + 5]}, 400, "prompt"),
    ({"prompt": "word " * 9000}, 400, "prompt"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "hi", "top_logprobs": 2}, 400, "top_logprobs"),
    ({"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    ({"prompt": "hi", "presence_penalty": 9}, 400, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({}, 400, "prompt"),
])
def test_bad_requests_get_a_4xx_naming_the_field(tiny_server, body, status, param):
    code, err = _post(tiny_server, "/v1/completions", body)
    assert code == status and err["error"]["param"] == param and err["error"]["message"], err
    assert _health(tiny_server)["status"] == "ok"


def test_logprobs_are_the_models_log_softmax(tiny_server, synth_gguf):
    """Completions with logprobs (the official client, streamed and not) and chat with top_logprobs: every token's
    log-probability and its alternatives equal a float64 log-softmax of the reference decoder's logits for the same
    tokens, computed here independently; the streamed entries equal the non-streamed ones."""
    import numpy as np

    from toolchain.decoder import CpuBackend, Decoder

    client = openai.OpenAI(base_url=tiny_server + "/v1", api_key="unused")
    rng = np.random.default_rng()
    prompt = list(map(int, rng.integers(0, TINY["vocab"], 40)))
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=3)
    lp = done.choices[0].logprobs
    streamed = [c.choices[0].logprobs for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                                                          logprobs=3, stream=True)]
    flat = [x for c in streamed if c is not None for x in c.token_logprobs]
    assert flat == lp.token_logprobs and len(flat) == done.usage.completion_tokens
    dec = Decoder.open(str(synth_gguf(**dict(TINY, context_length=8192))), 512)
    dec.backend = CpuBackend(dec.model, 512)
    logits = dec.backend.forward(prompt)
    for k, (got, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        z = logits.astype(np.float64)
        ref = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
        tok = int(np.argmax(ref))  # greedy: the drawn token is the argmax
        assert abs(got - ref[tok]) < 1e-4, (k, got, ref[tok])
        best = np.argsort(-ref, kind="stable")[:3]
        assert np.allclose(sorted(top.values(), reverse=True), ref[best], atol=1e-4)
        raw = dec.tokenizer.token_bytes(tok)  # text, or OpenAI's bytes:\xNN form where not UTF-8 alone
        try:
            want = raw.decode("utf-8")
        except UnicodeDecodeError:
            want = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        assert lp.tokens[k] == want and len(top) == 3  # three distinct keys
        logits = dec.backend.forward([tok])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=4, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.logprob <= 0 and abs(c.logprob - c.top_logprobs[0].logprob) < 1e-9  # greedy: the top one
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_logprobs_stop_with_the_text_a_stop_string_cuts(tiny_server):
    """The tokens whose text a stop string cut have no log-probabilities: the tokens listed spell a prefix of the
    returned text, which ends before the stop string."""
    client = openai.OpenAI(base_url=tiny_server + "/v1", api_key="unused")
    free = client.completions.create(model="tiny", prompt="one two three", max_tokens=24).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert stop and stop in free
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model="tiny", prompt="one two three", max_tokens=24, stop=[stop],
                                                    logprobs=1, stream=True))
            text = "".join(c.choices[0].text for c in chunks)
            tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        else:
            done = client.completions.create(model="tiny", prompt="one two three", max_tokens=24, stop=[stop],
                                             logprobs=1)
            text, tokens = done.choices[0].text, done.choices[0].logprobs.tokens
        assert text == free[:free.find(stop)], stream
        spelled = b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                           for t in tokens).decode("utf-8", errors="replace")
        assert text.startswith(spelled) and stop not in spelled, (stream, tokens, text)


def test_bad_chat_messages_and_unknown_routes(tiny_server):
    code, err = _post(tiny_server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert code == 400 and err["error"]["param"] == "messages[0]"
    r = httpx.get(tiny_server + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"]
    code, ok = _post(tiny_server, "/v1/completions", {"prompt": "still serving", "max_tokens": 3})
    assert code == 200 and ok["usage"]["completion_tokens"] == 3


def test_client_disconnect_mid_stream_frees_its_slot(tiny_server):
    """A stream of thousands of tokens, closed after two events: the slot is free again within seconds, and the
    metrics count the aborted request as finished."""
    with httpx.stream("POST", tiny_server + "/v1/completions", timeout=60,
                      json={"prompt": "a long story", "max_tokens": 8000, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert _health(tiny_server)["busy_slots"] == 1
    deadline = time.time() + 10
    while _health(tiny_server)["busy_slots"] and time.time() < deadline:
        time.sleep(0.1)
    assert _health(tiny_server)["busy_slots"] == 0
    metrics = httpx.get(tiny_server + "/metrics", timeout=10).text
    assert "qtrt_busy_slots 0" in metrics and "qtrt_tokens_generated_total" in metrics


def test_api_key(synth_gguf):
    with server(synth_gguf(**TINY), "--slots", "1", "--api-key", "s3cret", "--model-name", "tiny") as url:
        code, err = _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert code == 401 and err["error"]["type"] == "authentication_error"
        code, _ = _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, {"Authorization": "Bearer wrong"})
        assert code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret")
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        assert _health(url)["status"] == "ok"  # /health stays public


@pytest.mark.real_model
@pytest.mark.slow
def test_openai_client_against_the_real_0_5b():
    """The official client: models, completions, chat (stream and not), 4 concurrent clients whose answers equal the
    same requests sent one at a time (greedy, cpu backend: exact), then the server is still healthy."""
    with server(require_real("0.5b"), "--slots", "4", "--max-context", "1024") as url:
        _client_session(url, exact=True)


QUESTIONS = ["What is 2 + 3? Answer with a number.", "Name a primary color.", "Write a haiku about rain.",
             "Say hello in French."]


def _client_session(url, exact: bool, transcript=None) -> list[str]:
    """What a user of the official client does; returns the transcript lines. exact: the concurrent answers equal
    the answers alone (the cpu backend); else (GPU: batched kernels sum in another order than batch-1 ones, so a
    near-tie may go the other way) at least 3 of 4 do."""
    log = []
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    (model,) = [m.id for m in client.models.list().data]
    done = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=12)
    assert done.choices[0].text and done.usage.completion_tokens <= 12
    log.append(f"completion 'def add(a, b):' -> {done.choices[0].text!r}")
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                          max_tokens=16)
    assert "5" in chat.choices[0].message.content
    log.append(f"chat {QUESTIONS[0]!r} -> {chat.choices[0].message.content!r}")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=16, stream=True))
    assert streamed == chat.choices[0].message.content
    together = [None] * 4

    def ask(i):
        together[i] = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[i]}], max_tokens=24).choices[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    alone = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                            max_tokens=24).choices[0] for q in QUESTIONS]
    same = [a.message.content == b.message.content for a, b in zip(together, alone)]
    log += [f"4 concurrent: {q!r} -> {c.message.content!r} (alone: {'same' if ok else repr(a.message.content)})"
            for q, c, a, ok in zip(QUESTIONS, together, alone, same)]
    assert all(same) if exact else sum(same) >= 3, log
    # a seeded sampled request: the same answer alone and beside 3 others (draws depend on seed and position only)
    sampled = dict(model=model, messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=24, temperature=0.8,
                   top_p=0.9, seed=1234)
    first = client.chat.completions.create(**sampled).choices[0].message.content
    beside = [None] * 4

    def ask_sampled(i):
        body = sampled if i == 0 else dict(sampled, messages=[{"role": "user", "content": QUESTIONS[i]}], seed=i)
        beside[i] = client.chat.completions.create(**body).choices[0].message.content

    threads = [threading.Thread(target=ask_sampled, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    log.append(f"sampled (T 0.8, top-p 0.9, seed 1234) alone -> {first!r}; beside 3 others -> {beside[0]!r}")
    if exact:
        assert beside[0] == first, log
    # log-probabilities (the device's pass on cuda), streamed and not: the same; greedy tokens are their top one
    lp = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=8, logprobs=3).choices[0].logprobs
    flat = [x for c in client.completions.create(model=model, prompt="def add(a, b):", max_tokens=8, logprobs=3,
                                                 stream=True) if c.choices[0].logprobs
            for x in c.choices[0].logprobs.token_logprobs]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) > 0 and flat == lp.token_logprobs, (flat, lp)
    for got, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and got <= 0 and abs(got - max(top.values())) < 1e-6
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
    log.append(f"logprobs=3 'def add(a, b):' -> {list(zip(lp.tokens, [round(x, 4) for x in lp.token_logprobs]))}")
    code, err = _post(url, "/v1/completions", {"prompt": "hi", "top_p": 0})
    assert code == 400 and err["error"]["param"] == "top_p"
    log.append(f"bad request top_p 0 -> {code} {err['error']['message']!r}")
    assert _health(url) == {"status": "ok", "slots": _health(url)["slots"], "busy_slots": 0, "queue": 0}
    log.append(f"health after: {_health(url)}")
    if transcript:
        with open(transcript, "w") as f:
            f.write("\n".join(log) + "\n")
    return log


@pytest.mark.gpu
@pytest.mark.real_model
def test_openai_client_against_the_real_1_5b_on_cuda():
    """The same client session against `qtrt serve --backend cuda` with the real 1.5B (device-side sampling, engine
    steps of several slots), transcript to $QTRT_SERVE_TRANSCRIPT."""
    import os

    with server(require_real("1.5b"), "--slots", "8", "--max-context", "4096", backend="cuda") as url:
        _client_session(url, exact=False, transcript=os.environ.get("QTRT_SERVE_TRANSCRIPT"))


def _gpu_memory_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.gpu
@pytest.mark.real_model
def test_soak_on_cuda_with_the_real_1_5b():
    """Several hundred requests over minutes (half sampled on the device), 8 clients, one 2,000-token prompt while
    they run: none lost, no slot leak, device memory flat (after a warm-up round that captures the step graphs).
    Report to $QTRT_LOAD_REPORT."""
    import os

    n = int(os.environ.get("QTRT_SOAK_REQUESTS", "300"))
    report = os.environ.get("QTRT_LOAD_REPORT", "/dev/null")
    with server(require_real("1.5b"), "--slots", "8", "--max-context", "4096", backend="cuda") as url:
        warm = subprocess.run([sys.executable, "scripts/load_test.py", "--url", url, "--clients", "8", "--requests",
                               "24", "--max-tokens", "32", "--sampled", "-o", "/dev/null"],
                              capture_output=True, text=True, timeout=300)
        assert warm.returncode == 0, warm.stdout[-2000:] + warm.stderr[-2000:]
        before = _gpu_memory_mib()
        r = subprocess.run([sys.executable, "scripts/load_test.py", "--url", url, "--clients", "8", "--requests",
                            str(n), "--max-tokens", "64", "--long-prompt", "2000", "--sampled", "--seconds", "400",
                            "-o", report], capture_output=True, text=True, timeout=500)
        after = _gpu_memory_mib()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["completed"] == out["sent"] == n and out["lost"] == 0 and out["failed"] == 0
    assert out["health_after"] == {"status": "ok", "slots": 8, "busy_slots": 0, "queue": 0}
    assert after - before <= 64, (before, after)


def test_soak_none_lost_no_slot_leak(tiny_server):
    """scripts/load_test.py (bounded: 80 streaming requests from 6 clients, staggered, prompts of 7 lengths, plus one
    long prompt while they run): every request completes, none is lost, and the slots and queue are empty after."""
    r = subprocess.run([sys.executable, "scripts/load_test.py", "--url", tiny_server, "--clients", "6", "--requests",
                        "80", "--max-tokens", "16", "--long-prompt", "600", "--seconds", "240", "-o", "/dev/null"],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["completed"] == report["sent"] == 80 and report["lost"] == 0 and report["failed"] == 0
    assert report["health_after"] == {"status": "ok", "slots": 2, "busy_slots": 0, "queue": 0}
    assert report["long_prompt"]["ttft_s"] > 0


def test_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    """The address is bound first: a busy port is a one-line error, exit 2, even with a model that does not exist."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "toolchain.cli", "serve", "--model", str(tmp_path / "absent.gguf"),
                            "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--port" in r.stderr and "absent" not in r.stderr
