"""Model-as-a-Service: API keys, per-key limits, and a usage ledger with cost and revenue, in a
SQLite file (one machine, the default) or a PostgreSQL database shared by any number of replicas.

    glmkit keys create --name alice --models glm-tiny --rpm 60 --tpm 100000 --concurrency 4 --budget-tokens 10000000
    glmkit keys create --name ops --admin              glmkit keys update ID|PREFIX --rpm 120 --clear tpm
    glmkit keys list [--all]            glmkit keys revoke ID|PREFIX            (each with --db PATH|URL)
    glmkit usage [--key ID|PREFIX] [--since 24h|7d|2026-01-01] [--until ...] [--json]
    glmkit serve --db postgresql://glmkit@dbhost/glmkit ...          (every replica names the same database)

    maas = MaaS(KeyStore(db), Ledger(db), Pricing(per_hour=2.0, input_per_m=0.5, output_per_m=1.5))  # db: path or URL
    key = maas.authenticate("Bearer glmk-...")        # KeyRecord, or AuthError (HTTP 401)
    maas.limiter.admit(key, request_id)                # a slot, or LimitError (HTTP 429)
    maas.limiter.reserve(key, 56, request_id)          # prompt + max_tokens x n set aside, or LimitError
    maas.open(row); maas.flush([row]); maas.record(row, key)   # the ledger row's life; record settles

Keys. A key is `glmk-` + 256 random bits (`secrets.token_urlsafe(32)`). Only its sha256 is stored:
for a key of that entropy a fast hash is enough (nothing to brute-force), and lookup by hash is an
index probe, so no comparison leaks timing. The raw key is printed once, at creation; afterwards a
key is named by its id (`k_...`) or its displayed prefix (the first 12 characters). An admin key
(`admin`) may also use the admin API. Lookups are cached for KeyStore.CACHE_S (2 s): a key revoked
or changed elsewhere takes effect within that time on every replica.

Limits (each optional, per key): the models it may use (others answer 404, as OpenAI does for
models a key cannot see), requests per minute and tokens per minute (sliding 60 s windows, 429
with Retry-After), concurrent requests (429 with Retry-After), and a lifetime token budget (prompt +
completion tokens; 429 `insufficient_quota` with `x-should-retry: false`: waiting will not help).

Token limits are never overshot, by one server or many. Admission (`admit`) takes a request slot
after the cheap checks (concurrency, requests per minute, budget or window already spent). Once the
handler knows the prompt and max_tokens, and before any work starts, `reserve` sets aside what the
request may use at most (prompt + max_tokens x n, summed over prompts) against the budget (used +
reserved + this <= budget) and the minute's window (settled + reserved + this <= tpm), or refuses
with a 429 that says whether waiting helps: a request larger than what is left of the budget
(`insufficient_quota`) or than the tpm itself never passes (no Retry-After, `x-should-retry:
false`); one that only waits for other requests in flight, or for the window to move, gets
Retry-After. When the request is over, `release` replaces its reservation by the tokens it used.

Where limits are decided: in the database, so that N replicas together never exceed a key's limits.
Each decision (admit, reserve, release) is one transaction that first locks the key's row in
`key_state` (SELECT ... FOR UPDATE on PostgreSQL; BEGIN IMMEDIATE on SQLite, which locks the file),
then reads what it needs: `key_state.used` (tokens settled), `inflight` (one row per request
admitted and not settled, with what it reserved: concurrency and reservations on every replica),
`limit_events` (admissions and settled tokens with their times: the windows), on the database's
clock, so replicas' clocks do not matter. The settlement also completes the ledger row, in the same
transaction. What the process keeps is a cache in front, never the authority: key records for a
couple of seconds, and a key's used tokens as last read (they only grow, so a budget seen spent is
refused without asking the database again). A decision is a handful of indexed statements: admit +
reserve + settle (with the row) took 0.9 ms (median; p99 3.9 ms) on SQLite and 3.4 ms (p99 4.7 ms)
on PostgreSQL 15 over a Unix socket with fsync on, one process, a key with every limit, on a
2-core AMD EPYC VM. A key's decisions are serialised by its row lock; other keys' run in parallel.

Replicas and crashes. Each MaaS is a replica: a row in `replicas` with a heartbeat every 5 s (a
thread). A replica whose heartbeat is older than 15 s (or, on this machine, whose process is gone)
is dead: the first live replica to notice releases its requests (their slots and reservations) and
marks its open ledger rows 'interrupted', adding their tokens to the key's use, in one transaction
per dead replica (two replicas noticing at once: the one that deletes its row does it). A replica
that was only slow and finishes such a request completes the row, and the tokens already counted
are not counted twice. Rows a glmkit before replicas left open are marked by the first MaaS to start.

Ledger. One row per request that passed authentication (401s have no customer to bill and are
counted in /metrics only): prompt, cached and completion tokens, compute seconds (the engine's
per-request share of model time), status, latency. cost = compute_s * price per hour / 3600 (the
machine's price); revenue = (uncached prompt * input + cached * cached input + completion * output)
/ 1e6 with prices per million tokens. Both are stored with the row, so a later price change keeps
history. Only work done is billed: a request refused before it ran (400, 404, 413, 429, a client
that left while queued) is recorded with its status and zero tokens, revenue and limit charge.

A row's life, so that billing survives kill -9: the row is written (`open`, status NULL, with its
replica) when the request is admitted; while it runs, metering's flusher writes its usage so far
every second (`flush`); at the end `record` completes it, and is committed before the last byte of
the response goes out (a client that saw a complete response always has a complete row). Rows of a
replica that died are marked as above; they keep the tokens of their last flush, at most a second
behind what was sent, and count against the key's budget. `glmkit usage` shows them in `unfinished`
(rows without a status: cut off by a crash, or in flight now).

Storage (db.py: the dialects, migrations). SQLite in WAL mode (readers such as `glmkit usage` never
block the server's writes) with synchronous=NORMAL: a commit is in the WAL file before the call
returns, which survives the process being killed (not a power cut). Keys and usage share one file by
default, $GLMKIT_CACHE or ~/.cache/glmkit, `maas.sqlite`. PostgreSQL through psycopg 3, used
directly rather than through SQLAlchemy 2 Core: the schema is five tables and the statements are a
few dozen, written once in the SQL both engines share (`INSERT ... ON CONFLICT`, `RETURNING`), so
what differs (placeholders, column types, FOR UPDATE, the clock, the migration lock) is a dozen
lines in db.py. SQLAlchemy 2.0 would translate the same few things at the price of a second
dependency (its CPython 3.11 x86-64 wheel: 3.4 MB, 13.6 MB installed, measured; psycopg is 2.2 MB
plus 9 MB of bundled libpq and OpenSSL) and a layer between the statements and what the database
runs, where these decisions depend on knowing exactly which statement takes which lock.
psycopg[binary] ships libpq in its wheel: nothing to compile, no system package on the serving machines.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from .db import Database

KEY_PREFIX = "glmk-"
SHOWN = 12  # characters of a raw key kept for display ("glmk-AbCdEfG")


def default_db_path() -> Path:
    return Path(os.environ.get("GLMKIT_CACHE") or Path.home() / ".cache" / "glmkit").expanduser() / "maas.sqlite"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


# ---- keys ----------------------------------------------------------------------------------------
@dataclass
class KeyRecord:
    id: str
    prefix: str
    name: str = ""
    created: float = 0.0
    revoked: float | None = None
    models: tuple[str, ...] | None = None  # None: every served model
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    budget_tokens: int | None = None
    admin: bool = False  # may use the admin API (keys, usage of every key)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


LIMITS = ("models", "rpm", "tpm", "concurrency", "budget_tokens")


def _check_limits(limits: dict) -> dict:
    """The limits as stored (models as a tuple), or ValueError naming the bad one."""
    out = {}
    for field_, v in limits.items():
        if field_ not in LIMITS:
            raise ValueError(f"{field_!r} is not a key limit; the limits are {', '.join(LIMITS)}")
        if field_ == "models":
            if v is not None:
                v = tuple(v) if not isinstance(v, str) else (v,)
                if not v or not all(isinstance(m, str) and m for m in v):
                    raise ValueError(f"models={v!r}: name at least one model, or leave it out to allow all")
        elif v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{field_}={v!r}: a limit is a positive integer (leave it out for no limit)")
        out[field_] = v
    return out


class KeyStore:
    """API keys, stored hashed, in a SQLite file or a PostgreSQL database (db.Database). Lookups by
    hash are cached for CACHE_S seconds: a key revoked or changed through another replica (or the
    CLI) takes effect there within that time; through this store, at once."""

    CACHE_S = 2.0

    def __init__(self, path=None):
        self.db = path if isinstance(path, Database) else Database(path or default_db_path())
        self.path = self.db.name
        self.cache: dict[str, tuple[float, KeyRecord]] = {}  # hash -> (when read, record)

    @staticmethod
    def _record(row) -> KeyRecord:
        d = dict(row)
        d.pop("hash")
        d["models"] = tuple(json.loads(d["models"])) if d["models"] is not None else None
        d["admin"] = bool(d["admin"])
        return KeyRecord(**d)

    def create(self, name: str = "", models=None, rpm=None, tpm=None, concurrency=None, budget_tokens=None,
               admin: bool = False) -> tuple[str, KeyRecord]:
        """A new key: (the raw key, shown only now, and its record). An admin key may use the admin API."""
        lim = _check_limits({"models": models, "rpm": rpm, "tpm": tpm, "concurrency": concurrency,
                             "budget_tokens": budget_tokens})
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        rec = KeyRecord("k_" + secrets.token_hex(6), raw[:SHOWN], name, time.time(), None, admin=bool(admin), **lim)
        self.db.run("INSERT INTO keys (id, prefix, hash, name, created, revoked, models, rpm, tpm, concurrency, "
                    "budget_tokens, admin) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rec.id, rec.prefix, hash_key(raw), name, rec.created, None, _models_json(rec.models), rec.rpm,
                     rec.tpm, rec.concurrency, rec.budget_tokens, int(rec.admin)))
        return raw, rec

    def lookup(self, raw: str) -> KeyRecord | None:
        """The active key with this raw value, or None (unknown or revoked)."""
        h, now = hash_key(raw), time.monotonic()
        hit = self.cache.get(h)
        if hit is not None and now - hit[0] < self.CACHE_S:
            return hit[1]
        row = self.db.one("SELECT * FROM keys WHERE hash = ? AND revoked IS NULL", (h,))
        if row is None:
            self.cache.pop(h, None)
            return None
        rec = self._record(row)
        if len(self.cache) > 10_000:  # keys seen in the last seconds; a bound, not a policy
            self.cache.clear()
        self.cache[h] = (now, rec)
        return rec

    def list(self, include_revoked: bool = False) -> list[KeyRecord]:
        q = "SELECT * FROM keys" + ("" if include_revoked else " WHERE revoked IS NULL") + " ORDER BY created"
        return [self._record(r) for r in self.db.all(q)]

    def find(self, id_or_prefix: str) -> KeyRecord:
        rows = self.db.all("SELECT * FROM keys WHERE id = ? OR prefix = ?", (id_or_prefix, id_or_prefix))
        if not rows:
            raise KeyError(f"no key with id or prefix {id_or_prefix!r}; see `glmkit keys list --all`")
        if len(rows) > 1:
            raise ValueError(f"{id_or_prefix!r} names {len(rows)} keys; use the key id (k_...)")
        return self._record(rows[0])

    def revoke(self, id_or_prefix: str) -> KeyRecord:
        rec = self.find(id_or_prefix)
        self.db.run("UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), rec.id))
        self.cache.clear()
        return self.find(rec.id)

    def update(self, id_or_prefix: str, **limits) -> KeyRecord:
        """Change a key's limits (models, rpm, tpm, concurrency, budget_tokens; None clears one); the
        others stay. Checked as create's; the new record. Requests in flight keep what they reserved."""
        rec = self.find(id_or_prefix)
        lim = _check_limits(limits)
        if not lim:
            return rec
        if "models" in lim:
            lim["models"] = _models_json(lim["models"])
        self.db.run(f"UPDATE keys SET {', '.join(f + ' = ?' for f in lim)} WHERE id = ?", (*lim.values(), rec.id))
        self.cache.clear()
        return self.find(rec.id)


