"""Every environment variable of contract §2, parsed once into a frozen Settings.

A value that cannot be honoured raises ConfigError naming the variable; nothing is silently
defaulted past a bad value. Pure: takes a mapping, returns a value, touches nothing.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from addons.config import nodes as nodes_mod
from addons.config.nodes import Nodes


class ConfigError(Exception):
    """A setting the registry refuses; str() is the one line printed on stderr."""


@dataclass(frozen=True)
class Address:
    host: str  # IPv6 without brackets
    port: int

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def is_wildcard(self) -> bool:
        """0.0.0.0 or [::]: every address of the host (a container behind a published port)."""
        return ipaddress.ip_address(self.host).is_unspecified

    @property
    def hostport(self) -> str:
        """host:port as it appears in a URL (IPv6 in brackets)."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    storage: str
    s3_bucket: str | None
    s3_region: str | None
    s3_endpoint: str | None
    auth_url: str | None
    listen: Address
    backend_addr: Address
    backend: str
    external_url: str
    admin_addr: Address
    mesh_coordinator_url: str | None
    mesh_auth_key: str | None
    mesh_interface: str
    mesh_poll_seconds: int
    policy_file: Path  # may not exist: then the default rule applies (contract §7)
    workers: int = 1
    header_timeout: int = 60
    idle_timeout: int = 75
    max_connections: int = 0  # 0: 4096 per worker, or what file descriptors allow
    max_client_connections: int = 256
    catalog_scan: int = 20_000  # names one catalog page looks at, at most
    cache_mb: int = 48  # MiB of content-addressed answers per gateway worker (0: no cache)
    max_client_pending: int = 32  # per source, connections without a complete request head
    gc_interval: int | None = None  # seconds between periodic GC runs; None: no periodic GC
    mirrors_file: Path | None = None  # REGISTRY_MIRRORS_FILE (addons/config/mirrors.py); None: none
    log_level: str = "info"  # the operator log's (stderr) threshold
    # Seconds after which an unfinished upload is purged by the backend and no longer counts
    # against its tenant's quota (REGISTRY_UPLOAD_MAX_AGE).
    upload_age: int = 3600
    # Derived from the mesh ULA (no REGISTRY_LISTEN / REGISTRY_EXTERNAL_URL): the gateway then
    # follows a ULA the coordinator moves the node to, without a restart.
    listen_from_mesh: bool = False
    external_url_derived: bool = True
    # Several nodes on one bucket (addons/config/nodes.py); the default is one node.
    nodes: Nodes = field(default_factory=Nodes)

    @property
    def anonymous(self) -> bool:
        return self.auth_url is None

    @property
    def realm(self) -> str:
        return f"{self.external_url}/auth/token"

    @property
    def runtime_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.runtime_dir / "logs"

    @property
    def state_dir(self) -> Path:
        """Where gateway workers publish their state for the admin endpoint."""
        return self.runtime_dir / "workers"


def parse_address(name: str, value: str) -> Address:
    """`host:port` with an IP literal host (IPv6 in brackets). Host names are refused: the
    gateway binds to exactly one address."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", value)
    if not m:
        raise ConfigError(f"{name}={value!r} is not an address (host:port, IPv6 in brackets)")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: {host!r} is not an IP address") from None
    if ip.version == 6 and not m.group(1):
        raise ConfigError(f"{name}={value!r}: IPv6 addresses go in brackets")
    if not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={value!r}: port out of range")
    return Address(str(ip), int(port))


def _url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}={value!r} is not an http(s) URL")
    return value.rstrip("/")


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not low <= number <= high:  # NaN fails both comparisons
        raise ConfigError(f"{name}={value!r}: expected a number from {low:g} to {high:g}")
    return number


def _opt(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def default_backend() -> str:
    return "zot" if shutil.which("zot") else "distribution"


def parse_data_dir(env: Mapping[str, str]) -> Path:
    path = Path(env.get("REGISTRY_DATA_DIR") or "/var/lib/tabbify-registry")
    if not path.is_absolute():
        raise ConfigError(f"REGISTRY_DATA_DIR={str(path)!r} must be an absolute path")
    return path


def parse_policy_file(env: Mapping[str, str]) -> Path:
    """REGISTRY_POLICY_FILE, absolute like REGISTRY_DATA_DIR: the gateway's working directory
    is not the operator's."""
    value = _opt(env, "REGISTRY_POLICY_FILE")
    if value is None:
        return parse_data_dir(env) / "policy.toml"
    if not Path(value).is_absolute():
        raise ConfigError(f"REGISTRY_POLICY_FILE={value!r} must be an absolute path")
    return Path(value)


