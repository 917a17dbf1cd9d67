"""Metering: one HTTP request's key, engine requests, usage and ledger row, and the ASGI middleware
that authenticates, applies the key's limits and writes the row.

    app.add_middleware(MeterMiddleware, server=server)        # server: app.Server
    call = request.scope["glmkit.call"]                       # in a handler: this request's Call

The middleware wraps /v1/* and /infill. It authenticates (401), admits the request against the key's
limits (429), and writes exactly one ledger row when the exchange is over: after the response, after
an error, or after the client went away (status 499), once the engine has released the request, so
compute time and tokens are final. The row is written in a `finally` that does not depend on the
handler or the response generator finishing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from .maas import AuthError, KeyRecord, LimitError, UsageRow

if TYPE_CHECKING:
    from ..engine import Request
    from .app import Server, _Choice

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/fill", "/infill", "/v1/classify")


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None):
    """An error in OpenAI's shape {"error": {"message", "type", "param", "code"}}."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class Call:
    """State of one metered HTTP request, created by the middleware and used by the handler."""

    def __init__(self, server: "Server", key: KeyRecord | None, endpoint: str):
        self.server, self.key, self.endpoint = server, key, endpoint
        self.loop = asyncio.get_running_loop()
        self.id = uuid.uuid4().hex[:24]
        self.t0, self.p0 = time.time(), time.perf_counter()
        self.model: str | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[_Choice] = []  # the engine requests, as the client sees them
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

    @property
    def scope(self) -> str:
        """Prompt-cache namespace: one customer's prompts never warm another's cache."""
        return self.key.id if self.key is not None else "local"

    def submit(self, choice: _Choice):
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
        self.server.engine.submit(req)
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

    def row(self) -> UsageRow:
        u = self.usage()
        status = self.status or 500
        finish = self.finish_reason
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
            error=self.error if status >= 400 else None)


class MeterMiddleware:
    """Authentication for /v1/* and /infill; limits, metering and the ledger row for generation.

    Pure ASGI (not BaseHTTPMiddleware): it sees the raw `receive`, so a client's disconnect cancels
    the engine requests at once, and its `finally` writes the row whatever the handler did."""

    def __init__(self, app, server: "Server"):
        self.app, self.server = app, server

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
        if key is not None:
            try:
                s.maas.limiter.admit(key)
            except LimitError as e:
                call.status, call.complete, call.error = 429, True, str(e)
                s.record(call, admitted=False)
                h = {"retry-after": str(e.retry_after)} if e.retry_after else {}
                if not e.should_retry:
                    h["x-should-retry"] = "false"
                return await error_response(429, str(e), e.type, None, e.code, h)(scope, receive, send)
        scope["glmkit.call"] = call

        async def rx():
            m = await receive()
            if m["type"] == "http.disconnect" and not call.complete:  # the client left before the end
                call.disconnected = True
                call.cancel()
            return m

        async def tx(m):
            if m["type"] == "http.response.start":
                call.status = m["status"]
            elif m["type"] == "http.response.body" and not m.get("more_body", False):
                call.complete = True
            try:
                await send(m)
            except OSError:  # ASGI 2.4 servers report a gone client this way
                call.disconnected = True
                raise

        try:
            await self.app(scope, rx, tx)
        finally:
            call.cancel()  # nobody reads the unfinished ones any more
            try:
                await call.done.wait()  # the engine lets go within a step: tokens and compute are final
            finally:
                s.record(call)
