"""A hostile tenant against a live `glmkit serve`: one table of what broke, per category.

    .venv/bin/python bench/hostile_run.py            # the full run (about 3 minutes on 2 cores)
    .venv/bin/python bench/hostile_run.py --quick    # fewer requests per category: a smoke run
    .venv/bin/python bench/hostile_run.py --keep     # keep the temp dir (databases, server logs)
    .venv/bin/python bench/hostile_run.py --only auth files      # some categories

It starts its own servers as subprocesses (`glmkit serve --port P`, a free loopback port found at
run time, the embedded default model, auth on, `--keys-db` in a temp dir, an admin token from
`--admin-token-file`), makes its keys with `glmkit keys create`, waits for /health, and stops the
servers at the end. It is the run that issue 16 asks for in its closing note, made repeatable.

Columns: `tried` requests (or connections, or CLI runs); `5xx` answers (for files: tracebacks);
`hangs`, exchanges that took longer than BOUND_S = 30 s or never ended; `lost`, data lost (ledger
rows missing or left unmarked for admitted requests, tokens over a limit, requests in flight over a
concurrency limit, victim streams that did not complete); `wrong`, every other broken expectation
(a status that is not the one the contract says, a refusal that was billed, a leak, a CLI that
exits 0 where it must fail); `what`, the numbers behind the row. Details of the first failures of
each kind are printed under the table.

Categories:
- bad inputs: several hundred hostile bodies on /v1/completions, /v1/chat/completions, /v1/fill,
  /infill, /v1/classify: lone surrogates (escaped in the JSON) in every string field and label key,
  degenerate numbers in every numeric field (1e-300, 5e-324, 1e308, NaN, Infinity, 1e400, a
  5000-digit integer, true, "5", 1.5, ...), format-spec cloze patterns, n=16 with many prompts,
  invalid JSON, wrong types, 100,000-deep nesting, empty and missing fields, unknown models, 7 MB
  prompts of spaces, 9 MB bodies (413). Expected: 2xx/4xx only, each within the bound; refusals
  recorded with zero tokens; a ledger row for every answered request.
- auth: no header, malformed headers, wrong scheme, unknown / revoked / other-model keys, the admin
  token used as a tenant key, /metrics without a key, with a tenant key, with the admin token.
  Expected: 401 or 404 (or the HTTP parser's 400 for a NUL byte), and 200 only for the admin token
  on /metrics.
- isolation: 6 victim streams of key A while key B sends the degenerate sampling values above in
  a loop: every victim ends normally (finish_reason length/stop, [DONE], no error event); /v1/usage
  of B shows only B's rows, and A's ledger has a row for every victim. Then queue flooding: a key
  held to --concurrency 2 sends a request of 64 prompts (the most one request may have) and one of
  16 (a full batch and the whole waiting queue); A's one-prompt requests meanwhile must get 200, and
  a refused one must cost A nothing.
- limits: 20 concurrent requests (~40-token prompt, max_tokens 16) on a key with
  --budget-tokens 200 and on one with --tpm 100: ledger tokens at most 200 / 100; 10 parallel
  streams on a key with --concurrency 2: never more than 2 in flight (from the streams' own
  first-to-last chunk intervals), the rest 429.
- load: 64 concurrent streams of 4 keys all complete; /health latency while a 7 MB prompt is refused and
  while 16 near-limit prompts (5.8 MB of words) are tokenized.
- slow clients (a server with --header-timeout 2 --body-timeout 2): 100 connections that send
  half a request head and stop, 5 that trickle a head byte by byte, 20 half-sent bodies and 5
  trickled bodies on a key with --concurrency 1: heads closed, bodies answered 408 (or closed),
  within the timeout plus a margin; a normal request of that key succeeds meanwhile.
- kill -9: long streams, long non-streaming requests and short requests on a server that is killed
  with SIGKILL mid-flight (twice in the full run), restarted on the same database each time. From
  the `usage` table: every complete response has its complete row (same tokens); every request cut
  off has a row marked 'interrupted' that carries at least the tokens its client had seen 1.5 s
  before the kill (metering flushes every second).
- files: `glmkit info`, `info --verify` and `convert` on copies of the embedded model with a shard
  index pointing at /etc/passwd (relative and absolute) or at a canary file outside, shards that
  are symlinks out of the directory (also through a fake hub-cache `snapshots/` layout), config.json
  as a list, with "hidden_size": "big" or "dim": "big", a vocab_size its weights do not have (every
  loader refuses it, so --verify must too), n_layers 1,000,000 on the 16 MB weights, or a symlink, a
  truncated model.safetensors, and a nonexistent path (also `glmkit fill --model /nonexistent`).
  Failures: a traceback, exit 0 where it must fail, a message that shows an outside file's size or
  contents; a run still going after BOUND_S + 5 s is killed and counted as a hang.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 30.0  # an exchange slower than this is a hang
EMBEDDED = ROOT / "glmkit" / "assets" / "default"
_script = Path(sys.executable).parent / "glmkit"
GLMKIT = [str(_script)] if _script.exists() else [sys.executable, "-m", "glmkit"]
MAIN_BATCH = 16  # --max-batch of the server most categories run against (--max-waiting stays 64)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/fill", "/infill", "/v1/classify")


# ---- bookkeeping ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One category's line of the table; `notes` keeps a few examples of each kind of failure."""

    category: str
    tried: int = 0
    errors: int = 0  # 5xx (files: tracebacks)
    hangs: int = 0
    lost: int = 0
    wrong: int = 0
    what: str = ""
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note(self, kind: str, text: str):
        with self.lock:
            if sum(n.startswith(kind + ":") for n in self.notes) < 4:
                self.notes.append(f"{kind}: {text}")

    def add(self, attr: str, n: int = 1, why: str | None = None):
        with self.lock:
            setattr(self, attr, getattr(self, attr) + n)
        if why and n:
            self.note(attr, why)

    def streams(self, label: str, ss: list[Streamed]):
        """Count streams that must each run to the end: a hang, a 5xx, or an incomplete stream is lost."""
        for v in ss:
            self.add("tried")
            if v.hung:
                self.add("hangs", why=f"{label}: {v.exc} after {v.elapsed:.1f} s")
            elif v.status is not None and v.status >= 500:
                self.add("errors", why=f"{label}: {v.status} {v.text[:160]!r}")
            if not v.complete:
                self.add("lost", why=f"{label}: status {v.status}, finish {v.finish}, done {v.done}, "
                                     f"error {v.error_event}, {v.exc}")

    def check(self, label: str, r: Answer, ok=None):
        """Count one HTTP exchange: a hang, a 5xx, or a status outside `ok` (default: any 2xx-4xx)."""
        self.add("tried")
        if r.hung:
            self.add("hangs", why=f"{label}: {r.exc or 'no answer'} after {r.elapsed:.1f} s")
        elif r.status is None:
            self.add("wrong", why=f"{label}: no HTTP answer ({r.exc})")
        elif r.status >= 500:
            self.add("errors", why=f"{label}: {r.status} {r.text[:160]!r}")
        elif ok is not None and r.status not in ok:
            self.add("wrong", why=f"{label}: {r.status}, expected {sorted(ok)}: {r.text[:120]!r}")
        elif ok is None and not 200 <= r.status < 500:
            self.add("wrong", why=f"{label}: {r.status} {r.text[:120]!r}")


@dataclass
class Answer:
    status: int | None
    elapsed: float
    text: str = ""
    exc: str = ""
    headers: dict = field(default_factory=dict)

    @property
    def hung(self) -> bool:
        return self.elapsed > BOUND_S or "Timeout" in self.exc

    def json(self):
        try:
            return json.loads(self.text)
        except ValueError:
            return None


