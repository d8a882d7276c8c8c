"""The whole product as users run it: `tabbify-registry run` in a subprocess, real backend."""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
# TBF_CLI: another installation's `tabbify-registry` (another venv: an engine measured side by side)
CLI = os.environ.get("TBF_CLI") or str(ROOT / ".venv" / "bin" / "tabbify-registry")


# Ports for the servers tests start: below the kernel's ephemeral range (32768 and up here), so
# that neither bind(0) nor an outgoing connection hands one out, each parallel test worker in a
# block of its own. A port found by bind(0) and released could be found again by another
# worker before its stack bound it: two gateways (SO_REUSEPORT) then shared one port, and one
# test's requests reached the other's registry.
PORT_BASE, PORT_BLOCK, PORT_BLOCKS = 20_000, 2_000, 6
_worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_picked = itertools.count()


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free now, never picked before by this test process nor by
    another parallel test worker."""
    block = PORT_BASE + (_worker % PORT_BLOCKS) * PORT_BLOCK
    ports: list[int] = []
    for _ in range(PORT_BLOCK):
        port = block + next(_picked) % PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (a test's server, or something else on this machine)
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports in {block}-{block + PORT_BLOCK - 1}")


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (requests.RequestException, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {predicate}")
        time.sleep(interval)


class Stack:
    """One registry: gateway on `self.url`, backend on `self.backend_url`, logs in `self.log`."""

    def __init__(self, data_dir: Path, auth_url: str | None, **env: str) -> None:
        self.data_dir = data_dir
        self.port, self.backend_port, admin_port = free_ports(3)
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.backend_url = f"http://127.0.0.1:{self.backend_port}"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "REGISTRY_DATA_DIR": str(data_dir),
            "REGISTRY_LISTEN": self.host,
            "REGISTRY_BACKEND_ADDR": f"127.0.0.1:{self.backend_port}",
            "REGISTRY_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
            "REGISTRY_BACKEND": "distribution",
            **env,
        }
        if auth_url:
            self.env["REGISTRY_AUTH_URL"] = auth_url
        self.log = data_dir.parent / f"{data_dir.name}-stack.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Stack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [CLI, "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"stack exited {self.proc.returncode}:\n{self.log.read_text()}")
            gateway = requests.get(f"{self.url}/v2/", timeout=2).status_code in (200, 401)
            backend = self.backend_get("/v2/", timeout=2).status_code == 200
            return gateway and backend

        wait_for(ready, timeout)

    @property
    def backend_credential_file(self) -> Path:
        """Where `run` leaves the backend's credential (user:password, 0600)."""
        return self.data_dir / "run" / "backend-credential"

    @property
    def backend_auth(self) -> tuple[str, str] | None:
        """(user, password) of the run's backend credential, as `requests` takes it: the
        backend refuses anonymous requests. None for an external backend (no credential)."""
        if not self.backend_credential_file.exists():
            return None
        user, _, password = self.backend_credential_file.read_text().strip().partition(":")
        return user, password

    def backend_headers(self) -> dict[str, str]:
        """The `Authorization` header of the run's backend credential ({} without one)."""
        auth = self.backend_auth
        if auth is None:
            return {}
        basic = base64.b64encode(":".join(auth).encode()).decode()
        return {"Authorization": f"Basic {basic}"}

    def backend_get(self, path: str, method: str = "GET", **kw) -> requests.Response:
        """A request straight to the backend with the run's credential (around the gateway)."""
        return requests.request(method, f"{self.backend_url}{path}", auth=self.backend_auth, **kw)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def supervisorctl(self, *args: str) -> str:
        """supervisorctl against this stack. The gateway workers are `gateway:gateway-<n>`
        (`gateway:*` for all of them)."""
        conf = ROOT / "supervisord.conf"
        run_dir = self.data_dir / "run"
        env = {**self.env, "TBF_RUNTIME_DIR": str(run_dir), "TBF_LOG_DIR": str(run_dir / "logs")}
        for key in ("PYTHON", "GATEWAY_COMMAND", "BACKEND_COMMAND", "ADMIN_COMMAND"):
            env[f"TBF_{key}"] = "unused"
        env.update(
            TBF_BACKEND_AUTOSTART="true", TBF_WORKERS=str(self.workers), TBF_MINFDS="1024",
            TBF_TOKEN_FD="0", TBF_RUN_ID="0", TBF_MESH_COMMAND="unused", TBF_MESH_AUTOSTART="false",
            TBF_GC_COMMAND="unused", TBF_GC_AUTOSTART="false", TBF_MIRROR_BINARY="unused",
            TBF_MIRRORS="1", TBF_MIRROR_AUTOSTART="false",
        )  # fmt: skip
        out = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "supervisorctl"), "-c", str(conf), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout + out.stderr

    @property
    def workers(self) -> int:
        return int(self.env.get("REGISTRY_WORKERS") or os.cpu_count() or 1)

    def gateway_pids(self) -> dict[str, int]:
        """The running gateway workers' pids by process name."""
        pids = {}
        for n in range(self.workers):
            out = self.supervisorctl("pid", f"gateway:gateway-{n}").strip()
            if out.isdigit() and int(out):
                pids[f"gateway-{n}"] = int(out)
        return pids

    def access_log(self) -> list[dict]:
        """The access log lines (stdout) among everything the stack printed."""
        lines = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith('{"time"'):
                entry = json.loads(line)
                if "source" not in entry:  # operator lines (stderr) name their source
                    lines.append(entry)
        return lines
