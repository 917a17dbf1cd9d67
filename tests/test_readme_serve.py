"""The README's first command run as written: `.venv/bin/glmkit serve --no-auth` (plus `--port 0`)
serves the embedded model, answers /health and a completion (the model's greedy fill, computed here
without the server), and shuts down gracefully on SIGTERM.

The console script is this environment's (`.venv/bin/glmkit` when pytest runs from `.venv`), with the
repository first on PYTHONPATH so it serves the glmkit under test. The server's port comes from its
own log line (uvicorn reports the port the OS chose), so nothing polls and no fixed port is taken."""

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import greedy_blank

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    """The README's first code block: the install-and-serve line, then the test command."""
    return (ROOT / "README.md").read_text(encoding="utf-8").split("```bash\n", 1)[1].split("```", 1)[0].splitlines()


def readme_first_command() -> list[str]:
    """The command after the last `&&` of the README's first line of code: the one that serves."""
    return shlex.split(readme_commands()[0].split("&&")[-1])


def test_ci_runs_the_readme_test_command():
    """.ci/run ends with the README's test command, which runs the slow tests too."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == readme_commands()[1] == ".venv/bin/python -m pytest --slow", (ci[-1], readme_commands())


def lines_of(stream, q: queue.Queue):
    for line in stream:
        q.put(line)
    q.put(None)  # end of output: the process closed it, or died


def http(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, json.loads(r.read())


@pytest.mark.slow
def test_readme_serve_command_serves_and_stops_on_sigterm(tmp_path):
    pytest.importorskip("uvicorn", reason="`glmkit serve` needs the serve extra")
    argv = readme_first_command()
    assert argv == [".venv/bin/glmkit", "serve", "--no-auth"], f"the README's first command changed: {argv}"
    exe = Path(sys.executable).parent / "glmkit"  # .venv/bin/glmkit of the environment running the tests
    if not exe.exists():
        pytest.skip(f"no console script {exe}: glmkit is not installed in this environment (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLMKIT_CACHE": str(tmp_path)}  # the ledger goes to tmp_path
    p = subprocess.Popen([str(exe), *argv[1:], "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True, env=env, cwd=tmp_path)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lines_of, args=(p.stderr, q), daemon=True).start()
    log, port = [], None
    try:
        while port is None:  # each line as it comes; the server is up once uvicorn says where
            line = q.get(timeout=300)
            assert line is not None, f"glmkit serve exited ({p.poll()}) before listening:\n{''.join(log)}"
            log.append(line)
            if m := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        url = f"http://127.0.0.1:{port}"
        status, health = http(url + "/health")
        assert status == 200 and health.get("status") == "ok", health
        status, r = http(url + "/v1/completions", {"model": "glmkit-default", "prompt": "def add(a, b):",
                                                   "max_tokens": 6, "temperature": 0})
        assert status == 200 and r["object"] == "text_completion" and r["model"] == "glmkit-default", r
        (choice,) = r["choices"]
        assert 1 <= r["usage"]["completion_tokens"] <= 6 and choice["finish_reason"] in ("length", "stop"), r
        assert choice["text"] == greedy_text("def add(a, b):", 6), r
        p.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: the status is SIGTERM's
        assert p.wait(timeout=60) in (0, -signal.SIGTERM), f"exit status {p.returncode} on SIGTERM"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    while (line := q.get(timeout=10)) is not None:
        log.append(line)
    text = "".join(log)
    assert "Application shutdown complete" in text and "Finished server process" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def greedy_text(prompt: str, n: int) -> str:
    """The embedded model's greedy fill of a [gMASK] after `prompt` (what /v1/completions serves for a
    GLM-objective model), one full forward per token, in this process."""
    import glmkit
    from glmkit.convert import DEFAULT_MODEL
    from glmkit.infill import special_ids

    tok = glmkit.load_tokenizer(DEFAULT_MODEL)
    return tok.decode(greedy_blank(glmkit.load().eval(), special_ids(tok), tok.encode(prompt), n))
