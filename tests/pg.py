"""A throwaway PostgreSQL cluster for the tests: `initdb` in a temporary directory, the server on a
Unix socket in that directory only (no TCP port, so nothing clashes with another cluster), stopped
and deleted at the end. PostgreSQL refuses to run as root, so when the tests run as root the
cluster runs as the `postgres` user (Debian's package creates it) or, failing that, `nobody`.

    cluster = Cluster.start()          # or raises ClusterError saying what failed
    url = cluster.create_database()    # postgresql://postgres@/t_<random>?host=/tmp/glmkit-pg-...
    cluster.stop()

Used by the `pg_url` (session) and `pg_db` (a fresh database per test) fixtures in conftest.py.
The cluster trades durability for speed (fsync off): it is thrown away.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit


class ClusterError(RuntimeError):
    """The cluster could not be started; the message says which step failed and how."""


def find_bin() -> Path | None:
    """The directory of initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    if (initdb := shutil.which("initdb")) and shutil.which("pg_ctl"):
        return Path(initdb).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    return Path(found[-1]).parent if found else None


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    raise ClusterError("running as root and there is no `postgres` or `nobody` user to run PostgreSQL as")


class Cluster:
    def __init__(self, bindir: Path, root: Path, user: pwd.struct_passwd | None):
        self.bindir, self.root, self.user = bindir, root, user
        self.data, self.log = root / "data", root / "server.log"
        self.superuser = user.pw_name if user else pwd.getpwuid(os.geteuid()).pw_name
        self.url = self.url_of("postgres")

    def url_of(self, dbname: str) -> str:
        return f"postgresql://{self.superuser}@/{dbname}?host={self.root}"

    def _cmd(self, *args, timeout=120):
        kw = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []} if self.user else {}
        return subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, **kw)

    @classmethod
    def start(cls, settings: dict | None = None) -> Cluster:
        """initdb + pg_ctl start; ClusterError with the failing step's output if either fails."""
        bindir = find_bin()
        if bindir is None:
            raise ClusterError("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; "
                               "install Debian's postgresql package")
        user = _run_as()
        root = Path(tempfile.mkdtemp(prefix="glmkit-pg-", dir="/tmp"))  # short: a socket path has at most 107 bytes
        if user:
            os.chown(root, user.pw_uid, user.pw_gid)
        c = cls(bindir, root, user)
        try:
            r = c._cmd("initdb", "-D", str(c.data), "-U", c.superuser, "--auth=trust", "--no-sync", "-E", "UTF8",
                       "--locale=C")
            if r.returncode != 0:
                raise ClusterError(f"initdb failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
            opts = {"listen_addresses": "''", "unix_socket_directories": f"'{root}'", "fsync": "off",
                    "full_page_writes": "off", "max_connections": "200", **(settings or {})}
            o = " ".join(f"-c {k}={v}" for k, v in opts.items())
            r = c._cmd("pg_ctl", "-D", str(c.data), "-l", str(c.log), "-o", o, "-w", "-t", "60", "start")
            if r.returncode != 0:
                log = c.log.read_text()[-800:] if c.log.exists() else ""
                raise ClusterError(f"pg_ctl start failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-400:]} {log}")
        except BaseException:  # nothing of a cluster that did not start is left in /tmp
            shutil.rmtree(root, ignore_errors=True)
            raise
        return c

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url_of(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = urlsplit(url).path.lstrip("/")
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # connections a test left open are closed

    def stop(self) -> None:
        self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
