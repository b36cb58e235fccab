"""`qtrt serve` as clients meet it, started by the test on 127.0.0.1: the official `openai` package against the real
0.5B on the cpu backend (streaming and not, 4 concurrent clients), bad requests answered with a 4xx JSON error naming
the field while the server keeps serving, the API key, a client that disconnects mid-stream (its slot is freed), and
/health and /metrics after all of it."""
from __future__ import annotations

import json
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
def server(model, *args):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "serve", "--model", str(model), "--backend", "cpu",
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
    ({"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({}, 400, "prompt"),
])
def test_bad_requests_get_a_4xx_naming_the_field(tiny_server, body, status, param):
    code, err = _post(tiny_server, "/v1/completions", body)
    assert code == status and err["error"]["param"] == param and err["error"]["message"], err
    assert _health(tiny_server)["status"] == "ok"


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
    questions = ["What is 2 + 3? Answer with a number.", "Name a primary color.", "Write a haiku about rain.",
                 "Say hello in French."]
    with server(require_real("0.5b"), "--slots", "4", "--max-context", "1024") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        (model,) = [m.id for m in client.models.list().data]
        done = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=12)
        assert done.choices[0].text and done.usage.completion_tokens <= 12
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": questions[0]}],
                                              max_tokens=16)
        assert "5" in chat.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": questions[0]}], max_tokens=16, stream=True))
        assert streamed == chat.choices[0].message.content
        together = [None] * 4

        def ask(i):
            together[i] = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": questions[i]}], max_tokens=24).choices[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        alone = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                max_tokens=24).choices[0] for q in questions]
        assert [c.message.content for c in together] == [c.message.content for c in alone]
        assert _health(url) == {"status": "ok", "slots": 4, "busy_slots": 0, "queue": 0}


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