@dataclass
class Streamed:
    """A streamed exchange: status, the times of content chunks, finish reasons, [DONE], error events."""

    status: int | None = None
    id: str | None = None
    chunk_times: list = field(default_factory=list)
    finish: list = field(default_factory=list)
    done: bool = False
    error_event: str | None = None
    usage: dict | None = None
    t0: float = 0.0
    elapsed: float = 0.0
    exc: str = ""
    text: str = ""

    @property
    def hung(self) -> bool:
        return self.elapsed > BOUND_S or "Timeout" in self.exc

    @property
    def complete(self) -> bool:
        return (self.status == 200 and self.done and self.error_event is None and bool(self.finish)
                and all(f in ("length", "stop") for f in self.finish))


def auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def call(method: str, url: str, *, key: str | None = None, body=None, raw: bytes | None = None,
         headers: dict | None = None, timeout: float = BOUND_S) -> Answer:
    h = {"Content-Type": "application/json", **auth(key), **(headers or {})}
    h = {k: v for k, v in h.items() if v is not None}
    content = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    t0 = time.perf_counter()
    try:
        with httpx.Client(timeout=timeout) as c:
            r = c.request(method, url, content=content, headers=h)
        return Answer(r.status_code, time.perf_counter() - t0, r.text, headers=dict(r.headers))
    except httpx.HTTPError as e:
        return Answer(None, time.perf_counter() - t0, exc=f"{type(e).__name__}: {e}"[:200])