_DURATION = re.compile(r"([0-9]{1,9})([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_mirrors_file(env: Mapping[str, str]) -> Path | None:
    """REGISTRY_MIRRORS_FILE: absolute, like REGISTRY_POLICY_FILE; its content is read by
    `run` (addons/config/mirrors.py), which refuses a bad file with its file:line."""
    value = _opt(env, "REGISTRY_MIRRORS_FILE")
    if value is None:
        return None
    if not Path(value).is_absolute():
        raise ConfigError(f"REGISTRY_MIRRORS_FILE={value!r} must be an absolute path")
    return Path(value)


def parse_gc_interval(env: Mapping[str, str]) -> int | None:
    """REGISTRY_GC_INTERVAL: a duration such as `30m`, `24h`, `7d` (the policy file's
    grammar), at least a minute; unset or empty: no periodic GC."""
    return _duration(env, "REGISTRY_GC_INTERVAL", 60, "a minute, such as '30m', '24h' or '7d'")


def _duration(env: Mapping[str, str], name: str, least: int, expected: str) -> int | None:
    """A duration variable (`30m`, `24h`, `7d`: the policy file's grammar) of at least
    `least` seconds, in seconds; None when unset. `expected` completes the refusal."""
    value = _opt(env, name)
    if value is None:
        return None
    m = _DURATION.fullmatch(value)
    seconds = int(m[1]) * _DURATION_UNITS[m[2]] if m else 0
    if seconds < least:
        raise ConfigError(f"{name}={value!r}: expected a duration of at least {expected}")
    return seconds


LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_log_level(env: Mapping[str, str]) -> str:
    """REGISTRY_LOG_LEVEL: the operator log's threshold; the access log is not affected."""
    value = _opt(env, "REGISTRY_LOG_LEVEL") or "info"
    if value not in LOG_LEVELS:
        raise ConfigError(f"REGISTRY_LOG_LEVEL={value!r}: expected {', '.join(LOG_LEVELS)}")
    return value


def parse_upload_age(env: Mapping[str, str]) -> int:
    """REGISTRY_UPLOAD_MAX_AGE: how long an unfinished upload lives (default `1h`), at least
    10 seconds; it must exceed the longest push (README, quotas)."""
    seconds = _duration(env, "REGISTRY_UPLOAD_MAX_AGE", 10, "10 seconds, such as '1h' or '30m'")
    return 3600 if seconds is None else seconds


def load(env: Mapping[str, str], ula: str | None = None) -> Settings:
    """Parse the environment. `ula` is the mesh address once the bootstrap has one."""
    data_dir = parse_data_dir(env)

    storage = env.get("REGISTRY_STORAGE") or "local"
    if storage not in ("local", "s3"):
        raise ConfigError(f"REGISTRY_STORAGE={storage!r}: expected 'local' or 's3'")
    bucket, region = _opt(env, "REGISTRY_S3_BUCKET"), _opt(env, "REGISTRY_S3_REGION")
    endpoint = _opt(env, "REGISTRY_S3_ENDPOINT")
    if storage == "s3":
        if not bucket:
            raise ConfigError("REGISTRY_S3_BUCKET is required with REGISTRY_STORAGE=s3")
        if not region:
            raise ConfigError("REGISTRY_S3_REGION is required with REGISTRY_STORAGE=s3")
        if endpoint:
            endpoint = _url("REGISTRY_S3_ENDPOINT", endpoint)

    auth_url = _opt(env, "REGISTRY_AUTH_URL")
    if auth_url:
        auth_url = _url("REGISTRY_AUTH_URL", auth_url)

    if listen_value := _opt(env, "REGISTRY_LISTEN"):
        listen = parse_address("REGISTRY_LISTEN", listen_value)
    elif ula:
        listen = Address(ula, 5000)
    else:
        listen = Address("127.0.0.1", 5000)
    if auth_url is None and not listen.is_loopback:
        raise ConfigError(
            f"REGISTRY_LISTEN={listen.hostport}: anonymous dev mode (no REGISTRY_AUTH_URL) "
            "listens on loopback only"
        )
    backend = env.get("REGISTRY_BACKEND") or default_backend()
    if backend not in ("zot", "distribution", "external"):
        raise ConfigError(
            f"REGISTRY_BACKEND={backend!r}: expected 'zot', 'distribution' or 'external'"
        )
    try:
        nodes = nodes_mod.parse(env, storage, bucket, region, backend)
    except nodes_mod.NodesError as e:
        raise ConfigError(str(e)) from None

    backend_addr = parse_address(
        "REGISTRY_BACKEND_ADDR", env.get("REGISTRY_BACKEND_ADDR") or "127.0.0.1:5001"
    )
    zot_cluster = backend == "zot" and nodes.several
    if zot_cluster and backend_addr.hostport not in nodes.cluster_members:
        # Zot members proxy each repository's requests to its owner at the member address.
        raise ConfigError(
            f"REGISTRY_BACKEND_ADDR={backend_addr.hostport}: in a Zot cluster, this node's "
            "own entry of REGISTRY_CLUSTER_MEMBERS (the other members connect to it there)"
        )
    if not backend_addr.is_loopback and not zot_cluster:
        raise ConfigError(f"REGISTRY_BACKEND_ADDR={backend_addr.hostport} must be loopback")
    if backend_addr == listen:
        raise ConfigError("REGISTRY_BACKEND_ADDR must differ from REGISTRY_LISTEN")

    bundle, cert_file = _opt(env, "AWS_CA_BUNDLE"), _opt(env, "SSL_CERT_FILE")
    if backend == "distribution" and storage == "s3" and bundle and cert_file not in (None, bundle):
        # Distribution reads its CA from SSL_CERT_FILE (distribution_env): two files, one slot.
        raise ConfigError(
            f"AWS_CA_BUNDLE={bundle} and SSL_CERT_FILE={cert_file} differ: Distribution reads "
            "one CA file; set one of them (a PEM file with every CA the backend must trust)"
        )

    # The token realm is built from the external URL, never from a request's Host. Listening
    # on every address (a container behind `-p 5000:5000`) without one, the realm names this
    # machine as its own clients reach it; `run`'s summary tells other machines' users to set it.
    default_url = (
        f"http://localhost:{listen.port}" if listen.is_wildcard else f"http://{listen.hostport}"
    )
    external_url = _url("REGISTRY_EXTERNAL_URL", env.get("REGISTRY_EXTERNAL_URL") or default_url)

    admin_addr = parse_address(
        "REGISTRY_ADMIN_ADDR", env.get("REGISTRY_ADMIN_ADDR") or "127.0.0.1:5002"
    )
    if not admin_addr.is_loopback:
        raise ConfigError(f"REGISTRY_ADMIN_ADDR={admin_addr.hostport} must be loopback")

    coordinator = _opt(env, "MESH_COORDINATOR_URL")
    if coordinator:
        coordinator = _url("MESH_COORDINATOR_URL", coordinator)
    interface = env.get("MESH_INTERFACE") or "tbf0"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", interface):
        raise ConfigError(f"MESH_INTERFACE={interface!r} is not a valid interface name")
    poll = env.get("MESH_POLL_SECONDS") or "30"
    if not re.fullmatch(r"[0-9]+", poll) or int(poll) < 1:
        raise ConfigError(f"MESH_POLL_SECONDS={poll!r}: expected a positive whole number")

    return Settings(
        data_dir=data_dir,
        storage=storage,
        s3_bucket=bucket,
        s3_region=region,
        s3_endpoint=endpoint,
        auth_url=auth_url,
        listen=listen,
        backend_addr=backend_addr,
        backend=backend,
        external_url=external_url,
        admin_addr=admin_addr,
        mesh_coordinator_url=coordinator,
        mesh_auth_key=_opt(env, "MESH_AUTH_KEY"),
        mesh_interface=interface,
        mesh_poll_seconds=int(poll),
        policy_file=parse_policy_file(env),
        workers=int(_number(env, "REGISTRY_WORKERS", os.cpu_count() or 1, 1, 64)),
        header_timeout=int(_number(env, "REGISTRY_HEADER_TIMEOUT", 60, 1, 3600)),
        idle_timeout=int(_number(env, "REGISTRY_IDLE_TIMEOUT", 75, 1, 3600)),
        max_connections=int(_number(env, "REGISTRY_MAX_CONNECTIONS", 0, 0, 10_000_000)),
        max_client_connections=int(
            _number(env, "REGISTRY_MAX_CLIENT_CONNECTIONS", 256, 1, 10_000_000)
        ),
        catalog_scan=int(_number(env, "REGISTRY_CATALOG_SCAN", 20_000, 10, 10_000_000)),
        cache_mb=int(_number(env, "REGISTRY_CACHE_MB", 48, 0, 4096)),
        max_client_pending=int(_number(env, "REGISTRY_MAX_CLIENT_PENDING", 32, 1, 10_000_000)),
        gc_interval=parse_gc_interval(env),
        mirrors_file=parse_mirrors_file(env),
        log_level=parse_log_level(env),
        upload_age=parse_upload_age(env),
        listen_from_mesh=listen_value is None and ula is not None,
        external_url_derived=not env.get("REGISTRY_EXTERNAL_URL"),
        nodes=nodes,
    )


def distribution_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment Distribution runs with (the backend, and gc's mark): REGISTRY_* removed
    (it reads them as config overrides), and an operator's AWS_CA_BUNDLE handed over as Go's
    own SSL_CERT_FILE. Distribution 2.8 wraps the AWS SDK's HTTP transport (to set its
    User-Agent) and the SDK (aws-sdk-go v1) loads a CA bundle only into an unwrapped one:
    every start panics ("LoadCustomCABundleError … transport unsupported type"). Go's
    crypto/x509 reads SSL_CERT_FILE instead of the system roots, so the bundle must hold
    every CA the backend needs (docs/deploying.md)."""
    child = {k: v for k, v in env.items() if not k.startswith("REGISTRY_")}
    bundle = child.pop("AWS_CA_BUNDLE", "").strip()
    if bundle:
        child["SSL_CERT_FILE"] = bundle
    return child


def version() -> str:
    """The installed distribution's version (pyproject.toml), not a copy kept in the code."""
    try:
        return importlib.metadata.version("tabbify-registry")
    except importlib.metadata.PackageNotFoundError:  # a checkout that is not installed
        return "unknown (not installed)"
