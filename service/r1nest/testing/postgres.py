"""A throwaway PostgreSQL server for tests and benchmarks: Debian's `postgresql` binaries, a fresh
cluster in a temporary directory, loopback only.

    with postgres_server() as server:
        url = server.create_database("ledger_a")   # postgresql://r1nest:<password>@127.0.0.1:<port>/ledger_a
        ...
        server.stop()     # pg_ctl stop -m fast: an outage, on demand
        server.start()    # the same cluster, the same port

The cluster lives in its own temporary directory (data, unix socket, log) and is removed at the
end. PostgreSQL refuses to run as root, so when the caller is root the directory is handed to the
`postgres` user and every server binary runs through `runuser -u postgres --`. Clients connect
over TCP on 127.0.0.1 with a password (SCRAM), as a deployment would; the superuser and its
random password exist only in this cluster.

`durable=False` (tests) turns fsync off: nothing here survives a machine crash anyway, and the
shared 2-core machine spends its time on the tests rather than on the disk. Benchmarks pass
`durable=True` (PostgreSQL's defaults: fsync on, synchronous_commit on).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "r1nest"
START_TIMEOUT_S = 60
SERVER_USER = "postgres"  # who runs the server when the caller is root


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (scripts/setup-env installs them)."""


def server_bindir() -> Path:
    """The newest Debian PostgreSQL's bin directory (initdb, pg_ctl, postgres)."""
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if (Path(p) / "initdb").exists()]
    if not candidates:
        raise PostgresUnavailable("no PostgreSQL server found under /usr/lib/postgresql: apt-get install postgresql")
    return max(candidates, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """One cluster; `start()`/`stop()` may be called again and again (same port, same data)."""

    def __init__(self, *, durable: bool = False, max_connections: int = 200) -> None:
        self.bindir = server_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="r1nest-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root
        self.log_path = self.root / "server.log"
        self.port = free_port()
        self.password = secrets.token_urlsafe(24)
        self._durable = durable
        self._max_connections = max_connections
        self._as_server_user = os.geteuid() == 0
        self.running = False

    # the cluster ------------------------------------------------------------------------------

    def init(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_server_user:
            shutil.chown(self.root, SERVER_USER)
            shutil.chown(pwfile, SERVER_USER)
        os.chmod(pwfile, 0o600)
        try:
            self._run(
                "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8", "--locale=C.UTF-8",
                "--no-instructions",
            )
        finally:
            pwfile.unlink()

    def start(self) -> None:
        options = [
            f"-p {self.port}", f"-k {self.socket_dir}", "-c listen_addresses=127.0.0.1",
            f"-c max_connections={self._max_connections}",
        ]
        if not self._durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl", "start", "-w", "-t", str(START_TIMEOUT_S), "-D", str(self.data_dir),
            "-l", str(self.log_path), "-o", " ".join(options),
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m fast`: open sessions are terminated, new connections refused."""
        self._run("pg_ctl", "stop", "-w", "-t", str(START_TIMEOUT_S), "-m", mode, "-D", str(self.data_dir))
        self.running = False

    def remove(self) -> None:
        if self.running:
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # clients ------------------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql over the unix socket as the superuser; returns its unaligned output."""
        done = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
             "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PGPASSWORD": self.password},
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database names here are letters, digits and _: {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    # ----------------------------------------------------------------------------------------------

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), *args]
        if self._as_server_user:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S + 30, cwd=self.root)
        if done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, argv, done.stdout, done.stderr + "\n--- server log ---\n" + self.log()[-3000:]
            )


@contextmanager
def postgres_server(*, durable: bool = False, max_connections: int = 200) -> Iterator[PostgresServer]:
    """A started throwaway cluster; stopped and deleted on exit."""
    server = PostgresServer(durable=durable, max_connections=max_connections)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()
