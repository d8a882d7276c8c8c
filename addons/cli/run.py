"""`tabbify-registry run`: the container's PID 1.

Mesh bootstrap (when configured) → backend config rendered into REGISTRY_DATA_DIR →
supervisord running the backend and the gateway workers side by side (programs.py says
what each runs). It stays the parent of supervisord (not exec) so it can turn "a program
could not start" into a non-zero exit status, which supervisord alone cannot do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from addons.cli import deployment
from addons.cli.logrelay import LogRelay, OperatorText, program_name
from addons.cli.programs import (
    BIN,
    SUPERVISORD_CONF,
    MirrorInstance,
    http_secret,
    load_mirrors,
    mirror_instances,
    require_backend,
    supervisor_env,
    token_key,
    write_backend_config,
    write_backend_credential,
    write_mirror_configs,
)
from addons.config import settings as settings_mod
from addons.config import token_keys
from addons.config.settings import ConfigError, Settings, version
from addons.gateway import policy_store
from mesh import bootstrap


def listen_free(s: Settings) -> None:
    """The workers bind the port with SO_REUSEPORT, which would share it with another such
    program: make sure nobody holds it first."""
    family = socket.AF_INET6 if ":" in s.listen.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As a server binds: connections of an earlier run in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((s.listen.host, s.listen.port))
        except OSError as e:
            raise ConfigError(f"REGISTRY_LISTEN={s.listen.hostport}: {e.strerror}") from None


def migrate_requests() -> None:
    """Best effort: let the kernel hand the connections queued at a worker that dies to the
    other workers (net.ipv4.tcp_migrate_req, Linux 5.14+, per network namespace) instead of
    resetting them. Without the privilege, a dying worker's queue is lost, as in nginx. Only
    as a container's PID 1, where the network namespace is the container's own: never a
    host's setting changed behind its operator's back."""
    if os.getpid() != 1:
        return
    with contextlib.suppress(OSError):
        Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1\n")


def raise_fd_limit() -> int:
    """Soft descriptor limit up to the hard one (each client connection costs two); returns
    the `minfds` supervisord should keep (and close in its children below)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    # The run's key sits at minfds + 8 (token_key), which must stay below the limit.
    return max(16, min(target - 64, 65536))


def start_log_relay(s: Settings, mirror_count: int = 0) -> LogRelay:
    """The FIFOs every program writes into, drained by this process (logrelay.py)."""
    s.log_dir.mkdir(parents=True, exist_ok=True)
    readable = sys.stderr.isatty()  # a person at a terminal, not a log shipper
    relay = LogRelay(s.log_dir, sys.stdout.buffer, sys.stderr.buffer, s.log_level, readable)
    workers = [f"gateway-{n}" for n in range(s.workers)]
    proxies = [f"mirror-{n}" for n in range(max(1, mirror_count))]
    for name in ("access.fifo", *(f"{p}.log" for p in (*LOGGED_PROGRAMS, *workers, *proxies))):
        per_request = name == "backend.log" or name.startswith("mirror-")
        relay.fifo(name, per_request_line if per_request else None)
    relay.start()
    return relay


LOGGED_PROGRAMS = ("backend", "admin", "mesh", "fatal", "gc")


def per_request_line(line: bytes) -> bool:
    """Distribution logs every answer (its 404s too, at level error) as `response completed…`:
    the gateway's access log already has each request, so these are dropped, but for a 5xx,
    whose line says why (the gateway's answer hides the backend's detail)."""
    if b'msg="response completed' not in line:
        return False
    return re.search(rb"http\.response\.status=5\d\d", line) is None


