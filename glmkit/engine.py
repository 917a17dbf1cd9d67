"""The serving engine: continuous batching over token ids.

    engine = Engine(model, max_batch=8)
    req = engine.submit(Request(prompt_ids=[...], params=SamplingParams(max_new_tokens=64)))
    while engine.has_work():
        engine.step()                    # schedule -> run -> update
    req.output_ids, req.finish_reason

`step()` reads like nano-vllm's: admit waiting requests into free batch rows (taking a cached
prompt's KV from the prompt cache), run one forward, then sample each row with its own parameters,
emit the token and retire finished rows. The forward (`GLM.step_many`) is a decode step of every
running row and the step's prefill chunks together: their tokens go through the linears as one
list, so the weights are read once per step, not once for the prefill and again for the decode
(attention is per part: the rows against the engine's cache, a chunk against its prompt's, with its
prompt's mask). A step with no chunk is a plain decode step (the native fused path). Requests join
and leave between steps, so a long generation never holds a short one back.

Chunked prefill. A step prefills at most `prefill_chunk` prompt tokens in all (oldest admitted
prompt first), the rest in later steps, beside the running rows' decode: a long prompt does not stall
every stream for its whole prefill, and its attention scores are bounded by chunk x prompt. Each
chunk attends to the prompt's keys so far through the cache, so the logits equal a one-shot
prefill's (within summation order). `prefill_chunk="auto"` (the default) sizes each step's chunk by
time (`ChunkSizer`): while rows decode, as many tokens as keep the step within about 2x an idle
decode step (at least 16, so a prompt always progresses, unless what fits the native few-row kernels
beside the rows is the cheaper step); with none decoding, 512. An int is a fixed
chunk; None prefills whole prompts. A GLM prefix-LM prompt's Part A (its first `sep` tokens, read
bidirectionally) must be complete before any query reads it, so the first chunk holds all of Part A,
however long, whatever the chunk size; what follows is chunked. A prompt being prefilled holds a
batch seat; it joins the running rows when its last chunk is done, and its first token is sampled in
that step.

Rows live in one paged KV cache (`model.PagedKVCache`): keys and values in blocks of `block_size`
slots from one pool, a block table per row, blocks taken as a row grows and given back when it
leaves, so memory follows the tokens in flight, not max_batch x max_len. Running rows are kept at the
front of the batch (a leaving row's place goes to a later one by moving its block table, not its
keys), so a step runs on rows `[:n]`; each row writes its key/value at its own position. Attention
gathers each row's keys through its table (one copy of the keys read per layer and step: the eager
step's cost of paging).

Prompt KV reuse. A GLM-objective model reads its prompt bidirectionally (Part A), so a prompt's KV
depends on the whole prompt: it is reused only for an identical prompt. Causal models (GLM-4) can
reuse any cached prefix and prefill only the rest. Entries are scoped by `cache_scope` (the API
key): one customer's prompt never warms another's cache, so timing cannot leak prompts, and each
scope has its own LRU of `prompt_cache_entries`, so one customer's new prompts never evict another's
(eviction would tell a tenant that someone else is active). The number of scopes kept is bounded
too (`prompt_cache_scopes`, least recently used scope dropped whole): that bounds memory, and what
it can reveal is only that many other keys were active, not when or what they sent. A cached
prompt holds its blocks in the pool, and a request built on it shares them (reference-counted; the
partly filled last block is copied when the request first writes into it). When the pool runs short,
admission drops the request's own scope's entries, then whole least recently used scopes, before it
waits: the pool's size is the one bound that every tenant shares.

Sampling. One `sampling.Sampler` holds the running rows' parameters, penalty state and random
streams, in the rows' order; one call draws every row's token as the row would draw alone, so a
request gives the tokens `generate` gives with the same seed, whatever runs beside it. A request
whose parameters carry a constraint gets its grammar matcher when its row joins (the engine needs
`constraint_vocab`, the tokenizer's vocabulary as the grammar engine reads it: token ids still);
a matcher that fails ends its row alone with "error".

Faults stay in their row. A request that cannot be admitted, or whose logits are not finite (after
its sampling parameters), ends alone with finish_reason "error" and `req.error` saying why; the
other rows go on. A forward that fails with prefill chunks in it is run again part by part, and a
chunk that fails alone fails its request alone. Only a failure of a batched step itself (the decode or the sampler, not a
request's numbers) fails every running row.

Memory. The block pool is sized at construction: `kv_memory` bytes (or `kv_blocks` blocks), by
default max_batch x max_len positions; a pool that cannot fit the memory this process may use is
refused before allocating (`MemoryError`). Its pages are touched only as blocks are handed out.
`max_len` and `max_batch` stay limits per row and on rows. A waiting request is admitted only when
its prompt's blocks are free (it waits otherwise, in order; one that could never fit is refused at
`submit`). A running row that needs a block when none is free ends alone with finish_reason "error"
(its tokens so far kept, `req.error` saying the KV pool is full); the other rows go on. No
preemption: a row's blocks are held until it leaves.

The engine knows nothing of text or HTTP: stop strings and detokenization live in the server,
which calls `cancel` when a stop string appears or the client disconnects.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import kernels
from .errors import ContextLengthError
from .model import BlockPool, PagedKVCache, Part, PoolExhausted
from .plan import check_kv_fits
from .sampling import Sampler, SamplingParams, check_constrainable, ngram_bans


class EngineFull(RuntimeError):
    """The waiting queue is at capacity: shed load (HTTP 503 with Retry-After)."""


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # GLM inputs: prompt positions (2, T) as lists (default: 0..T-1, block 0), prefix length, and
    # where generated tokens go: token k sits at gen_start + k * gen_step (position, block)
    position_ids: list[list[int]] | None = None
    sep: int = 0
    gen_start: tuple[int, int] | None = None  # default (T, 0): causal continuation
    gen_step: tuple[int, int] = (1, 0)
    cache_scope: str | None = None  # prompt-cache namespace (an API key id); None: no reuse
    on_token: Callable | None = None  # (request, token_id, logprob, top_logprobs) from the engine thread
    on_finish: Callable | None = None  # (request,)
    # filled by the engine
    id: int = -1
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | error
    cached_tokens: int = 0
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    compute_s: float = 0.0  # this request's share of model time (prefill + its part of each step)
    error: str | None = None  # why, when finish_reason is "error"
    _cancel: bool = False


@dataclass
class _Prefill:
    req: Request
    prompt: PagedKVCache  # one row: the prompt's keys so far
    done: int  # prompt tokens in it
    keep: bool  # becomes a prompt-cache entry


@dataclass
class _Row:
    req: Request
    length: int  # positions written in the cache
    next_logits: torch.Tensor | None = None  # (V,) after prefill, before the first sample


class ChunkSizer:
    """Prefill tokens per step for `prefill_chunk="auto"`, from times measured as the engine runs.

    A step's time is about t_decode + n * t_token for a chunk of n tokens beside the decode rows (the
    weights are read once either way), so while rows decode a chunk gets (slack - 1) * t_decode /
    t_token tokens: the streams' time per token stays within about `slack` x an idle decode step.
    t_decode is a moving average of decode-only steps; t_token of a mixed step's time past t_decode,
    per chunk token (so the fixed cost of running the rows through the larger product counts too, and
    the size settles where the step takes slack x t_decode). Never fewer than `floor` tokens, so a
    prompt always progresses, and at most twice the last one, so one step timed short cannot make the
    next one long. Until a decode-only step has been timed, the floor (the first one is not timed: it
    pays one-time work, the native library's load and the model's decode plan).

    That line has a step in it: while rows and chunk together fit the native few-row kernels
    (`few_rows`, kernels.MAX_ROWS), the weights are read as stored; past it, quantized weights are
    dequantized once per step for the GEMM, a fixed cost that can exceed a whole decode step. So the
    few-row steps get a line of their own (t_few per chunk token, timed at first with the most tokens
    that fit, few_rows - rows), and a step takes the few-row chunk when it keeps within slack x
    t_decode and the other line's chunk is not larger, or when neither keeps within it and it is the
    shorter step.
    With no rows decoding nobody waits on the step: `idle` tokens (large chunks, few weight passes,
    but bounded so that a request arriving meanwhile waits at most one such chunk)."""

    def __init__(self, slack: float = 2.0, floor: int = 16, idle: int = 512, few_rows: int = kernels.MAX_ROWS,
                 decay: float = 0.7):
        self.slack, self.floor, self.idle, self.few_rows, self.decay = slack, floor, idle, few_rows, decay
        self.t_decode: float | None = None  # seconds of a decode-only step
        self.t_token: float | None = None  # seconds per prefill token beside the decode rows, past few_rows
        self.t_few: float | None = None  # the same within few_rows rows and chunk tokens
        self.last = floor  # the last chunk on the line
        self.warm = False

    def size(self, rows: int) -> int:
        """The chunk for a step beside `rows` decoding rows."""
        if not rows:
            return self.idle
        if self.t_decode is None:
            return self.floor
        few = self.few_rows - rows
        if few > 0 and self.t_few is None:
            return few  # timed once
        n = self.floor if self.t_token is None else (self.slack - 1) * self.t_decode / max(self.t_token, 1e-9)
        n = int(min(self.idle, 2 * self.last, max(self.floor, few + 1, n)))
        if few > 0 and self.t_token is not None:
            k = int(min(few, max(1, (self.slack - 1) * self.t_decode / max(self.t_few, 1e-9))))
            budget, t_line, t_k = self.slack * self.t_decode, self.t_decode + n * self.t_token, self.t_decode + k * self.t_few
            if (t_k <= budget and (t_line > budget or k >= n)) or (t_line > budget and t_k < t_line):
                return k
        self.last = n
        return n

    def record(self, seconds: float, rows: int, tokens: int):
        """One forward's time: `rows` decode rows beside `tokens` prefill tokens."""
        avg = lambda old, new: new if old is None else self.decay * old + (1 - self.decay) * new
        if not tokens:
            if self.warm:
                self.t_decode = avg(self.t_decode, seconds)
            self.warm = True
        elif rows and self.t_decode is not None:
            per_token = max(seconds - self.t_decode, 0.0) / tokens
            if rows + tokens <= self.few_rows:
                self.t_few = avg(self.t_few, per_token)
            else:
                self.t_token = avg(self.t_token, per_token)