def raw_http(url: str, method: str, path: str, headers: dict, body: bytes | None) -> Answer:
    """One request written by hand on a socket: for header bytes an HTTP client refuses to send (NUL)."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode()
    for k, v in {"Content-Type": "application/json", **headers}.items():
        head += k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) + b"\r\n"
    body = body or b""
    head += f"Content-Length: {len(body)}\r\n\r\n".encode()
    t0, got = time.perf_counter(), b""
    try:
        with socket.create_connection((host, int(port)), timeout=BOUND_S) as s:
            s.sendall(head + body)
            while chunk := s.recv(65536):
                got += chunk
    except OSError as e:
        if not got:
            return Answer(None, time.perf_counter() - t0, exc=f"{type(e).__name__}: {e}")
    m = re.match(rb"HTTP/1\.1 (\d{3})", got)
    return Answer(int(m.group(1)) if m else None, time.perf_counter() - t0, got.partition(b"\r\n\r\n")[2].decode(errors="replace"))


def stream(url: str, body: dict, key: str | None, timeout: float = BOUND_S) -> Streamed:
    s = Streamed(t0=time.perf_counter())
    try:
        with httpx.Client(timeout=timeout) as c, c.stream("POST", url, json={**body, "stream": True},
                                                          headers=auth(key)) as r:
            s.status = r.status_code
            if r.status_code != 200:
                s.text = r.read().decode(errors="replace")
            else:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        s.done = True
                        continue
                    d = json.loads(data)
                    if "error" in d:
                        s.error_event = json.dumps(d["error"])[:200]
                        continue
                    s.id = s.id or d.get("id")
                    s.usage = d.get("usage") or s.usage
                    for ch in d.get("choices", []):
                        piece = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
                        if piece:
                            s.chunk_times.append(time.perf_counter())
                        if ch.get("finish_reason"):
                            s.finish.append(ch["finish_reason"])
    except (httpx.HTTPError, ValueError) as e:
        s.exc = f"{type(e).__name__}: {e}"[:200]
    s.elapsed = time.perf_counter() - s.t0
    return s


def parallel(fn, items, workers: int):
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(fn, items))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*GLMKIT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ---- servers --------------------------------------------------------------------------------------
class Server:
    """`glmkit serve` in a subprocess on its own keys database, with an admin token."""

    def __init__(self, workdir: Path, name: str, *flags: str):
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = self.dir / "maas.sqlite"
        self.admin = secrets.token_urlsafe(32)
        tok = self.dir / "admin-token"
        tok.write_text(self.admin + "\n")
        tok.chmod(0o600)
        self.flags, self.proc, self.port, self.starts = flags, None, None, 0
        self.logs: list[Path] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def key(self, name: str, *limits: str) -> tuple[str, str]:
        """(raw key, key id) of a new key, made with `glmkit keys create`."""
        p = cli("keys", "--db", str(self.db), "create", "--name", name, *limits)
        if p.returncode != 0:
            raise RuntimeError(f"glmkit keys create failed: {p.stderr[-1000:]}")
        return p.stdout.strip().splitlines()[-1], re.search(r"\b(k_[0-9a-f]+)\b", p.stderr).group(1)

    def start(self):
        self.port = free_port()
        self.starts += 1
        log = self.dir / f"serve-{self.starts}.log"
        self.logs.append(log)
        self.proc = subprocess.Popen(
            [*GLMKIT, "serve", "--port", str(self.port), "--keys-db", str(self.db),
             "--admin-token-file", str(self.dir / "admin-token"), *self.flags],
            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"glmkit serve exited ({self.proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"glmkit serve did not answer /health in 180 s: {log.read_text()[-2000:]}")

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tracebacks(self) -> int:
        return sum(log.read_text(errors="replace").count("Traceback") for log in self.logs if log.exists())

    def rows(self, where: str = "1", args=()) -> list[dict]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(f"SELECT * FROM usage WHERE {where}", args)]


# ---- bad inputs -----------------------------------------------------------------------------------
class Raw(str):
    """A JSON value written as is (NaN, 1e400, a 5000-digit integer, deep nesting)."""


def to_json(obj) -> bytes:
    raws: list[str] = []

    def mark(v):
        if isinstance(v, Raw):
            raws.append(str(v))
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {mark(k) if isinstance(k, Raw) else k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    s = json.dumps(mark(obj))  # ensure_ascii: a lone surrogate goes out as the escape \ud800, valid JSON
    for i, r in enumerate(raws):
        s = s.replace(f'"@@raw{i}@@"', r, 1)
    return s.encode()


def base_bodies(model: str) -> dict[str, dict]:
    return {
        "/v1/completions": {"model": model, "prompt": "The weather today is", "max_tokens": 4, "stop": ["\n\n"],
                            "user": "tenant-b"},
        "/v1/chat/completions": {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hello there"}],
                                 "max_tokens": 4, "stop": "###"},
        "/v1/fill": {"model": model, "text": "The capital of France is [MASK].", "max_tokens": 4},
        "/infill": {"model": model, "input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n",
                    "n_predict": 4, "stop": ["\n"]},
        "/v1/classify": {"model": model, "text": ["great movie", "awful plot"], "pattern": "{text} It was [MASK].",
                         "labels": {"pos": "good", "neg": "bad"}},
    }


NUMERIC = {
    "/v1/completions": ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                        "repetition_penalty", "seed", "n", "max_tokens", "logprobs", "best_of"],
    "/v1/chat/completions": ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                             "repetition_penalty", "seed", "n", "max_tokens", "max_completion_tokens", "top_logprobs"],
    "/v1/fill": ["max_tokens", "temperature", "top_p", "seed"],
    "/infill": ["n_predict", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed"],
    "/v1/classify": [],
}
HOSTILE_NUMBERS = [1e-300, 5e-324, 1e-308, 1e308, -1e308, -0.0, 0, -1, 1.5, 2**63, 2**64 + 1, 10**30, True, "5",
                   None, [], {}, Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("9" * 5000)]
# the sampling values of issue 16 (the ones that once aborted every tenant's generation), and their kin
POISON = [{"temperature": 1e-300}, {"temperature": 5e-324}, {"repetition_penalty": 1e-308},
          {"repetition_penalty": 1e308}, {"top_p": 5e-324}, {"top_p": 5e-324, "temperature": 2},
          {"temperature": 2, "top_k": 1, "min_p": 1}, {"min_p": 1.0, "top_p": 1e-300, "temperature": 1e-300},
          {"presence_penalty": 2, "frequency_penalty": 2, "repetition_penalty": 100},
          {"repetition_penalty": 0.01, "temperature": 2}, {"temperature": 1e-300, "logprobs": 20},
          {"seed": 2**53 - 1, "temperature": 2, "top_p": 1e-300}]


def string_paths(v, path=()):
    """Paths to every string leaf and every dict key of a body."""
    if isinstance(v, str):
        yield path, "value"
    elif isinstance(v, dict):
        for k, x in v.items():
            yield path + (k,), "key"
            yield from string_paths(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from string_paths(x, path + (i,))


def replaced(body, path, new, kind="value"):
    body = json.loads(json.dumps(body))
    obj = body
    for p in path[:-1]:
        obj = obj[p]
    if kind == "key":
        obj[new] = obj.pop(path[-1])
    else:
        obj[path[-1]] = new
    return body


def hostile_bodies(model: str) -> list[tuple[str, str, bytes, dict, set | None]]:
    """(label, route, body bytes, extra headers, the statuses allowed or None for any 2xx-4xx)."""
    out = []
    bases = base_bodies(model)

    def add(label, route, body, ok=None, headers=None):
        out.append((label, route, body if isinstance(body, bytes) else to_json(body), headers or {}, ok))

    for route, base in bases.items():
        add("valid", route, base, {200})
        # lone surrogates in every string and every key: valid JSON, not text
        for path, kind in string_paths(base):
            for s in ("\ud800", "x\udfffy", "\udc00" + "a" * 10):
                if kind == "key" and not (len(path) > 1 and path[-2] == "labels"):
                    continue  # a surrogate field name is just an unknown field
                add(f"surrogate in {kind} {'.'.join(map(str, path))}", route, replaced(base, path, s, kind), {400})
        # degenerate numbers in every numeric field
        for fname in NUMERIC[route]:
            for v in HOSTILE_NUMBERS:
                add(f"{fname}={str(v)[:20]}", route, {**base, fname: v})
        for extra in ({"foo": 1}, {"model": "gpt-4"}, {"model": ""}, {"model": "x" * 100_000}, {"model": 5},
                      {"model": model + "\u0000"}, {"model": "../../etc/passwd"}):
            add(f"{list(extra)[0]}={str(list(extra.values())[0])[:20]}", route, {**base, **extra})
        for missing in base:
            add(f"missing {missing}", route, {k: v for k, v in base.items() if k != missing})
        add("empty object", route, {})
        add("7 MB of spaces", route, seven_mb(route, base))
        add("9 MB body", route, {**base, "user": " " * (9 << 20)} if route != "/v1/classify"
            else {**base, "text": " " * (9 << 20)}, {413})
        add("GET on a POST route", route, b"", {404, 405})
    c, chat = bases["/v1/completions"], bases["/v1/chat/completions"]
    cls, fill = bases["/v1/classify"], bases["/v1/fill"]
    # cloze patterns: only plain {text} placeholders
    for pat in ("{text}{text:a>10000000}[MASK]", "{text!r}[MASK]", "{0}[MASK]", "{}[MASK]", "{text.__class__}[MASK]",
                "{text[0]}[MASK]", "{text:{text}}[MASK]", "{TEXT}[MASK]", "{text }[MASK]", "{text}{", "}{text}[MASK]",
                "%s[MASK]", "{text}" + "{text:>99999999}" * 8 + "[MASK]"):
        add(f"pattern {pat[:30]!r}", "/v1/classify", {**cls, "pattern": pat}, {400})
    for pat in ("{{text}}[MASK]", "{text}", "[MASK]", "{text}[MASK][MASK]", "{text}" + "[MASK]" * 500,
                "{text}" * 2000 + "[MASK]", "{text}[sMASK]", "{text}[gMASK]", "{text}" + "x" * 400_000 + "[MASK]"):
        add(f"pattern {pat[:30]!r}", "/v1/classify", {**cls, "pattern": pat})
    for text in ("{text:a>10000000}", "{0}{text!r}", "", [], [""], ["a"] * 65, ["a"] * 64, ["word " * 70_000] * 16):
        add(f"classify text {str(text)[:30]!r}", "/v1/classify", {**cls, "text": text})
    for labels in ({}, {"a": "x"}, {f"l{i}": f"v{i}" for i in range(33)}, {"a": "", "b": "y"},
                   {"a": "x" * 100_000, "b": "y"}, {"a": "[MASK]", "b": "y"}, {"a": 1, "b": 2}, ["a", "b"],
                   {f"l{i}": f"v{i} " * 20 for i in range(32)}):
        add(f"labels {str(labels)[:30]}", "/v1/classify", {**cls, "labels": labels})
    for score in ("max", 1, None):
        add(f"score {score}", "/v1/classify", {**cls, "score": score})
    # many choices, huge generations, many blanks
    add("n=16 x 16 prompts", "/v1/completions", {**c, "prompt": [f"prompt {i}" for i in range(16)], "n": 16, "max_tokens": 16})
    add("n=16 x 4 prompts", "/v1/completions", {**c, "prompt": [f"prompt {i}" for i in range(4)], "n": 16, "max_tokens": 8})
    add("n=16 x 64 prompts, stream", "/v1/completions", {**c, "prompt": [f"p{i}" for i in range(64)], "n": 16, "stream": True})
    add("64 prompts", "/v1/completions", {**c, "prompt": [f"prompt {i}" for i in range(64)], "max_tokens": 4})
    add("n=16 max_tokens 1000 greedy", "/v1/completions", {**c, "n": 16, "max_tokens": 1000, "temperature": 0})
    add("chat n=16, no max_tokens", "/v1/chat/completions", {k: v for k, v in {**chat, "n": 16}.items() if k != "max_tokens"})
    add("max_tokens 2**31", "/v1/completions", {**c, "max_tokens": 2**31})
    add("fill with 300 blanks", "/v1/fill", {**fill, "text": "[MASK] " * 300, "max_tokens": 2})
    add("fill with 60 blanks", "/v1/fill", {**fill, "text": "a [MASK] " * 60, "max_tokens": 4})
    # wrong types and shapes
    for prompt in (5, True, None, {"a": 1}, [1, "a"], [[1, 2], [3]], [-1], [16384], [2**63], [1.5], [True], [], "",
                   Raw("[" * 100_000 + "]" * 100_000), [0] * 2000):
        add(f"prompt {str(prompt)[:30]}", "/v1/completions", {**c, "prompt": prompt})
    for messages in ("hi", [], [{"role": "user"}], [{"role": "hacker", "content": "x"}], [{"content": "x"}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/"}}]}],
                     [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
                     [{"role": "user", "content": None}], [{"role": "user", "content": 5}],
                     [{"role": "tool", "content": "x"}] * 200, [{"role": "user", "content": "x" * 391_000}],
                     Raw("[" + '{"role":"user","content":' * 1 + "[" * 100_000 + "]" * 100_000 + "}]")):
        add(f"messages {str(messages)[:30]}", "/v1/chat/completions", {**chat, "messages": messages})
    for extra in ({"stop": 5}, {"stop": ["a"] * 17}, {"stop": [""]}, {"stop": "x" * 100_000}, {"stream": "yes"},
                  {"stream": 1}, {"echo": 1}, {"logprobs": True}, {"logit_bias": {"1": 100}}, {"suffix": "\ud800"},
                  {"suffix": " " * 7_000_000}, {"stream_options": {"include_usage": "yes"}},
                  {"echo": True, "logprobs": 20, "max_tokens": 64}):
        add(f"completions {str(extra)[:30]}", "/v1/completions", {**c, **extra})
    for extra in ({"tools": [{}]}, {"response_format": {"type": "json_object"}}, {"tool_choice": {"a": Raw("[" * 50_000 + "]" * 50_000)}},
                  {"top_logprobs": 20, "logprobs": True}, {"max_tokens": None, "max_completion_tokens": 10**12}):
        add(f"chat {str(extra)[:30]}", "/v1/chat/completions", {**chat, **extra})
    add("infill stream true", "/infill", {**bases["/infill"], "stream": True})
    add("infill prefix+suffix 7 MB", "/infill", {**bases["/infill"], "input_prefix": "a " * 1_750_000, "input_suffix": "b " * 1_750_000})
    # not JSON, or not the JSON expected
    for raw in (b"", b"{", b'{"prompt":', b"null", b"[]", b"123", b'"str"', b"{'prompt': 'x'}",
                b'{"prompt": "x"} trailing', b"\xef\xbb\xbf" + to_json(c), b"\xff\xfe\xfd", "{\"prompt\": \"x\"}".encode("utf-16"),
                b'{"prompt": "x", "prompt": 5}', b'{"prompt": "\\ud800"}', b'{"prompt": "\\u0000\\u0000"}',
                b"{" + b'"a":{' * 100_000 + b"}" * 100_001, b'{"prompt": "' + b"\\" * 10 + b'"}', b'{"prompt": "x\x00"}'):
        for route in ROUTES:
            add(f"raw {raw[:24]!r}", route, raw)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None, "application/json; charset=utf-16"):
        add(f"content-type {ctype}", "/v1/completions", to_json(c), headers={"Content-Type": ctype})
    add("content-encoding gzip, plain body", "/v1/completions", to_json(c), headers={"Content-Encoding": "gzip"})
    return out


def seven_mb(route: str, base: dict) -> dict:
    spaces = " " * 7_000_000
    return {"/v1/completions": {**base, "prompt": spaces},
            "/v1/chat/completions": {**base, "messages": [{"role": "user", "content": spaces}]},
            "/v1/fill": {**base, "text": spaces + "[MASK]"},
            "/infill": {**base, "input_prefix": spaces},
            "/v1/classify": {**base, "text": spaces}}[route]


def bad_inputs(srv: Server, key: str, key_id: str, model: str, quick: bool) -> Row:
    row = Row("bad inputs")
    cases = hostile_bodies(model)
    if quick:
        cases = cases[::6]
    slowest = [0.0, ""]
    statuses: dict[int, int] = {}

    def one(case):
        label, route, body, headers, ok = case
        method = "GET" if label == "GET on a POST route" else "POST"
        r = call(method, srv.url + route, key=key, raw=body if method == "POST" else None, headers=headers)
        row.check(f"{route} {label}", r, ok)
        with row.lock:
            statuses[r.status] = statuses.get(r.status, 0) + 1
            if r.elapsed > slowest[0]:
                slowest[:] = [r.elapsed, f"{route} {label}"]
        return method, r

    results = parallel(one, cases, 6)
    answered = sum(1 for m, r in results if m == "POST" and r.status is not None)
    time.sleep(1.0)  # a refusal's row may be completed just after its answer went out
    rows = srv.rows("key_id = ?", (key_id,))
    billed = [r for r in rows if (r["status"] or 0) >= 400 and (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0) > 0]
    row.add("wrong", len(billed), f"{len(billed)} refusals billed, e.g. {billed[0]['endpoint']} {billed[0]['status']} "
            f"{billed[0]['prompt_tokens']}+{billed[0]['completion_tokens']} tokens" if billed else None)
    missing = max(0, answered - len(rows))
    row.add("lost", missing, f"{answered} POSTs answered, {len(rows)} ledger rows" if missing else None)
    row.what = (f"{len(cases)} bodies on 5 routes; statuses {dict(sorted((k or 0, v) for k, v in statuses.items()))}; "
                f"slowest {slowest[0]:.1f} s ({slowest[1][:40]}); {len(rows)} ledger rows, {len(billed)} refusals billed")
    return row


# ---- auth -----------------------------------------------------------------------------------------
def auth_attacks(srv: Server, model: str, good: str, revoked: str, other_model: str) -> Row:
    row = Row("auth")
    bodies = base_bodies(model)
    bad_headers = {
        "no header": {},
        "empty": {"Authorization": ""},
        "Bearer only": {"Authorization": "Bearer"},
        "Bearer + space": {"Authorization": b"Bearer "},  # bytes: sent by hand (an HTTP client refuses it)
        "Basic": {"Authorization": "Basic " + "dXNlcjpwYXNz"},
        "Token scheme, good key": {"Authorization": "Token " + good},
        "key without scheme": {"Authorization": good},
        "good key + suffix": {"Authorization": f"Bearer {good}x"},
        "good key truncated": {"Authorization": f"Bearer {good[:-1]}"},
        "good key upper-case": {"Authorization": f"Bearer {good.upper()}"},
        "two keys": {"Authorization": f"Bearer {good}, Bearer {good}"},
        "unknown key": {"Authorization": "Bearer glmk-" + secrets.token_urlsafe(32)},
        "prefix only": {"Authorization": f"Bearer {good[:12]}"},
        "revoked key": {"Authorization": f"Bearer {revoked}"},
        "admin token as a key": {"Authorization": f"Bearer {srv.admin}"},
        "10 KB key": {"Authorization": "Bearer " + "a" * 10_000},
        "NUL in key": {"Authorization": b"Bearer glmk-\x00abc"},
        "latin-1 bytes": {"Authorization": b"Bearer glmk-\xe9\xff"},
        "sql in key": {"Authorization": "Bearer ' OR 1=1 --"},
        "x-api-key header": {"x-api-key": good},
    }
    cases = []
    for label, h in bad_headers.items():
        ok = {400, 401} if label == "NUL in key" else {401}  # NUL is not HTTP: the parser's 400 is right too
        for route in ROUTES:
            cases.append((f"{label} {route}", "POST", route, bodies[route], h, ok))
        for route in ("/v1/models", "/v1/usage", f"/v1/models/{model}"):
            cases.append((f"{label} GET {route}", "GET", route, None, h, ok))
    for route in ROUTES:
        cases.append((f"other-model key {route}", "POST", route, bodies[route], auth(other_model), {404}))
        cases.append((f"other-model key, no model {route}", "POST", route,
                      {k: v for k, v in bodies[route].items() if k != "model"}, auth(other_model), {404}))
    cases.append(("other-model key GET /v1/models/name", "GET", f"/v1/models/{model}", None, auth(other_model), {404}))
    for label, h, ok in (("no header", {}, {401}), ("tenant key", auth(good), {401, 403}),
                         ("admin token with 'x'", {"Authorization": f"Bearer {srv.admin}x"}, {401}),
                         ("admin token, Basic", {"Authorization": f"Basic {srv.admin}"}, {401}),
                         ("admin token", auth(srv.admin), {200})):
        cases.append((f"/metrics {label}", "GET", "/metrics", None, h, ok))

    def one(case):
        label, method, route, body, h, ok = case
        raw = to_json(body) if body is not None else None
        if any(isinstance(v, bytes) for v in h.values()):
            r = raw_http(srv.url, method, route, h, raw)
        else:
            r = call(method, srv.url + route, raw=raw, headers=h)
        row.check(label, r, ok)
        return r

    results = parallel(one, cases, 6)
    n200 = sum(r.status == 200 for r in results)
    row.what = (f"{len(cases)} requests, {len(bad_headers)} kinds of bad credentials x 8 routes, other-model key, "
                f"/metrics; {n200} answered 200 (expected 1: /metrics with the admin token)")
    return row


# ---- isolation ------------------------------------------------------------------------------------
def isolation(srv: Server, model: str, a: tuple[str, str], b: tuple[str, str], flood: tuple[str, str], quick: bool) -> Row:
    row = Row("isolation")
    bases = base_bodies(model)
    rounds = 1 if quick else 3
    victim_body = {"model": model, "messages": [{"role": "user", "content": "Tell me about the sea."}],
                   "max_tokens": 64, "temperature": 0.8, "seed": 7}
    stop = threading.Event()
    poison_statuses: dict[int, int] = {}
    failures0 = httpx.get(srv.url + "/health", timeout=10).json().get("engine_failures")

    def poison(worker: int):
        i = worker
        while not stop.is_set():
            values = POISON[i % len(POISON)]
            route = ("/v1/completions", "/v1/chat/completions", "/infill", "/v1/fill")[i % 4]
            body = {**bases[route], **({"max_tokens": 48} if route != "/infill" else {"n_predict": 48})}
            if route == "/infill":
                values = {("repeat_penalty" if k == "repetition_penalty" else k): v for k, v in values.items()
                          if k not in ("presence_penalty", "frequency_penalty", "logprobs")}
            elif route == "/v1/fill":
                values = {k: v for k, v in values.items() if k in ("temperature", "top_p", "seed")}
            elif route == "/v1/chat/completions" and "logprobs" in values:
                values = {**{k: v for k, v in values.items() if k != "logprobs"}, "logprobs": True, "top_logprobs": 20}
            r = call("POST", srv.url + route, key=b[0], body={**body, **values})
            row.check(f"poison {route} {values}", r)
            with row.lock:
                poison_statuses[r.status] = poison_statuses.get(r.status, 0) + 1
            i += 3

    threads = [threading.Thread(target=poison, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # poison rows are in the batch before the victims arrive
    victims: list[Streamed] = []
    for _ in range(rounds):
        victims += parallel(lambda _: stream(srv.url + "/v1/chat/completions", victim_body, a[0]), range(6), 6)
    stop.set()
    for t in threads:
        t.join()
    row.streams("victim stream", victims)
    failures1 = httpx.get(srv.url + "/health", timeout=10).json().get("engine_failures")
    # B's usage shows B only; A's ledger has a row per victim
    r = call("GET", srv.url + "/v1/usage", key=b[0])
    row.check("B GET /v1/usage", r, {200})
    ids = {d.get("key_id") for d in (r.json() or {}).get("data", [])}
    if ids != {b[1]}:
        row.add("wrong", why=f"/v1/usage of key B shows key ids {sorted(map(str, ids))}, expected only {b[1]}")
    a_rows = srv.rows("key_id = ?", (a[1],))
    if len(a_rows) < len(victims):
        row.add("lost", len(victims) - len(a_rows), f"{len(victims)} victim streams, {len(a_rows)} ledger rows of key A")
    if failures1 != failures0:
        row.add("wrong", why=f"/health engine_failures went from {failures0} to {failures1}")
    done = sum(v.complete for v in victims)

    # queue flooding: a key held to --concurrency 2 sends one request of 64 prompts (the most one request may
    # have: --max-waiting) and one of MAIN_BATCH: a full batch and the whole waiting queue, with two requests.
    # Key A's one-prompt requests meanwhile must still be served
    big = {"model": model, "prompt": [f"Story number {j}:" for j in range(64)], "max_tokens": 100 if quick else 200,
           "temperature": 0}
    flood_answers: list[Answer] = []
    flooders = [threading.Thread(target=lambda n=n: flood_answers.append(
        call("POST", srv.url + "/v1/completions", key=flood[0], body={**big, "prompt": big["prompt"][:n]}, timeout=120)))
        for n in (64, MAIN_BATCH)]
    for t in flooders:
        t.start()
        time.sleep(0.3)
    small = {"model": model, "prompt": "Hello", "max_tokens": 4}
    during = []
    while any(t.is_alive() for t in flooders) and len(during) < 20:
        r = call("POST", srv.url + "/v1/completions", key=a[0], body=small)
        row.check("key A's one-prompt request while another key floods the queue", r, {200})
        during.append(r.status)
        time.sleep(0.2)
    for t in flooders:
        t.join()
    time.sleep(1.0)  # a refusal's row may be completed just after its answer went out
    billed = [r for r in srv.rows("key_id = ? AND status >= 500", (a[1],)) if (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)]
    row.add("wrong", len(billed), f"key A billed for {len(billed)} of its {during.count(503)} 503s during the flood "
            f"({sum(r['prompt_tokens'] for r in billed)} prompt tokens)" if billed else None)
    row.what = (f"{done}/{len(victims)} victim streams complete beside {sum(poison_statuses.values())} poison requests "
                f"{dict(sorted((k or 0, n) for k, n in poison_statuses.items()))}; B's /v1/usage keys {len(ids)}; "
                f"engine failures {failures0}->{failures1}; while a --concurrency 2 key held 64+{MAIN_BATCH} prompts "
                f"({sorted(r.status or 0 for r in flood_answers)}), key A got {during.count(200)}/{len(during)} x 200, "
                f"{during.count(503)} x 503")
    return row


# ---- limits ---------------------------------------------------------------------------------------
PROMPT_40 = "The quick brown fox jumps over the lazy dog near the river bank while the children watch from the bridge."


def ledger_tokens(srv: Server, key_id: str) -> int:
    return sum((r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0) for r in srv.rows("key_id = ?", (key_id,)))


def limits(srv: Server, model: str, budget: tuple[str, str], tpm: tuple[str, str], conc: tuple[str, str], quick: bool) -> Row:
    row = Row("limits")
    body = {"model": model, "prompt": PROMPT_40, "max_tokens": 16, "temperature": 0}
    what = []
    prompt_tokens = None
    for (key, key_id), limit, name in ((budget, 200, "budget 200"), (tpm, 100, "tpm 100")):
        rs = parallel(lambda _: call("POST", srv.url + "/v1/completions", key=key, body=body), range(20), 20)
        for r in rs:
            row.check(f"{name}: 20 concurrent", r, {200, 429})
        ok = [r for r in rs if r.status == 200]
        prompt_tokens = prompt_tokens or next((r.json()["usage"]["prompt_tokens"] for r in ok), None)
        answered_tokens = sum(r.json()["usage"]["total_tokens"] for r in ok)
        used = ledger_tokens(srv, key_id)
        over = max(0, used - limit, answered_tokens - limit)
        row.add("lost", over, f"{name}: ledger {used} tokens, responses {answered_tokens}, limit {limit}" if over else None)
        if used != answered_tokens:
            row.add("wrong", why=f"{name}: ledger {used} tokens, the 200 responses' usage says {answered_tokens}")
        what.append(f"{name}: {len(ok)} x 200, {sum(r.status == 429 for r in rs)} x 429, {used} tokens")
    # after the budget is spent: a 429 that says waiting will not help
    r = call("POST", srv.url + "/v1/completions", key=budget[0], body={**body, "max_tokens": 200})
    row.check("spent budget", r, {429})
    if r.status == 429 and r.headers.get("x-should-retry") != "false":
        row.add("wrong", why="spent budget: 429 without x-should-retry: false")
    # concurrency 2: 10 parallel streams long enough to overlap
    long = {"model": model, "prompt": PROMPT_40, "max_tokens": 120 if quick else 300, "temperature": 0}
    ss = parallel(lambda _: stream(srv.url + "/v1/completions", long, conc[0]), range(10), 10)
    spans = []
    for s in ss:
        row.add("tried")
        if s.hung:
            row.add("hangs", why=f"concurrency 2: {s.exc} after {s.elapsed:.1f} s")
        elif s.status is not None and s.status >= 500:
            row.add("errors", why=f"concurrency 2: {s.status} {s.text[:120]!r}")
        elif s.status not in (200, 429):
            row.add("wrong", why=f"concurrency 2: {s.status} {s.text[:120]!r}")
        if s.status == 200 and len(s.chunk_times) >= 2:
            spans.append((s.chunk_times[0], s.chunk_times[-1]))
    # the most streams producing tokens at one moment (each stream's first-to-last chunk lies inside its slot)
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans], key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    row.add("lost", max(0, peak - 2), f"concurrency 2: {peak} streams in flight at once" if peak > 2 else None)
    what.append(f"concurrency 2: {sum(s.status == 200 for s in ss)} x 200, {sum(s.status == 429 for s in ss)} x 429, "
                f"peak {peak} in flight")
    row.what = f"prompt {prompt_tokens} tokens + 16; " + "; ".join(what)
    return row


# ---- load -----------------------------------------------------------------------------------------
def load(srv: Server, model: str, key: str, quick: bool) -> Row:
    row = Row("load")
    n = 16 if quick else 64
    body = {"model": model, "messages": [{"role": "user", "content": "Write a short poem."}], "max_tokens": 96,
            "temperature": 0.7}
    # spread over 4 keys: one key may queue only its share of the waiting queue (--max-waiting-per-key,
    # a quarter by default) besides the rows running; past that it gets 429s, by design
    tenants = [key] + [srv.key(f"load-{i}")[0] for i in range(1, 4)]
    t0 = time.perf_counter()
    ss = parallel(lambda i: stream(srv.url + "/v1/chat/completions", {**body, "seed": i}, tenants[i % 4]), range(n), n)
    wall = time.perf_counter() - t0
    row.streams("stream", ss)
    complete = sum(s.complete for s in ss)

    # /health while a huge request is being handled
    words = " ".join(random.Random(0).choice(["alpha", "beta", "gamma", "delta", "river", "stone", "light", "42"])
                     for _ in range(60_000))  # about 330,000 characters: under the per-text limit, so it is tokenized
    heavy = {"7 MB prompt of spaces": {"model": model, "prompt": " " * 7_000_000, "max_tokens": 4},
             f"16 near-limit prompts ({16 * len(words) / 1e6:.1f} MB)": {"model": model, "prompt": [words] * 16, "max_tokens": 4}}
    health_notes = []
    for label, big in heavy.items():
        res: dict = {}
        th = threading.Thread(target=lambda: res.update(r=call("POST", srv.url + "/v1/completions", key=key, body=big)))
        th.start()
        lat = []
        while th.is_alive():
            h = call("GET", srv.url + "/health", timeout=BOUND_S)
            row.check(f"/health during {label}", h, {200})
            lat.append(h.elapsed)
            time.sleep(0.05)
        th.join()
        row.check(label, res["r"])
        health_notes.append(f"{label}: {res['r'].status} in {res['r'].elapsed:.1f} s, /health max "
                            f"{max(lat) * 1000 if lat else float('nan'):.0f} ms over {len(lat)} polls")
        if lat and max(lat) > 2.0:
            row.add("wrong", why=f"/health took {max(lat):.1f} s during {label}")
    row.what = f"{complete}/{n} streams (4 keys) complete in {wall:.1f} s; " + "; ".join(health_notes)
    return row


# ---- slow clients ---------------------------------------------------------------------------------
def hold(port: int, first: bytes, trickle: bytes = b"", every: float = 0.25, bound: float = BOUND_S) -> tuple[float | None, bytes]:
    """Open a connection, send `first`, then `trickle` a byte at a time; (seconds until the server closed
    it or None if it never did within `bound`, what it answered)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0 = time.perf_counter()
    got = b""
    try:
        s.sendall(first)
        rest = list(trickle)
        while time.perf_counter() - t0 < bound:
            s.settimeout(every if rest else 0.5)
            try:
                data = s.recv(65536)
                if not data:
                    return time.perf_counter() - t0, got
                got += data
            except TimeoutError:
                if rest:
                    try:
                        s.sendall(bytes([rest.pop(0)]))
                    except OSError:
                        return time.perf_counter() - t0, got
            except OSError:
                return time.perf_counter() - t0, got
        return None, got
    finally:
        s.close()


