"""Read-only mirrors of upstream registries (REGISTRY_MIRRORS_FILE): the file, and the names.

Mirrored content appears under the reserved namespace `mirror/<name>/<repository>`. No tenant
can be named `mirror` (the token endpoint and the policy refuse it), nobody pushes or deletes
there (routes.py, policy/evaluate.py), and who may pull is the access policy's. Pure: no mitmproxy.

    [[mirror]]
    name = "docker.io"                  # one repository path component (dots allowed)
    url = "https://registry-1.docker.io"
    credentials_file = "/run/secrets/hub" # optional: one line `user:token`; never logged
    tag_ttl = "10m"                     # how long a tag is served before it is re-checked

A file that does not parse stops start-up with one line `<file>:<line>: <what is wrong>`.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from addons.decisions.routes import COMPONENT

NAMESPACE = "mirror"  # the reserved first segment
PREFIX = NAMESPACE + "/"
KEYS = ("name", "url", "credentials_file", "tag_ttl")
DEFAULT_TAG_TTL = 600
_COMPONENT_RE = re.compile(COMPONENT)
_DURATION = re.compile(r"([0-9]{1,9})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class MirrorError(ValueError):
    """A mirrors file the registry refuses; str() is `<file>:<line>: <what>`."""


@dataclass(frozen=True)
class Mirror:
    name: str
    url: str  # scheme://host[:port], no path
    credentials_file: Path | None
    tag_ttl: int  # seconds
    line: int

    @property
    def host(self) -> str:
        """host[:port] of the upstream (the key of Zot's credentials file)."""
        return urlsplit(self.url).netloc


def is_mirror(repository: str) -> bool:
    return repository.startswith(PREFIX)


def split(repository: str) -> tuple[str, str] | None:
    """`mirror/<name>/<repository>` → (name, repository upstream); None when not that shape."""
    if not is_mirror(repository):
        return None
    name, _, rest = repository[len(PREFIX) :].partition("/")
    return (name, rest) if name and rest else None


def _line_of(text: str, index: int) -> int:
    """The line of the index-th `[[mirror]]` header (1-based), else 1."""
    headers = [
        i + 1 for i, ln in enumerate(text.splitlines()) if re.match(r"\s*\[\[\s*mirror\s*\]\]", ln)
    ]
    return headers[index] if index < len(headers) else 1


def _key_line(text: str, table_line: int, key: str) -> int:
    lines = text.splitlines()
    for i in range(table_line, len(lines)):
        if re.match(r"\s*\[", lines[i]):
            break
        if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return table_line


def parse_duration(value: object) -> int | None:
    m = _DURATION.fullmatch(value) if isinstance(value, str) else None
    return int(m[1]) * _UNITS[m[2]] if m and int(m[1]) > 0 else None


def parse(text: str, source: str) -> list[Mirror]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = re.search(r" \(at line (\d+), column \d+\)$", message)
        line = int(m[1]) if m else max(1, len(text.rstrip().split("\n")))
        message = message[: m.start()] if m else re.sub(r" \(at end of document\)$", "", message)
        raise MirrorError(f"{source}:{line}: invalid TOML: {message}") from None
    for key, value in data.items():
        if key != "mirror" or not isinstance(value, list):
            line = next((i + 1 for i, ln in enumerate(text.splitlines()) if key in ln), 1)
            raise MirrorError(f"{source}:{line}: unknown key {key!r} (expected [[mirror]] tables)")
    mirrors: list[Mirror] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(data.get("mirror", [])):
        line = _line_of(text, index)

        def fail(key: str | None, message: str, line: int = line) -> MirrorError:
            at = _key_line(text, line, key) if key else line
            return MirrorError(f"{source}:{at}: [[mirror]] {message}")

        if not isinstance(table, dict):
            raise fail(None, "must be a table")
        for key in table:
            if key not in KEYS:
                raise fail(key, f"unknown key {key!r} (expected {', '.join(KEYS)})")
        name = table.get("name")
        if not isinstance(name, str) or not _COMPONENT_RE.fullmatch(name):
            raise fail("name", "'name' must be one repository path component, e.g. 'docker.io'")
        if name in seen:
            raise fail("name", f"name {name!r} already used at line {seen[name]}")
        url = table.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.username is not None
            or parts.password is not None
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise fail("url", "'url' must be http(s)://host[:port] (no path, no credentials)")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise fail("url", "'url' has an invalid port") from None
        creds = table.get("credentials_file")
        if creds is not None and (not isinstance(creds, str) or not Path(creds).is_absolute()):
            raise fail("credentials_file", "'credentials_file' must be an absolute path")
        ttl = parse_duration(table.get("tag_ttl", "10m"))
        if ttl is None:
            raise fail("tag_ttl", "'tag_ttl' must be a duration such as '30s', '10m', '1h'")
        seen[name] = line
        mirrors.append(
            Mirror(
                name, f"{parts.scheme}://{parts.netloc}", Path(creds) if creds else None, ttl, line
            )
        )
    return mirrors


def load(path: Path) -> list[Mirror]:
    """The mirrors of `path`, their credentials files checked (MirrorError, file:line)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MirrorError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MirrorError(f"{path}:{raw.count(b'\n', 0, e.start) + 1}: not UTF-8") from None
    mirrors = parse(text, str(path))
    for m in mirrors:
        if m.credentials_file is not None:
            try:
                read_credentials(m.credentials_file)
            except MirrorError as e:
                line = _key_line(text, m.line, "credentials_file")
                raise MirrorError(f"{path}:{line}: [[mirror]] {m.name}: {e}") from None
    return mirrors


def read_credentials(path: Path) -> tuple[str, str]:
    """(user, token) from a file of one line `user:token`. The message never quotes it."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MirrorError(
            f"credentials_file {path}: cannot read ({getattr(e, 'strerror', e)})"
        ) from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    user, colon, token = (lines[0].strip() if len(lines) == 1 else "").partition(":")
    if not colon or not user or not token or any(c.isspace() for c in user + token):
        raise MirrorError(f"credentials_file {path}: expected one line `user:token`")
    return user, token


