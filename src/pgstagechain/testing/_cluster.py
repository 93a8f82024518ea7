"""A throwaway PostgreSQL cluster for tests and demos: initdb, start, restart, stop.

Server binaries come from the ``pgserver`` wheel when it is installed, otherwise from
``pg_config --bindir`` or PATH. PostgreSQL refuses to run as root, so under root the
cluster runs as an unprivileged system user (created when missing).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER_USER = "pgstagechain"


def find_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` live."""
    try:
        from pgserver._commands import POSTGRES_BIN_PATH

        if (Path(POSTGRES_BIN_PATH) / "initdb").exists():
            return Path(POSTGRES_BIN_PATH)
    except ImportError:
        pass
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = Path(subprocess.check_output([pg_config, "--bindir"], text=True).strip())
        if (found / "initdb").exists():
            return found
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError(
        "no PostgreSQL server binaries found: `pip install pgserver` or install PostgreSQL"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVER_USER,
            ],
            check=True,
            capture_output=True,
        )
    return SERVER_USER


class TemporaryCluster:
    """A PostgreSQL cluster in a directory of its own, listening on 127.0.0.1.

    ``fsync`` stays on (figures measured against it are honest); ``settings`` add
    ``-c name=value`` server options.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="pgstagechain-"))
        self.data = self.directory / "data"
        self.port = port or free_port()
        self.bindir = find_bindir()
        self.user = _server_user()
        self.settings = {
            "max_connections": "300",
            "listen_addresses": "127.0.0.1",
            **(settings or {}),
        }

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            user=self.user,
            cwd=self.directory,
            timeout=120,
        )
        if result.returncode:
            raise RuntimeError(
                f"{args[0]} failed (exit {result.returncode}): {result.stderr.strip()}"
            )
        return result

    def init(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.user:
            shutil.chown(self.directory, self.user)
            self.directory.chmod(0o755)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )

    def start(self) -> TemporaryCluster:
        self.init()
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.directory} {options}",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server in ``mode``. One that will not stop that way within a minute is
        stopped ``immediate``, so the cluster stays usable, and the error quotes its log."""
        if not (self.data / "postmaster.pid").exists():
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        except RuntimeError as exc:
            if mode == "immediate":
                raise
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            raise RuntimeError(f"{exc}; the server log ends with:\n{self.log_tail()}") from None

    def restart(self, mode: str = "fast") -> None:
        try:
            self.stop(mode)
        finally:
            self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.directory / "server.log").read_text(errors="replace")
        except OSError as exc:
            return f"(no server log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def is_running(self) -> bool:
        result = subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True,
            user=self.user,
        )
        return result.returncode == 0

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> TemporaryCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()
