"""What tests/test_replicas.py and bench/serve_replicas.py share: `glmkit serve` replicas as subprocesses (port 0,
the port read from uvicorn's start-up line; optionally pinned to a core with taskset and one thread), and HAProxy
in front of them with the configuration `glmkit lb-config` writes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmkit.server.replicas import REPLICA_HEADER, lb_config


@dataclass
class Replica:
    proc: subprocess.Popen
    url: str
    log: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def answered(self, response) -> bool:
        """Whether `response` (httpx) came from this replica (its x-glmkit-replica header names its port)."""
        return response.headers.get(REPLICA_HEADER, "").rsplit(":", 1)[-1] == str(self.port)


def free_port() -> int:
    """A port free now (for HAProxy, whose port must be in its configuration before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def replica(*args: str, cpu: int | None = None, threads: int | None = None, timeout: float = 180):
    """`glmkit serve ARGS` on a free loopback port; yields a Replica once it listens, kills it at the end.
    cpu: pin it to that core (taskset); threads: torch's intra-op threads (OMP_NUM_THREADS)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    proc = subprocess.Popen([*pin, sys.executable, "-m", "glmkit", "serve", "--device", "cpu", "--port", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    log, url, up = [], [], threading.Event()

    def read():  # the port is in uvicorn's start-up line; the rest of the log is kept for failures
        for line in proc.stderr:
            log.append(line)
            if not url and (m := re.search(r"running on (http://[\d.]+:\d+)", line)):
                url.append(m[1])
                up.set()
        up.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not (up.wait(timeout) and url):
            raise RuntimeError("glmkit serve did not start:\n" + "".join(log[-30:]))
        yield Replica(proc, url[0], log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


class LoadBalancerError(RuntimeError):
    """HAProxy did not start or did not answer; the message says what it printed."""


def haproxy_missing() -> str | None:
    """Why HAProxy cannot run here, or None."""
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (Debian: apt-get install haproxy; .ci/run installs it)"
    return None


@contextlib.contextmanager
def load_balancer(replicas: list[Replica], directory: Path, timeout: float = 30):
    """HAProxy (foreground, `-db`) in front of `replicas` with `glmkit lb-config`'s configuration; yields its
    URL once it answers /health through a replica."""
    import httpx

    port = free_port()
    cfg = Path(directory) / "haproxy.cfg"
    cfg.write_text(lb_config([("127.0.0.1", r.port) for r in replicas], port))
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:  # HAProxy has no start-up line to wait for: ask it
            if proc.poll() is not None:
                raise LoadBalancerError(f"haproxy exited with {proc.returncode}:\n{proc.stdout.read()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise LoadBalancerError(f"haproxy on {url} did not answer /health within {timeout} s")
            time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait(30)