def _models_json(models) -> str | None:
    return json.dumps(list(models)) if models is not None else None


# ---- pricing and the ledger ------------------------------------------------------------------------
@dataclass
class Pricing:
    """Machine price (per hour of compute) and token prices (per million tokens), one currency."""

    per_hour: float = 0.0
    input_per_m: float = 0.0
    cached_input_per_m: float | None = None  # None: same as input
    output_per_m: float = 0.0

    def __post_init__(self):
        for k, v in asdict(self).items():
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"price {k}={v!r} must be a finite number >= 0")

    def cost(self, compute_s: float) -> float:
        return compute_s * self.per_hour / 3600

    def revenue(self, prompt: int, cached: int, completion: int) -> float:
        cached_price = self.input_per_m if self.cached_input_per_m is None else self.cached_input_per_m
        return ((prompt - cached) * self.input_per_m + cached * cached_price + completion * self.output_per_m) / 1e6


@dataclass
class UsageRow:
    ts: float  # unix time the request arrived
    request_id: str
    key_id: str | None  # None: a server started with --no-auth
    endpoint: str
    model: str | None = None
    status: int | None = 200  # 499: the client went away before the end; None: open (in flight, or cut by a crash)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    compute_s: float = 0.0
    latency_s: float = 0.0
    ttft_s: float | None = None
    cost: float = 0.0
    revenue: float = 0.0
    error: str | None = None


