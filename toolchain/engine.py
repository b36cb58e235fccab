"""Many requests at once over one backend: slots, a queue, continuous batching, chunked prefill, prefix reuse.

    engine = Engine(decoder, slots=4)               # a Decoder whose backend has at least `slots` KV-cache slots
    handle = engine.submit(prompt_ids, Params(max_tokens=64, sampling=Sampling(...)))
    for event in handle: ...                        # or `async for event in handle` (asyncio-friendly)
    engine.abort(handle.id); engine.close()

Three parts, as in vLLM and llama-server (docs: ../shared/docs/serving.md):
- `Scheduler.schedule()` only decides which tokens run next: one decode row per generating request first, then prompt
  chunks of prefilling requests in the rows the decode rows leave (a long prompt advances at most `prefill_chunk`
  tokens a step, so it never stalls running streams for more than one chunk; vLLM's token budget). Prefix reuse
  keeps multiples of REUSE_ALIGN tokens and a chunk is a whole `prefill_chunk` wherever the rows allow it, so past
  its reused part a prompt is computed in the same pieces whatever else runs as long as the decode rows leave a
  chunk's room (on the cpu reference, 32-token chunks in steps of 64 rows: while at most 32 rows decode).
- `Engine` owns requests, slots and the loop (a thread): it admits requests into free slots (the slot whose cached
  tokens share the longest prefix with the prompt, llama.cpp's prompt cache: those tokens are not recomputed), runs
  the step on the backend, samples, retires requests (stop token, max_tokens, context end, abort) and frees their slots.
- The backend only runs steps: `step(ids, positions, slots, rows) -> logits of those rows` (cpu and cuda backends),
  sampled here on the host; or, where it samples on the device (cuda), `set_sampling(slot, ...)` when a request takes
  a slot, `step_tokens(ids, positions, slots, rows, tail) -> the sampled tokens of those rows` (tail: which of the
  sampler's passes the step needs, sampling.Tail) and `last_logprobs` for the requests that ask; decode steps may
  also be launched ahead (`launch_decode`, `read_tokens`, `read_logprobs`). Both draw from the same definition with
  the same uniform per (seed, position) (toolchain/sampling.py).

Events are (kind, payload): ("token", id) for each new token, then ("done", finish_reason) with finish_reason "stop",
"length" or "abort"; ("error", message) if the step failed.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .decoder import _common_prefix
from .sampling import MAX_LOGPROBS, Sampling, Tail, apply_penalties, draw_rng, sample, token_logprobs
from .errors import UserError, check_token_ids


@dataclass(frozen=True)
class Params:
    max_tokens: int = 64
    sampling: Sampling = Sampling()
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely (sampling.py)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UserError(f"max_tokens {self.max_tokens!r}: must be an integer >= 1")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise UserError(f"logprobs {self.logprobs!r}: must be an integer in [0, {MAX_LOGPROBS}]")


class RequestHandle:
    """The caller's side of a request: iterate (sync or async) over its events."""

    def __init__(self, rid: str):
        self.id = rid
        self._q: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue | None = None
        self.ids: list[int] = []
        self.logprobs: list[dict] = []  # one per token event, when the request asked (set before the event)
        self.finish_reason: str | None = None
        self.stats: dict = {}

    def _emit(self, event):
        if event[0] == "token":
            self.ids.append(event[1])
        elif event[0] == "done":
            self.finish_reason = event[1]
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._aq.put_nowait, event)
        else:
            self._q.put(event)

    def bind_loop(self, loop: asyncio.AbstractEventLoop):
        """Deliver events to this asyncio loop from now on (call before the first event, i.e. at submit)."""
        self._loop, self._aq = loop, asyncio.Queue()

    def __iter__(self):
        while True:
            event = self._q.get()
            yield event
            if event[0] in ("done", "error"):
                return

    async def __aiter__(self):
        while True:
            event = await self._aq.get()
            yield event
            if event[0] in ("done", "error"):
                return


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: Params
    handle: RequestHandle
    seed: int  # the draws' uniforms: (seed, position) (toolchain/sampling.py)
    slot: int | None = None
    computed: int = 0  # prompt tokens in the slot's cache
    generated: list[int] = field(default_factory=list)
    aborted: bool = False
    reused: int = 0  # prompt tokens found in the slot's cache at admission
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