def lock_data_dir(s: Settings) -> IO[str]:
    """One stack per data dir: a second `run` on the same REGISTRY_DATA_DIR is refused."""
    lock = open(s.runtime_dir / "lock", "w")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"REGISTRY_DATA_DIR={s.data_dir} is in use by another tabbify-registry"
        ) from None
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def summary(s: Settings, instances: list[MirrorInstance] | None = None) -> list[str]:
    """What `run` says at start: where it listens, in which mode, where the operator looks."""
    listen = f"listening on http://{s.listen.hostport}"
    if s.external_url != f"http://{s.listen.hostport}":
        listen += f" (clients use {s.external_url})"
    if s.listen.is_wildcard and s.external_url_derived:
        listen += "; set REGISTRY_EXTERNAL_URL to the URL other machines use (the token realm)"
    if s.anonymous:
        mode = "mode: anonymous dev mode (no login, no namespaces, loopback only)"
    else:
        mode = f"mode: Tabbify auth at {s.auth_url}"
    admin = f"http://{s.admin_addr.hostport}"
    backend = {"external": "an external registry", "zot": "Zot", "distribution": "Distribution"}
    storage = f"S3 bucket {s.s3_bucket}" if s.storage == "s3" else "local storage"
    workers = f"{s.workers} gateway worker{'s' if s.workers != 1 else ''}"
    mirrored = [f"mirror/{i.mirror.name}/ of {i.mirror.url}" for i in instances or []]
    return [
        f"tabbify-registry {version()} starting",
        listen,
        mode,
        f"admin on {admin} (live view /, /metrics, /healthz, /livez, /readyz)",
        f"data in {s.data_dir}; backend: {backend[s.backend]} on {s.backend_addr.hostport} "
        f"({storage}); {workers}",
        *([f"mirrors: {', '.join(mirrored)}"] if mirrored else []),
    ]


def wait_reaping(pid: int) -> int:
    """Wait for supervisord, reaping every other child on the way: as a container's PID 1 we
    inherit orphans (wireguard-go's daemon among them) and must not leave zombies."""
    while True:
        child, status = os.wait()
        if child == pid:
            return os.waitstatus_to_exitcode(status)


def run(env: Mapping[str, str]) -> int:
    s = settings_mod.load(env)
    policy_store.read(s.policy_file)  # a bad policy refuses start-up (file:line on stderr)
    load_mirrors(s)  # so does a bad mirrors file
    if s.nodes.token_key_file is not None:
        try:
            token_keys.read_keys(s.nodes.token_key_file)  # the workers would refuse it too
        except token_keys.KeyFileError as e:
            raise ConfigError(f"REGISTRY_TOKEN_KEY_FILE: {e}") from None
    require_backend(s)  # before the mesh: a node that cannot serve should not join
    if s.mesh_coordinator_url:
        # With a mesh, the gateway listens on [ULA]:5000 and the realm names that address.
        # Its warnings are operator lines too (the relay does not run yet).
        said = OperatorText("mesh", sys.stderr.buffer, s.log_level, sys.stderr.isatty())
        with contextlib.redirect_stderr(said):
            ula = bootstrap.up(s)
        s = settings_mod.load(env, ula=ula)
    s.runtime_dir.mkdir(parents=True, exist_ok=True)
    (s.data_dir / "zot-cache").mkdir(exist_ok=True)
    _lock = lock_data_dir(s)
    # For gc, policy and config given this data dir: the settings this run uses.
    deployment.write(env, s)
    fatal = s.runtime_dir / "fatal"
    fatal.unlink(missing_ok=True)
    write_backend_credential(s)
    instances = mirror_instances(s)
    config_file = write_backend_config(s, [i.mirror for i in instances])
    write_mirror_configs(s, instances, http_secret(s))
    listen_free(s)
    migrate_requests()
    minfds = raise_fd_limit()
    key_fd = token_key(minfds)
    s.state_dir.mkdir(parents=True, exist_ok=True)
    relay = start_log_relay(s, len(instances))
    for line in summary(s, instances):
        relay.log("info", line)

    supervisord = subprocess.Popen(
        [str(BIN / "supervisord"), "--nodaemon", "--configuration", str(SUPERVISORD_CONF)],
        env={
            **supervisor_env(env, s, config_file, instances),
            "TBF_MINFDS": str(minfds),
            "TBF_TOKEN_FD": str(key_fd),
            "TBF_RUN_ID": secrets.token_hex(8),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(key_fd,),
    )
    assert supervisord.stdout is not None and supervisord.stderr is not None
    relay.source(supervisord.stdout.fileno(), "supervisord", "stderr")
    relay.source(supervisord.stderr.fileno(), "supervisord", "stderr")

    def forward(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:  # supervisord's reload: every program restarted
            relay.log("info", "restarting every program on SIGHUP")
        else:
            relay.log("info", f"stopping on {signal.Signals(signum).name}")
        supervisord.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    status = wait_reaping(supervisord.pid)
    if fatal.exists():
        program = fatal.read_text().strip()
        relay.log("error", f"{program_name(program)} could not start: every program stopped")
        status = 1
    else:
        relay.log("info", f"stopped (exit status {status})")
    relay.drain()
    return status
