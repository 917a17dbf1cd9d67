"""The database behind MaaS (keys, limits, the ledger): SQLite for a file path, PostgreSQL for a
`postgresql://` URL, one connection each, the few places the two dialects differ, and versioned
schema migrations applied when a database is opened.

    db = Database("/path/maas.sqlite")   or   Database("postgresql://user@host/glmkit")
    with db.tx():                                      # BEGIN IMMEDIATE (SQLite) / BEGIN (PostgreSQL) ... COMMIT
        row = db.one("SELECT used FROM key_state WHERE key_id = ?" + db.for_update, (key_id,))
        db.run("UPDATE key_state SET used = used + ? WHERE key_id = ?", (n, key_id))   # -> rowcount
    db.all(sql, args) -> [dict]; db.many(sql, seq); db.now(), or db.NOW in SQL: the database's clock (unix seconds)
    db.busy_s, db.statements                           # time spent in the database by this connection, statements run

SQL is written once, with `?` placeholders, in the subset both engines share (upserts are `INSERT ...
ON CONFLICT`, `RETURNING` works in both); `sql()` turns `?` into psycopg's `%s`. What differs is
here and nowhere else: column types in the schema (REAL is 4 bytes on PostgreSQL, so DOUBLE
PRECISION; INTEGER is 4 bytes there, so BIGINT for limits and counters), `FOR UPDATE` (SQLite
has no row locks: its BEGIN IMMEDIATE takes the write lock of the whole file for the transaction,
which serialises the same decisions), the clock, and the lock that keeps two servers starting on
one empty database from both migrating it (an advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite).

Migrations: `schema_version` holds one row per migration applied (the version is its primary key,
so a second server applying the same migration fails instead of doing it twice). Migration 1 is
the schema of glmkit before replicas, in `IF NOT EXISTS` form, so a database written by that
version (its tables, no version table) is brought to version 1 with its rows; later ones add
columns and tables. A database newer than this glmkit is refused with a message.

One connection per Database, shared by the server's threads under `lock` (a transaction holds it
from BEGIN to COMMIT). A request does a few short statements, so one connection per process is not
what limits a replica. A lost PostgreSQL connection fails the statement that meets it (the ledger's
writes print their rows to stderr then; admission answers 503) and is opened again by the next.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# migration i (1-based) is MIGRATIONS[i - 1]; {real} {big} {serial} are filled per dialect
MIGRATIONS: list[list[str]] = [
    [  # 1: the schema of glmkit before replicas (one server per SQLite file)
        "CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, prefix TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, "
        "name TEXT NOT NULL DEFAULT '', created {real} NOT NULL, revoked {real}, models TEXT, rpm {big}, tpm {big}, "
        "concurrency {big}, budget_tokens {big})",
        "CREATE TABLE IF NOT EXISTS usage (id {serial}, ts {real} NOT NULL, request_id TEXT, key_id TEXT, endpoint TEXT, "
        "model TEXT, status INTEGER, finish_reason TEXT, prompt_tokens INTEGER, cached_tokens INTEGER, "
        "completion_tokens INTEGER, compute_s {real}, latency_s {real}, ttft_s {real}, cost {real}, revenue {real}, error TEXT)",
        "CREATE INDEX IF NOT EXISTS usage_key_ts ON usage (key_id, ts)",
        "CREATE INDEX IF NOT EXISTS usage_open ON usage (request_id) WHERE status IS NULL",
    ],
    [  # 2: admin keys; limits held in the database for any number of replicas
        "ALTER TABLE keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE usage ADD COLUMN replica TEXT",  # the server process that opened the row
        "CREATE INDEX usage_open_replica ON usage (replica) WHERE status IS NULL",
        # one row per server process; a replica whose heartbeat is stale is dead, its requests are released
        "CREATE TABLE replicas (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, started {real} NOT NULL, "
        "heartbeat {real} NOT NULL)",
        # per key: tokens settled (its budget's use); the row every limit decision on the key locks
        "CREATE TABLE key_state (key_id TEXT PRIMARY KEY, used {big} NOT NULL)",
        # requests admitted and not yet settled: concurrency, and the tokens they reserved
        "CREATE TABLE inflight (request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, replica TEXT NOT NULL, "
        "admitted {real} NOT NULL, reserved {big} NOT NULL DEFAULT 0)",
        "CREATE INDEX inflight_key ON inflight (key_id)",
        "CREATE INDEX inflight_replica ON inflight (replica)",
        # the sliding 60 s windows: admissions (requests = 1) and settled tokens, by the database's clock
        "CREATE TABLE limit_events (key_id TEXT NOT NULL, t {real} NOT NULL, requests INTEGER NOT NULL, tokens {big} NOT NULL)",
        "CREATE INDEX limit_events_key_t ON limit_events (key_id, t)",
    ],
]
VERSION = len(MIGRATIONS)
_MIGRATE_LOCK = 0x676C6D6B  # the advisory lock id of migrations on PostgreSQL ("glmk")


def is_postgres(target) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def shown(target) -> str:
    """The database's name for messages: a URL without its password."""
    if not is_postgres(target):
        return str(target)
    u = urlsplit(target)
    if u.password is None:
        return target
    netloc = f"{u.username}:***@{u.hostname or ''}" + (f":{u.port}" if u.port else "")
    return urlunsplit(u._replace(netloc=netloc))


def _sqlite(path) -> sqlite3.Connection:
    if str(path) != ":memory:":
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # key hashes and customers' usage: readable by the owner only
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")  # no-op for :memory:; readers never block the writer
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a process crash (not a power cut)
    return db