COLUMNS = [f.name for f in UsageRow.__dataclass_fields__.values()]


class Ledger:
    """The usage ledger: one row per request (see the module docstring), in a SQLite file or a
    PostgreSQL database. `replica` names the server process that opened a row, so that the rows
    of a replica that died, and only those, are marked interrupted (Limiter.reap)."""

    INSERT = f"INSERT INTO usage ({', '.join(COLUMNS)}, replica) VALUES ({', '.join('?' * (len(COLUMNS) + 1))})"
    # rows are found by request id while open (status NULL) only: a small partial index
    UPDATE_OPEN = f"UPDATE usage SET {', '.join(c + ' = ?' for c in COLUMNS)} WHERE request_id = ? AND status IS NULL"

    def __init__(self, path=None):
        self.db = path if isinstance(path, Database) else Database(path or default_db_path())
        self.path = self.db.name

    def open(self, row: UsageRow, replica: str | None = None) -> None:
        """The row of a request just admitted (status None until `record` completes it)."""
        self.db.run(self.INSERT, [getattr(row, c) for c in COLUMNS] + [replica])

    def flush(self, rows: list[UsageRow]) -> None:
        """Usage so far of open rows, in one transaction; a row completed meanwhile is left as it is."""
        with self.db.tx():
            self.db.many(self.UPDATE_OPEN, [[getattr(r, c) for c in COLUMNS] + [r.request_id] for r in rows])

    def record(self, row: UsageRow, replica: str | None = None) -> None:
        """The final row: completes the request's open row, or adds it (a request refused before admission)."""
        values = [getattr(row, c) for c in COLUMNS]
        with self.db.tx():
            if self.db.run(self.UPDATE_OPEN, values + [row.request_id]) == 0:
                self.db.run(self.INSERT, values + [replica])

    def rows(self, key_id: str | None = None) -> list[UsageRow]:
        q, args = "SELECT * FROM usage", ()
        if key_id is not None:
            q, args = q + " WHERE key_id = ?", (key_id,)
        return [UsageRow(**{c: r[c] for c in COLUMNS}) for r in self.db.all(q + " ORDER BY id", args)]

    def used_tokens(self, key_id: str) -> int:
        r = self.db.one("SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS n FROM usage WHERE key_id = ?",
                        (key_id,))
        return int(r["n"])

    def totals(self, key_id: str | None = None, since: float | None = None, until: float | None = None) -> list[dict]:
        """Per key: requests, errors, unfinished (no status: in flight or cut by a crash), tokens, compute
        seconds, cost, revenue, margin."""
        where, args = [], []
        for cond, v in (("key_id = ?", key_id), ("ts >= ?", since), ("ts < ?", until)):
            if v is not None:
                where.append(cond)
                args.append(v)
        q = ("SELECT key_id, COUNT(*) AS requests, SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors, "
             "SUM(CASE WHEN status IS NULL THEN 1 ELSE 0 END) AS unfinished, SUM(prompt_tokens) AS prompt_tokens, "
             "SUM(cached_tokens) AS cached_tokens, SUM(completion_tokens) AS completion_tokens, SUM(compute_s) AS compute_s, "
             "SUM(cost) AS cost, SUM(revenue) AS revenue FROM usage" + (" WHERE " + " AND ".join(where) if where else "")
             + " GROUP BY key_id ORDER BY key_id")
        out = self.db.all(q, args)
        for d in out:
            for k in ("requests", "errors", "unfinished", "prompt_tokens", "cached_tokens", "completion_tokens"):
                d[k] = int(d[k] or 0)  # PostgreSQL's SUM of integers may be a Decimal
            for k in ("compute_s", "cost", "revenue"):
                d[k] = float(d[k] or 0.0)
            d["margin"] = d["revenue"] - d["cost"]
        return out


