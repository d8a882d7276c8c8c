"""A real PostgreSQL server for tests (Debian's postgresql), a throwaway cluster on loopback.

PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user the
package creates, in a directory of its own outside pytest's (root-only) temporary tree.
A database `registry` and a role `registry` with a password: the ledger logs in as a
production node would, the password coming from PGPASSWORD.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.stack import free_port

PASSWORD = "ledger-test-password"


def bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class Postgres:
    def __init__(self, durable: bool = False) -> None:
        """`durable`: fsync on (benchmarks); tests run without it."""
        found = bindir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/setup.sh --test installs it)")
        self.bin = found
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tbf-pg-"))
        self.data = self.dir / "data"
        self.user = "postgres" if os.geteuid() == 0 else None
        self.url = f"postgresql://registry@127.0.0.1:{self.port}/registry"
        self.created = 0
        self.options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
            f" -c fsync={'on' if durable else 'off'} -c max_connections=50"
        )

    def _run(self, *args: str, input: str | None = None) -> str:
        command = [*(["runuser", "-u", self.user, "--"] if self.user else []), *args]
        out = subprocess.run(
            command, input=input, capture_output=True, text=True, timeout=60, cwd=self.dir
        )
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {out.stderr or out.stdout}")
        return out.stdout

    def start(self) -> Postgres:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8", "--locale=C")  # fmt: skip
        # Password logins over TCP; trust only on the cluster's own socket (set-up below).
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        self.restart()
        self.sql(f"CREATE ROLE registry LOGIN PASSWORD '{PASSWORD}'")
        self.sql("CREATE DATABASE registry OWNER registry")  # one statement: not in a transaction
        return self

    def sql(self, statements: str, database: str = "postgres") -> str:
        return self._run(str(self.bin / "psql"), "-h", str(self.dir), "-p", str(self.port),
                         "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1", "-qAt",
                         "-c", statements)  # fmt: skip

    def database(self) -> str:
        """A new, empty database owned by `registry`: its URL (each test its own)."""
        self.created += 1
        name = f"t{self.created}"
        self.sql(f"CREATE DATABASE {name} OWNER registry")
        return f"postgresql://registry@127.0.0.1:{self.port}/{name}"

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Start (again, after `stop`) on the same port and data."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", self.options, "-w",
                  "-t", "30", "-l", str(self.dir / "log"), "start")  # fmt: skip

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
