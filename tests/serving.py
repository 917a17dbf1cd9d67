"""What the server tests share: a tiny tokenizer's texts, a tiny random model, a live uvicorn on port 0,
and checks of OpenAI-shaped responses (the fixtures over them are in conftest.py)."""

import asyncio
import contextlib
import json
import socket
import threading
import time

import torch

from glmkit.config import ModelConfig, get_preset
from glmkit.model import GLM

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 2,
         "def add(a, b):\n    return a + b\n", "Hello there, how are you today? I am fine, thank you."] * 10
CHAT = [{"role": "user", "content": "Hello there"}]


def make_model(tok, position="rope_2d", tie=True, seed=0):
    torch.manual_seed(0)
    cfg = get_preset("debug", vocab_size=tok.vocab_size, tie_embeddings=tie) if position == "rope_2d" else ModelConfig(
        vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, position="rope_partial", max_seq_len=256)
    m = GLM(cfg).eval()
    m.init_weights(seed=seed)
    return m


def poll(what, fn, timeout: float = 20.0):
    """`fn()` until it is truthy (a row lands once its exchange is over, which a client does not wait for).
    `what` says what was awaited: a string, or a function whose text shows the state at the timeout."""
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        time.sleep(0.02)
    return value


def rows(app):
    return app.state.server.maas.ledger.rows()


def sse(text: str) -> list:
    data = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", f"stream does not end with [DONE]: {data[-3:]}"
    return [json.loads(d) for d in data[:-1]]


def tok_text(content) -> str:
    return "".join(e["token"] for e in content)


def assert_error(r, status: int, type_=None, code=None, param=None):
    __tracebackhide__ = True
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if type_ is not None:
        assert err["type"] == type_, err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@contextlib.contextmanager
def serve(app):
    """uvicorn in a thread on a socket bound to port 0 before it starts: connections queue in the
    backlog until the server (and its lifespan) is up, so nothing polls or sleeps."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join()
        sock.close()


def scope_of(path: str, headers: dict) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5),
            "server": ("testserver", 80),
            "headers": [(b"content-type", b"application/json")] + [(k.encode(), v.encode()) for k, v in headers.items()]}


async def leave_after(app, path, body, headers, chunks_before_leaving: int, arrived: asyncio.Event, leave: asyncio.Event):
    """One request through the raw ASGI app; the client leaves (http.disconnect) once `leave` is set,
    which happens by itself after `chunks_before_leaving` body chunks. Returns the chunks received."""
    got, asked = [], False

    async def receive():
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(m):
        if m["type"] == "http.response.body" and m.get("body"):
            got.append(m["body"])
            arrived.set()
            if len(got) >= chunks_before_leaving:
                leave.set()

    await app(scope_of(path, headers), receive, send)
    return got