# The gateway process's own: name -> "host:port" (a Distribution proxy instance) or "" (the
# backend itself: Zot). Set by addons/gateway/mirror.py (MirrorGate) from `registry_mirrors`.
ROUTES: dict[str, str] = {}
TAG_TTLS: dict[str, int] = {}  # name -> tag_ttl seconds


def resolve(repository: str) -> tuple[str | None, str] | None:
    """Where a mirrored repository is read: (base URL, or None for the backend; repository
    name there). None when `repository` is not under a configured mirror."""
    found = split(repository)
    if found is None or found[0] not in ROUTES:
        return None
    addr = ROUTES[found[0]]
    return (f"http://{addr}", found[1]) if addr else (None, repository)


def forward_target(repository: str, path: str) -> tuple[str | None, str]:
    """(host:port of the mirror's instance or None for the backend, the path it gets) for a
    request path of `repository` (a configured mirror: else ValueError)."""
    found = split(repository)
    addr = ROUTES.get(found[0]) if found else None
    if found is None or addr is None:
        raise ValueError(f"{repository}: not a configured mirror")
    if not addr:
        return None, path  # Zot: the backend serves /v2/mirror/<name>/… itself
    prefix = f"/v2/{PREFIX}{found[0]}/"
    if not path.startswith(prefix):
        raise ValueError(f"{path}: not a path of {repository}")
    return addr, "/v2/" + path[len(prefix) :]


def routes_option(targets: dict[str, tuple[str, int]]) -> str:
    """The gateway's `registry_mirrors`: JSON {name: ["host:port", tag_ttl]}: where each mirror
    is served (a Distribution proxy instance, or "" for Zot: the backend itself, path
    unchanged) and its tag_ttl in seconds."""
    return json.dumps({k: list(v) for k, v in targets.items()}, sort_keys=True)


def parse_routes_option(value: str) -> dict[str, tuple[str, int]]:
    if not value:
        return {}
    try:
        routes = json.loads(value)
        parsed = {k: (str(v[0]), int(v[1])) for k, v in routes.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        parsed = None
    if parsed is None or not all(_COMPONENT_RE.fullmatch(k) for k in parsed):
        raise ValueError("registry_mirrors: expected JSON {name: ['host:port' or '', tag_ttl]}")
    return parsed
