"""The README's quick start and "Trying tenants", run as written.

The shell blocks of those two sections are taken from README.md itself. A `make run` line is
the one line played by the test: it starts `tabbify-registry run` with the environment the
line gives and the defaults `make run` has (ports 5000-5003 included), in a throwaway data
dir; `make test` is what is running this. Every other line runs in bash with `set -e`, in a
throwaway podman storage, so a step of the README that fails fails this test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.stack import CLI, ROOT, wait_for

pytestmark = pytest.mark.e2e


def section_blocks(readme: str, title: str) -> list[str]:
    """The ```sh blocks of the `## title` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return re.findall(r"^```sh\n(.*?)^```", match.group(1), re.M | re.S)


def split_make_run(block: str) -> tuple[list[str], dict[str, str] | None]:
    """The block's other lines, and the environment of its `make run` line (None: none)."""
    lines, env = [], None
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[-2:] == ["make", "run"]:
            env = dict(w.split("=", 1) for w in words[:-2])
        elif words[-2:] != ["make", "test"]:
            lines.append(line)
    return lines, env


class Session:
    """A user's shell session: one environment, podman storage of its own, jobs it leaves."""

    def __init__(self, tmp: Path) -> None:
        storage = tmp / "storage.conf"
        storage.write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{tmp}/graph"\nrunroot = "{tmp}/runroot"\n'
        )
        self.env = {
            "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(tmp / "home"),
            "CONTAINERS_STORAGE_CONF": str(storage),
            "REGISTRY_AUTH_FILE": str(tmp / "auth.json"),
        }
        (tmp / "home").mkdir()
        (tmp / "auth.json").write_text("{}")  # podman stats it before writing a login
        self.cwd = ROOT  # the README speaks from the checkout
        self.jobs: list[subprocess.Popen[bytes]] = []

    def sh(self, lines: list[str]) -> str:
        script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
        # Output to a file, not a pipe: a job the script leaves running keeps what it inherits.
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(
                ["bash", "-c", script],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its background jobs stay in this group, ended at close
            )
            self.jobs.append(proc)
            proc.wait(timeout=600)
            out.seek(0)
            text = out.read().decode(errors="replace")
        assert proc.returncode == 0, f"README step failed ({proc.returncode}):\n{script}\n{text}"
        return text

    def close(self) -> None:
        for job in self.jobs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGTERM)


class MakeRun:
    """`make run` with the README's environment: `tabbify-registry run`, defaults otherwise."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.log = data_dir.with_suffix(".log")
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [CLI, "run"],
                env={**base, "REGISTRY_DATA_DIR": str(data_dir), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"make run exited:\n{self.log.read_text()}")
            return requests.get("http://127.0.0.1:5000/v2/", timeout=2).status_code in (200, 401)

        wait_for(ready, 60)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session(tmp_path)
    yield s
    s.close()


def test_the_quick_start_and_trying_tenants_run_as_written(
    tmp_path: Path, session: Session
) -> None:
    readme = (ROOT / "README.md").read_text()
    data = tmp_path / "data"

    # Quick start: make run, then build, push, inspect and pull the test image.
    start, use = section_blocks(readme, "Quick start")
    lines, env = split_make_run(start)
    assert env is not None and not lines
    stack = MakeRun(data, env)
    try:
        out = session.sh(use.splitlines())
        assert '"Name": "127.0.0.1:5000/dev/hello"' in out
        health = requests.get("http://127.0.0.1:5002/healthz", timeout=5)
        assert health.status_code == 200, health.text
    finally:
        stack.stop()

    # Trying tenants: dev-auth, make run with it, then acme's pushes.
    serve, use = section_blocks(readme, "Trying tenants")
    lines, env = split_make_run(serve)
    assert env == {"REGISTRY_AUTH_URL": "http://127.0.0.1:5003"}
    session.sh(lines)  # dev-auth in the background
    wait_for(lambda: "acme " in Path("/tmp/dev-jwts").read_text(), 30)
    stack = MakeRun(data, env)
    try:
        out = session.sh(use.splitlines())
        assert "Login Succeeded" in out
        assert "refused: dev/ is not acme's" in out
    finally:
        stack.stop()
