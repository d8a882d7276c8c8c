"""`tabbify-registry run | config | mesh up | policy` (contract §1, §7).

`run` is the container's PID 1: mesh bootstrap (when configured) → backend config rendered
into REGISTRY_DATA_DIR → supervisord running the backend and the gateway workers side by
side. It stays the parent of supervisord (not exec) so it can turn "a program could not
start" into a non-zero exit status, which supervisord alone cannot do.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from addons.cli import deployment, devauth
from addons.cli import gc as gc_cmd
from addons.cli import policy as policy_cmd
from addons.cli.logrelay import LogRelay, OperatorText, program_name
from addons.clients import backend_credential
from addons.config import mirrors, nodes, token_keys
from addons.config import settings as settings_mod
from addons.config.settings import ConfigError, Settings, version
from addons.decisions.policy import PolicyError
from addons.gateway import policy_store
from addons.runstate import write_atomic
from mesh import bootstrap
from mesh.state import MeshError
from zot import config as backend_config


def supervisord_conf() -> Path:
    """supervisord.conf: at the top of a checkout (editable install), else where an installed
    package puts its data files (`<prefix>/share/tabbify-registry/`, the image)."""
    checkout = Path(__file__).resolve().parents[2] / "supervisord.conf"
    return (
        checkout
        if checkout.exists()
        else Path(sys.prefix, "share", "tabbify-registry", checkout.name)
    )


SUPERVISORD_CONF = supervisord_conf()
BIN = Path(sys.executable).parent


def gateway_command(s: Settings, instances: list[MirrorInstance] | None = None) -> list[str]:
    """The gateway (mitmproxy's engine with our addons, addons/gateway/chain.py) in reverse mode on
    REGISTRY_LISTEN.

    An IPv6 listen host goes without brackets (mitmproxy's mode syntax); the upstream URL
    keeps them. `lazy` so a dead backend does not break answers the addons give themselves.
    """
    upstream = f"http://{s.backend_addr.hostport}"
    mesh_dir = s.data_dir / "mesh" if s.mesh_coordinator_url else None
    # A listen address (and realm) derived from the mesh follows the ULA in state.json when the
    # coordinator moves the node (addons/gateway/meshaddress.py); explicit settings stay.
    follow = s.mesh_coordinator_url is not None and s.listen_from_mesh
    # [::] is every address of both families, as Go and Linux take it: no listen host, where
    # asyncio binds 0.0.0.0 and :: (a host of "::" alone would be IPv6 only, V6ONLY).
    host = "" if s.listen.host == "::" else f"{s.listen.host}:"
    return [
        sys.executable, "-m", "addons.gateway.chain",
        "--mode", f"reverse:{upstream}@{host}{s.listen.port}",
        "--set", "connection_strategy=lazy",
        "--set", f"confdir={s.runtime_dir / 'mitmproxy'}",
        "--set", f"termlog_verbosity={GATEWAY_VERBOSITY[s.log_level]}",
        "--set", f"registry_anonymous={'true' if s.anonymous else 'false'}",
        "--set", f"registry_realm={s.realm}",
        "--set", f"registry_auth_url={s.auth_url or ''}",
        "--set", f"registry_policy_file={'' if s.anonymous else s.policy_file}",
        # Tenant isolation by digest: only with tenants (auth on).
        "--set", f"registry_ledger={'' if s.anonymous else ledger_spec(s)}",
        "--set", f"registry_backend={upstream}",
        "--set", f"registry_backend_credential={backend_credential_file(s) or ''}",
        "--set", f"registry_mirrors={mirrors.routes_option(mirror_routes(s, instances))}",
        "--set", f"registry_mesh_state={mesh_dir / 'state.json' if mesh_dir and follow else ''}",
        "--set", f"registry_mesh_realm={'true' if follow and s.external_url_derived else 'false'}",
        "--set", f"registry_capture_dir={s.data_dir / 'captures'}",
        "--set", f"registry_header_timeout={s.header_timeout}",
        "--set", f"registry_idle_timeout={s.idle_timeout}",
        "--set", f"registry_catalog_scan={s.catalog_scan}",
        "--set", f"registry_cache_bytes={s.cache_mb * 1024 * 1024}",
        # The caps are the node's: each of the workers takes its share.
        "--set", f"registry_max_connections={worker_share(s.max_connections, s.workers)}",
        "--set",
        f"registry_max_client_connections={worker_share(s.max_client_connections, s.workers)}",
        "--set", f"registry_max_client_pending={worker_share(s.max_client_pending, s.workers)}",
        "--set", f"registry_access_log={s.log_dir / 'access.fifo'}",
        "--set", f"registry_state_dir={s.state_dir}",
        "--set", f"registry_upload_age={s.upload_age}",
        # Shared registry-token keys (several nodes): instead of the run's own key.
        *(["--token-key-file", str(s.nodes.token_key_file)] if s.nodes.token_key_file else []),
    ]  # fmt: skip


# --- mirrors of upstream registries (REGISTRY_MIRRORS_FILE, addons/config/mirrors.py) -------------


@dataclass(frozen=True)
class MirrorInstance:
    """One mirror as this run serves it: with Distribution, a proxy-mode instance of its own
    on a loopback port (`port`); with Zot, the backend's sync extension (`port` 0)."""

    mirror: mirrors.Mirror
    port: int = 0
    index: int = 0


def load_mirrors(s: Settings) -> list[mirrors.Mirror]:
    """The mirrors file's mirrors; a bad file stops start-up with its file:line."""
    if s.mirrors_file is None:
        return []
    try:
        found = mirrors.load(s.mirrors_file)
    except mirrors.MirrorError as e:
        raise ConfigError(f"REGISTRY_MIRRORS_FILE: {e}") from None
    if found and s.backend == "external":
        raise ConfigError(
            "REGISTRY_MIRRORS_FILE: mirrors need a backend this run starts (zot or distribution)"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def mirror_instances(s: Settings) -> list[MirrorInstance]:
    found = load_mirrors(s)
    if s.backend != "distribution":
        return [MirrorInstance(m, 0, i) for i, m in enumerate(found)]
    return [MirrorInstance(m, free_port(), i) for i, m in enumerate(found)]


def mirror_routes(
    s: Settings, instances: list[MirrorInstance] | None
) -> dict[str, tuple[str, int]]:
    """The gateway's `registry_mirrors`: where each mirror is read, its tag_ttl."""
    return {
        i.mirror.name: (f"127.0.0.1:{i.port}" if i.port else "", i.mirror.tag_ttl)
        for i in (instances or [])
    }


def write_mirror_configs(s: Settings, instances: list[MirrorInstance], secret: str) -> None:
    """Each Distribution proxy instance's config (0600: it holds the upstream credential,
    which is never on a command line, in the environment or in a log)."""
    for old in s.runtime_dir.glob("mirror-*.json"):
        old.unlink()
    for inst in instances:
        if not inst.port:
            continue
        creds = (
            mirrors.read_credentials(inst.mirror.credentials_file)
            if inst.mirror.credentials_file
            else None
        )
        config = backend_config.render_distribution_mirror(s, inst.mirror, inst.port, secret, creds)
        path = s.runtime_dir / f"mirror-{inst.index}.json"
        write_atomic(path, (json.dumps(config, indent=2) + "\n").encode(), mode=0o600)
        (s.data_dir / "mirror" / inst.mirror.name).mkdir(parents=True, exist_ok=True)


def write_zot_credentials(s: Settings, found: list[mirrors.Mirror]) -> Path | None:
    """Zot's sync credentials file (its own JSON, by upstream host), from the users' files,
    in the runtime dir with mode 0600; None when no mirror has credentials."""
    path = s.runtime_dir / backend_config.ZOT_SYNC_CREDENTIALS
    entries = {}
    for m in found:
        if m.credentials_file is not None:
            user, token = mirrors.read_credentials(m.credentials_file)
            entries[m.host] = {"username": user, "password": token}
    if not entries:
        path.unlink(missing_ok=True)
        return None
    write_atomic(path, (json.dumps(entries, indent=2) + "\n").encode(), mode=0o600)
    return path


def worker_share(cap: int, workers: int) -> int:
    """One worker's part of a node's connection cap. The kernel spreads connections over the
    workers by a hash, not evenly: an even split would refuse a client on one worker while
    the node is below its cap. So each takes its even part plus about three standard
    deviations of a binomial spread, never more than the whole (0 stays 0: no cap set)."""
    if cap <= 0 or workers <= 1:
        return cap
    even = cap / workers
    return min(cap, math.ceil(even + 3 * math.sqrt(even * (1 - 1 / workers))))


# mitmproxy's engine logs every client connection at info: that is debugging detail here.
GATEWAY_VERBOSITY = {"debug": "info", "info": "warn", "warning": "warn", "error": "error"}


def ledger_spec(s: Settings) -> str:
    """The gateway's `registry_ledger`: SQLite under the data dir, the shared S3 ledger with
    the storage's region and endpoint, or PostgreSQL (addons/storage/spec.py)."""
    if s.nodes.ledger_url is None:
        return str(s.data_dir / "ledger" / "ledger.db")
    if not s.nodes.ledger_in_s3:
        return s.nodes.ledger_url  # PostgreSQL, without its password (see supervisor_env)
    from addons.storage.s3 import S3Location  # boto3: only where an S3 ledger is used

    assert s.s3_region is not None  # settings refuse an S3 ledger without a region
    bucket, prefix = s.nodes.ledger_bucket or "", s.nodes.ledger_prefix
    return S3Location(bucket, prefix, s.s3_region, s.s3_endpoint).url()


def backend_credential_file(s: Settings) -> Path | None:
    """Where the run's backend credential is (a path on command lines, never the secret):
    always for the backend `run` starts; for an external one only when the operator gave
    one (REGISTRY_BACKEND_CREDENTIAL_FILE), else the gateway sends none."""
    if s.backend == "external" and s.nodes.backend_credential_file is None:
        return None
    return s.runtime_dir / backend_credential.FILE_NAME


def write_backend_credential(s: Settings) -> None:
    """The run's backend credential (0600) and the backend's htpasswd file of it (0600):
    made anew each run, or REGISTRY_BACKEND_CREDENTIAL_FILE's (a Zot cluster's, an external
    registry's)."""
    path = s.runtime_dir / backend_credential.FILE_NAME
    htpasswd = s.runtime_dir / backend_credential.HTPASSWD_NAME
    given = s.nodes.backend_credential_file
    try:
        credential = backend_credential.read(given) if given else backend_credential.make()
    except backend_credential.CredentialError as e:
        raise ConfigError(f"REGISTRY_BACKEND_CREDENTIAL_FILE={e}") from None
    if backend_credential_file(s) is None:
        path.unlink(missing_ok=True)  # an earlier run's: nobody reads them any more
        htpasswd.unlink(missing_ok=True)
        return
    write_atomic(path, f"{credential}\n".encode(), mode=0o600)
    if s.backend != "external":
        write_atomic(htpasswd, backend_credential.htpasswd(credential).encode(), mode=0o600)


def admin_command(s: Settings) -> list[str]:
    """The operator's loopback endpoint, a program of its own (addons/admin/program.py)."""
    mesh_dir = s.data_dir / "mesh" if s.mesh_coordinator_url else None
    return [
        sys.executable, "-m", "addons.admin.program",
        "--listen", s.admin_addr.hostport,
        "--backend", f"http://{s.backend_addr.hostport}",
        "--backend-credential", str(backend_credential_file(s) or ""),
        "--state-dir", str(s.state_dir),
        "--capture-dir", str(s.data_dir / "captures"),
        "--log-dir", str(s.log_dir),
        "--mesh-interface", s.mesh_interface if s.mesh_coordinator_url else "",
        "--mesh-status", str(mesh_dir / "status.json") if mesh_dir else "",
        "--auth-url", s.auth_url or "",
    ]  # fmt: skip


BACKEND_BINARIES = {"zot": "zot", "distribution": "docker-registry"}


def require_backend(s: Settings) -> None:
    binary = BACKEND_BINARIES.get(s.backend)
    if binary and shutil.which(binary) is None:
        raise ConfigError(f"REGISTRY_BACKEND={s.backend}: `{binary}` is not on PATH")


def backend_command(
    s: Settings, config_file: Path, env: Mapping[str, str] | None = None
) -> list[str]:
    """The backend's command line. Distribution gets an operator's AWS_CA_BUNDLE as
    SSL_CERT_FILE, and not AWS_CA_BUNDLE itself (its S3 driver panics on it; see
    settings.distribution_env): supervisord hands every program its own environment, so the
    change is made here, for this program only (the gateway's boto3 ledger reads
    AWS_CA_BUNDLE as it is)."""
    command = [BACKEND_BINARIES[s.backend], "serve", str(config_file)]
    bundle = (env or {}).get("AWS_CA_BUNDLE", "").strip()
    if s.backend == "distribution" and bundle:
        return ["env", "-u", "AWS_CA_BUNDLE", f"SSL_CERT_FILE={bundle}", *command]
    return command


def token_key(minfds: int) -> int:
    """The registry-token key of this run: 32 random bytes in a sealed memfd, placed at a
    descriptor number supervisord does not close in its children (it closes those below
    `minfds`), so every gateway worker, restarted ones too, inherits it. Never on disk, never
    in the environment; a new run makes a new key, so issued tokens die with the run."""
    memfd = os.memfd_create("tabbify-registry-token-key", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(memfd, secrets.token_bytes(32))
    seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, seals)
    fd = os.dup2(memfd, minfds + 8, inheritable=True)
    os.close(memfd)
    return fd


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


def supervisor_env(
    env: Mapping[str, str],
    s: Settings,
    config_file: Path,
    instances: list[MirrorInstance] | None = None,
) -> dict[str, str]:
    """The environment supervisord and its programs get. REGISTRY_* is removed: Distribution
    reads every REGISTRY_<SECTION>_<KEY> as a config override (and panics on ours); the
    gateway gets its settings on its command line."""
    child = {k: v for k, v in env.items() if not k.startswith("REGISTRY_")}
    external = s.backend == "external"
    child.update(
        TBF_RUNTIME_DIR=str(s.runtime_dir),
        TBF_LOG_DIR=str(s.log_dir),
        TBF_WORKERS=str(s.workers),
        TBF_ADMIN_COMMAND=shlex.join(admin_command(s)),
        TBF_PYTHON=sys.executable,
        TBF_GATEWAY_COMMAND=shlex.join(gateway_command(s, instances)),
        # Distribution's proxy instances, one per mirror (mirror-<n>.json in the runtime dir).
        TBF_MIRROR_BINARY=BACKEND_BINARIES["distribution"],
        TBF_MIRRORS=str(max(1, len(proxies := [i for i in instances or [] if i.port]))),
        TBF_MIRROR_AUTOSTART="true" if proxies else "false",
        TBF_BACKEND_COMMAND=(
            "true" if external else shlex.join(backend_command(s, config_file, env))
        ),
        TBF_BACKEND_AUTOSTART="false" if external else "true",
        TBF_MESH_COMMAND=shlex.join([sys.executable, "-m", "mesh.follow", str(s.data_dir)]),
        TBF_MESH_AUTOSTART="true" if s.mesh_coordinator_url else "false",
        TBF_GC_COMMAND=shlex.join(gc_command(env, s)),
        TBF_GC_AUTOSTART="true" if s.gc_interval and s.backend == "distribution" else "false",
    )
    if s.nodes.ledger_password is not None:
        # Given in REGISTRY_LEDGER_URL: libpq's own variable, never a command line.
        child["PGPASSWORD"] = s.nodes.ledger_password
    return child


def gc_command(env: Mapping[str, str], s: Settings) -> list[str]:
    """The periodic GC (REGISTRY_GC_INTERVAL, Distribution only: Zot collects by itself):
    `tabbify-registry gc --every N` with the REGISTRY_* settings given back on its command
    line (supervisord's environment has none of them, see supervisor_env)."""
    given = {k: v for k, v in env.items() if k.startswith("REGISTRY_")}
    if s.nodes.ledger_url is not None:  # without its password (PGPASSWORD carries that)
        given["REGISTRY_LEDGER_URL"] = s.nodes.ledger_url
    settings = [f"{k}={v}" for k, v in sorted(given.items())]
    return [
        "env",
        *settings,
        str(BIN / "tabbify-registry"),
        "gc",
        "--every",
        str(s.gc_interval or 0),
    ]


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


def http_secret(s: Settings) -> str:
    """The backend's upload-state secret: REGISTRY_HTTP_SECRET_FILE's (the same on every
    node, so an upload started on one node finishes on another), else made once per data
    dir (0600) and kept."""
    if s.nodes.http_secret_file is not None:
        try:
            return nodes.read_http_secret(s.nodes.http_secret_file)
        except nodes.NodesError as e:
            raise ConfigError(str(e)) from None
    path = s.data_dir / "secrets" / "http-secret"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, secrets.token_urlsafe(32).encode(), mode=0o600)
    return path.read_text().strip()


def write_backend_config(s: Settings, found: list[mirrors.Mirror] | None = None) -> Path:
    path = s.runtime_dir / f"{s.backend}-config.json"
    if s.backend != "external":
        policy = None if s.anonymous else policy_store.read(s.policy_file)  # Zot's retention
        creds = write_zot_credentials(s, found or []) if s.backend == "zot" else None
        config = backend_config.render(s, http_secret(s), policy, found or [], creds)
        write_atomic(path, (json.dumps(config, indent=2) + "\n").encode(), mode=0o600)
    return path


def printable_config(s: Settings) -> dict[str, object]:
    """What `config` prints: the rendered config without its secrets (the upload secret and
    a password inside REGISTRY_CACHE_URL are named, not shown). The policy's retention rules
    are part of Zot's config."""
    policy = None if s.anonymous else policy_store.read(s.policy_file)
    found = load_mirrors(s)
    creds = (
        s.runtime_dir / backend_config.ZOT_SYNC_CREDENTIALS
        if any(m.credentials_file for m in found)
        else None
    )
    if s.nodes.http_secret_file is not None:
        secret = f"<from REGISTRY_HTTP_SECRET_FILE={s.nodes.http_secret_file}>"
        config = backend_config.render(s, secret, policy, found, creds)
    else:
        config = backend_config.render(s, policy=policy, mirrors=found, credentials=creds)
    cache = config.get("storage", {}).get("cacheDriver")
    if isinstance(cache, dict) and urlsplit(cache.get("url", "")).password:
        cache["url"] = "<REGISTRY_CACHE_URL: it holds a password>"
    return config


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


ENVIRONMENT = """\
environment (read by run, config, gc and policy; docs/contract.md has each):
  REGISTRY_DATA_DIR              everything persistent (default /var/lib/tabbify-registry)
  REGISTRY_STORAGE               local (default) or s3
  REGISTRY_S3_BUCKET, REGISTRY_S3_REGION, REGISTRY_S3_ENDPOINT   with s3
  REGISTRY_AUTH_URL              Tabbify auth base URL; unset = anonymous dev mode, loopback only
  REGISTRY_LISTEN                gateway address (default 127.0.0.1:5000, [ULA]:5000 on a mesh)
  REGISTRY_EXTERNAL_URL          the base URL clients use (default http://<listen address>)
  REGISTRY_ADMIN_ADDR            health, metrics, live view; loopback (default 127.0.0.1:5002)
  REGISTRY_BACKEND               zot, distribution or external (default: zot if on PATH)
  REGISTRY_BACKEND_ADDR          the backend's loopback address (default 127.0.0.1:5001)
  REGISTRY_BACKEND_CREDENTIAL_FILE  the backend's credential (Zot cluster, external backend)
  REGISTRY_WORKERS               gateway worker processes (default: number of cores)
  REGISTRY_LOG_LEVEL             operator log (stderr): debug, info (default), warning, error
  REGISTRY_POLICY_FILE           access policy (default $REGISTRY_DATA_DIR/policy.toml)
  REGISTRY_GC_INTERVAL           periodic garbage collection, e.g. 24h (default: none)
  REGISTRY_UPLOAD_MAX_AGE        unfinished uploads are purged this old (default 1h)
  REGISTRY_MIRRORS_FILE          upstream registries mirrored read-only under mirror/<name>/
  REGISTRY_HEADER_TIMEOUT        seconds to receive a request's head (default 60)
  REGISTRY_IDLE_TIMEOUT          seconds an idle client connection is kept (default 75)
  REGISTRY_CACHE_MB              manifests by digest kept in memory per worker (default 48, 0 off)
  REGISTRY_MAX_CONNECTIONS       client connections of the node (default: descriptors allow)
  REGISTRY_MAX_CLIENT_CONNECTIONS  connections of one client address (default 256)
  REGISTRY_MAX_CLIENT_PENDING    slow request heads of one client address (default 32)
  REGISTRY_CATALOG_SCAN          names one catalog page looks at, at most (default 20000)
  REGISTRY_LEDGER_URL            shared ledger, s3://bucket/prefix or postgresql://...
  REGISTRY_TOKEN_KEY_FILE        shared registry-token keys for several nodes
  REGISTRY_HTTP_SECRET_FILE      shared upload-state secret for several nodes
  REGISTRY_CACHE_URL             shared Zot dedupe cache for several nodes
  REGISTRY_CLUSTER_MEMBERS, REGISTRY_CLUSTER_HASH_KEY   a Zot cluster
  MESH_COORDINATOR_URL           mesh coordinator; unset = no mesh
  MESH_AUTH_KEY                  join credential for the coordinator
  MESH_INTERFACE                 WireGuard interface (default tbf0)
  MESH_POLL_SECONDS              peer set refresh (default 30)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tabbify-registry",
        description="Private OCI registry front door (see the README).",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tabbify-registry {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="mesh bootstrap, backend config, supervisord (foreground)")
    sub.add_parser("config", help="print the rendered backend config")
    mesh = sub.add_parser(
        "mesh", help="mesh bootstrap only", description="Mesh commands (MESH_COORDINATOR_URL)."
    )
    mesh_commands = mesh.add_subparsers(dest="action", required=True)
    mesh_commands.add_parser(
        "up",
        help="join the mesh and bring its interface up, then exit",
        description="Join the mesh named by MESH_COORDINATOR_URL: register this node with the "
        "coordinator, bring the WireGuard interface up and print its address. `run` does this "
        "itself at start-up; this is the mesh step alone.",
    )
    policy_cmd.add_parser(sub)
    gc_cmd.add_parser(sub)
    devauth.add_parser(sub)
    args = parser.parse_args(argv)
    env = os.environ
    try:
        if args.command == "dev-auth":
            sys.exit(devauth.main(args))
        elif args.command == "policy":
            sys.exit(policy_cmd.main(env, args))
        elif args.command == "gc":
            # Acts on the running deployment: only with the settings it records.
            deployed = deployment.environment(env, required=True)
            sys.exit(gc_cmd.main(settings_mod.load(deployed), args))
        elif args.command == "run":
            sys.exit(run(env))
        elif args.command == "config":
            deployed = deployment.environment(env, required=False)
            print(json.dumps(printable_config(settings_mod.load(deployed)), indent=2))
        else:
            s = settings_mod.load(env)
            if s.mesh_coordinator_url is None:
                raise ConfigError("MESH_COORDINATOR_URL is not set: there is no mesh to bring up")
            print(bootstrap.up(s))
    except (ConfigError, MeshError, PolicyError, ValueError) as e:
        print(f"tabbify-registry: {e}", file=sys.stderr)
        sys.exit(2)
