"""Two `glmkit serve` replicas on one PostgreSQL database behind HAProxy: throughput against each replica
alone, database time per request, limits across replicas, and kill -9 of a replica, in one run.

    .venv/bin/python bench/serve_replicas.py                       # embedded model, a throwaway PostgreSQL cluster
    .venv/bin/python bench/serve_replicas.py --model DIR --db postgresql://user@host/db --concurrency 8 --requests 256

What it does (replicas, HAProxy and the cluster are started by tests/replicas.py and tests/pg.py):
1. Starts PostgreSQL (or uses --db), two replicas each pinned to its own core with one torch thread (taskset,
   OMP_NUM_THREADS=1), and HAProxy with `glmkit lb-config`'s configuration. Pinning keeps the replicas from
   competing for the same cores, so the ratio below shows what the shared database and the load balancer
   cost, not two processes sharing CPUs; HAProxy, PostgreSQL and this client still share the machine.
2. Throughput: `--requests` non-streaming completions of `--max-tokens` tokens at `--concurrency`, each client
   with its own key, sent straight to replica A while B idles, then to B while A idles ("alone"); then
   2 x requests at 2 x concurrency to both at once, straight to each ("both, direct") and through HAProxy
   with half of the keys hashed to each replica ("both behind HAProxy"). Target: both behind HAProxy >=
   0.9 x (A alone + B alone). "both, direct" splits the gap: what sharing the machine and the database
   costs, and what HAProxy adds.
3. Per request and phase: database time as the replicas measure it (their glmkit_database_seconds and
   _statements in /metrics: round trips, lock waits, commits), the part of it spent executing inside PostgreSQL
   (pg_stat_statements, which the cluster this script starts preloads; with --db the extension must be
   installed there, else n/a), and CPU
   milliseconds of each process group (replica A, replica B, PostgreSQL, HAProxy, this load generator),
   which shows where the cores went when the replicas share a small machine with the rest.
4. Limits across replicas: 40 concurrent requests of one key, alternately straight to each replica, against a
   200-token budget (used must end <= 200); RPM 5 with 12 requests (exactly 5 admitted).
5. kill -9 of replica B during a burst through HAProxy: answers by status, every 200 with exactly one complete
   ledger row, no request with two rows, rows <= requests sent (no POST replayed), key B's requests moved to A.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/pg.py and tests/replicas.py

import httpx

from glmkit.server.maas import KeyStore, Ledger
from tests.replicas import haproxy_missing, load_balancer, replica

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


async def load(targets: list[tuple[str, str]], requests: int, max_tokens: int, phase: str) -> dict:
    """`requests` completions spread over the clients (url, raw key), one request in flight per client; the
    prompts name the phase, so no phase meets another's prompts in the prompt cache."""
    lat, tokens, codes = [], 0, Counter()
    todo = iter(range(requests))

    async def client(c: httpx.AsyncClient, url: str, raw: str):
        nonlocal tokens
        for i in todo:
            t = time.perf_counter()
            r = await c.post(url + "/v1/completions", headers={"authorization": f"Bearer {raw}"},
                             json={"prompt": f"{PROMPT} {phase} {i}", "max_tokens": max_tokens, "temperature": 0})
            codes[r.status_code] += 1
            if r.status_code == 200:
                lat.append(time.perf_counter() - t)
                tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=len(targets) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, url, raw) for url, raw in targets))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"codes": codes, "tok_s": tokens / wall, "req_s": len(lat) / wall, "p50": statistics.median(lat) if lat else 0,
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0, "tokens": tokens, "wall": wall}


def keys_per_replica(db: str, lb: str, replicas, want: int) -> list[list[str]]:
    """New keys until each replica has `want` of them as HAProxy routes them (the x-glmkit-replica header)."""
    store, found = KeyStore(db), [[] for _ in replicas]
    while not all(len(f) >= want for f in found):
        raw, _ = store.create("bench")
        r = httpx.get(lb + "/v1/models", headers={"authorization": f"Bearer {raw}"}, timeout=30)
        (i,) = [i for i, rep in enumerate(replicas) if rep.answered(r)]
        found[i].append(raw)
        if sum(map(len, found)) > 50 * want:
            raise RuntimeError(f"keys do not spread over the replicas: {[len(f) for f in found]}")
    return [f[:want] for f in found]


