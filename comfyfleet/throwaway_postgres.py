"""A throwaway PostgreSQL server for local runs (the tests, the chaos run, the benchmarks):
Debian's binaries, a data directory under /tmp, a free port on 127.0.0.1, no fsync. Each user
of it gets a database of its own (:meth:`PgServer.new_database`)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import asyncpg

_SUPERUSER = "postgres"


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "PostgreSQL's server binaries are missing: run scripts/bootstrap.sh --with-postgres"
        )
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="comfyfleet-pg-"))
        self.port = _free_port()
        # PostgreSQL refuses to run as root: then it runs as Debian's postgres user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    # Start and stop happen once per test session, outside any event loop: plain subprocesses.
    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        if self._as:
            shutil.chown(self.root, "postgres", "postgres")
        data = self.root / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", _SUPERUSER, "-A", "trust", "--no-sync")
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    async def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user=_SUPERUSER, database="postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{name}"
