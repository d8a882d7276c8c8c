"""Settings for several registry nodes on one bucket (contract §2, §9), and the rules that
refuse a configuration which would split state between them.

Every node runs its own gateway and backend; what they must share, and where it lives then:

- images: one S3 bucket (REGISTRY_STORAGE=s3), never local disk;
- the isolation ledger: REGISTRY_LEDGER_URL=s3://… or postgresql://…, not SQLite in the
  data dir;
- Zot's dedupe cache: REGISTRY_CACHE_URL=redis://…, not boltdb in the data dir;
- which Zot owns a repository: REGISTRY_CLUSTER_MEMBERS + REGISTRY_CLUSTER_HASH_KEY;
- Distribution's upload-state secret: REGISTRY_HTTP_SECRET_FILE, not one per data dir;
- Zot's backend credential: REGISTRY_BACKEND_CREDENTIAL_FILE, not one per run (members
  forward requests to each other with it);
- the registry-token key: per run (clients log in again when they move), or
  REGISTRY_TOKEN_KEY_FILE for tokens every node accepts.

"Several nodes" is declared by REGISTRY_CLUSTER_MEMBERS (two or more `host:port`: the backend
of each node as the others reach it, Zot's `cluster.members`). Pure: reads a mapping only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

# Zot's and Distribution's key prefix in the bucket (zot/config.py S3_PREFIX, without "/").
STORAGE_PREFIX = "zot"
HASH_KEY_LENGTH = 16  # Zot: siphash needs a 128-bit key, given as 16 characters
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_MEMBER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")
_DATABASE = re.compile(r"[A-Za-z0-9_.-]{1,63}")
# libpq parameters a PostgreSQL ledger URL may carry: TLS and naming, nothing that changes
# what the statements do (`options` is the ledger's own: its statement timeout).
PG_PARAMETERS = frozenset(
    {"sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "target_session_attrs"}
)


class NodesError(ValueError):
    """A several-nodes setting that is refused; str() names the variable."""


@dataclass(frozen=True)
class Nodes:
    ledger_url: str | None = None  # s3://bucket/prefix, postgresql://…; None = SQLite
    # A password given in a postgresql:// URL, kept out of `ledger_url` and out of repr().
    ledger_password: str | None = field(default=None, repr=False)
    token_key_file: Path | None = None
    http_secret_file: Path | None = None
    # The backend's credential (`user:password`) instead of one made per run: the same on
    # every Zot member, which forward each other's requests with the credential they got.
    backend_credential_file: Path | None = None
    cluster_members: tuple[str, ...] = ()
    cluster_hash_key: str | None = None
    cache_url: str | None = None  # Zot's remote dedupe cache (Redis)

    @property
    def several(self) -> bool:
        return len(self.cluster_members) >= 2

    @property
    def ledger_in_s3(self) -> bool:
        return bool(self.ledger_url and self.ledger_url.startswith("s3://"))

    @property
    def ledger_bucket(self) -> str | None:
        return urlsplit(self.ledger_url).netloc if self.ledger_in_s3 and self.ledger_url else None

    @property
    def ledger_prefix(self) -> str:
        return urlsplit(self.ledger_url).path.strip("/") if self.ledger_url else ""


def _absolute(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    if not Path(value).is_absolute():
        raise NodesError(f"{name}={value!r} must be an absolute path")
    return Path(value)


def shown(value: str) -> str:
    """A URL as error messages may print it: without user information (a password)."""
    parts = urlsplit(value)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def parse_pg_url(value: str) -> tuple[str, str | None]:
    """postgresql://[user[:password]@]host[:port]/database[?sslmode=…], one host: the URL
    without its password, and the password. The URL goes on the gateway's command line, so
    the password travels apart (PGPASSWORD in the programs' environment, which libpq reads,
    as it reads PGPASSFILE)."""
    parts = urlsplit(value)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - a port that is no number in 0-65535 raises ValueError
    except ValueError:
        raise NodesError(f"REGISTRY_LEDGER_URL: {hostport!r} is not host[:port]") from None
    if not host or "," in hostport or parts.fragment or (userinfo and not user):
        raise NodesError(
            "REGISTRY_LEDGER_URL: expected postgresql://[user[:password]@]host[:port]/database "
            "(one host)"
        )
    database = parts.path.removeprefix("/")
    if not _DATABASE.fullmatch(database):
        raise NodesError(f"REGISTRY_LEDGER_URL: {database!r} is not a database name")
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise NodesError("REGISTRY_LEDGER_URL: its query is malformed") from None
    unknown = sorted({k for k, _ in query} - PG_PARAMETERS)
    if unknown:
        raise NodesError(
            f"REGISTRY_LEDGER_URL: parameter {unknown[0]!r} is not taken (only "
            f"{', '.join(sorted(PG_PARAMETERS))})"
        )
    netloc = f"{user}@{hostport}" if user else hostport
    url = f"postgresql://{netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    return url, (unquote(password) if colon else None)


def parse_ledger_url(value: str, storage_bucket: str | None) -> tuple[str, str | None]:
    """The ledger URL (never with a password in it), and a PostgreSQL password if it had one."""
    parts = urlsplit(value)
    if parts.scheme in ("postgresql", "postgres"):
        return parse_pg_url(value)
    if parts.scheme != "s3":
        raise NodesError(
            f"REGISTRY_LEDGER_URL={shown(value)!r}: expected s3://<bucket>/<prefix> or "
            "postgresql://[user[:password]@]host[:port]/database"
        )
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise NodesError(
            f"REGISTRY_LEDGER_URL={shown(value)!r}: only s3://<bucket>/<prefix> (no credentials, "
            "no query: region and endpoint are REGISTRY_S3_REGION and REGISTRY_S3_ENDPOINT)"
        )
    if not _BUCKET.fullmatch(parts.netloc):
        raise NodesError(f"REGISTRY_LEDGER_URL={value!r}: {parts.netloc!r} is not a bucket name")
    prefix = parts.path.strip("/")
    if not prefix or not _PREFIX.fullmatch(prefix) or ".." in prefix.split("/"):
        raise NodesError(
            f"REGISTRY_LEDGER_URL={value!r}: give a prefix of its own (s3://<bucket>/<prefix>, "
            "letters, digits, . _ - and /)"
        )
    top = prefix.split("/")[0]
    if parts.netloc == storage_bucket and top == STORAGE_PREFIX:
        raise NodesError(
            f"REGISTRY_LEDGER_URL={value!r}: the prefix {STORAGE_PREFIX}/ of the bucket is the "
            "backend's storage; choose another"
        )
    return f"s3://{parts.netloc}/{prefix}", None


def parse_members(value: str) -> tuple[str, ...]:
    members = tuple(m.strip() for m in value.split(",") if m.strip())
    for m in members:
        match = _MEMBER.fullmatch(m)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise NodesError(f"REGISTRY_CLUSTER_MEMBERS: {m!r} is not host:port (IPv6 in brackets)")
    if len(set(members)) != len(members):
        raise NodesError("REGISTRY_CLUSTER_MEMBERS lists a member twice")
    if len(members) == 1:
        raise NodesError(
            "REGISTRY_CLUSTER_MEMBERS: one member is no cluster; list every node, or unset it"
        )
    return members


def parse(
    env: Mapping[str, str], storage: str, bucket: str | None, region: str | None, backend: str
) -> Nodes:
    """The several-nodes settings, and the refusal of anything that would split state."""
    ledger_value = env.get("REGISTRY_LEDGER_URL", "").strip()
    ledger_url, ledger_password = (
        parse_ledger_url(ledger_value, bucket) if ledger_value else (None, None)
    )
    if ledger_url and ledger_url.startswith("s3://") and not region:
        raise NodesError("REGISTRY_LEDGER_URL=s3://… needs REGISTRY_S3_REGION (request signing)")

    members = parse_members(env.get("REGISTRY_CLUSTER_MEMBERS", ""))
    hash_key = env.get("REGISTRY_CLUSTER_HASH_KEY", "").strip() or None
    if hash_key is not None and len(hash_key) != HASH_KEY_LENGTH:
        raise NodesError(
            f"REGISTRY_CLUSTER_HASH_KEY: exactly {HASH_KEY_LENGTH} characters (Zot's siphash key)"
        )
    cache_url = env.get("REGISTRY_CACHE_URL", "").strip() or None
    if cache_url is not None and urlsplit(cache_url).scheme not in ("redis", "rediss"):
        raise NodesError("REGISTRY_CACHE_URL: expected redis://… or rediss://… (Zot's cache)")

    nodes = Nodes(
        ledger_url=ledger_url,
        ledger_password=ledger_password,
        token_key_file=_absolute(env, "REGISTRY_TOKEN_KEY_FILE"),
        http_secret_file=_absolute(env, "REGISTRY_HTTP_SECRET_FILE"),
        backend_credential_file=_absolute(env, "REGISTRY_BACKEND_CREDENTIAL_FILE"),
        cluster_members=members,
        cluster_hash_key=hash_key,
        cache_url=cache_url,
    )
    if nodes.several:
        refuse_split_state(nodes, storage, backend)
    return nodes


def refuse_split_state(nodes: Nodes, storage: str, backend: str) -> None:
    """Several nodes declared: every piece of state must be one every node sees."""
    if storage != "s3":
        raise NodesError(
            "REGISTRY_CLUSTER_MEMBERS: several nodes need REGISTRY_STORAGE=s3 (one bucket); "
            "on local storage each node would hold other images"
        )
    if nodes.ledger_url is None:
        raise NodesError(
            "REGISTRY_CLUSTER_MEMBERS: several nodes need a shared ledger, REGISTRY_LEDGER_URL="
            "s3://<bucket>/<prefix> or postgresql://…; with each node's own SQLite ledger a "
            "tenant's push through one node would be unknown (404) on the others"
        )
    if backend == "zot":
        if len({m.rsplit(":", 1)[1] for m in nodes.cluster_members}) > 1:
            # Zot finds itself among the members by its own addresses and its one http.port.
            raise NodesError("REGISTRY_CLUSTER_MEMBERS: every Zot member must use the same port")
        if nodes.cache_url is None:
            raise NodesError(
                "REGISTRY_CLUSTER_MEMBERS: Zot on several nodes needs a shared dedupe cache, "
                "REGISTRY_CACHE_URL=redis://…; each node's own boltdb cache would split it"
            )
        if nodes.cluster_hash_key is None:
            raise NodesError(
                "REGISTRY_CLUSTER_MEMBERS: Zot on several nodes needs REGISTRY_CLUSTER_HASH_KEY "
                f"({HASH_KEY_LENGTH} characters, the same on every node)"
            )
        if nodes.backend_credential_file is None:
            # A member forwards a request for a repository it does not own with the
            # Authorization header it got: each node's own per-run credential would be refused.
            raise NodesError(
                "REGISTRY_CLUSTER_MEMBERS: Zot on several nodes needs one backend credential, "
                "REGISTRY_BACKEND_CREDENTIAL_FILE (one line `user:password`, the same file "
                "content on every node)"
            )
    if backend == "distribution" and nodes.http_secret_file is None:
        raise NodesError(
            "REGISTRY_CLUSTER_MEMBERS: Distribution on several nodes needs one upload secret, "
            "REGISTRY_HTTP_SECRET_FILE (the same file content on every node); with each "
            "node's own, an upload started on one node fails on another"
        )


def read_http_secret(path: Path) -> str:
    """The shared upload-state secret: the file's first line, at least 32 characters."""
    try:
        text = path.read_text()
    except OSError as e:
        raise NodesError(f"REGISTRY_HTTP_SECRET_FILE={path}: {e.strerror}") from None
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(secret) < 32:
        raise NodesError(f"REGISTRY_HTTP_SECRET_FILE={path}: at least 32 characters expected")
    return secret