def replica_db(replicas, token: str) -> tuple[float, float]:
    """(seconds, statements) the replicas spent in database statements so far, as each one measures it (round
    trips, lock waits and commits included): the glmkit_database_* gauges of their /metrics."""
    total = [0.0, 0.0]
    for r in replicas:
        text = httpx.get(r.url + "/metrics", headers={"authorization": f"Bearer {token}"}, timeout=30).text
        for i, name in enumerate(("glmkit_database_seconds", "glmkit_database_statements")):
            total[i] += float(re.search(rf"^{name} (\S+)$", text, re.M)[1])
    return total[0], total[1]


def db_time(db: str, reset: bool = False) -> tuple[float, int] | None:
    """(ms of statement execution, statements) in this database since the last reset; None without the extension."""
    import psycopg

    try:
        with psycopg.connect(db, autocommit=True) as conn:
            if reset:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                conn.execute("SELECT pg_stat_statements_reset()")
                return 0.0, 0
            ms, calls = conn.execute(
                "SELECT COALESCE(SUM(total_exec_time), 0), COALESCE(SUM(calls), 0) FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND query NOT ILIKE '%pg_stat_statements%'").fetchone()
            return float(ms), int(calls)
    except psycopg.Error as e:
        print(f"pg_stat_statements unavailable: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return None


class CPU:
    """CPU seconds so far of each part of the set-up: the two replicas, PostgreSQL (the cluster's postmaster and
    its backends; 0 with --db), HAProxy (this process's haproxy child) and this load generator."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, ra, rb, cluster):
        self.ra, self.rb = ra.proc.pid, rb.proc.pid
        pid_file = cluster.data / "postmaster.pid" if cluster is not None else None
        self.postmaster = int(pid_file.read_text().split()[0]) if pid_file is not None and pid_file.exists() else None

    @classmethod
    def stat(cls, pid: int) -> tuple[int, str, float]:
        """(parent pid, name, CPU seconds) of a process, from /proc/PID/stat."""
        text = Path(f"/proc/{pid}/stat").read_text()
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        return int(rest[1]), name, (int(rest[11]) + int(rest[12])) / cls.TICK

    def read(self) -> dict[str, float]:
        procs = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    procs[int(d.name)] = self.stat(int(d.name))
                except (OSError, ValueError, IndexError):
                    pass  # gone meanwhile
        me = os.getpid()
        pg = [v[2] for pid, v in procs.items() if self.postmaster in (pid, v[0])] if self.postmaster else []
        own = resource.getrusage(resource.RUSAGE_SELF)
        return {"replica A": procs.get(self.ra, (0, "", 0.0))[2], "replica B": procs.get(self.rb, (0, "", 0.0))[2],
                "postgres": sum(pg), "haproxy": sum(v[2] for v in procs.values() if v[0] == me and v[1] == "haproxy"),
                "client": own.ru_utime + own.ru_stime}


def spread(replicas, raw: str, n: int, body: dict) -> Counter:
    h = {"authorization": f"Bearer {raw}"}
    with ThreadPoolExecutor(n) as pool:
        return Counter(pool.map(lambda i: httpx.post(replicas[i % 2].url + "/v1/completions", json=body, headers=h,
                                                     timeout=300).status_code, range(n)))


def kill_check(db: str, lb: str, a, b, max_tokens: int) -> dict:
    """A burst through HAProxy from a key on each replica; B is killed once it has 2 requests in flight."""
    (on_a,), (on_b,) = keys_per_replica(db, lb, [a, b], 1)
    store = KeyStore(db)
    kid = {on_a: store.lookup(on_a).id, on_b: store.lookup(on_b).id}
    answers, stop = [], threading.Event()

    def client(raw, n):
        while not stop.is_set():
            try:
                r = httpx.post(lb + "/v1/completions", json={"prompt": PROMPT, "max_tokens": n},
                               headers={"authorization": f"Bearer {raw}"}, timeout=300)
            except httpx.HTTPError as e:
                r = e
            answers.append((kid[raw], r))

    threads = [threading.Thread(target=client, args=(raw, n)) for raw in (on_a, on_b) for n in (max_tokens * 4, 4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while sum(r.status is None for r in Ledger(db).rows(kid[on_b])) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(b.proc.pid, signal.SIGKILL)
    b.proc.wait(30)
    n_before = len(answers)
    while len(answers) < n_before + 6 and time.monotonic() < deadline + 120:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(300)
    rows = [r for k in kid.values() for r in Ledger(db).rows(k)]
    by_id = Counter(r.request_id for r in rows)
    complete = {r.request_id for r in rows if r.status == 200}
    ok = [r for _, r in answers if isinstance(r, httpx.Response) and r.status_code == 200]
    moved = [r for k, r in answers[n_before:] if k == kid[on_b] and isinstance(r, httpx.Response) and r.status_code == 200]
    return {"codes": Counter(r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for _, r in answers),
            "ok_with_row": sum(r.json()["id"].removeprefix("cmpl-") in complete for r in ok), "ok": len(ok),
            "twice": sum(n > 1 for n in by_id.values()), "rows": len(rows), "sent": len(answers),
            "moved": f"{sum(a.answered(r) for r in moved)}/{len(moved)}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--db", default=None, help="postgresql://... to use (default: a throwaway cluster, tests/pg.py)")
    p.add_argument("--concurrency", type=int, default=8, help="clients per replica")
    p.add_argument("--requests", type=int, default=256, help="requests per replica and phase")
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args(argv)
    if why := haproxy_missing():
        print(f"serve_replicas: {why}", file=sys.stderr)
        return 1
    ncpu = len(os.sched_getaffinity(0))
    cores = (0, 1) if ncpu >= 2 else (None, None)
    print(subprocess.run(["sh", "-c", "lscpu | head -20"], capture_output=True, text=True).stdout)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    cluster = None
    db = a.db
    if db is None:
        from tests.pg import Cluster

        cluster = Cluster.start({"shared_preload_libraries": "pg_stat_statements"})
        db = cluster.create_database()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            token = secrets.token_urlsafe(24)
            (Path(tmp) / "admin.token").write_text(token)
            args = ["--db", db, "--max-batch", str(max(8, a.concurrency)), "--admin-token-file", str(Path(tmp) / "admin.token")]
            args += ["--model", a.model] if a.model else []
            with replica(*args, cpu=cores[0], threads=1) as ra, replica(*args, cpu=cores[1], threads=1) as rb, \
                    load_balancer([ra, rb], Path(tmp)) as lb:
                keys = keys_per_replica(db, lb, [ra, rb], a.concurrency)
                asyncio.run(load([(ra.url, k) for k in keys[0][:2]], 4, 4, "warm"))  # warm-up: first-call costs out of the figures
                asyncio.run(load([(rb.url, k) for k in keys[1][:2]], 4, 4, "warm"))
                cpu = CPU(ra, rb, cluster)
                phases = {}
                for name, targets, n in (
                        ("A alone (direct)", [(ra.url, k) for k in keys[0]], a.requests),
                        ("B alone (direct)", [(rb.url, k) for k in keys[1]], a.requests),
                        ("both, direct (no LB)", [(r.url, k) for r, ks in ((ra, keys[0]), (rb, keys[1])) for k in ks],
                         2 * a.requests),
                        ("both behind HAProxy", [(lb, k) for ks in keys for k in ks], 2 * a.requests)):
                    before, t_db, r_db = cpu.read(), db_time(db, reset=True), replica_db([ra, rb], token)
                    m = asyncio.run(load(targets, n, a.max_tokens, name))
                    m["cpu"] = {g: v - before[g] for g, v in cpu.read().items()}
                    m["db"] = db_time(db) if t_db is not None else None
                    m["replica_db"] = [x - y for x, y in zip(replica_db([ra, rb], token), r_db)]
                    m["clients"] = len(targets)
                    phases[name] = m

                budget_raw, budget_key = KeyStore(db).create("budget", budget_tokens=200)
                budget_codes = spread([ra, rb], budget_raw, 40, {"prompt": "Hello there", "max_tokens": 40})
                used = sum(r.prompt_tokens + r.completion_tokens for r in Ledger(db).rows(budget_key.id))
                rpm_raw, _ = KeyStore(db).create("rpm", rpm=5)
                rpm_codes = spread([ra, rb], rpm_raw, 12, {"prompt": "Hi", "max_tokens": 1})
                kill = kill_check(db, lb, ra, rb, a.max_tokens)
    finally:
        if cluster is not None:
            cluster.stop()

    pin = f"cores {cores[0]} and {cores[1]}" if cores[0] is not None else "not pinned (1 core)"
    print(f"\ntwo replicas ({pin}, 1 thread each), PostgreSQL, HAProxy; {a.requests} requests x {a.max_tokens} "
          f"tokens per replica, {a.concurrency} clients per replica (one key each)\n")
    groups = list(next(iter(phases.values()))["cpu"])
    print(f"{'phase':<24}{'clients':>8}{'requests':>9}{'tok/s':>8}{'req/s':>7}{'p50 s':>7}{'p99 s':>7}{'db ms':>7}"
          f"{'stmts':>6}{'pg ms':>7}" + "".join(f"{g:>11}" for g in groups) + "  statuses")
    print(f"{'(per request: db = as the replicas time it, pg = execution inside PostgreSQL, CPU ms of each process)':>90}")
    for name, m in phases.items():
        n = sum(m["codes"].values())
        pg = f"{m['db'][0] / n:.2f}" if m["db"] else "n/a"
        print(f"{name:<24}{m['clients']:>8}{n:>9}{m['tok_s']:>8.1f}{m['req_s']:>7.2f}{m['p50']:>7.2f}{m['p99']:>7.2f}"
              f"{1000 * m['replica_db'][0] / n:>7.2f}{m['replica_db'][1] / n:>6.1f}{pg:>7}"
              + "".join(f"{1000 * m['cpu'][g] / n:>11.1f}" for g in groups) + f"  {dict(m['codes'])}")
    alone = phases["A alone (direct)"]["tok_s"] + phases["B alone (direct)"]["tok_s"]
    both, direct = phases["both behind HAProxy"], phases["both, direct (no LB)"]
    print(f"\nsum of alone {alone:.1f} tok/s; both behind HAProxy / sum of alone: {both['tok_s'] / alone:.3f}x "
          f"(target >= 0.9x); both direct / sum of alone: {direct['tok_s'] / alone:.3f}x; "
          f"HAProxy / direct: {both['tok_s'] / direct['tok_s']:.3f}x")
    n = sum(both["codes"].values())
    print(f"database time per request behind HAProxy: {1000 * both['replica_db'][0] / n:.2f} ms in "
          f"{both['replica_db'][1] / n:.1f} statements as the replicas time them (round trips, lock waits, commits)"
          + (f", {both['db'][0] / n:.2f} ms of it executing inside PostgreSQL" if both["db"] else "")
          + f"; p50 latency {both['p50'] * 1000:.0f} ms")
    print("\nlimits across replicas (one key, requests alternately straight to each replica):")
    print(f"  budget 200 tokens, 40 concurrent requests: {dict(budget_codes)}; ledger {used} tokens "
          f"({'ok' if used <= 200 else 'OVER'})")
    print(f"  rpm 5, 12 requests: {dict(rpm_codes)} ({'ok' if rpm_codes.get(200) == 5 else 'NOT 5'})")
    print(f"\nkill -9 of replica B in a burst through HAProxy: answers {dict(kill['codes'])}; "
          f"200s with a complete ledger row {kill['ok_with_row']}/{kill['ok']}; requests with two rows {kill['twice']}; "
          f"ledger rows {kill['rows']} for {kill['sent']} requests sent; key B's later 200s served by A {kill['moved']}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