# ---- limits ---------------------------------------------------------------------------------------
class LimitError(Exception):
    """HTTP 429. `retry_after` seconds for rate limits; None with `should_retry` False for a budget."""

    def __init__(self, message: str, type_: str, code: str, retry_after: int | None = None, should_retry: bool = True):
        super().__init__(message)
        self.type, self.code, self.retry_after, self.should_retry = type_, code, retry_after, should_retry


class AuthError(Exception):
    """HTTP 401."""


@dataclass
class KeyState:
    """What the database holds for one key's limits (Limiter.snapshot)."""

    used: int  # tokens settled over the key's life (its budget's use), interrupted rows included
    reserved: int  # tokens set aside by its requests in flight, on every replica
    active: int  # its requests in flight, on every replica
    requests: int  # admissions in the last minute (counted while it has an rpm)
    tokens: int  # tokens settled in the last minute (counted while it has a tpm)


def _host() -> str:
    """This machine and process namespace: pids are comparable only between processes with the same
    one. The hostname alone is not enough: containers with host networking share it and not their
    pids, and two machines may share a name; so the boot id and the pid namespace are added (Linux)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


HOST = _host()
_LIVE: weakref.WeakValueDictionary[str, Limiter] = weakref.WeakValueDictionary()  # this process's replicas
INTERRUPTED = ("the server stopped before the request ended; tokens as of its last flush")


def _alive(host: str, pid: int, replica: str) -> bool:
    """False when a replica's process is known to be gone: on this machine, its pid does not exist
    or, in this process, its Limiter is gone. True when unknown (another machine): its heartbeat decides."""
    if host != HOST:
        return True
    if pid == os.getpid():
        return replica in _LIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return True


def _beat(ref, stop: threading.Event, every: float):
    # holds the limiter weakly: a limiter dropped without close() stops beating, as a killed server would
    while not stop.wait(every):
        lim = ref()
        if lim is None:
            return
        try:
            lim.beat()
        except lim.db.errors as e:
            print(f"glmkit serve: heartbeat of replica {lim.replica} failed: {e}", file=sys.stderr)
        del lim


class Limiter:
    """Per-key admission: requests and tokens per minute, concurrency, lifetime token budget, and the
    token reservations of requests in flight, decided in the ledger's database so that every replica
    on it enforces the same limits (see the module docstring). `clock` replaces the database's clock
    for the windows (tests); `heartbeat` False: no thread (the replica is reaped once stale)."""

    WINDOW = 60.0
    HEARTBEAT_S = 5.0
    STALE_S = 15.0  # a replica whose heartbeat is older is dead: its requests are released, its rows interrupted

    def __init__(self, ledger: Ledger, clock=None, heartbeat: bool = True):
        self.ledger, self.db, self.clock = ledger, ledger.db, clock
        self.replica = "r_" + secrets.token_hex(8)
        self.spent: dict[str, int] = {}  # key id -> its used tokens as last read: they only grow, so >= budget is final
        self.anonymous: dict[str, list[str]] = {}  # key id -> ids of requests admitted without one (admit(key))
        self.reservations: dict[str, int] = {}  # request id -> tokens it reserved, requests of this replica
        self.stop = threading.Event()
        now = self.db.now()
        self.db.run("INSERT INTO replicas (id, host, pid, started, heartbeat) VALUES (?, ?, ?, ?, ?)",
                    (self.replica, HOST, os.getpid(), now, now))
        _LIVE[self.replica] = self
        self.interrupted = self.reap(legacy=True)
        if heartbeat:
            threading.Thread(target=_beat, args=(weakref.ref(self), self.stop, self.HEARTBEAT_S), daemon=True,
                             name=f"glmkit-heartbeat-{self.replica}").start()

    # ---- replicas ---------------------------------------------------------------------------------------------
    def beat(self) -> None:
        """This replica is alive; then release what replicas found dead held."""
        if self.db.run(f"UPDATE replicas SET heartbeat = {self.db.NOW} WHERE id = ?", (self.replica,)) == 0:
            # reaped while alive (a pause longer than STALE_S): our requests' slots were released; carry on
            print(f"glmkit serve: this server (replica {self.replica}) missed its heartbeats for over {self.STALE_S:g} s; "
                  "other replicas released its requests' limits", file=sys.stderr)
            now = self.db.now()
            self.db.run("INSERT INTO replicas (id, host, pid, started, heartbeat) VALUES (?, ?, ?, ?, ?)",
                        (self.replica, HOST, os.getpid(), now, now))
        self.reap()

    def reap(self, legacy: bool = False) -> int:
        """Release the requests of dead replicas (heartbeat older than STALE_S, or a process known
        gone): their slots and reservations, and their open ledger rows marked 'interrupted' with
        the tokens of their last flush added to the key's use, each replica once, in one transaction.
        `legacy`: also rows a glmkit before replicas left open. The number of rows marked."""
        now = self.db.now()
        dead = [r["id"] for r in self.db.all("SELECT id, host, pid, heartbeat FROM replicas WHERE id <> ?", (self.replica,))
                if r["heartbeat"] < now - self.STALE_S or not _alive(r["host"], r["pid"], r["id"])]
        marked = 0
        for rid in dead:
            with self.db.tx():
                if self.db.run("DELETE FROM replicas WHERE id = ?", (rid,)) == 0:
                    continue  # another replica reaped it first; its row lock made us wait until then
                for r in self.db.all("SELECT key_id, SUM(prompt_tokens + completion_tokens) AS n FROM usage WHERE replica = ? "
                                     "AND status IS NULL AND finish_reason IS NULL AND key_id IS NOT NULL GROUP BY key_id "
                                     "ORDER BY key_id", (rid,)):
                    self.db.run("UPDATE key_state SET used = used + ? WHERE key_id = ?", (int(r["n"] or 0), r["key_id"]))
                marked += self.db.run("UPDATE usage SET finish_reason = 'interrupted', error = ? WHERE replica = ? AND "
                                      "status IS NULL AND finish_reason IS NULL", (INTERRUPTED, rid))
                self.db.run("DELETE FROM inflight WHERE replica = ?", (rid,))
        if legacy:  # no replica row to serialise on: charge exactly the rows this transaction marked
            with self.db.tx():
                rows = self.db.all("UPDATE usage SET finish_reason = 'interrupted', error = ? WHERE replica IS NULL AND "
                                   "status IS NULL AND finish_reason IS NULL RETURNING key_id, "
                                   "prompt_tokens + completion_tokens AS n", (INTERRUPTED,))
                charge: dict[str, int] = {}
                for r in rows:
                    if r["key_id"] is not None:
                        charge[r["key_id"]] = charge.get(r["key_id"], 0) + int(r["n"] or 0)
                for key_id in sorted(charge):
                    self.db.run("UPDATE key_state SET used = used + ? WHERE key_id = ?", (charge[key_id], key_id))
                marked += len(rows)
        return marked

    def close(self) -> None:
        """A clean stop: this replica's requests in flight are released and it leaves the replica table."""
        self.stop.set()
        _LIVE.pop(self.replica, None)
        with self.db.tx():
            self.db.run("DELETE FROM inflight WHERE replica = ?", (self.replica,))
            self.db.run("DELETE FROM replicas WHERE id = ?", (self.replica,))

    # ---- the key's row, its windows ------------------------------------------------------------------------
    def _lock(self, key_id: str) -> tuple[int, float]:
        """Inside a transaction: lock the key's state row (created on first use from the ledger's
        finished and interrupted rows) and read its used tokens and the clock. What the decision reads
        next (in flight, windows) comes in later statements, not subqueries of this one: on PostgreSQL
        (READ COMMITTED) each statement reads as of its start, and only those that start once the lock
        is held see every decision committed before ours."""
        q = f"SELECT used, {self.db.NOW} AS now FROM key_state WHERE key_id = ?{self.db.for_update}"
        r = self.db.one(q, (key_id,))
        if r is None:
            self.db.run("INSERT INTO key_state (key_id, used) SELECT ?, COALESCE(SUM(prompt_tokens + completion_tokens), 0) "
                        "FROM usage WHERE key_id = ? AND (status IS NOT NULL OR finish_reason = 'interrupted') "
                        "ON CONFLICT (key_id) DO NOTHING", (key_id, key_id))
            r = self.db.one(q, (key_id,))
        used = self.spent[key_id] = int(r["used"])
        return used, (self.clock() if self.clock is not None else float(r["now"]))

    def _window(self, key_id: str, now: float) -> tuple[int, int, float | None]:
        """(admissions, settled tokens, time of the oldest admission) in the minute before `now`."""
        self.db.run("DELETE FROM limit_events WHERE key_id = ? AND t <= ?", (key_id, now - self.WINDOW))
        r = self.db.one("SELECT COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(tokens), 0) AS tokens, "
                        "MIN(CASE WHEN requests > 0 THEN t END) AS first FROM limit_events WHERE key_id = ? AND t > ?",
                        (key_id, now - self.WINDOW))
        return int(r["requests"]), int(r["tokens"]), r["first"]

    def _tpm_wait(self, key_id: str, now: float, room: int) -> int:
        """Whole seconds until the tokens settled in the window are at most `room`."""
        events = self.db.all("SELECT t, tokens FROM limit_events WHERE key_id = ? AND tokens > 0 AND t > ? ORDER BY t",
                             (key_id, now - self.WINDOW))
        acc, wait = sum(int(e["tokens"]) for e in events), 0.0
        for e in events:
            if acc <= room:
                break
            acc -= int(e["tokens"])
            wait = e["t"] + self.WINDOW - now
        return max(1, math.ceil(wait))

    @staticmethod
    def _spent_error(key: KeyRecord, used: int) -> LimitError:
        return LimitError(f"this key has used its token budget ({used} of {key.budget_tokens} tokens); ask for a larger "
                          "budget or use another key", "insufficient_quota", "insufficient_quota", None, should_retry=False)

    # ---- admission, reservation, settlement -------------------------------------------------------------------
    def admit(self, key: KeyRecord, request_id: str | None = None) -> str:
        """Take a request slot for `key` or raise LimitError; `release` gives the slot back. The
        request's id (one is made up when none is given; `release(key, n)` then frees the last)."""
        rid = request_id or "anon-" + secrets.token_hex(8)
        if key.budget_tokens is not None and self.spent.get(key.id, 0) >= key.budget_tokens:
            raise self._spent_error(key, self.spent[key.id])  # proved without the database: use only grows
        with self.db.tx():
            used, now = self._lock(key.id)
            if key.budget_tokens is not None and used >= key.budget_tokens:
                raise self._spent_error(key, used)
            if key.concurrency is not None:
                active = int(self.db.one("SELECT COUNT(*) AS n FROM inflight WHERE key_id = ?", (key.id,))["n"])
                if active >= key.concurrency:
                    raise LimitError(f"this key already has {active} requests in flight (limit {key.concurrency}); "
                                     "retry when one finishes", "requests", "rate_limit_exceeded", 1)
            if key.rpm is not None or key.tpm is not None:
                requests, tokens, first = self._window(key.id, now)
                if key.rpm is not None and requests >= key.rpm:
                    wait = first + self.WINDOW - now
                    raise LimitError(f"rate limit of {key.rpm} requests per minute reached; retry in {math.ceil(wait)} s",
                                     "requests", "rate_limit_exceeded", max(1, math.ceil(wait)))
                if key.tpm is not None and tokens >= key.tpm:
                    wait = self._tpm_wait(key.id, now, key.tpm - 1)  # until the window is under the limit
                    raise LimitError(f"rate limit of {key.tpm} tokens per minute reached ({tokens} in the last minute); "
                                     f"retry in {wait} s", "tokens", "rate_limit_exceeded", wait)
            self.db.run("INSERT INTO inflight (request_id, key_id, replica, admitted, reserved) VALUES (?, ?, ?, ?, 0)",
                        (rid, key.id, self.replica, now))
            if key.rpm is not None:
                self.db.run("INSERT INTO limit_events (key_id, t, requests, tokens) VALUES (?, ?, 1, 0)", (key.id, now))
        if request_id is None:
            self.anonymous.setdefault(key.id, []).append(rid)
        return rid

    def reserve(self, key: KeyRecord, tokens: int, request_id: str) -> None:
        """Set aside `tokens`, the most an admitted request may use, against the key's budget and
        tokens per minute, or raise LimitError; `release(key, used, request_id)` settles it."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"reserve({tokens!r}): give the most tokens the request may use, an integer >= 0")
        if key.budget_tokens is None and key.tpm is None:  # nothing to hold it against
            self.reservations[request_id] = self.reservations.get(request_id, 0) + tokens
            return
        with self.db.tx():
            used, now = self._lock(key.id)
            reserved = int(self.db.one("SELECT COALESCE(SUM(reserved), 0) AS n FROM inflight WHERE key_id = ?",
                                       (key.id,))["n"])
            if key.budget_tokens is not None:
                budget = key.budget_tokens
                if used + tokens > budget:
                    raise LimitError(f"this request may use up to {tokens} tokens (prompt + max_tokens x n) and this key "
                                     f"has {max(0, budget - used)} of its budget of {budget} left; lower max_tokens or n, "
                                     "or ask for a larger budget", "insufficient_quota", "insufficient_quota", None,
                                     should_retry=False)
                if used + reserved + tokens > budget:
                    raise LimitError(f"this request may use up to {tokens} tokens; this key's requests in flight have "
                                     f"reserved {reserved} of the {budget - used} left in its budget; retry when one "
                                     "finishes", "tokens", "rate_limit_exceeded", 1)
            if key.tpm is not None:
                if tokens > key.tpm:
                    raise LimitError(f"this request may use up to {tokens} tokens (prompt + max_tokens x n), more than "
                                     f"this key's limit of {key.tpm} tokens per minute, so it can never pass; lower "
                                     "max_tokens or n, or shorten the prompt", "tokens", "rate_limit_exceeded", None,
                                     should_retry=False)
                _, settled, _ = self._window(key.id, now)
                if settled + reserved + tokens > key.tpm:
                    room = key.tpm - reserved - tokens  # < 0: only requests in flight finishing can make room
                    wait = self._tpm_wait(key.id, now, room) if room >= 0 else 1
                    raise LimitError(f"rate limit of {key.tpm} tokens per minute: this request may use up to {tokens}, "
                                     f"{settled} were used in the last minute and {reserved} are reserved by requests "
                                     f"in flight; retry in {wait} s", "tokens", "rate_limit_exceeded", wait)
            if self.db.run("UPDATE inflight SET reserved = reserved + ? WHERE request_id = ? AND key_id = ?",
                           (tokens, request_id, key.id)) == 0:
                raise ValueError(f"reserve: request {request_id!r} of key {key.id} holds no slot; admit it first "
                                 "(Limiter.admit(key, request_id))")
        self.reservations[request_id] = self.reservations.get(request_id, 0) + tokens

    def release(self, key: KeyRecord, tokens: int, request_id: str | None = None, row: UsageRow | None = None) -> None:
        """The request is over: free its slot and replace its reservation by the tokens it used
        (prompt + completion), in one transaction, which also completes its ledger `row` if given."""
        if request_id is None:
            pending = self.anonymous.get(key.id)
            if not pending:
                raise ValueError(f"release: key {key.id} has no request admitted without an id; name the request")
            request_id = pending.pop()
        reserved = self.reservations.pop(request_id, None)
        with self.db.tx():
            _, now = self._lock(key.id)
            charged = 0
            if self.db.one("DELETE FROM inflight WHERE request_id = ? RETURNING reserved", (request_id,)) is None:
                # released by a replica that took this one for dead: it charged the row's tokens of the last flush
                r = self.db.one("SELECT prompt_tokens + completion_tokens AS n FROM usage WHERE request_id = ? AND "
                                "status IS NULL AND finish_reason = 'interrupted'", (request_id,))
                charged = int(r["n"] or 0) if r else 0
            if row is not None:
                self.ledger.record(row, self.replica)
            if tokens - charged:
                self.db.run("UPDATE key_state SET used = used + ? WHERE key_id = ?", (tokens - charged, key.id))
                self.spent[key.id] = self.spent.get(key.id, 0) + tokens - charged
            if tokens and key.tpm is not None:
                self.db.run("INSERT INTO limit_events (key_id, t, requests, tokens) VALUES (?, ?, 0, ?)", (key.id, now, tokens))
        if reserved is not None and tokens > reserved:  # a handler's bug: the limits may be overshot by the difference
            print(f"glmkit serve: request {request_id} used {tokens} tokens, more than the {reserved} it reserved",
                  file=sys.stderr)

    def snapshot(self, key_id: str) -> KeyState:
        """The key's state in the database, across every replica."""
        now = self.clock() if self.clock is not None else self.db.now()
        r = self.db.one("SELECT used FROM key_state WHERE key_id = ?", (key_id,))
        f = self.db.one("SELECT COUNT(*) AS n, COALESCE(SUM(reserved), 0) AS reserved FROM inflight WHERE key_id = ?",
                        (key_id,))
        w = self.db.one("SELECT COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(tokens), 0) AS tokens FROM "
                        "limit_events WHERE key_id = ? AND t > ?", (key_id, now - self.WINDOW))
        return KeyState(int(r["used"]) if r else 0, int(f["reserved"]), int(f["n"]), int(w["requests"]), int(w["tokens"]))