class Engine:
    def __init__(self, model, max_batch: int = 8, max_len: int | None = None, max_waiting: int = 64,
                 prompt_cache_entries: int = 8, prompt_cache_scopes: int = 64, kv_memory: int | None = None,
                 kv_blocks: int | None = None, block_size: int = 16, prefill_chunk: int | str | None = "auto",
                 kv_dtype: torch.dtype | None = None, constraint_vocab=None):
        if not (prefill_chunk is None or prefill_chunk == "auto" or (isinstance(prefill_chunk, int) and prefill_chunk > 0)):
            raise ValueError(f"prefill_chunk={prefill_chunk!r}: give a number of tokens > 0, 'auto' (sized by "
                             "measured step times) or None (whole prompts)")
        self.model = model.eval()
        cfg = model.cfg
        self.causal = not cfg.prefix_lm  # GLM-4: no bidirectional prefix, any prefix reusable
        self.max_len = max_len or cfg.max_seq_len
        p = model.embed.weight
        kv = p.dtype if kv_dtype is None else kv_dtype  # the pool's dtype: the model's, or int8 (model.BlockPool)
        if kv not in (p.dtype, torch.int8):
            raise ValueError(f"kv_dtype={kv_dtype}: the KV cache is kept in the model's dtype ({p.dtype}) or torch.int8")
        if kv_memory is None and kv_blocks is None:  # room for every row at full length, as a static cache
            check_kv_fits(cfg, max_batch, self.max_len, kv, p.device)
            kv_blocks = max_batch * -(-self.max_len // block_size)
        else:
            if kv_blocks is None:
                kv_blocks = kv_memory // BlockPool.block_bytes(cfg, block_size, kv) - 1  # and the null block
            if kv_blocks < 1:
                raise ValueError(f"a KV pool of {kv_memory} bytes holds no block of {block_size} positions")
            check_kv_fits(cfg, 1, kv_blocks * block_size, kv, p.device)
        self.pool = BlockPool.for_model(model, kv_blocks, block_size, kv)
        self.cache = PagedKVCache(self.pool, max_batch, self.max_len)  # row b: the b-th running request
        # row i: the state of self.rows[i]; constraint_vocab (constrain.ConstraintVocab): for constrained requests
        self.sampler = Sampler(max_batch, cfg.vocab_size, p.device, constraint_vocab)
        self.rows: list[_Row] = []
        self.prefilling: list[_Prefill] = []  # admitted, prompt not yet prefilled (chunked prefill)
        self.prefill_chunk = prefill_chunk
        self.sizer = ChunkSizer()  # chunk sizes for prefill_chunk="auto"
        self.waiting: deque[Request] = deque()
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.prompt_cache: OrderedDict[str, OrderedDict] = OrderedDict()  # scope -> its own LRU of entries
        self.prompt_cache_entries, self.prompt_cache_scopes = prompt_cache_entries, prompt_cache_scopes
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self._next_id = 0
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "steps": 0}

    # ---- API (any thread) ----------------------------------------------------------------------------
    def check(self, req: Request):
        T = len(req.prompt_ids)
        if T == 0:
            raise ValueError("the prompt is empty")
        if T + req.params.max_new_tokens > self.max_len:
            raise ContextLengthError(f"prompt of {T} tokens + max_tokens {req.params.max_new_tokens} exceeds the context "
                                     f"of {self.max_len} tokens")
        if req.params.num_beams > 1:
            raise ValueError("beam search is not served by the batching engine")
        if req.params.constraint is not None:
            check_constrainable(req.params, self.sampler.constraint_vocab)
        if not 0 <= req.sep <= T:
            raise ValueError(f"sep={req.sep} outside the prompt of {T} tokens")
        if self._blocks(T) > self.pool.n_blocks:
            raise ContextLengthError(f"prompt of {T} tokens needs {self._blocks(T)} KV blocks; the pool holds "
                                     f"{self.pool.n_blocks} of {self.pool.block} positions")

    def _blocks(self, n: int) -> int:
        return -(-n // self.pool.block)

    def submit(self, req: Request) -> Request:
        self.check(req)
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self.waiting)} requests already waiting")
            req.id, self._next_id = self._next_id, self._next_id + 1
            req.t_submit = time.perf_counter()
            self.waiting.append(req)
        self.wake.set()
        return req

    def cancel(self, req: Request):
        req._cancel = True  # picked up at the next step boundary
        self.wake.set()

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting or self.prefilling)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def waiting_in(self, scope: str | None) -> int:
        """Requests of one cache scope (an API key) in the waiting queue."""
        with self.lock:
            return sum(1 for r in self.waiting if r.cache_scope == scope)

    # ---- the loop -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self):
        self._schedule()
        self._retire()  # rows cancelled since the last step leave before the forward
        self._run()
        if not self.rows:
            return
        self._sample_and_emit()
        self._retire()
        if self._reserve():  # the slot each row writes in the next step's forward
            self._retire()

    def run_forever(self, stop: threading.Event):
        while not stop.is_set():
            if not self.has_work():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                self.step()
            except Exception:  # never leave clients hanging: fail what is in flight, keep serving
                for row in self.rows:
                    self._finish(row.req, "error")
                self.cache.release(range(len(self.rows)))
                self.rows.clear()
                for p in self.prefilling:
                    p.prompt.release(0)
                    self._finish(p.req, "error")
                self.prefilling.clear()
                raise

    # ---- schedule: admit waiting requests (prefill or copy cached prompt KV) -----------------------------
    def _schedule(self):
        while True:
            dropped = []
            with self.lock:
                # cancelled requests still waiting are dropped without running
                for req in [r for r in self.waiting if r._cancel]:
                    self.waiting.remove(req)
                    dropped.append(req)
                req = self.waiting[0] if self.waiting and len(self.rows) + len(self.prefilling) < self.max_batch else None
                if req is not None and not self._room(req):
                    req = None  # it waits for running rows to give blocks back
                if req is not None:
                    self.waiting.popleft()
            for d in dropped:  # callbacks run outside the lock: they may submit
                self._finish(d, "cancelled")
            if req is None:
                return
            try:
                self._admit(req)
            except Exception as e:  # a request that cannot be admitted fails alone; the others go on
                traceback.print_exc()
                req.error = f"could not start: {type(e).__name__}: {e}"
                self._finish(req, "error")

    def _room(self, req: Request) -> bool:
        """Whether the prompt's blocks are free (counted without sharing), dropping prompt-cache entries
        while they are not: the request's own scope's, oldest first, then whole scopes, least recently used first."""
        hit = self._lookup(req)  # its blocks are shared, not taken; + 1: the copy of a shared last block
        need = self._blocks(len(req.prompt_ids)) - (hit[0] // self.pool.block if hit else 0) + 1
        need += sum(self._blocks(len(p.req.prompt_ids)) - len(p.prompt.blocks[0]) for p in self.prefilling)  # promised
        own = self.prompt_cache.get(req.cache_scope) or {}
        for key in [k for k, e in own.items() if e is not hit]:
            if self.pool.num_free >= need:
                break
            own.pop(key)[1].release(0)
        while self.pool.num_free < need and self.prompt_cache:
            for entry in self.prompt_cache.popitem(last=False)[1].values():
                entry[1].release(0)
        return self.pool.num_free >= need or not (self.rows or self.prefilling)  # alone: it fits or fails at prefill

    def _positions(self, req: Request) -> torch.Tensor:
        T = len(req.prompt_ids)
        if req.position_ids is None:
            return torch.stack((torch.arange(T), torch.zeros(T, dtype=torch.long)))
        return torch.tensor(req.position_ids, dtype=torch.long)

    @staticmethod
    def _cache_key(req: Request, n: int):
        return (tuple(req.prompt_ids[:n]), req.sep, tuple(map(tuple, req.position_ids or ())))

    def _lookup(self, req: Request):
        """(cached length, its one-row KVCache, logits) of the longest reusable prompt entry of its scope, or None."""
        entries = self.prompt_cache.get(req.cache_scope) if req.cache_scope is not None else None
        if not entries:
            return None
        self.prompt_cache.move_to_end(req.cache_scope)
        full = self._cache_key(req, len(req.prompt_ids))
        if full in entries:
            entries.move_to_end(full)
            return entries[full]
        if not self.causal or req.position_ids is not None or req.sep:
            return None
        best = None  # causal: the longest cached prompt that is a prefix of this one
        for (ids, _, _), entry in entries.items():
            if len(ids) < len(req.prompt_ids) and tuple(req.prompt_ids[: len(ids)]) == ids:
                if best is None or len(ids) > best[0]:
                    best = entry
        return best

    def _remember(self, req: Request, entry):
        """Keep a prompt's KV in its scope's LRU; evicts only within that scope (or a whole idle scope)."""
        entries = self.prompt_cache.setdefault(req.cache_scope, OrderedDict())
        self.prompt_cache.move_to_end(req.cache_scope)
        entries[self._cache_key(req, len(req.prompt_ids))] = entry
        while len(entries) > self.prompt_cache_entries:
            entries.popitem(last=False)[1][1].release(0)
        while len(self.prompt_cache) > self.prompt_cache_scopes:
            for entry in self.prompt_cache.popitem(last=False)[1].values():
                entry[1].release(0)

    def _admit(self, req: Request):
        """Start a request: its row at once when its whole prompt is cached, else a prefill (run by `_prefill`)."""
        T = len(req.prompt_ids)
        hit = self._lookup(req)
        req.cached_tokens = n = hit[0] if hit is not None else 0
        self.stats["cached_tokens"] += n
        if n == T:
            self._join(req, hit[1], hit[2], keep=True)  # the entry keeps its blocks; the row shares them
            return
        prompt = PagedKVCache(self.pool, 1, T)
        prompt.sep[0] = req.sep  # what a first prefill sets: the mask reads it from the first chunk on
        if n:  # causal: the cached prefix's blocks are shared, the rest is prefilled
            prompt.copy_rows(0, hit[1], 0, n)
            prompt.length = n
        self.prefilling.append(_Prefill(req, prompt, n, req.cache_scope is not None and self.prompt_cache_entries > 0))

    def _chunks(self, rows: int) -> list[tuple[_Prefill, int, int]]:
        """This step's prefill chunks (prompt, first token, end), oldest prompt first, within the step's
        budget of prompt tokens (a GLM Part A goes whole in its prompt's first chunk: every query reads
        it). Cancelled prompts leave here; one whose blocks cannot be had fails alone."""
        if not self.prefilling:
            return []
        budget, out = self._budget(rows), []
        for p in list(self.prefilling):
            req, T = p.req, len(p.req.prompt_ids)
            if budget <= 0:
                break
            if req._cancel:
                self.prefilling.remove(p)
                p.prompt.release(0)
                self._finish(req, "cancelled")
                continue
            n = min(T - p.done, max(budget, req.sep - p.done))
            try:
                p.prompt.reserve(0, p.done, p.done + n)
            except Exception as e:  # fails alone, as at admission
                self._fail_prefill(p, e)
                continue
            out.append((p, p.done, p.done + n))
            budget -= n
        return out

    def _budget(self, rows: int) -> float:
        if self.prefill_chunk == "auto":
            return self.sizer.size(rows)
        return self.prefill_chunk or float("inf")

    def _fail_prefill(self, p: _Prefill, e: Exception):
        traceback.print_exc()
        self.prefilling.remove(p)
        p.prompt.release(0)
        p.req.error = f"could not start: {type(e).__name__}: {e}"
        self._finish(p.req, "error")

    def _join(self, req: Request, prompt: PagedKVCache, logits: torch.Tensor, keep: bool):
        """The request's row takes the prompt's blocks (shared with its entry when kept) and its sampler state."""
        T = len(req.prompt_ids)
        self.cache.copy_rows(len(self.rows), prompt, 0, T)
        if not keep:
            prompt.release(0)  # the row holds the blocks now
        self.sampler.join(req.params, torch.tensor(req.prompt_ids, dtype=torch.long, device=logits.device), req.params.seed)
        self.rows.append(_Row(req, T, logits))

    def _reserve(self) -> bool:
        """Give every running row the block its next slot needs; a row that cannot get one ends alone.
        Returns whether any did."""
        failed = False
        for b, r in enumerate(self.rows):
            try:
                self.cache.reserve(b, r.length, r.length + 1)
            except PoolExhausted as e:  # its blocks go back at once: the rows after it may need them
                self.cache.release(b)
                r.req.finish_reason, r.req.error, failed = "error", f"{e}: the request was stopped after "\
                    f"{len(r.req.output_ids)} tokens (a larger --kv-memory, or fewer concurrent requests)", True
        return failed

    # ---- run: one forward for the decode rows and the prefill chunks --------------------------------------
    def _run(self):
        """The step's one forward (`GLM.step_many`): a decode step of the running rows that have a token
        to feed (all but those that joined this step from the prompt cache, which come last) and the
        step's prefill chunks, their tokens through the linears together. A finished prompt's request
        joins the rows, its logits sampled with theirs. Should the forward fail with chunks in it, its parts
        run again one by one (`_run_apart`)."""
        dev = self.cache.table.device
        decode = [r for r in self.rows if r.next_logits is None]  # rows [:len(decode)]
        chunks = self._chunks(len(decode))
        parts = []
        if decode:
            lengths = [r.length for r in decode]
            ids = torch.tensor([[r.req.output_ids[-1]] for r in decode], device=dev)  # (n, 1)
            pos = torch.tensor([self._gen_position(r.req, len(r.req.output_ids) - 1) for r in decode], device=dev)
            # each row writes at its own length; rows [:n] of the cache, attending up to the longest row
            parts.append(Part(ids, pos[:, :, None], self.cache, torch.tensor(lengths, device=dev)[:, None],
                              extent=max(lengths) + 1))
        for p, a, b in chunks:
            req = p.req
            parts.append(Part(torch.tensor([req.prompt_ids[a:b]], device=dev), self._positions(req)[None, :, a:b].to(dev),
                              p.prompt, torch.arange(a, b, device=dev)[None], extent=b, last_only=True))
        if not parts:
            return
        t0 = time.perf_counter()
        try:
            logits = self.model.step_many(parts)
        except Exception:
            if not chunks:
                raise
            logits, chunks = self._run_apart(parts, chunks, bool(decode))
        dt = time.perf_counter() - t0
        tokens = len(decode) + sum(b - a for _, a, b in chunks)
        if self.prefill_chunk == "auto" and tokens:
            self.sizer.record(dt, len(decode), tokens - len(decode))
        if decode:
            for r, lg in zip(decode, logits[0][:, -1].float()):
                r.length += 1
                r.next_logits = lg
                r.req.compute_s += dt / tokens  # the step's time, shared by the tokens it ran
            self.stats["steps"] += 1
        for (p, a, b), lg in zip(chunks, logits[1:] if decode else logits):
            req, T = p.req, len(p.req.prompt_ids)
            p.done = p.prompt.length = b
            self.stats["prefill_tokens"] += b - a
            req.compute_s += dt * (b - a) / tokens
            if b == T:
                self.prefilling.remove(p)
                lg = lg[0, -1].float()
                if p.keep:
                    self._remember(req, (T, p.prompt, lg))  # never written again: its blocks stay shared
                self._join(req, p.prompt, lg, p.keep)

    def _run_apart(self, parts, chunks, decoding: bool):
        """After a failed mixed forward: the decode part alone (its failure fails the step), then each
        chunk alone, a chunk that fails again failing its request alone. Writing the same keys at the
        same slots again is harmless. Returns the logits and the chunks that ran."""
        logits, kept = ([self.model.step_many(parts[:1])[0]] if decoding else []), []
        for c, part in zip(chunks, parts[1:] if decoding else parts):
            try:
                logits.append(self.model.step_many([part])[0])
                kept.append(c)
            except Exception as e:
                self._fail_prefill(c[0], e)
        return logits, kept

    @staticmethod
    def _gen_position(req: Request, k: int) -> list[int]:
        start = req.gen_start if req.gen_start is not None else (len(req.prompt_ids), 0)
        return [start[0] + k * req.gen_step[0], start[1] + k * req.gen_step[1]]

    # ---- update: sample, emit, retire ---------------------------------------------------------------------
    def _sample_and_emit(self):
        """Draw every row's token in one sampler call, then emit row by row (one host read of the tokens)."""
        rows = self.rows
        banned = ngram_bans([r.req.output_ids for r in rows], [r.req.params.no_repeat_ngram_size for r in rows])
        tok, logprob, top, finite = self.sampler(torch.stack([r.next_logits for r in rows]), banned)
        errors = list(self.sampler.errors)  # why a constrained row could not draw (before update feeds its matcher)
        self.sampler.update(tok)
        tok, finite = tok.tolist(), finite.tolist()
        logprob = logprob.tolist() if logprob is not None else None
        top = (top[0].tolist(), top[1].tolist()) if top is not None else None
        for b, r in enumerate(rows):
            req, p = r.req, r.req.params
            r.next_logits = None
            if req._cancel:
                continue
            if not finite[b]:  # this row's numbers: it ends alone (retired below), the batch goes on
                req.finish_reason = "error"
                req.error = errors[b] or \
                    "sampling failed: the row's logits are not finite after its sampling parameters were applied"
                continue
            t = tok[b]
            if req.t_first is None:
                req.t_first = time.perf_counter()
            if t in p.stop_ids:
                req.finish_reason = "stop"
                continue
            req.output_ids.append(t)
            lp = logprob[b] if p.logprobs else None
            if lp is not None:
                req.logprobs.append(lp)
            self.stats["generated_tokens"] += 1
            if req.on_token:
                n = p.top_logprobs  # the sampler's top lists are as long as the most any row asks for
                req.on_token(req, t, lp, dict(zip(top[1][b][:n], top[0][b][:n])) if n else None)
            if len(req.output_ids) >= p.max_new_tokens:
                req.finish_reason = "length"

    def _retire(self):
        keep, done = [], []
        for r in self.rows:
            req = r.req
            if req._cancel and req.finish_reason is None:
                req.finish_reason = "cancelled"
            (keep if req.finish_reason is None else done).append(r)
        if done:  # compact: survivors move to the front rows (block tables move; the keys stay)
            old = {id(r): i for i, r in enumerate(self.rows)}
            for b, r in enumerate(keep):
                if old[id(r)] != b:
                    self.cache.copy_rows(b, self.cache, old[id(r)], r.length)
            self.cache.release(range(len(keep), len(self.rows)))  # done rows' blocks back to the pool
            self.rows = keep
            self.sampler.keep([old[id(r)] for r in keep])
        for r in done:  # after the rows are gone, so callbacks see the engine's new state
            self._finish(r.req, r.req.finish_reason)

    def _finish(self, req: Request, reason: str):
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        if req.on_finish:
            req.on_finish(req)