@dataclass
class Row:
    token: int
    position: int
    slot: int
    request: Request | None  # the request whose next token this row's logits give (None: mid-prompt row)


def _tail(rows: list[Row]) -> Tail | None:
    """The device sampler's passes a step's emitting rows need (penalties, draw, logprobs: sampling.Tail), or None
    where the argmax alone serves them."""
    return Tail.of((r.request.params.sampling, r.request.params.logprobs is not None) for r in rows)


# Prompt chunks. Prefix reuse keeps multiples of REUSE_ALIGN tokens; chunks are whole chunks where the step has room,
# so a prompt is computed in the same pieces whatever else runs once past its reused part (on the cpu reference,
# whose `prompt_chunk` is 32 too, exactly those it gets alone: the bit-exact concurrency test). Device backends take
# larger chunks (DEVICE_PREFILL_CHUNK, unless a backend names its own `prompt_chunk`; at most a step's rows, less the
# decode rows beside it): a step costs them a pass over all the weights whatever its rows, so a prompt in pieces of
# 32 took many such passes. Measured (H100, real 1.5B, 8 streams beside a 2,000-token prompt): its first token
# 0.889 -> 0.282 s with chunks of 256, the streams' largest gap 25 -> 44 ms (bench/results/device-2026-12-05d). Since
# a chunk's attention runs as the prefill pair (cuda_backend `_piece_from`), 512 (as llama-server's micro-batch):
# 4 streams decoding beside an 8,192-token prompt (synthetic 1.5B, H100, two rounds each), its first token 0.584 /
# 0.420 s with chunks of 256, 0.249 / 0.231 s with 507 (512 less 5 slots); the streams' gaps meanwhile, median 16.7 /
# 12.7 ms and 12.6 / 12.9 ms, largest 45.2 / 15.6 ms and 24.3 / 17.4 ms (bench/results/device-2026-12-06i).
REUSE_ALIGN = 32
DEVICE_PREFILL_CHUNK = 512


class Scheduler:
    """Which tokens run in the next step (and nothing else)."""

    def __init__(self, max_rows: int, prefill_chunk: int):
        self.max_rows, self.prefill_chunk = max_rows, prefill_chunk

    def schedule(self, running: list[Request]) -> list[Row]:
        rows: list[Row] = []
        for r in running:  # decode rows first: every generating stream gets its token each step
            if not r.prefilling and r.generated:
                rows.append(Row(r.generated[-1], len(r.prompt) + len(r.generated) - 1, r.slot, r))
        prompts = 0
        for r in running:  # then prompt chunks, oldest first, in the rows left
            if not r.prefilling:
                continue
            # a whole chunk where the rows allow: past its reused part a prompt then runs in the same pieces
            # whatever else runs (on the cpu backend its tokens are exactly those it gets alone); where they do not,
            # the step's first prompt takes the rows the decode rows left (a shorter piece: no prompt waits for a
            # step with more room, and the chunk may be the step's full size), a later one waits
            n = min(self.prefill_chunk, len(r.prompt) - r.computed)
            room = self.max_rows - len(rows)
            if n > room:
                if prompts or room <= 0:
                    continue
                n = room
            prompts += 1
            for j in range(n):
                pos = r.computed + j
                last = pos == len(r.prompt) - 1
                rows.append(Row(r.prompt[pos], pos, r.slot, r if last else None))
        return rows


