"""What supervisord runs, and how: the command line and environment of each program (the
backend, the gateway workers, the admin program, the mirrors, gc), and the files they are
given (backend config, backend credential, mirror configs).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from addons.clients import backend_credential
from addons.config import mirrors, nodes
from addons.config.settings import ConfigError, Settings
from addons.gateway import policy_store
from addons.runstate import write_atomic
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