# ---- the bundle the server holds ----------------------------------------------------------------------
class MaaS:
    """Keys (None with auth off), limits, ledger and prices of one server."""

    def __init__(self, keys: KeyStore | None, ledger: Ledger, pricing: Pricing | None = None, auth: bool = True):
        if auth and keys is None:
            raise ValueError("auth needs a KeyStore; pass auth=False only for local use (glmkit serve --no-auth)")
        self.keys, self.ledger, self.pricing, self.auth = keys, ledger, pricing or Pricing(), auth
        self.limiter = Limiter(ledger)
        # rows left open by replicas that died (and by a glmkit before replicas) were marked as it started
        self.interrupted = self.limiter.interrupted
        if self.interrupted:
            print(f"glmkit: {self.interrupted} requests of a server that stopped were cut off (kill, crash); their ledger "
                  "rows are marked 'interrupted' and carry the tokens of their last flush (see `glmkit usage`)", file=sys.stderr)

    def close(self) -> None:
        """A clean stop: this server's requests in flight release their limits at once."""
        self.limiter.close()

    @classmethod
    def local(cls, ledger_path=":memory:", pricing: Pricing | None = None) -> MaaS:
        """No authentication, metering only: for local use and tests."""
        return cls(None, Ledger(ledger_path), pricing, auth=False)

    def authenticate(self, authorization: str | None) -> KeyRecord | None:
        """The key of an `Authorization: Bearer ...` header; None when auth is off."""
        if not self.auth:
            return None
        scheme, _, raw = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            raise AuthError("no API key given: send the header 'Authorization: Bearer YOUR_KEY' "
                            "(create keys with `glmkit keys create`)")
        raw = raw.strip()
        key = self.keys.lookup(raw)
        if key is None:
            shown = raw[:SHOWN] + "..." if len(raw) > SHOWN else "***"
            raise AuthError(f"incorrect or revoked API key provided: {shown}")
        return key

    def _price(self, row: UsageRow) -> UsageRow:
        row.cost = self.pricing.cost(row.compute_s)
        row.revenue = self.pricing.revenue(row.prompt_tokens, row.cached_tokens, row.completion_tokens)
        return row

    def _write(self, fn, arg, rows: list[UsageRow]) -> None:
        # never raises in the middle of serving: the rows go to stderr instead
        try:
            fn(arg)
        except self.ledger.db.errors as e:
            print(f"glmkit serve: could not write usage rows ({e}): {[asdict(r) for r in rows]}",
                  file=sys.stderr)

    def open(self, row: UsageRow) -> None:
        """Write the row of a request just admitted (status None)."""
        self._write(lambda r: self.ledger.open(r, self.limiter.replica), row, [row])

    def flush(self, rows: list[UsageRow]) -> None:
        """Write the usage so far of open rows."""
        rows = [self._price(r) for r in rows]
        self._write(self.ledger.flush, rows, rows)

    def record(self, row: UsageRow, key: KeyRecord | None, admitted: bool = True) -> UsageRow:
        """Price the final row, write it, and release the key's slot (if `admitted` took one), settling
        its reservation to the tokens of the row."""
        self._price(row)
        if key is not None and admitted:  # settles the reservation and completes the row, in one transaction
            tokens = row.prompt_tokens + row.completion_tokens
            self._write(lambda r: self.limiter.release(key, tokens, r.request_id, row=r), row, [row])
        else:
            self._write(lambda r: self.ledger.record(r, self.limiter.replica), row, [row])
        return row


