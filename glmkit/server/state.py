"""What one app holds (`app.state.server`): the model, tokenizer, engine and its thread, the MaaS, and
the steps every route shares: checks, prompt layouts, submitting to the engine and reading it back.

    server = Server(model, tokenizer, "glm-tiny", MaaS.local(), max_batch=8, max_waiting=64, max_len=None)
    server.runner.start()                                   # the engine's thread (the app's lifespan)
    choices = await server.prepare(build)                   # tokenizing off the event loop
    server.submit_all(call, choices, max_tokens); await server.collect(request, call, choices)

The engine runs `step()` in its own thread. Its callbacks hand tokens to the event loop with
`loop.call_soon_threadsafe` onto one asyncio queue per HTTP request (metering.Call). Stop strings
are matched on the decoded text here (`sampling.StopText`); a match, a client disconnect, or the end
of the HTTP exchange cancels the engine request.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from ..chat import chat_format
from ..constrain import Constraint, ConstraintVocab
from ..engine import Engine, EngineFull, Request
from ..errors import ContextLengthError, ParameterError
from ..generate import Blank
from ..infill import SPAN_STEP, BlankPrompt, blank_prompt
from ..sampling import SamplingParams, StopText
from .maas import KeyRecord, LimitError, MaaS
from .metering import Call, Metrics
from .schemas import APIError


# ---- the engine's thread ------------------------------------------------------------------------------
class EngineRunner:
    """Runs `engine.run_forever` in a thread; no request is ever left without its on_finish.

    `Engine.run_forever` fails the running rows and re-raises when a step raises; we log and run it
    again. A request that raised while being admitted sits in neither the waiting queue nor the
    batch: after any failure, and at shutdown, every request we submitted that the engine has not
    finished is finished here ("error", or "cancelled" at shutdown), so its HTTP handler returns."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.inflight: dict[int, Request] = {}
        self.lock = threading.Lock()
        self.failures, self.last_error = 0, None

    def track(self, req: Request):
        with self.lock:
            self.inflight[id(req)] = req

    def forget(self, req: Request):
        with self.lock:
            self.inflight.pop(id(req), None)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self.stop_event.is_set()

    def start(self):
        self.stop_event.clear()
        self.thread = threading.Thread(target=self._loop, name="glmkit-engine", daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop_event.is_set():
            try:
                self.engine.run_forever(self.stop_event)
            except Exception as e:  # a failed step: its requests got "error"; keep serving the rest
                self.failures, self.last_error = self.failures + 1, f"{type(e).__name__}: {e}"
                traceback.print_exc()
                self._finish_orphans("error", only_lost=True)

    def _finish_orphans(self, reason: str, only_lost: bool):
        # both locks at once: a request is tracked only after `submit` queued it, so one we track that
        # is not queued now was taken by this (failed) engine thread (lock order: engine, then ours)
        with self.engine.lock, self.lock:
            queued = {id(r) for r in self.engine.waiting} if only_lost else set()
            reqs = [r for r in self.inflight.values() if r.t_done is None and id(r) not in queued]
        for r in reqs:
            r.finish_reason, r.t_done = reason, time.perf_counter()
            if r.on_finish:
                r.on_finish(r)

    def stop(self):
        self.stop_event.set()
        self.engine.wake.set()
        if self.thread is not None:
            self.thread.join()
        self._finish_orphans("cancelled", only_lost=False)


# ---- one HTTP request's choices ------------------------------------------------------------------
@dataclass
class Choice:
    """One generated sequence as the HTTP side sees it: text cut at stop strings, logprob entries."""

    index: int
    group: int  # which prompt it continues
    req: Request
    stop: StopText
    strip_newline: bool = False  # chat: the template's newline after <|assistant|> is not part of the reply
    prefix: str = ""  # echo
    text: str = ""
    entries: list = field(default_factory=list)  # (token id, logprob, top {id: logprob}, text offset)
    matched: bool = False
    finish_reason: str | None = None

    def emit(self, piece: str) -> str:
        if self.strip_newline and piece:
            piece, self.strip_newline = (piece[1:] if piece.startswith("\n") else piece), False
        self.text += piece
        return piece


# ---- the server ---------------------------------------------------------------------------------------
class Server:
    """The model, tokenizer, engine and MaaS behind one app; handlers call its methods."""

    def __init__(self, model, tokenizer, model_name: str, maas: MaaS, max_batch: int, max_waiting: int,
                 max_len: int | None, default_max_tokens: int = 1024, admin_token: str | None = None,
                 waiting_per_key: int | None = None, kv_memory: int | None = None,
                 prefill_chunk: int | str | None = "auto", kv_dtype=None):
        self.model, self.tok, self.name, self.maas = model, tokenizer, model_name, maas
        try:  # the grammar engine's view of the vocabulary (built at the first constrained request)
            vocab, self.no_constraints = ConstraintVocab.of(tokenizer, model.cfg.vocab_size), None
        except ValueError as e:
            vocab, self.no_constraints = None, str(e)
        self.engine = Engine(model, max_batch=max_batch, max_len=max_len, max_waiting=max_waiting, kv_memory=kv_memory,
                             prefill_chunk=prefill_chunk, kv_dtype=kv_dtype, constraint_vocab=vocab)
        self.runner = EngineRunner(self.engine)
        self.metrics = Metrics(self.engine, maas)
        self.causal = not model.cfg.prefix_lm
        self.chat = chat_format(model.cfg, tokenizer)  # the family's chat layout, stop ids and code infilling prompt
        self.work_lock = threading.Lock()  # classify: one at a time, beside the engine
        self.created = int(time.time())
        if default_max_tokens < 1:
            raise ValueError(f"default_max_tokens={default_max_tokens}: must be >= 1")
        self.default_max_tokens = default_max_tokens
        self.admin_token = admin_token
        # one key's share of the waiting queue: a tenant's n x prompts cannot fill it and 503 the others
        self.waiting_per_key = waiting_per_key or max(1, max_waiting // 4)
        if self.waiting_per_key < 1:
            raise ValueError(f"waiting_per_key={waiting_per_key}: must be >= 1")
        # a text longer than this can never fit the context (no token stands for more characters):
        # refused before it is tokenized, so an oversized text costs a length check, not seconds of CPU
        self.max_text_chars = self.engine.max_len * tokenizer.max_token_chars

    # ---- helpers ----
    def special(self, role: str) -> int:
        try:
            return self.tok.special(role)
        except KeyError as e:
            raise APIError(400, f"this model's tokenizer has no {role} token, which this endpoint needs ({e})") from None

    def check_model(self, request, name: str | None) -> Call:
        call: Call = request.scope["glmkit.call"]
        name = name or self.name
        key: KeyRecord | None = request.scope.get("glmkit.key")
        if name != self.name or (key is not None and not key.allows(name)):
            raise APIError(404, f"the model {name!r} does not exist or you do not have access to it; "
                           "GET /v1/models lists yours", param="model", code="model_not_found")
        call.model = name
        return call

    @staticmethod
    def params(**kw) -> SamplingParams:
        try:
            return SamplingParams(**kw)
        except ValueError as e:  # errors.ParameterError names the field
            param = getattr(e, "param", None)
            raise APIError(400, str(e).replace("SamplingParams.", ""), param={"max_new_tokens": "max_tokens"}.get(param, param),
                           code="invalid_value") from None

    def sampling(self, body, max_tokens: int, stop_ids, i: int, logprobs: bool = False, top: int = 0,
                 stops=(), constraint: Constraint | None = None) -> SamplingParams:
        """SamplingParams of choice i from an OpenAI-style body (fields it lacks keep their defaults)."""
        kw = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                            "presence_penalty", "frequency_penalty") if hasattr(body, k)}
        return self.params(max_new_tokens=max_tokens, seed=None if body.seed is None else body.seed + i,
                           stop=tuple(stops), stop_ids=tuple(stop_ids), logprobs=logprobs, top_logprobs=top,
                           constraint=constraint, **kw)

    def constraint(self, body) -> Constraint | None:
        """The one constraint a body asks for (chat's response_format; vLLM's guided_json, guided_regex,
        guided_choice, guided_grammar or structured_outputs), checked by the grammar engine; None for none.
        400 naming the fields when there are two, naming the field and the reason when the engine cannot
        build it. Call it off the event loop (`prepare`): compiling a large schema takes a while."""
        given = []  # (field, a function making the Constraint)
        rf = getattr(body, "response_format", None)
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", Constraint.json_object))
        elif rf is not None and rf.type == "json_schema":
            js = rf.json_schema
            if js is None:
                raise APIError(400, "response_format of type json_schema needs its json_schema: {\"name\": ..., "
                               "\"schema\": {...}, \"strict\": true}", param="response_format")
            given.append(("response_format", lambda: Constraint.json_schema(True if js.schema_ is None else js.schema_,
                                                                            strict=bool(js.strict))))
        kinds = {"json": Constraint.json_schema, "regex": Constraint.regex, "choice": Constraint.choice, "grammar": Constraint.lark}
        fields = [("guided_" + k, k, getattr(body, "guided_" + k)) for k in kinds]  # (field, kind, value)
        so = body.structured_outputs
        if so is not None:
            named = [("structured_outputs." + k, k, getattr(so, "json_" if k == "json" else k)) for k in kinds]
            if all(v is None for *_, v in named):
                raise APIError(400, "structured_outputs needs one of json, regex, choice, grammar", param="structured_outputs")
            fields += named
        given += [(name, lambda k=k, v=v: kinds[k](v)) for name, k, v in fields if v is not None]
        if len(given) > 1:
            names = [name for name, _ in given]
            raise APIError(400, f"at most one constraint per request; this one has {', '.join(names)}", param=names[1])
        if not given:
            return None
        name, build = given[0]
        if self.no_constraints:
            raise APIError(400, f"{name}: constrained decoding is not available with this model ({self.no_constraints})",
                           param=name, code="unsupported_parameter")
        try:
            c = build()
            c.check()
        except ValueError as e:
            raise APIError(400, f"{name}: {e}", param=name, code="invalid_value") from None
        vocab = self.engine.sampler.constraint_vocab
        try:
            vocab.lltokenizer  # noqa: B018 - built here, not in the engine's thread
        except ValueError as e:
            self.no_constraints = str(e)
            raise APIError(400, f"{name}: {e}", param=name, code="unsupported_parameter") from None
        try:
            vocab.check(c)  # what only the vocabulary shows: a grammar past the engine's limits, one no token begins
        except ValueError as e:
            raise APIError(400, f"{name}: {e}", param=name, code="invalid_value") from None
        return c

    @staticmethod
    def stops(stop) -> tuple[str, ...]:
        """A request's stop strings as a tuple (the schema allows 16 non-empty ones at most)."""
        return (stop,) if isinstance(stop, str) else tuple(stop or ())

    def check_chars(self, chars: int, param: str):
        """400 for text of `chars` characters: it can never fit the context, whatever it encodes to."""
        if chars > self.max_text_chars:
            raise APIError(400, f"{param}: {chars} characters can never fit the context of {self.engine.max_len} "
                           f"tokens (at most {self.max_text_chars} characters)", param=param, code="context_length_exceeded")

    def encode(self, text: str, param: str) -> list[int]:
        """Token ids of a request's text (call it off the event loop: see `prepare`); 400 for a text that
        cannot fit the context whatever it encodes to, or that the tokenizer refuses."""
        self.check_chars(len(text), param)
        try:
            return self.tok.encode(text)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    def max_sequences(self, call: Call) -> int:
        """The most engine requests (prompts x n) one HTTP request may queue: its key's share of the
        queue, or the whole queue with auth off (one tenant)."""
        return self.engine.max_waiting if call.key is None else min(self.engine.max_waiting, self.waiting_per_key)

    def rest_of_context(self, prompt_len: int) -> int:
        """max_tokens when a request gives none: the server's default, within the context."""
        return max(1, min(self.default_max_tokens, self.engine.max_len - prompt_len))

    @staticmethod
    async def prepare(fn, *args):
        """Run a handler's request preparation (tokenizing, layouts) in a worker thread: a 10 MB prompt
        must not stall the event loop, which serves every other stream and /health."""
        return await asyncio.to_thread(fn, *args)

    def encode_prompt(self, p, param: str) -> list[int]:
        if isinstance(p, str):
            return self.encode(p, param)
        V = self.model.cfg.vocab_size
        if any(not 0 <= t < V for t in p):
            raise APIError(400, f"token ids must lie in 0..{V - 1}", param=param)
        return list(p)

    # ---- prompt layouts (token ids -> engine Request) ----
    def blank_request(self, before: list[int], mask_role: str, after: list[int], params: SamplingParams) -> Request:
        """GLM blank infilling (`infill.blank_prompt`): Part A = before [mask] after, read bidirectionally,
        then the blank's span from <sop> on."""
        p = blank_prompt([before, after], [self.special(mask_role)], self.special("sop"))
        return Request(p.ids, params, position_ids=p.position_ids, sep=p.sep, gen_start=p.span_position(0, 1),
                       gen_step=SPAN_STEP)

    def fill_request(self, prompt: BlankPrompt, j: int, filled: list[list[int]], params: SamplingParams) -> Request:
        """Blank j of a fill (`BlankPrompt.blank`): Part A and the spans of blanks 0..j-1 as `fill` holds them in
        its cache, read with sep = len(Part A), then blank j's <sop>; its span goes at its mask's position."""
        ids, pos = prompt.blank(j, filled)
        return Request(ids, params, position_ids=pos, sep=prompt.sep, gen_start=prompt.span_position(j, 1),
                       gen_step=SPAN_STEP)

    def typed_blanks(self, blanks, masks: int) -> list[Blank | None]:
        """A fill body's `blanks` (schemas.FillBlank, one per mask in order) as `generate.Blank`s, one per mask
        (None: untyped); 400 naming the field for more blanks than masks or a constraint the grammar engine
        cannot build. Compiles each grammar once: call it off the event loop (`prepare`)."""
        blanks = list(blanks or ())
        if len(blanks) > masks:
            raise APIError(400, f"blanks: {len(blanks)} given for a text with {masks} blanks; give at most one per "
                           "[MASK] / [sMASK] / [gMASK], in order", param="blanks")
        out: list[Blank | None] = []
        for j, b in enumerate(blanks):
            try:
                out.append(Blank.of(b.choices, b.regex, b.json_schema, b.max_tokens, b.stop))
            except ParameterError as e:
                raise APIError(400, f"blanks.{j}.{e.param}: {e}", param=f"blanks.{j}.{e.param}") from None
            if out[-1].constraint is not None:
                if self.no_constraints:
                    raise APIError(400, f"blanks.{j}: constrained decoding is not available with this model "
                                   f"({self.no_constraints})", param=f"blanks.{j}", code="unsupported_parameter")
                self.engine.sampler.constraint_vocab.lltokenizer  # noqa: B018 - built here, not in the engine's thread
        return out + [None] * (masks - len(out))

    @property
    def sees_suffix(self) -> bool:
        """Whether a completion's suffix reaches the model: a GLM model reads prompt [MASK] suffix, a causal
        model with a code infilling format (CodeGeeX4) reads its FIM prompt; other causal models cannot."""
        return not self.causal or self.chat.infills

    def completion_request(self, ids: list[int], suffix: list[int] | None, params: SamplingParams) -> Request:
        """A completion's layout: a causal model reads [gMASK] <sop> prompt, or its format's infilling prompt
        when there is a suffix and it has one (otherwise it cannot see the suffix); a GLM model fills
        prompt [gMASK], or prompt [MASK] suffix when there is a suffix."""
        if self.causal:
            if suffix is not None and self.chat.infills:
                return Request(self.chat.infill(self.tok, ids, suffix), params)
            return Request([self.special("gmask"), self.special("sop")] + ids, params)
        return self.blank_request(ids, "gmask", [], params) if suffix is None else self.blank_request(ids, "mask", suffix, params)

    def completion_stop_ids(self, suffix: bool = False) -> tuple[int, ...]:
        if self.causal and suffix and self.chat.infills:  # the infilling prompt is a chat turn: its reply's ends
            return tuple(self.chat.stop_ids(self.tok))
        return (self.special("eos"),) if self.causal else (self.special("eop"), self.special("eos"))

    def chat_request(self, ids: list[int], params: SamplingParams) -> Request:
        """A rendered chat prompt's layout: read causally, or (ChatGLM-6B, `blank`) what precedes its final
        [gMASK] <sop> as a GLM Part A, the reply generated as that blank's span."""
        if self.chat.blank:
            if self.causal:
                raise APIError(400, f"the {self.chat.name} chat format needs a model trained with GLM's blank "
                               "infilling; this one is causal", param="model", code="unsupported_model")
            return self.blank_request(ids[:-2], "gmask", [], params)
        return Request(ids, params)

    def submit_all(self, call: Call, choices: list[Choice], max_tokens: int | None):
        """Submit every choice's request; all or nothing: each is checked (400) before any is queued, then
        the call reserves its prompt tokens + max_tokens per choice against the key's limits (429)."""
        try:
            for c in choices:
                self.engine.check(c.req)
        except ValueError as e:
            code = "context_length_exceeded" if isinstance(e, ContextLengthError) else "invalid_value"
            raise APIError(400, str(e), param="messages" if call.endpoint.endswith("chat/completions") else "prompt",
                           code=code) from None
        if call.key is not None and self.engine.waiting_in(call.scope) + len(choices) > self.waiting_per_key:
            # checked and submitted on the event loop with no await between: no other request of the key interleaves
            raise LimitError(f"this key's requests already fill its share of the waiting queue ({self.waiting_per_key} "
                             "sequences); retry when they start", "requests", "rate_limit_exceeded", 1)
        if max_tokens is not None:  # None: the call reserved what it may use already (a fill's later blanks)
            call.reserve(call.prompt_tokens + max_tokens * len(choices))
        try:
            for c in choices:
                call.submit(c)
        except EngineFull as e:
            call.cancel()
            raise APIError(503, f"the server is overloaded ({e}); retry shortly", "server_error", None, "overloaded",
                           {"retry-after": "1"}) from None

    async def events(self, call: Call, choices: list[Choice]):
        """(choice, new text, new logprob entries, finished) as tokens arrive, for all choices."""
        left = len(choices)
        while left:
            i, item = await call.queue.get()
            ch = choices[i]
            if item is None:
                left -= 1
                piece = ch.emit(ch.stop.close())
                r = ch.req.finish_reason
                ch.finish_reason = "stop" if ch.matched else r
                yield ch, piece, [], True
                continue
            if ch.matched:
                continue
            tok, logprob, top = item
            offset = len(ch.prefix) + len(ch.text)
            piece = ch.emit(ch.stop.add(tok))
            if ch.stop.matched is not None:  # cut here; the engine stops at its next step
                ch.matched = True
                self.engine.cancel(ch.req)
            entry = (tok, logprob, top, offset)
            ch.entries.append(entry)
            yield ch, piece, [entry], False

    async def collect(self, request, call: Call, choices: list[Choice]):
        """Run every choice to its end (non-streaming); a client that leaves cancels them."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.create_task(watch())  # the middleware's receive cancels on disconnect
        try:
            async for _ in self.events(call, choices):
                pass
        finally:
            watcher.cancel()
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            why = failed[0].req.error or "see the server log"
            raise APIError(500, f"the engine failed on this request ({why})", "server_error", None, "engine_error")

    async def locked(self, fn, *args, **kw):
        """Run fn in a worker thread, one at a time; returns (result, seconds)."""
        def run():
            with self.work_lock, torch.inference_mode():
                t0 = time.perf_counter()
                return fn(*args, **kw), time.perf_counter() - t0
        return await asyncio.to_thread(run)
