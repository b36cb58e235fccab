"""Load against a running `qtrt serve` (127.0.0.1 only): N concurrent streaming clients, bounded in count and time.

Each client sends streaming chat or completion requests one after another (staggered starts, prompts of different
lengths, greedy, or every other one sampled with --sampled), and the run reports what users feel and what operators watch:
- requests sent, completed, failed (a failed or lost request is an error: exit 1);
- aggregate generated tokens/s, time to first token and inter-token latency (p50 / p99);
- optionally the first-token time of one long prompt sent while the others run (--long-prompt N tokens), and the
  stall it causes to the running streams (their largest inter-token gap during it);
- the server's /health after the run (busy slots 0, queue 0: no slot leak) and its resident memory before and after
  (--pid), so a soak shows memory flat.

    python3 scripts/load_test.py --url http://127.0.0.1:8000 --clients 16 --requests 200 --max-tokens 64 -o load.json
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from urllib.parse import urlparse

import httpx

WORDS = "the of and to in is for on with as by at from that this it be are or an was".split()


def _rss_kb(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def stream_one(client: httpx.Client, url: str, prompt: str, max_tokens: int, sampled: bool = False) -> dict:
    t0 = time.perf_counter()
    stamps, text = [], []
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    if sampled:
        body |= {"temperature": 0.7, "top_p": 0.9}
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "body": r.read().decode()[:300]}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"ok": False, "error": chunk["error"]}
            piece = chunk["choices"][0].get("text") or ""
            if piece:
                stamps.append(time.perf_counter())
                text.append(piece)
    if not stamps:
        return {"ok": False, "error": "no tokens"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ok": True, "ttft_s": stamps[0] - t0, "gaps": gaps, "pieces": len(stamps), "end": stamps[-1],
            "start": t0, "stamps": stamps}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64, help="total requests (bounded)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=600, help="stop sending after this long (bounded)")
    ap.add_argument("--long-prompt", type=int, default=0, help="also send one prompt of about this many tokens")
    ap.add_argument("--sampled", action="store_true", help="every other request samples (temperature 0.7, top-p 0.9)")
    ap.add_argument("--pid", type=int, help="the server's pid, for its resident memory before and after")
    ap.add_argument("-o", "--output", default="load.json")
    a = ap.parse_args()
    host = urlparse(a.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"load_test: {a.url}: only a server on this machine's loopback is a target")
    rss_before = _rss_kb(a.pid)
    results, lock, sent = [], threading.Lock(), [0]
    deadline = time.time() + a.seconds

    def client(i):
        time.sleep(0.05 * i)
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    if sent[0] >= a.requests or time.time() > deadline:
                        return
                    n = sent[0]
                    sent[0] += 1
                prompt = " ".join(WORDS[(n + j) % len(WORDS)] for j in range(8 + 13 * (n % 7)))
                try:
                    r = stream_one(c, a.url, f"Request {n}: {prompt}", a.max_tokens, a.sampled and n % 2 == 1)
                except httpx.HTTPError as e:
                    r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                with lock:
                    results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    long_run = None
    if a.long_prompt:
        time.sleep(2.0)  # the others are streaming by now
        with httpx.Client(timeout=600) as c:
            long_run = stream_one(c, a.url, "Summarize: " + " ".join(WORDS[j % len(WORDS)]
                                                                      for j in range(a.long_prompt)), 8)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    gaps = [g for r in ok for g in r["gaps"]]
    pieces = sum(r["pieces"] for r in ok)
    report = {"url": a.url, "clients": a.clients, "sent": sent[0], "completed": len(ok),
              "failed": len(results) - len(ok), "lost": sent[0] - len(results), "wall_s": round(wall, 2),
              "aggregate_pieces_per_s": round(pieces / wall, 1),
              "ttft_p50_s": pct([r["ttft_s"] for r in ok], 0.5), "ttft_p99_s": pct([r["ttft_s"] for r in ok], 0.99),
              "itl_p50_s": pct(gaps, 0.5), "itl_p99_s": pct(gaps, 0.99),
              "health_after": httpx.get(a.url + "/health", timeout=10).json(),
              "server_rss_kb": {"before": rss_before, "after": _rss_kb(a.pid)},
              "errors": [r for r in results if not r["ok"]][:5]}
    if long_run and long_run["ok"]:
        t_long0, t_long1 = long_run["start"], long_run["start"] + long_run["ttft_s"]
        during = [b - a_ for r in ok for a_, b in zip(r["stamps"], r["stamps"][1:]) if a_ < t_long1 and b > t_long0]
        report["long_prompt"] = {"tokens_about": a.long_prompt, "ttft_s": round(long_run["ttft_s"], 3),
                                 "largest_gap_of_others_during_it_s": round(max(during), 3) if during else None}
    json.dump(report, open(a.output, "w"), indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "errors"}, indent=1))
    bad = report["failed"] or report["lost"] or report["health_after"].get("busy_slots")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
