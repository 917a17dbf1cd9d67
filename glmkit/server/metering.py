"""Metering: one HTTP request's key, engine requests, usage and ledger row, the ASGI middleware
that authenticates, reads the body, applies the key's limits and keeps the row, and the app's
Prometheus metrics.

    app.add_middleware(MeterMiddleware, server=server)        # server: state.Server
    call = request.scope["glmkit.call"]                       # in a handler: this request's Call
    call.reserve(prompt_tokens + max_tokens * n)              # before any work; LimitError -> 429
    call.submit(choice)  or  call.start(); run the work       # only work started is billed

The middleware wraps /v1/* and /infill. It authenticates (401), then, for the generation routes:
1. reads the whole body before the request takes a slot, so a stalled body holds nothing: at most
   `max_body_bytes` (default 8 MiB; 413 in OpenAI's error shape) within `body_timeout` seconds of
   the head (default 30 s; 408). Both close the connection: the rest of the body is not read.
   The body is then replayed to the app. (Request heads: http.py.)
2. admits the request against the key's limits (429) and writes its ledger row, still open (status
   NULL). The handler reserves the most it may use (`Call.reserve`, LimitError: the app answers
   it with `limit_response`), settled to the tokens used when the row is completed (maas.py).
3. while it runs, a flusher writes the usage so far of every open row that changed, every FLUSH_S
   = 1 s, in one transaction in a worker thread. After a kill -9 a row has the tokens of its last
   flush, at most a second of generation behind what was sent.
4. completes the row when the exchange is over, and commits it before the last byte of the response
   goes out: a client that saw a complete response always has a complete row. After an error, or a
   client that went away (status 499), it is completed once the engine has released the request, so
   compute time and tokens are final, in a `finally` that does not depend on the handler.
Only work done is billed: a call none of whose engine requests ran, or whose handler never started
its own work (`Call.start`), is recorded with zero tokens (a 400, a 429, a client that left while
queued).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from .maas import AuthError, KeyRecord, LimitError, MaaS, UsageRow

if TYPE_CHECKING:
    from ..engine import Request

# `server` below is state.Server and a choice state.Choice: named, not imported (imports point down, to here)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/fill", "/infill", "/v1/classify")
MAX_BODY_BYTES = 8 << 20  # a 128k-token prompt is about 0.5 MiB of text, 1 MiB as JSON token ids
BODY_TIMEOUT_S = 30.0  # from the request head to the end of its body
FLUSH_S = 1.0  # how often the usage of requests in flight reaches their ledger rows


class Metrics:
    """Prometheus metrics in a registry of this app's own (two apps in one process never clash)."""

    def __init__(self, engine, maas: MaaS | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        if maas is not None:  # keys, limits and the ledger: time spent waiting on the database, per process
            dbs = list({id(d): d for d in (maas.ledger.db, maas.keys.db if maas.keys else None) if d is not None}.values())
            Gauge("glmkit_database_seconds", "seconds spent in database statements (keys, limits, ledger) since start, "
                  "round trips and lock waits included", registry=r).set_function(lambda: sum(d.busy_s for d in dbs))
            Gauge("glmkit_database_statements", "database statements run since start", registry=r).set_function(
                lambda: sum(d.statements for d in dbs))
        Gauge("glmkit_requests_running", "engine requests in the running batch", registry=r).set_function(lambda: engine.num_running)
        Gauge("glmkit_requests_waiting", "engine requests waiting for a batch row", registry=r).set_function(lambda: engine.num_waiting)
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("glmkit_time_to_first_token_seconds", "submission to first generated token", buckets=lat, registry=r)
        self.itl = Histogram("glmkit_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.e2e = Histogram("glmkit_e2e_request_latency_seconds", "HTTP request arrival to end of response", buckets=lat, registry=r)
        self.prompt_tokens = Counter("glmkit_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("glmkit_cached_prompt_tokens", "prompt tokens served from the prompt cache", registry=r)
        self.generation_tokens = Counter("glmkit_generation_tokens", "generated tokens", registry=r)
        self.requests = Counter("glmkit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None):
    """An error in OpenAI's shape {"error": {"message", "type", "param", "code"}}."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def limit_response(e: LimitError):
    """The 429 of a LimitError: Retry-After when waiting helps, `x-should-retry: false` when it cannot."""
    h = {"retry-after": str(e.retry_after)} if e.retry_after else {}
    if not e.should_retry:
        h["x-should-retry"] = "false"
    return error_response(429, str(e), e.type, None, e.code, h)


class BodyError(Exception):
    """A request body refused before admission: 413 (too large) or 408 (too slow)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


async def read_body(scope, receive, limit: int, timeout: float) -> bytes | None:
    """The whole request body, or None if the client left; BodyError past `limit` bytes or `timeout` s."""
    too_large = BodyError(413, f"the request body is larger than this server's limit of {limit} bytes "
                               f"({limit / 2**20:g} MiB); send a smaller request", "request_too_large")
    length = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), b"")
    if length.strip().isdigit() and int(length) > limit:  # refused before a byte of it is read
        raise too_large
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    parts, size = [], 0
    while True:
        try:
            m = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise BodyError(408, f"the request body did not arrive within {timeout:g} s; send the whole request at "
                                 "once", "request_timeout") from None
        if m["type"] == "http.disconnect":
            return None
        parts.append(m.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            raise too_large
        if not m.get("more_body", False):
            return b"".join(parts)


class Call:
    """State of one metered HTTP request, created by the middleware and used by the handler."""

    def __init__(self, server, key: KeyRecord | None, endpoint: str):
        self.server, self.key, self.endpoint = server, key, endpoint
        self.loop = asyncio.get_running_loop()
        self.id = uuid.uuid4().hex[:24]
        self.t0, self.p0 = time.time(), time.perf_counter()
        self.model: str | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list = []  # the engine requests, as the client sees them
        self.jobs: list[tuple[int, Request]] = []  # (prompt group, engine request) of those submitted
        self.unfinished = 0
        self.done = asyncio.Event()
        self.done.set()
        # set by handlers that do not go through the engine (fill, classify), or for prompts
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.compute_s = 0.0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.status: int | None = None  # from http.response.start
        self.complete = False  # the last body chunk went out
        self.disconnected = False
        self.recorded = False
        self.started = False  # work began (submit, start): a call that never started bills nothing
        self.reserved = 0  # tokens set aside against the key's budget and tpm (reserve)
        self.flushed = (0, 0, 0, 0.0)  # the usage in the open row (prompt, cached, completion, compute_s)

    @property
    def scope(self) -> str:
        """Prompt-cache namespace: one customer's prompts never warm another's cache."""
        return self.key.id if self.key is not None else "local"

    def reserve(self, tokens: int) -> None:
        """Set aside `tokens`, the most this request may use (prompt + max_tokens x n, over all its
        prompts), against the key's budget and tokens per minute. Call once the size is known and
        before any work starts; LimitError (429) if they do not fit. The row settles it to the usage."""
        if self.key is not None:
            self.server.maas.limiter.reserve(self.key, tokens, self.id)
        self.reserved += tokens

    def start(self) -> None:
        """The handler's own work (fill, classify) begins: from now on the call is billed."""
        self.started = True

    def submit(self, choice):
        """Hand the choice's request to the engine; its tokens arrive on self.queue as (choice index,
        (tok, logprob, top)), then (index, None) when it is finished. Raises EngineFull / ValueError."""
        i, group, req = choice.index, choice.group, choice.req
        loop, queue, metrics = self.loop, self.queue, self.server.metrics
        last, finished = [None], [False]

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (i, item))
            except RuntimeError:  # the event loop is closed: the server is gone
                pass

        def on_token(r, tok, logprob, top):  # engine thread
            now = time.perf_counter()
            if last[0] is not None:
                metrics.itl.observe(now - last[0])
            last[0] = now
            put((tok, logprob, top))

        def on_finish(r):  # engine thread (or the runner after a failure / at shutdown); once
            if finished[0]:
                return
            finished[0] = True
            self.server.runner.forget(r)
            put(None)
            try:
                loop.call_soon_threadsafe(self._finished_one)
            except RuntimeError:
                pass

        req.on_token, req.on_finish, req.cache_scope = on_token, on_finish, self.scope
        self.server.engine.submit(req)  # EngineFull: not started, not billed (`worked` reads the jobs)
        self.server.runner.track(req)
        self.jobs.append((group, req))
        self.choices.append(choice)
        self.unfinished += 1
        self.done.clear()

    def _finished_one(self):
        self.unfinished -= 1
        if self.unfinished == 0:
            self.done.set()

    def cancel(self):
        for _, r in self.jobs:
            if r.t_done is None:
                self.server.engine.cancel(r)

    def usage(self) -> dict:
        """OpenAI usage: prompt tokens counted once per prompt (n > 1 shares it), cached tokens of a
        prompt the fewest any of its choices had (its prefill ran once), completion tokens generated;
        for a choice ended by a stop string, those up to the one that completed it (the engine may
        have made a token or two more before the cancel reached it; compute_s still counts them)."""
        cached: dict[int, int] = {}
        for g, r in self.jobs:
            cached[g] = min(cached.get(g, r.cached_tokens), r.cached_tokens)
        completion = self.completion_tokens + sum(len(c.entries) if c.matched else len(c.req.output_ids)
                                                  for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}

    def worked(self) -> bool:
        """Whether work was done, which is all that is billed: an engine request was prefilled or had a
        token drawn (a prompt served whole from the prompt cache whose first token is a stop id has
        neither compute time nor output, and is billed like any other; a request cancelled while
        queued, as after a 503 or a client that left, was not), or the handler's own work started (or,
        for a handler that did not say so, finished with compute time)."""
        if self.jobs:
            return any(r.compute_s > 0 or r.output_ids or r.t_first is not None for _, r in self.jobs)
        return self.started or self.compute_s > 0

    def record(self, admitted: bool = True):
        """Complete the ledger row (once) and count the request in the metrics."""
        if self.recorded:
            return
        self.recorded = True
        row = self.server.maas.record(self.row(), self.key, admitted=admitted)
        m = self.server.metrics
        m.requests.labels(self.endpoint, str(row.status)).inc()
        m.e2e.observe(row.latency_s)
        m.prompt_tokens.inc(row.prompt_tokens)
        m.cached_tokens.inc(row.cached_tokens)
        m.generation_tokens.inc(row.completion_tokens)
        for _, r in self.jobs:
            if r.t_first is not None:
                m.ttft.observe(r.t_first - r.t_submit)

    def row(self, final: bool = True) -> UsageRow:
        """The ledger row: final at the end of the exchange, or open (status None) with the usage so far."""
        u = self.usage() if self.worked() else {"prompt_tokens": 0, "completion_tokens": 0,
                                                "prompt_tokens_details": {"cached_tokens": 0}}
        status, finish = None, None
        if final:
            status, finish = self.status or 500, self.finish_reason
            if self.disconnected:  # before the response was complete
                status, finish = 499, "cancelled"
            elif finish is None and self.jobs:
                reasons = [c.finish_reason for c in self.choices]
                finish = ",".join(sorted({x or "unknown" for x in reasons}))
        firsts = [r.t_first for _, r in self.jobs if r.t_first is not None]
        return UsageRow(
            ts=self.t0, request_id=self.id, key_id=self.key.id if self.key else None, endpoint=self.endpoint,
            model=self.model, status=status, finish_reason=finish, prompt_tokens=u["prompt_tokens"],
            cached_tokens=u["prompt_tokens_details"]["cached_tokens"], completion_tokens=u["completion_tokens"],
            compute_s=self.compute_s + sum(r.compute_s for _, r in self.jobs),
            latency_s=time.perf_counter() - self.p0, ttft_s=min(firsts) - self.p0 if firsts else None,
            error=self.error if status is not None and status >= 400 else None)


class Flusher:
    """Writes the usage so far of the calls in flight to their open ledger rows every `interval`
    seconds, all in one transaction, in a worker thread. An asyncio task that lives while calls are
    open; it reads the calls on the event loop, where they change, so it sees no half-made state."""

    def __init__(self, maas: MaaS, interval: float = FLUSH_S):
        self.maas, self.interval = maas, interval
        self.calls: set[Call] = set()
        self.task: asyncio.Task | None = None

    def add(self, call: Call):
        self.calls.add(call)
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.task = loop.create_task(self._run())

    def discard(self, call: Call):
        self.calls.discard(call)

    def rows(self) -> list[UsageRow]:
        """Open rows whose usage changed since their last flush."""
        out = []
        for c in list(self.calls):
            r = c.row(final=False)
            now = (r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.compute_s)
            if now != c.flushed:
                c.flushed = now
                out.append(r)
        return out

    async def _run(self):
        while self.calls:
            await asyncio.sleep(self.interval)
            if rows := self.rows():
                await asyncio.to_thread(self.maas.flush, rows)


class MeterMiddleware:
    """Authentication for /v1/* and /infill; body limits, token limits, metering and the ledger row for
    generation (see the module docstring).

    Pure ASGI (not BaseHTTPMiddleware): it sees the raw `receive`, so a client's disconnect cancels
    the engine requests at once, and its `finally` writes the row whatever the handler did."""

    def __init__(self, app, server, max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT_S,
                 flush_s: float = FLUSH_S):
        if max_body_bytes < 1 or not body_timeout > 0 or not flush_s > 0:
            raise ValueError(f"max_body_bytes={max_body_bytes}, body_timeout={body_timeout}, flush_s={flush_s}: "
                             "each must be > 0")
        self.app, self.server = app, server
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        self.flusher = Flusher(server.maas, flush_s)

    async def refuse(self, call: Call, why: Exception, response, scope, receive, send):
        """Answer before admission; the row (zero tokens, no slot taken) is written first."""
        call.status, call.complete, call.error = response.status_code, True, str(why)
        call.record(admitted=False)
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1/") or path == "/infill"):
            return await self.app(scope, receive, send)
        s = self.server
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            key = s.maas.authenticate(headers.get("authorization"))
        except AuthError as e:  # the label is a known route or "other": clients choose paths, not metric names
            s.metrics.requests.labels(path if path in GENERATION_PATHS or path == "/v1/models" else "other", "401").inc()
            return await error_response(401, str(e), "invalid_request_error", None, "invalid_api_key")(scope, receive, send)
        scope["glmkit.key"] = key
        if scope["method"] != "POST" or path not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        call = Call(s, key, path)
        try:
            body = await read_body(scope, receive, self.max_body_bytes, self.body_timeout)
        except BodyError as e:  # the rest of the body is not read: the connection cannot carry another request
            return await self.refuse(call, e, error_response(e.status, str(e), "invalid_request_error", None, e.code,
                                                             {"connection": "close"}), scope, receive, send)
        if body is None:  # the client left while sending
            call.disconnected = True
            call.record(admitted=False)
            return
        if key is not None:  # a transaction in the database (shared by replicas): off the event loop
            try:
                await asyncio.to_thread(s.maas.limiter.admit, key, call.id)
            except LimitError as e:
                return await self.refuse(call, e, limit_response(e), scope, receive, send)
            except s.maas.ledger.db.errors as e:  # the limits cannot be decided: another replica may be able to
                return await self.refuse(call, e, error_response(
                    503, "the limits database is unavailable; retry shortly", "server_error", None,
                    "database_unavailable", {"retry-after": "1"}), scope, receive, send)
        scope["glmkit.call"] = call
        await asyncio.to_thread(s.maas.open, call.row(final=False))  # from here on a kill -9 leaves the row, open
        self.flusher.add(call)
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def rx():
            if replay:
                return replay.pop()
            m = await receive()
            if m["type"] == "http.disconnect" and not call.complete:  # the client left before the end
                call.disconnected = True
                call.cancel()
            return m

        async def tx(m):
            if m["type"] == "http.response.start":
                call.status = m["status"]
            elif m["type"] == "http.response.body" and not m.get("more_body", False):
                # the row is durable before the client can see the end of the response
                call.complete = True
                call.cancel()
                await call.done.wait()
                call.record()
            try:
                await send(m)
            except OSError:  # ASGI 2.4 servers report a gone client this way
                call.disconnected = True
                raise

        try:
            await self.app(scope, rx, tx)
        finally:
            self.flusher.discard(call)
            call.cancel()  # nobody reads the unfinished ones any more
            try:
                await call.done.wait()  # the engine lets go within a step: tokens and compute are final
            finally:
                call.record()