# ---- command line -----------------------------------------------------------------------------------
def _when(s: str | None) -> float | None:
    """'24h' / '30m' / '7d' ago, or an ISO date or datetime (local time unless it names a zone)."""
    if s is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", s.strip())
    if m:
        return time.time() - float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    try:
        return datetime.fromisoformat(s.strip()).timestamp()
    except ValueError:
        raise ValueError(f"--since/--until {s!r}: give a duration ago (30m, 24h, 7d) or an ISO date (2026-01-31)") from None


def _fmt_time(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells)


def keys_main(argv=None) -> int:
    """`glmkit keys create|list|revoke`."""
    p = argparse.ArgumentParser(prog="glmkit keys", description="Manage the API keys of `glmkit serve` (stored hashed).")
    p.add_argument("--db", default=None, help=f"keys database (default: {default_db_path()})")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create a key; it is printed once and cannot be shown again")
    c.add_argument("--name", default="", help="who or what the key is for")
    c.add_argument("--models", default=None, help="comma-separated model names the key may use (default: all)")
    c.add_argument("--rpm", type=int, default=None, help="requests per minute")
    c.add_argument("--tpm", type=int, default=None, help="tokens (prompt + completion) per minute")
    c.add_argument("--concurrency", type=int, default=None, help="requests in flight at once")
    c.add_argument("--budget-tokens", type=int, default=None, help="lifetime token budget (prompt + completion)")
    c.add_argument("--admin", action="store_true", help="the key may use the admin API (keys and usage of every key)")
    ls = sub.add_parser("list", help="list keys (prefix only; the raw keys are not stored)")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    r = sub.add_parser("revoke", help="revoke a key by id (k_...) or prefix; takes effect on the next request")
    r.add_argument("key")
    u = sub.add_parser("update", help="change a key's limits (the others stay); takes effect within seconds on every server")
    u.add_argument("key", help="id (k_...) or prefix")
    u.add_argument("--models", default=None, help="comma-separated model names the key may use")
    for name in ("rpm", "tpm", "concurrency", "budget-tokens"):
        u.add_argument(f"--{name}", type=int, default=None)
    u.add_argument("--clear", action="append", default=[], choices=LIMITS, help="remove this limit (repeatable)")
    for sp in (c, ls, r, u):  # --db after the subcommand too
        sp.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    store = KeyStore(a.db)
    if a.cmd == "create":
        models = [m.strip() for m in a.models.split(",") if m.strip()] if a.models is not None else None
        raw, rec = store.create(a.name, models, a.rpm, a.tpm, a.concurrency, a.budget_tokens, admin=a.admin)
        print(raw)
        print(f"{'admin ' if rec.admin else ''}key {rec.id} ({rec.prefix}...) created in {store.path}; store it now: it "
              "cannot be shown again", file=sys.stderr)
    elif a.cmd == "list":
        used = {r["key_id"]: int(r["n"]) for r in store.db.all(
            "SELECT key_id, SUM(prompt_tokens + completion_tokens) AS n FROM usage GROUP BY key_id")}
        rows = [[k.id, k.prefix + "...", k.name or "-", _fmt_time(k.created),
                 ("revoked" if k.revoked else "active") + (" admin" if k.admin else ""),
                 ",".join(k.models) if k.models else "all", k.rpm or "-", k.tpm or "-", k.concurrency or "-",
                 k.budget_tokens or "-", used.get(k.id, 0)] for k in store.list(a.all)]
        print(_table(rows, ["id", "prefix", "name", "created", "status", "models", "rpm", "tpm", "concurrency",
                            "budget", "used tokens"]))
    elif a.cmd == "update":
        change = {f: getattr(a, f) for f in LIMITS if getattr(a, f) is not None}
        if "models" in change:
            change["models"] = [m.strip() for m in change["models"].split(",") if m.strip()]
        change.update({f: None for f in a.clear})
        if not change:
            p.error("keys update: give a new limit (--rpm N, ...) or --clear LIMIT")
        rec = store.update(a.key, **change)
        print(f"updated {rec.id} ({rec.prefix}...): models {','.join(rec.models) if rec.models else 'all'}, rpm {rec.rpm}, "
              f"tpm {rec.tpm}, concurrency {rec.concurrency}, budget {rec.budget_tokens}")
    else:
        rec = store.revoke(a.key)
        print(f"revoked {rec.id} ({rec.prefix}...) at {_fmt_time(rec.revoked)}")
    return 0