def slow_clients(workdir: Path, model: str, quick: bool) -> tuple[Row, Server]:
    row = Row("slow clients")
    srv = Server(workdir, "slow", "--header-timeout", "2", "--body-timeout", "2")
    key, _ = srv.key("slow-d", "--concurrency", "1")
    srv.start()
    port = srv.url.rsplit(":", 1)[1]
    port = int(port)
    half_head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthori"
    body = to_json({"model": model, "prompt": "Hello", "max_tokens": 4})
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    n_heads, n_bodies = (20, 5) if quick else (100, 20)
    jobs = ([("half head", half_head, b"")] * n_heads + [("trickled head", b"P", b"OST / HTTP/1.1\r\nX: " + b"a" * 200)] * 5
            + [("half body", head + body[: len(body) // 2], b"")] * n_bodies
            + [("trickled body", head, body)] * 5)
    results: list = [None] * len(jobs)

    def run(i):
        results[i] = hold(port, jobs[i][1], jobs[i][2])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    time.sleep(0.5)  # every stalled connection is open, every stalled body has its head in
    normal = call("POST", srv.url + "/v1/completions", key=key, raw=body, timeout=BOUND_S)
    health = call("GET", srv.url + "/health")
    for t in threads:
        t.join()
    row.check("a normal request of the --concurrency 1 key beside the stalled bodies", normal, {200})
    row.check("/health beside the stalled connections", health, {200})
    closes: dict[str, list] = {}
    for (label, _, _), (closed_after, got) in zip(jobs, results):
        row.add("tried")
        status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else None
        closes.setdefault(label, []).append(closed_after)
        if closed_after is None:
            row.add("hangs", why=f"{label}: still open after {BOUND_S:.0f} s (answer {got[:60]!r})")
            continue
        if status is not None and status >= 500:
            row.add("errors", why=f"{label}: {got[:120]!r}")
        if "head" in label and got:
            row.add("wrong", why=f"{label}: answered {got[:60]!r} (expected a silent close)")
        if "body" in label and status not in (408, None):
            row.add("wrong", why=f"{label}: answered {got[:80]!r} (expected 408 or a close)")
        if closed_after > 2 + 5:
            row.add("wrong", why=f"{label}: closed after {closed_after:.1f} s (timeout 2 s)")
    srv.stop()

    def span(v):
        v = [x for x in v if x is not None]
        return f"{min(v):.1f}-{max(v):.1f} s" if v else "never"

    row.what = (f"{n_heads}+5 stalled heads closed in {span(closes['half head'] + closes['trickled head'])}, "
                f"{n_bodies}+5 stalled bodies ended in {span(closes['half body'] + closes['trickled body'])}; "
                f"normal request of the 1-slot key: {normal.status} in {normal.elapsed:.1f} s")
    return row, srv


# ---- kill -9 --------------------------------------------------------------------------------------
@dataclass
class Sent:
    kind: str  # long-stream, long-plain, short-plain, short-stream
    result: object = None
    id: str | None = None
    complete: bool = False
    usage: dict | None = None


def kill9_round(srv: Server, model: str, key: str, quick: bool) -> tuple[list[Sent], float]:
    """Start long and short requests, SIGKILL the server mid-flight; (what was sent, the kill's time)."""
    sent: list[Sent] = []
    lock = threading.Lock()
    stop = threading.Event()
    chat = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0}
    plain = {"model": model, "prompt": "The history of the city", "temperature": 0}

    def track(kind, fn):
        s = Sent(kind)
        with lock:
            sent.append(s)
        s.result = fn()
        r = s.result
        if isinstance(r, Streamed):
            s.id = r.id[r.id.index("-") + 1:] if r.id else None
            s.complete = r.complete
        elif r.status == 200:
            d = r.json()
            s.id, s.usage, s.complete = d["id"][d["id"].index("-") + 1:], d["usage"], True
        return s

    def long_stream():
        track("long-stream", lambda: stream(srv.url + "/v1/chat/completions", {**chat, "max_tokens": 900}, key))

    def long_plain():
        track("long-plain", lambda: call("POST", srv.url + "/v1/completions", key=key, body={**plain, "max_tokens": 900}))

    def shorts(w):
        i = 0
        while not stop.is_set():
            if (i + w) % 2:
                track("short-plain", lambda: call("POST", srv.url + "/v1/completions", key=key, body={**plain, "max_tokens": 8}))
            else:
                track("short-stream", lambda: stream(srv.url + "/v1/chat/completions", {**chat, "max_tokens": 8}, key))
            i += 1

    n_long = 6 if quick else 10
    threads = ([threading.Thread(target=long_stream) for _ in range(n_long)]
               + [threading.Thread(target=long_plain) for _ in range(4)]
               + [threading.Thread(target=shorts, args=(w,)) for w in range(2)])
    for t in threads:
        t.start()
    time.sleep(2.5)  # the long ones are generating and the flusher has written their rows more than once
    stop.set()
    time.sleep(0.5)  # no request is on its way in at the kill: every request sent was admitted
    t_kill = time.perf_counter()
    srv.kill9()
    for t in threads:
        t.join()
    return sent, t_kill


def kill9(workdir: Path, model: str, quick: bool) -> tuple[Row, Server]:
    row = Row("kill -9")
    srv = Server(workdir, "kill9", "--max-batch", "16")
    rounds = 1 if quick else 2
    keys = [srv.key(f"kill-{i}") for i in range(rounds)]
    srv.start()
    per_round = []
    for i in range(rounds):
        per_round.append(kill9_round(srv, model, keys[i][0], quick))
        srv.start()  # the next server on the database marks the rows the dead one left open
    marked = sum("were cut off" in log.read_text() for log in srv.logs)
    srv.stop()
    complete_n = cut_n = interrupted_n = behind = 0
    seen_tokens = ledger_tokens_cut = 0
    for (sent, t_kill), (_, key_id) in zip(per_round, keys):
        rows = srv.rows("key_id = ?", (key_id,))
        by_id = {r["request_id"]: r for r in rows}
        for s in sent:
            row.add("tried")
            r = s.result
            if isinstance(r, (Answer, Streamed)) and r.status is not None and r.status >= 500:
                row.add("errors", why=f"{s.kind}: {r.status} {r.text[:120]!r}")
            if r.hung:
                row.add("hangs", why=f"{s.kind}: {r.exc} after {r.elapsed:.1f} s")
        for s in (s for s in sent if s.complete):
            complete_n += 1
            lr = by_id.get(s.id)
            if lr is None or lr["status"] != 200 or lr["finish_reason"] in (None, "interrupted"):
                row.add("lost", why=f"{s.kind} {s.id}: complete response, ledger row {lr and {k: lr[k] for k in ('status', 'finish_reason')}}")
            elif s.usage and lr["completion_tokens"] != s.usage["completion_tokens"]:
                row.add("lost", why=f"{s.kind} {s.id}: response usage {s.usage['completion_tokens']}, row {lr['completion_tokens']}")
        cut = [s for s in sent if not s.complete]
        cut_n += len(cut)
        open_rows = [r for r in rows if r["status"] is None]
        interrupted = [r for r in open_rows if r["finish_reason"] == "interrupted"]
        interrupted_n += len(interrupted)
        unmarked = len(open_rows) - len(interrupted)
        row.add("lost", unmarked, f"{unmarked} rows left open and not marked interrupted" if unmarked else None)
        refused = [s for s in cut if getattr(s.result, "status", None) not in (None, 200)]
        missing = len(cut) - len(refused) - len(interrupted)
        row.add("lost", max(0, missing), f"{len(cut) - len(refused)} requests cut by the kill, {len(interrupted)} "
                f"interrupted rows" if missing > 0 else None)
        for s in cut:
            r = s.result
            if not isinstance(r, Streamed) or not s.id:
                continue
            lr = by_id.get(s.id)
            seen = len(r.chunk_times)
            before = sum(t <= t_kill - 1.5 for t in r.chunk_times)  # tokens the last flush must have seen
            seen_tokens += seen
            if lr is None or lr["finish_reason"] != "interrupted":
                row.add("lost", why=f"cut stream {s.id} ({seen} chunks seen): row {lr and lr['finish_reason']}")
                continue
            ledger_tokens_cut += lr["completion_tokens"] or 0
            if (lr["completion_tokens"] or 0) < before:
                behind += 1
                row.add("lost", why=f"cut stream {s.id}: {before} chunks seen 1.5 s before the kill, row has "
                                    f"{lr['completion_tokens']} completion tokens")
    row.what = (f"{rounds} kill(s); {complete_n} complete responses, {cut_n} cut, {interrupted_n} rows marked "
                f"interrupted ({marked} restarts said so); cut streams: clients saw {seen_tokens} chunks, "
                f"rows carry {ledger_tokens_cut} tokens, {behind} more than 1.5 s behind")
    return row, srv


# ---- files ----------------------------------------------------------------------------------------
def tensor_names(path: Path) -> list[str]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def checkpoint_cases(workdir: Path) -> list[tuple[str, Path, bool]]:
    """(label, checkpoint dir, whether plain `info` must fail too: config damage and missing paths)."""
    base = workdir / "files"
    base.mkdir()
    outside = base / "outside"
    outside.mkdir()
    canary = outside / "canary.bin"
    canary.write_bytes(b"CANARY-SECRET-" + b"x" * (31337 - 14))
    shutil.copy(EMBEDDED / "model.safetensors", outside / "model.safetensors")
    names = tensor_names(EMBEDDED / "model.safetensors")
    up = "../" * (len(base.resolve().parts) + 2)
    cases = []

    def copy(name: str, weights: bool = True) -> Path:
        d = base / name
        d.mkdir(parents=True)
        for f in ("config.json", "tokenizer.json"):
            shutil.copy(EMBEDDED / f, d / f)
        if weights:
            shutil.copy(EMBEDDED / "model.safetensors", d / "model.safetensors")
        return d

    def sharded(name: str, target: str) -> Path:
        d = copy(name, weights=False)
        shard = "model-00001-of-00001.safetensors"
        shutil.copy(EMBEDDED / "model.safetensors", d / shard)
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: (target if i == 0 else shard) for i, n in enumerate(names)}}))
        return d

    cases.append(("index -> ../../../etc/passwd", sharded("a-index-relative", up + "etc/passwd"), False))
    cases.append(("index -> /etc/passwd", sharded("a-index-absolute", "/etc/passwd"), False))
    cases.append(("index -> canary outside", sharded("a-index-canary", "../outside/canary.bin"), False))
    d = copy("b-symlink-model", weights=False)
    (d / "model.safetensors").symlink_to(outside / "model.safetensors")
    cases.append(("shard symlinked to a model outside", d, False))
    d = copy("b-symlink-passwd", weights=False)
    (d / "model.safetensors").symlink_to("/etc/passwd")
    cases.append(("shard symlinked to /etc/passwd", d, False))
    fake = base / "b-hub" / "snapshots" / "rev"
    fake.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(EMBEDDED / f, fake / f)
    (base / "b-hub" / "blobs").symlink_to("/etc")
    (fake / "model.safetensors").symlink_to("../../blobs/passwd")
    cases.append(("fake hub cache, blobs -> /etc", fake, False))
    d = copy("c-config-list")
    (d / "config.json").write_text(json.dumps([1, 2, 3]))
    cases.append(("config.json a JSON list", d, True))
    d = copy("d-config-string")
    cfg = json.loads((EMBEDDED / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": "big", "dim": "big"}))
    cases.append(('config.json "hidden_size": "big"', d, True))
    d = copy("d-config-dim-string")
    (d / "config.json").write_text(json.dumps({**cfg, "dim": "big"}))
    cases.append(('config.json "dim": "big"', d, True))
    d = copy("d-config-vocab")  # shapes that disagree with the weights: every loader refuses it
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    cases.append(("config.json vocab_size + 1 (shapes disagree)", d, False))
    d = copy("d-config-layers")  # a 16 MB checkpoint whose config claims a million layers
    (d / "config.json").write_text(json.dumps({**cfg, "n_layers": 1_000_000}))
    cases.append(("config.json n_layers 1,000,000", d, False))
    d = copy("g-config-symlink")
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/etc/passwd")
    cases.append(("config.json symlinked to /etc/passwd", d, True))
    d = copy("e-truncated")
    with (d / "model.safetensors").open("r+b") as f:
        f.truncate((EMBEDDED / "model.safetensors").stat().st_size // 2)
    cases.append(("truncated model.safetensors", d, False))
    cases.append(("/nonexistent", Path("/nonexistent"), True))
    return cases


def files(workdir: Path, quick: bool) -> Row:
    row = Row("files")
    cases = checkpoint_cases(workdir)
    passwd = Path("/etc/passwd").read_bytes()
    leaks = [re.compile(rf"(?<![\d.,]){len(passwd)}(?![\d.,])"), re.compile(re.escape(passwd.split(b"\n")[0].decode())),
             re.compile(r"(?<![\d.,])31337(?![\d.,])"), re.compile("CANARY-SECRET")]
    (workdir / "files-out").mkdir()
    baseline = cli("info", str(EMBEDDED)).stdout  # a pattern the clean model's own output matches proves nothing
    leaks = [p for p in leaks if not p.search(baseline)]
    runs = []
    for label, d, info_fails in cases:
        out = workdir / "files-out" / re.sub(r"\W+", "-", label)
        runs.append((label, ["info", str(d)], info_fails))
        runs.append((label, ["info", "--verify", str(d)], True))
        runs.append((label, ["convert", str(d), str(out)], True))
    runs.append(("/nonexistent", ["fill", "--model", "/nonexistent", "a [MASK] b"], True))

    def one(run):
        label, args, must_fail = run
        t0 = time.perf_counter()
        try:
            p = cli(*args, timeout=BOUND_S + 5)  # past the bound it is a hang: no need to wait longer
        except subprocess.TimeoutExpired:
            row.add("tried")
            row.add("hangs", why=f"{label}: glmkit {' '.join(a for a in args[:2] if not a.startswith('/'))} "
                                 f"still running after {BOUND_S + 5:.0f} s (killed)")
            return None
        elapsed = time.perf_counter() - t0
        row.add("tried")
        text = p.stdout + p.stderr
        cmd = f"glmkit {' '.join(a for a in args[:2] if not a.startswith('/'))}"
        if "Traceback" in p.stderr:
            row.add("errors", why=f"{label}: {cmd}: traceback ...{p.stderr.strip()[-200:]!r}")
        if must_fail and p.returncode == 0:
            row.add("wrong", why=f"{label}: {cmd} exited 0: {text.strip()[-160:]!r}")
        for pat in leaks:
            if pat.search(text):
                row.add("wrong", why=f"{label}: {cmd} shows an outside file's size or contents ({pat.pattern[:30]}): "
                                     f"{text.strip()[-200:]!r}")
                break
        if label == "/nonexistent" and not re.search(r"not exist|no such|not found", text, re.I):
            row.add("wrong", why=f"{label}: {cmd} does not say the path does not exist: {text.strip()[-160:]!r}")
        if elapsed > BOUND_S:
            row.add("hangs", why=f"{label}: {cmd} took {elapsed:.0f} s")
        return p.returncode

    codes = parallel(one, runs, 2)
    row.what = (f"{len(cases)} damaged checkpoints x info / info --verify / convert (+ fill --model /nonexistent); "
                f"{sum(c not in (0, None) for c in codes)} refused with an exit code")
    return row


# ---- the run --------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = ["| category | tried | 5xx | hangs | lost | wrong | what |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.category} | {r.tried} | {r.errors} | {r.hangs} | {r.lost} | {r.wrong} | {r.what} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per category (a smoke run)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (databases, server logs)")
    ap.add_argument("--only", nargs="*", help="categories to run (default: all), e.g. --only auth files")
    args = ap.parse_args()
    want = lambda name: not args.only or any(name.startswith(o) for o in args.only)

    workdir = Path(tempfile.mkdtemp(prefix="glmkit-hostile-"))
    t_start = time.perf_counter()
    rows: list[Row] = []
    servers: list[Server] = []
    try:
        main_srv = Server(workdir, "main", "--max-batch", str(MAIN_BATCH))
        servers.append(main_srv)
        keys = {name: main_srv.key(name, *limits) for name, limits in (
            ("bad", ()), ("victim-a", ()), ("poison-b", ()), ("load", ()), ("auth-good", ()), ("revoked", ()),
            ("other-model", ("--models", "some-other-model")), ("flood", ("--concurrency", "2")), ("budget", ("--budget-tokens", "200")),
            ("tpm", ("--tpm", "100")), ("conc", ("--concurrency", "2")))}
        p = cli("keys", "--db", str(main_srv.db), "revoke", keys["revoked"][1])
        if p.returncode != 0:
            raise RuntimeError(f"glmkit keys revoke failed: {p.stderr}")
        main_srv.start()
        model = httpx.get(main_srv.url + "/v1/models", headers=auth(keys["bad"][0]), timeout=10).json()["data"][0]["id"]
        print(f"glmkit serve ({model}) on {main_srv.url}, work dir {workdir}", file=sys.stderr)
        steps = [
            ("bad inputs", lambda: bad_inputs(main_srv, *keys["bad"], model, args.quick)),
            ("auth", lambda: auth_attacks(main_srv, model, keys["auth-good"][0], keys["revoked"][0], keys["other-model"][0])),
            ("isolation", lambda: isolation(main_srv, model, keys["victim-a"], keys["poison-b"], keys["flood"], args.quick)),
            ("limits", lambda: limits(main_srv, model, keys["budget"], keys["tpm"], keys["conc"], args.quick)),
            ("load", lambda: load(main_srv, model, keys["load"][0], args.quick)),
        ]
        for name, fn in steps:
            if want(name):
                t0 = time.perf_counter()
                rows.append(fn())
                print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        main_srv.stop()
        for name, fn in (("slow clients", lambda: slow_clients(workdir, model, args.quick)),
                         ("kill -9", lambda: kill9(workdir, model, args.quick))):
            if want(name):
                t0 = time.perf_counter()
                row, srv = fn()
                servers.append(srv)
                rows.append(row)
                print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if want("files"):
            t0 = time.perf_counter()
            rows.append(files(workdir, args.quick))
            print(f"  files: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    print(table(rows))
    print(f"\n{'quick' if args.quick else 'full'} run in {time.perf_counter() - t_start:.0f} s; "
          f"tracebacks in the server logs: {sum(s.tracebacks() for s in servers)}")
    for r in rows:
        for n in r.notes:
            print(f"- {r.category}: {n}")
    if args.keep:
        print(f"work dir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