class Database:
    """One connection to SQLite (a path, or ":memory:") or PostgreSQL (a postgresql:// URL), migrated
    to VERSION on open."""

    def __init__(self, target):
        self.target = target if is_postgres(target) else str(Path(target).expanduser()) if str(target) != ":memory:" else ":memory:"
        self.postgres = is_postgres(target)
        self.lock = threading.RLock()
        self._depth = 0  # nesting of tx(): only the outermost one begins and commits
        self.busy_s, self.statements = 0.0, 0  # time in statements (round trips, lock waits, commits) and their number
        if self.postgres:
            try:
                import psycopg
                from psycopg.rows import dict_row
            except ImportError:
                raise ImportError(f"{shown(target)}: a PostgreSQL database needs psycopg 3; install it with "
                                  "`pip install 'glmkit[serve]'` (or `pip install 'psycopg[binary]'`)") from None

            def connect():
                try:
                    return psycopg.connect(target, autocommit=True, row_factory=dict_row)
                except psycopg.OperationalError as e:
                    raise ConnectionError(f"cannot connect to {shown(target)}: {str(e).strip()}") from None

            self._connect = connect
            self.conn = connect()
            self.errors: tuple[type[Exception], ...] = (psycopg.Error,)
            self.for_update = " FOR UPDATE"
            self.NOW = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
            self._types = {"real": "DOUBLE PRECISION", "big": "BIGINT", "serial": "BIGSERIAL PRIMARY KEY"}
        else:
            self.conn = _sqlite(self.target)
            self.errors = (sqlite3.Error,)
            self.for_update = ""  # BEGIN IMMEDIATE already holds the file's write lock
            self.NOW = "((julianday('now') - 2440587.5) * 86400.0)"
            self._types = {"real": "REAL", "big": "INTEGER", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}
        self.migrated = self.migrate()

    def __repr__(self):
        return f"Database({shown(self.target)!r})"

    @property
    def name(self) -> str:
        return shown(self.target)

    def close(self):
        with self.lock:
            self.conn.close()

    # ---- statements ------------------------------------------------------------------------------------------
    def _c(self):
        """The connection; on PostgreSQL a new one if the last was lost (a server restart, a network cut):
        the statement that met the loss failed, the next one, outside a transaction, reconnects."""
        if self.postgres and self.conn.closed and not self._depth:
            self.conn = self._connect()
        return self.conn

    def sql(self, q: str) -> str:
        # our SQL has no '?' or '%' in literals, so the placeholders translate one for one
        return q.replace("?", "%s") if self.postgres else q

    @contextlib.contextmanager
    def _timed(self):
        # the lock is held: statements of this connection run one at a time, so the sum is wall time
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.busy_s += time.perf_counter() - t0
            self.statements += 1

    def run(self, q: str, args=()) -> int:
        """Execute one statement; the number of rows it changed."""
        with self.lock, self._timed():
            return self._c().execute(self.sql(q), args).rowcount

    def one(self, q: str, args=()) -> dict | None:
        with self.lock, self._timed():
            r = self._c().execute(self.sql(q), args).fetchone()
        return dict(r) if r is not None else None

    def all(self, q: str, args=()) -> list[dict]:
        with self.lock, self._timed():
            return [dict(r) for r in self._c().execute(self.sql(q), args).fetchall()]

    def many(self, q: str, seq) -> None:
        with self.lock, self._timed():
            if self.postgres:
                self._c().cursor().executemany(self.sql(q), seq)
            else:
                self.conn.executemany(q, seq)

    def now(self) -> float:
        """The database's clock, unix seconds: every replica's windows and heartbeats use this one."""
        return float(self.one(f"SELECT {self.NOW} AS t")["t"])

    @contextlib.contextmanager
    def tx(self):
        """A transaction that takes the write lock at once on SQLite (BEGIN IMMEDIATE: no other
        connection, of any process, writes until it ends); on PostgreSQL a plain one, whose
        `SELECT ... FOR UPDATE` rows stay locked until it ends. Rolled back on an exception."""
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            with self._timed():  # BEGIN IMMEDIATE waits here for another process's write lock
                self._c().execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self
            except BaseException:
                self._depth = 0
                if not (self.postgres and self.conn.closed):  # a lost connection has nothing to roll back
                    self.conn.execute("ROLLBACK")
                raise
            self._depth = 0
            with self._timed():  # the commit's wait for the disk
                self.conn.execute("COMMIT")

    # ---- migrations ------------------------------------------------------------------------------------------
    def tables(self) -> set[str]:
        if self.postgres:
            q = "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = current_schema()"
        else:
            q = "SELECT name FROM sqlite_master WHERE type = 'table'"
        return {r["name"] for r in self.all(q)}

    def version(self) -> int:
        if "schema_version" not in self.tables():
            return 0
        return int(self.one("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version")["v"])

    def migrate(self) -> list[int]:
        """Bring the schema to VERSION, one transaction for all of it; the migrations applied. Two
        servers starting at once on an empty database: one migrates, the other waits and finds it done."""
        with self.tx():
            if self.postgres:
                self.run("SELECT pg_advisory_xact_lock(?)", (_MIGRATE_LOCK,))
            have = self.version()
            if have > VERSION:
                raise RuntimeError(f"{self.name} has schema version {have}, newer than this glmkit's {VERSION}: "
                                   "upgrade glmkit on this machine")
            if have == VERSION:
                return []
            self.run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied {real} NOT NULL)"
                     .format(**self._types))
            done = []
            for v in range(have + 1, VERSION + 1):
                for stmt in MIGRATIONS[v - 1]:
                    self.run(stmt.format(**self._types))
                self.run("INSERT INTO schema_version (version, applied) VALUES (?, ?)", (v, self.now()))
                done.append(v)
            return done

