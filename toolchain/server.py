"""`qtrt serve`: an OpenAI-compatible HTTP API over the engine (Starlette on uvicorn).

    POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models, GET /health, GET /metrics

The server only translates HTTP: it checks the request (a 4xx JSON error naming the field, and the server keeps
serving), applies the chat template, tokenizes, submits token ids to the engine (toolchain/engine.py), turns the
engine's token events into text (incremental UTF-8, stop strings) and into JSON or server-sent events. A client that
goes away mid-stream aborts its request, which frees its slot before the next step.
"""
from __future__ import annotations

import json
import time
import uuid

from .decoder import Sampling, StopStrings
from .sampling import MAX_LOGPROBS
from .engine import Engine, Params
from .errors import UserError
from .tokenizer import StreamDecoder

ACCEPTED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
            "seed", "stop", "stream", "stream_options", "n", "user", "logprobs", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "min_p", "top_logprobs"}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def _error(message: str, status: int = 400, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error"):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Server:
    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None, max_tokens_limit: int = 4096,
                 max_body_bytes: int = 1 << 20):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.tokenizer = engine.decoder.tokenizer
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.started = time.time()

    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], exception_handlers={404: lambda req, exc: _error(f"no route {req.url.path}", 404, code="not_found"),
                               405: lambda req, exc: _error(f"{req.method} is not allowed on {req.url.path}", 405)})

    # -- plain endpoints -----------------------------------------------------------------------------------------------
    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", **{k: v for k, v in self.engine.status().items()
                                                 if k in ("slots", "busy_slots", "queue")}})

    async def metrics(self, request):
        from starlette.responses import PlainTextResponse

        if (denied := self._auth(request)) is not None:
            return denied
        s = self.engine.status()
        tps = s["tokens_generated"] / s["step_seconds"] if s["step_seconds"] else 0.0
        lines = [
            ("qtrt_requests_total", "counter", "requests submitted", s["requests_total"]),
            ("qtrt_requests_finished_total", "counter", "requests finished", s["requests_finished"]),
            ("qtrt_busy_slots", "gauge", "slots serving a request", s["busy_slots"]),
            ("qtrt_slots", "gauge", "KV-cache slots", s["slots"]),
            ("qtrt_queue_depth", "gauge", "requests waiting for a slot", s["queue"]),
            ("qtrt_tokens_generated_total", "counter", "tokens generated", s["tokens_generated"]),
            ("qtrt_prompt_tokens_total", "counter", "prompt tokens submitted", s["prompt_tokens"]),
            ("qtrt_prompt_tokens_reused_total", "counter", "prompt tokens found in a slot's cache",
             s["prompt_tokens_reused"]),
            ("qtrt_prefill_tokens_total", "counter", "prompt tokens computed", s["prefill_tokens"]),
            ("qtrt_steps_total", "counter", "engine steps", s["steps"]),
            ("qtrt_step_seconds_total", "counter", "seconds spent in steps (prefill and decode)", s["step_seconds"]),
            ("qtrt_tokens_per_second", "gauge", "generated tokens per second of step time", tps),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def models(self, request):
        from starlette.responses import JSONResponse

        if (denied := self._auth(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                          "created": int(self.started), "owned_by": "qtrt"}]})

    # -- generation ----------------------------------------------------------------------------------------------------
    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request):
        return await self._generate(request, chat=True)

    def _auth(self, request):
        if not self.api_key:
            return None
        h = request.headers
        given = h.get("x-api-key") or (h.get("authorization", "")[7:] if h.get("authorization", "").lower()
                                       .startswith("bearer ") else None)
        if given != self.api_key:
            return _error("invalid or missing API key (Authorization: Bearer KEY)", 401, kind="authentication_error",
                          code="invalid_api_key")
        return None

    async def _body(self, request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BadRequest(f"the request body is over {self.max_body_bytes} bytes", status=413)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise BadRequest(f"the request body is over {self.max_body_bytes} bytes", status=413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def _parse(self, body: dict, chat: bool) -> tuple[list[int], Params, list[str], bool]:
        for k in body:
            if k not in ACCEPTED:
                raise BadRequest(f"'{k}' is not supported by this server", k)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest(f"the model '{model}' does not exist; this server serves '{self.model_name}'", "model",
                             404, "model_not_found")
        if body.get("n", 1) != 1:
            raise BadRequest("only n = 1 is supported", "n")
        logprobs = self._logprobs(body, chat)
        floats = {}
        for k, lo, hi, default in (("presence_penalty", -2, 2, 0.0), ("frequency_penalty", -2, 2, 0.0),
                                   ("repetition_penalty", 1e-6, 10, 1.0), ("min_p", 0, 1, 0.0)):
            v = body.get(k)
            v = default if v is None else v
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise BadRequest(f"{k} must be a number in [{0 if lo == 1e-6 else lo}, {hi}]"
                                 + (" and above 0" if lo == 1e-6 else ""), k)
            floats[k] = float(v)
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = body.get(key, 256 if chat else 16)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.max_tokens_limit:
            raise BadRequest(f"{key} must be an integer between 1 and {self.max_tokens_limit}", key)
        t = body.get("temperature", 1.0 if body.get("top_p") is not None else 0.0)
        if t is None:
            t = 0.0
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 2:
            raise BadRequest("temperature must be a number between 0 and 2", "temperature")
        top_p = body.get("top_p", 1.0)
        top_p = 1.0 if top_p is None else top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise BadRequest("top_p must be a number in (0, 1]", "top_p")
        top_k = body.get("top_k", 0) or 0
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise BadRequest("top_k must be an integer >= 0", "top_k")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise BadRequest("seed must be a non-negative integer", "seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("stop must be a string or a list of at most 4 non-empty strings", "stop")
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest("stream must be true or false", "stream")
        ids = self._prompt_ids(body, chat)
        room = self.engine.max_context - len(ids)
        if room < 1:
            raise BadRequest(f"the prompt has {len(ids)} tokens, which leaves no room in the context of "
                             f"{self.engine.max_context}", "messages" if chat else "prompt", 400,
                             "context_length_exceeded")
        try:
            params = Params(max_tokens=min(max_tokens, room),
                            sampling=Sampling(float(t), top_k, float(top_p), seed, **floats), logprobs=logprobs)
        except UserError as e:
            raise BadRequest(str(e)) from None
        return ids, params, stop, body.get("stream", False)

    @staticmethod
    def _logprobs(body: dict, chat: bool) -> int | None:
        """How many alternatives per token the request wants with its log-probabilities (None: none). Chat:
        logprobs true/false and top_logprobs 0-20; completions: logprobs 0-20 (OpenAI's legacy field)."""
        lp = body.get("logprobs")
        if chat:
            top = body.get("top_logprobs")
            if lp is not None and not isinstance(lp, bool):
                raise BadRequest("logprobs must be true or false", "logprobs")
            if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS):
                raise BadRequest(f"top_logprobs must be an integer between 0 and {MAX_LOGPROBS}", "top_logprobs")
            if top is not None and not lp:
                raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
            return (top or 0) if lp else None
        if body.get("top_logprobs") is not None:
            raise BadRequest("top_logprobs belongs to chat completions; completions take logprobs: N", "top_logprobs")
        if lp is None:
            return None
        if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS:
            raise BadRequest(f"logprobs must be an integer between 0 and {MAX_LOGPROBS}", "logprobs")
        return lp

    def _logprob_format(self, entries: list[dict], chat: bool, offset: int = 0) -> dict:
        """OpenAI's logprobs object of these tokens: chat's {content: [...]}, or completions' parallel lists
        (text_offset counts characters from `offset`)."""
        def spelled(i):  # a token's (text, bytes); where the bytes are not UTF-8 alone, OpenAI's "bytes:\\xNN..." text
            raw = self.tokenizer.token_bytes(i)
            try:
                return raw.decode("utf-8"), raw
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

        def text(i):  # (distinct tokens get distinct texts: top_logprobs' keys)
            return spelled(i)[0]

        def chat_entry(i, lp):
            t, raw = spelled(i)
            return {"token": t, "logprob": lp, "bytes": list(raw)}

        if chat:
            return {"content": [{**chat_entry(e["token"], e["logprob"]),
                                 "top_logprobs": [chat_entry(i, lp) for i, lp in e["top"]]} for e in entries]}
        tokens = [text(e["token"]) for e in entries]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{text(i): lp for i, lp in e["top"]} for e in entries], "text_offset": offsets}

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        vocab = self.engine.vocab
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
            clean = []
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                        or not isinstance(m.get("content"), str):
                    raise BadRequest(f"messages[{i}] must be {{role: system|user|assistant, content: string}}",
                                     f"messages[{i}]")
                clean.append({"role": m["role"], "content": m["content"]})
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(clean))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(x, int) and not isinstance(x, bool)
                                                            for x in prompt):
                bad = [x for x in prompt if not 0 <= x < vocab]
                if bad:
                    raise BadRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
                ids = list(prompt)
            else:
                raise BadRequest("prompt must be a string or a list of token ids (one prompt per request)", "prompt")
        if not ids:
            raise BadRequest("the prompt is empty", "messages" if chat else "prompt")
        return ids

    async def _generate(self, request, chat: bool):
        import asyncio

        from starlette.responses import JSONResponse, StreamingResponse

        if (denied := self._auth(request)) is not None:
            return denied
        try:
            ids, params, stop, stream = self._parse(await self._body(request), chat)
        except BadRequest as e:
            return _error(str(e), e.status, e.param, e.code)
        handle = self.engine.submit(ids, params, loop=asyncio.get_running_loop())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        pieces = self._text(handle, stop)
        if stream:
            return StreamingResponse(self._sse(pieces, handle, rid, created, chat, params.logprobs is not None),
                                     media_type="text/event-stream")
        text, finish, entries = [], "length", []
        try:
            async for kind, value in pieces:
                if kind == "text":
                    text.append(value)
                elif kind == "logprob":
                    entries.append(value)
                else:
                    finish = value
        finally:
            self.engine.abort(handle.id)  # no-op once finished; frees the slot if this handler was cancelled
        if finish == "error":
            return _error("the generation failed on the server", 500, kind="server_error")
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(handle.ids),
                 "total_tokens": len(ids) + len(handle.ids)}
        content = "".join(text)
        lp = self._logprob_format(entries, chat) if params.logprobs is not None else None
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
                   "logprobs": lp}
                  if chat else {"index": 0, "text": content, "finish_reason": finish, "logprobs": lp})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": self.model_name, "choices": [choice], "usage": usage})

    async def _text(self, handle, stop):
        """("text", piece)... then ("finish", reason): the engine's tokens as text, cut at a stop string (which
        aborts the request: its slot is freed); ("logprob", entry) before each token's text where the request asked
        for log-probabilities."""
        sd, cut = StreamDecoder(self.tokenizer), StopStrings(stop)
        n, held = 0, []  # log-probabilities of tokens whose text the stop-string cut still holds back
        async for kind, value in handle:
            if kind == "token":
                if n < len(handle.logprobs):  # the request asked for them: set before its token event
                    held.append(handle.logprobs[n])
                n += 1
                piece = cut.push(sd.push(value))
                if cut.stopped:  # the held tokens made the stop string: their text is cut, so are they
                    if piece:
                        yield "text", piece
                    self.engine.abort(handle.id)
                    yield "finish", "stop"
                    return
                if piece and not cut.held:
                    for entry in held:
                        yield "logprob", entry
                    held.clear()
                if piece:
                    yield "text", piece
            elif kind == "done":
                tail = cut.push(sd.flush())
                tail += "" if cut.stopped else cut.flush()
                if not cut.stopped:
                    for entry in held:
                        yield "logprob", entry
                if tail:
                    yield "text", tail
                yield "finish", "stop" if cut.stopped else ("length" if value == "abort" else value)
                return
            else:
                yield "finish", "error"
                return

    async def _sse(self, pieces, handle, rid, created, chat, logprobs: bool = False):
        kind_name = "chat.completion.chunk" if chat else "text_completion"
        pending, offset = [], [0]  # log-probabilities of the tokens since the last frame; characters sent

        def frame(delta_text=None, finish=None, role=False):
            lp = None
            if logprobs and pending:
                lp = self._logprob_format(pending, chat, offset[0])
                pending.clear()
            offset[0] += len(delta_text or "")
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lp}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": lp}
            return "data: " + json.dumps({"id": rid, "object": kind_name, "created": created,
                                          "model": self.model_name, "choices": [choice]}) + "\n\n"

        try:
            if chat:
                yield frame(role=True)
            async for kind, value in pieces:
                if kind == "logprob":
                    pending.append(value)
                elif kind == "text":
                    yield frame(value)
                elif value == "error":
                    yield "data: " + json.dumps({"error": {"message": "the generation failed on the server",
                                                           "type": "server_error"}}) + "\n\n"
                else:
                    yield frame(finish=value)
            yield "data: [DONE]\n\n"
        finally:  # the client went away (cancelled here) or the stream ended: the slot is freed either way
            self.engine.abort(handle.id)


def bind(host: str, port: int):
    """The listening socket, bound before the model loads: an address in use or unknown is a one-line UserError at
    once, and uvicorn is handed this very socket (no window for another process to take the port)."""
    import socket

    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:  # socket.gaierror included
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another "
                        "--port, or a --host of this machine") from None
    return sock


def serve(engine: Engine, model_name: str, sock, api_key: str | None = None, max_tokens_limit: int = 4096,
          log_level: str = "warning"):
    """Serve on the bound socket `sock` (bind()) until interrupted."""
    import uvicorn

    app = Server(engine, model_name, api_key, max_tokens_limit).app()
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