def usage_main(argv=None) -> int:
    """`glmkit usage`: per-key totals of the ledger."""
    p = argparse.ArgumentParser(prog="glmkit usage", description="Per-key totals of the usage ledger: requests, errors, "
                                "unfinished (no status: in flight now, or cut off by a crash and marked 'interrupted' when "
                                "a server next opens the ledger), tokens, compute seconds, cost (machine time), revenue "
                                "(token prices), margin.")
    p.add_argument("--db", default=None, help=f"ledger database (default: {default_db_path()})")
    p.add_argument("--key", default=None, help="one key, by id (k_...) or prefix")
    p.add_argument("--since", default=None, help="30m, 24h, 7d (ago) or an ISO date/time")
    p.add_argument("--until", default=None, help="as --since")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    a = p.parse_args(argv)
    since, until = _when(a.since), _when(a.until)
    ledger = Ledger(a.db)
    names = {r["id"]: (r["prefix"], r["name"]) for r in ledger.db.all("SELECT id, prefix, name FROM keys")}
    key_id = None
    if a.key is not None:  # a ledger kept apart from its keys (--ledger) knows ids only
        key_id = KeyStore(ledger.db).find(a.key).id if names else a.key
    totals = ledger.totals(key_id, since, until)
    if a.json:
        for t in totals:
            print(json.dumps(t))
        return 0
    if not totals:
        print("no requests in the ledger" + (" for that key" if a.key else "") + (" in that period" if since or until else ""))
        return 0
    counts = ("requests", "errors", "unfinished", "prompt_tokens", "cached_tokens", "completion_tokens")

    def row(label, name, t):
        return [label, name, *(t[k] for k in counts), f"{t['compute_s']:.3f}",
                *(f"{t[k]:.6f}" for k in ("cost", "revenue", "margin"))]

    rows = [row(t["key_id"] or "(no auth)", names.get(t["key_id"], ("", ""))[1] or "-", t) for t in totals]
    if len(rows) > 1:
        rows.append(row("total", "", {k: sum(t[k] for t in totals) for k in totals[0] if k != "key_id"}))
    print(_table(rows, ["key", "name", "requests", "errors", "unfinished", "prompt", "cached", "completion", "compute_s",
                        "cost", "revenue", "margin"]))
    return 0