class Engine:
    def __init__(self, decoder, slots: int = 4, prefill_chunk: int | None = None, max_rows: int | None = None):
        be = decoder.backend
        if not hasattr(be, "step"):
            raise UserError(f"the {be.name} backend runs one sequence at a time: serve with --backend cuda or cpu")
        if getattr(be, "n_slots", 1) < slots:
            raise UserError(f"--slots {slots}: the {be.name} backend was built with {getattr(be, 'n_slots', 1)} "
                            "KV-cache slots")
        self.decoder, self.backend, self.n_slots = decoder, be, slots
        self.max_context = decoder.max_context
        self.device_sampling = hasattr(be, "step_tokens")
        self.pipelined = hasattr(be, "launch_decode")  # decode steps back to back (_step_pipelined)
        self._inflight = None  # (rows, ticket, t0) of a launched decode step not read yet
        self.vocab = decoder.model.config.vocab
        self.stop_ids = decoder.tokenizer.stop_token_ids
        max_rows = max_rows or getattr(be, "max_tokens", 64)
        if slots >= max_rows:
            raise UserError(f"--slots {slots}: a step holds {max_rows} tokens; use fewer slots")
        # a chunk may be the whole step: beside d decode rows it takes the max_rows - d rows left (slots < max_rows,
        # so at least one: no prompt starves), and a prompt alone runs in whole chunks (the step's full size where
        # the backend's chunk is larger)
        prefill_chunk = prefill_chunk or getattr(be, "prompt_chunk", DEVICE_PREFILL_CHUNK)
        self.scheduler = Scheduler(max_rows, max(1, min(prefill_chunk, max_rows)))
        self.slot_tokens: list[list[int]] = [[] for _ in range(slots)]  # what each slot's cache holds
        self.slot_owner: list[Request | None] = [None] * slots
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._inbox: queue.Queue = queue.Queue()
        self._submitted = 0  # submits not yet drained into `waiting` (under _lock: two threads count them)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._closed = False
        self.metrics = {"requests_total": 0, "requests_finished": 0, "tokens_generated": 0, "prompt_tokens": 0,
                        "prompt_tokens_reused": 0, "steps": 0, "step_seconds": 0.0, "prefill_tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="qtrt-engine", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread) ----------------------------------------------------------------------------
    def submit(self, prompt_ids, params: Params = Params(), loop: asyncio.AbstractEventLoop | None = None
               ) -> RequestHandle:
        """Queue a request; its tokens are checked here (a UserError names the problem, nothing is queued)."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        ids = check_token_ids(list(prompt_ids), self.vocab)
        if not ids:
            raise UserError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_context:
            raise UserError(f"the prompt has {len(ids)} tokens, which leaves no room in the context of "
                            f"{self.max_context}")
        handle = RequestHandle(f"req-{next(self._ids)}")
        if loop is not None:
            handle.bind_loop(loop)
        seed = params.sampling.seed
        seed = int(np.random.SeedSequence().entropy % 2**63) if seed is None else seed
        req = Request(handle.id, ids, params, handle, seed)
        with self._lock:
            self._submitted += 1
        self._inbox.put(("submit", req))
        self._wake.set()
        return handle

    def abort(self, request_id: str):
        """Stop a request (a client went away, a stop string was seen): its slot is freed before the next step."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def generate_many(self, prompts, params: Params = Params()) -> list[RequestHandle]:
        """Run many prompts concurrently and wait for all: their handles, with .ids and .finish_reason."""
        handles = [self.submit(p, params) for p in prompts]
        for h in handles:
            for _ in h:
                pass
        return handles

    def status(self) -> dict:
        return {"slots": self.n_slots, "busy_slots": sum(o is not None for o in self.slot_owner),
                "queue": len(self.waiting) + self._submitted, **self.metrics}

    def close(self):
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)

    # -- the engine thread --------------------------------------------------------------------------------------------
    def _loop(self):
        getattr(self.backend, "bind_thread", lambda: None)()  # e.g. the CUDA context, current per thread
        while not self._closed:
            try:
                self._drain()
                self._admit()
                if not self.running and self._inflight is None:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, the engine goes on
                self._inflight = None
                for r in list(self.running):
                    self._finish(r, None, error=f"{type(e).__name__}: {e}")

    def _drain(self):
        while True:
            try:
                kind, x = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self.waiting.append(x)
                with self._lock:
                    self._submitted -= 1
                self.metrics["requests_total"] += 1
            else:
                for r in self.waiting + self.running:
                    if r.id == x:
                        r.aborted = True
                for r in [r for r in self.waiting if r.aborted]:
                    self.waiting.remove(r)
                    r.handle._emit(("done", "abort"))
                for r in [r for r in self.running if r.aborted]:
                    self._finish(r, "abort")

    def _admit(self):
        """Waiting requests into free slots, FCFS; each takes the free slot sharing the longest prefix with it."""
        while self.waiting:
            free = [s for s in range(self.n_slots) if self.slot_owner[s] is None]
            if not free:
                return
            r = self.waiting.pop(0)
            best = max(free, key=lambda s: _common_prefix(self.slot_tokens[s], r.prompt))
            # reuse multiples of REUSE_ALIGN only (on the cpu reference whole chunks: their cache rows were computed
            # in exactly the pieces this prompt would use), and leave at least one token to compute: its logits
            # give the first new token
            align = min(REUSE_ALIGN, self.scheduler.prefill_chunk)
            keep = min(_common_prefix(self.slot_tokens[best], r.prompt), len(r.prompt) - 1) // align * align
            r.slot, r.computed, r.reused = best, keep, keep
            self.slot_owner[best] = r
            self.slot_tokens[best] = r.prompt[:keep]
            self.metrics["prompt_tokens"] += len(r.prompt)
            self.metrics["prompt_tokens_reused"] += keep
            if self.device_sampling:
                try:
                    self.backend.set_sampling(best, r.params.sampling, r.seed, r.prompt, len(r.prompt) - 1)
                except Exception as e:  # noqa: BLE001 - this request fails alone; the engine goes on
                    self._finish(r, None, error=f"{type(e).__name__}: {e}")
                    continue
            self.running.append(r)

    def _step(self):
        if self._inflight is not None:
            return self._step_pipelined()
        rows = self.scheduler.schedule(self.running)
        emit = [i for i, row in enumerate(rows) if row.request is not None]
        t0 = time.perf_counter()
        args = [row.token for row in rows], [row.position for row in rows], [row.slot for row in rows]
        tail = _tail([rows[i] for i in emit])
        if self.pipelined and rows and len(emit) == len(rows) and self.backend.can_pipeline(len(rows)):
            # decode rows only: launch and return; the next _step speculates the step after it before reading it
            self._inflight = (rows, self.backend.launch_decode(len(rows), max(args[1]), *args, tail=tail),
                              t0)
            return
        records = [None] * len(emit)  # the logprob record of each emitting row, where its request asks
        if self.device_sampling:
            drawn = [int(t) for t in self.backend.step_tokens(*args, rows=emit, tail=tail)]
            if tail and tail.logprobs:
                records = self.backend.last_logprobs(drawn, [rows[i].request.params.logprobs or 0 for i in emit])
        else:
            logits = self.backend.step(*args, rows=emit)
            drawn = []
            for k, (i, li) in enumerate(zip(emit, logits)):
                r = rows[i].request
                history = r.prompt + r.generated if r.params.sampling.penalized else ()
                drawn.append(sample(li, r.params.sampling, draw_rng(r.seed, rows[i].position), history))
                if r.params.logprobs is not None:
                    records[k] = token_logprobs(apply_penalties(li, history, r.params.sampling), drawn[-1],
                                                r.params.logprobs)
        self._keep_logprobs(rows, emit, drawn, records)
        self._apply(rows, emit, drawn, t0)

    def _keep_logprobs(self, rows: list[Row], emit: list[int], drawn: list[int], records: list):
        """Each emitting row's logprob record onto its request, where the request asks: one entry per token event
        (none for a stop token)."""
        for i, tok, rec in zip(emit, drawn, records):
            r = rows[i].request
            if r.params.logprobs is not None and tok not in self.stop_ids:
                r.handle.logprobs.append(rec)

    def _step_pipelined(self):
        """Decode steps back to back (vLLM's async scheduling): while step t runs, step t + 1 of the same rows is
        launched, fed on the device (each row's drawn token, its position + 1), before the host reads step t's
        tokens; so the GPU never waits for the host's bookkeeping. Speculation stops when the rows change: a request
        admitted, finished or aborted, or the context's end; a row whose request finished at step t has its step
        t + 1 token discarded (its cache row past the end is never reused: slot_tokens does not list it)."""
        rows, ticket, t0 = self._inflight
        live = [row.request in self.running for row in rows]
        nxt = None
        if all(live) and len(self.running) == len(rows) and all(row.position + 2 < self.max_context for row in rows):
            nrows = [Row(-1, row.position + 1, row.slot, row.request) for row in rows]  # token: known after step t
            nxt = (nrows, self.backend.launch_decode(len(nrows), max(r.position for r in nrows),
                                                          tail=_tail(nrows)),
                   time.perf_counter())
        drawn = [int(t) for t in self.backend.read_tokens(ticket)]
        self._inflight = nxt
        keep = [i for i, row in enumerate(rows) if row.request in self.running and row.request.slot == row.slot]
        for i in keep:
            if rows[i].token == -1:  # a speculated row was fed the token its request drew at the step before
                rows[i].token = rows[i].request.generated[-1]
        if any(rows[i].request.params.logprobs is not None for i in keep):
            records = self.backend.read_logprobs(ticket, drawn, [row.request.params.logprobs or 0 for row in rows])
            self._keep_logprobs(rows, keep, [drawn[i] for i in keep], [records[i] for i in keep])
        self._apply([rows[i] for i in keep], list(range(len(keep))), [drawn[i] for i in keep], t0)

    def _apply(self, rows: list[Row], emit: list[int], drawn: list[int], t0: float):
        """The host's side of a finished step: the slots' cached tokens, the prompts' progress, the drawn tokens
        (events, stop tokens, max_tokens, the context's end)."""
        self.metrics["steps"] += 1
        self.metrics["step_seconds"] += time.perf_counter() - t0
        for row in rows:  # the cache now holds these tokens
            toks = self.slot_tokens[row.slot]
            del toks[row.position:]
            toks.append(row.token)
            owner = self.slot_owner[row.slot]
            if owner is not None and owner.prefilling:
                owner.computed = max(owner.computed, row.position + 1)
                self.metrics["prefill_tokens"] += 1
        for i, tok in zip(emit, drawn):
            r = rows[i].request
            r.generated.append(tok)
            r.t_first = r.t_first or time.perf_counter()
            self.metrics["tokens_generated"] += 1
            if tok in self.stop_ids:
                self._finish(r, "stop")
                continue
            r.handle._emit(("token", tok))
            # the next step feeds this token at position len(prompt) + len(generated) - 1: it must fit the cache
            if len(r.generated) >= r.params.max_tokens or len(r.prompt) + len(r.generated) >= self.max_context:
                self._finish(r, "length")

    def _finish(self, r: Request, reason: str | None, error: str | None = None):
        if r in self.running:
            self.running.remove(r)
        if r.slot is not None and self.slot_owner[r.slot] is r:
            self.slot_owner[r.slot] = None
        r.handle.stats = {"prompt_tokens": len(r.prompt), "reused_tokens": r.reused,
                          "ttft_s": (r.t_first - r.t_submit) if r.t_first else None,
                          "decode_s": (time.perf_counter() - r.t_first) if r.t_first else 0.0}
        self.metrics["requests_finished"] += 1
        r.handle._emit(("error", error) if error else ("done", reason))
