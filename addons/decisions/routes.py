"""What a request path is, and whether a tenant may send it. Pure functions, no mitmproxy.

The raw path is checked exactly as the client sent it: anything outside the
distribution-spec grammar (`%`-escapes, `.`/`..` segments, `//`, upper case, unicode) is
refused, never cleaned, so the backend can only ever see a path we have fully understood.

How it is refused follows the distribution spec where the path is in the caller's own
namespace (a reference that cannot exist is 404 MANIFEST_UNKNOWN, as from a registry that
simply has no such thing), and is 403 DENIED anywhere else, whatever exists there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

# distribution-spec grammar (distribution/reference): lower-case components joined by '/'.
COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME = rf"{COMPONENT}(?:/{COMPONENT})*"
TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
DIGEST = r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}"
_DIGEST = re.compile(DIGEST)


def is_digest(value: str) -> bool:
    """A digest as the distribution spec's routes take it (sha256 or sha512, lower-case hex)."""
    return _DIGEST.fullmatch(value) is not None


UPLOAD_ID = r"[A-Za-z0-9][A-Za-z0-9_=-]{0,255}"  # UUIDs, base64url session ids; no dots

# Every method a route takes (and the token endpoint's GET/POST), exactly as RFC 9110 spells
# them: methods are case-sensitive, so `get` is none of them.
METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE"})

_COMPONENT_RE = re.compile(COMPONENT)
_NAME_RE = re.compile(NAME)

# (kind, tail pattern, methods). Order matters only for readability: tails do not overlap.
_ROUTES: list[tuple[str, re.Pattern[str], frozenset[str]]] = [
    ("blob", re.compile(rf"blobs/(?P<ref>{DIGEST})"), frozenset({"GET", "HEAD", "DELETE"})),
    ("upload", re.compile(r"blobs/uploads/"), frozenset({"POST"})),
    (
        "upload",
        re.compile(rf"blobs/uploads/(?P<ref>{UPLOAD_ID})"),
        frozenset({"GET", "PATCH", "PUT", "DELETE"}),
    ),
    (
        "manifest",
        re.compile(rf"manifests/(?P<ref>{TAG}|{DIGEST})"),
        frozenset({"GET", "HEAD", "PUT", "DELETE"}),
    ),
    ("tags", re.compile(r"tags/list"), frozenset({"GET", "HEAD"})),
    ("referrers", re.compile(rf"referrers/(?P<ref>{DIGEST})"), frozenset({"GET", "HEAD"})),
]
_REPO_PATH = re.compile(rf"/v2/(?P<name>{NAME})/(?P<tail>(?:blobs|manifests|tags|referrers)/.*)")


@dataclass(frozen=True)
class Route:
    kind: str  # base | catalog | blob | upload | manifest | tags | referrers
    name: str | None = None  # repository, e.g. "acme/app"
    reference: str | None = None  # tag, digest or upload id


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200
    code: str = ""
    reason: str = ""  # short, for the access log and the error message
    route: Route | None = None


# The reserved namespace of mirrored upstream registries (addons/config/mirrors.py): read-only for
# everybody, whatever the policy grants; no tenant is named after it.
MIRROR_PREFIX = "mirror/"
MIRROR_READ_ONLY = (
    "mirror/ is a read-only mirror of upstream registries: nobody pushes or deletes there"
)

ALLOW_BASE = Decision(True, route=Route("base"))

# May the caller do `action` (pull, push, delete) on a repository? Decision(True, reason=<the
# rule that allows it>) or the refusal. The gateway's comes from the access policy.
Rights = Callable[[str, str], Decision]

# The action each request needs on its repository (policy actions, contract §7).
_ACTIONS = {
    ("blob", "GET"): "pull", ("blob", "HEAD"): "pull", ("blob", "DELETE"): "delete",
    ("manifest", "GET"): "pull", ("manifest", "HEAD"): "pull",
    ("manifest", "PUT"): "push", ("manifest", "DELETE"): "delete",
    ("tags", "GET"): "pull", ("tags", "HEAD"): "pull",
    ("referrers", "GET"): "pull", ("referrers", "HEAD"): "pull",
}  # fmt: skip


def action(route: Route, method: str) -> str:
    """What `method` on `route` does to its repository: uploads are all `push`."""
    return "push" if route.kind == "upload" else _ACTIONS[(route.kind, method)]


def is_component(value: str) -> bool:
    """A valid single repository path component (what a tenant must be)."""
    return _COMPONENT_RE.fullmatch(value) is not None


def is_name(value: str) -> bool:
    return _NAME_RE.fullmatch(value) is not None


def owns(tenant: str | None, name: str) -> bool:
    """The tenant prefix is a whole segment: `acme` owns `acme/app`, not `acmex/app` or `acme`.
    No tenant (anonymous dev mode) owns everything."""
    return tenant is None or name.startswith(tenant + "/")


def owner_rights(tenant: str | None) -> Rights:
    """The default rule alone (no policy file): everything in the own namespace."""

    def rights(name: str, _action: str) -> Decision:
        return Decision(True, reason="owner") if owns(tenant, name) else foreign(tenant, name)

    return rights


def parse(path: str, method: str = "GET") -> Route | Decision:
    """Route for a raw /v2 path (no query), or the Decision refusing it."""
    if path in ("/v2/", "/v2", "/v2/_catalog"):
        kind = "catalog" if path.endswith("_catalog") else "base"
        if method not in ("GET", "HEAD"):
            return Decision(False, 405, "UNSUPPORTED", f"{method} not allowed on {path}")
        return Route(kind)
    m = _REPO_PATH.fullmatch(path)
    if m is None:
        return Decision(False, 403, "DENIED", "not a repository endpoint")
    tail = m["tail"]
    for kind, pattern, methods in _ROUTES:
        t = pattern.fullmatch(tail)
        if t is None:
            continue
        if method not in methods:
            return Decision(False, 405, "UNSUPPORTED", f"{method} not allowed on {kind}")
        return Route(kind, m["name"], t.groupdict().get("ref"))
    return Decision(False, 403, "DENIED", "not a repository endpoint")


def check(
    tenant: str | None, path: str, method: str = "GET", rights: Rights | None = None
) -> Decision:
    """May `tenant` (None = anonymous dev mode) send `method path`? `path` is raw, no query.
    `rights` decides on the repository (default: the owner rule); an allowed decision's
    `reason` names the rule that allowed it."""
    route = parse(path, method)
    if isinstance(route, Decision):
        if route.status == 405:  # a real endpoint, the wrong method
            return route
        return in_namespace(tenant, path, method) or route
    mirrored = route.name is not None and route.name.startswith(MIRROR_PREFIX)
    if mirrored and action(route, method) != "pull":
        return Decision(False, 403, "DENIED", MIRROR_READ_ONLY, route)
    if route.name is None or tenant is None:
        return Decision(True, route=route)
    decided = (rights or owner_rights(tenant))(route.name, action(route, method))
    return replace(decided, route=route)


def foreign(tenant: str | None, name: str, route: Route | None = None) -> Decision:
    if name == tenant:
        why = f"repositories of tenant {tenant} are named {tenant}/<name>, not {tenant}"
    else:
        why = f"repository outside namespace {tenant}/"
    return Decision(False, 403, "DENIED", why, route)


_KEYWORDS = ("manifests", "blobs", "tags", "referrers")
# What a malformed path in the caller's own namespace gets: (status, code, message) by
# endpoint, for reads (GET/HEAD/DELETE) and for writes. The registry has no such thing.
_CANNOT_EXIST = {
    "manifests": ((404, "MANIFEST_UNKNOWN", "manifest unknown"),
                  (400, "MANIFEST_INVALID", "invalid tag or digest")),
    "blobs": ((404, "BLOB_UNKNOWN", "blob unknown to registry"),
              (400, "DIGEST_INVALID", "invalid digest")),
    "uploads": ((404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry"),
                (404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry")),
    "referrers": ((400, "DIGEST_INVALID", "invalid digest"),
                  (400, "DIGEST_INVALID", "invalid digest")),
}  # fmt: skip


def in_namespace(tenant: str | None, path: str, method: str) -> Decision | None:
    """The refusal of a path outside the route table, as the spec wants it where the path is
    in the caller's own namespace: 404 for what cannot exist, 400 for what cannot be written.
    Elsewhere (another tenant's name, `/v2/_<extension>`) None: the caller's 403 stands."""
    segments = path.removeprefix("/v2/").split("/")
    if not path.startswith("/v2/") or not segments[0] or segments[0].startswith("_"):
        return None
    at = next((i for i in range(len(segments) - 1, 0, -1) if segments[i] in _KEYWORDS), None)
    name = "/".join(segments[:at] if at else segments)
    if tenant is not None and not name.startswith(tenant + "/"):
        return foreign(tenant, name) if name.split("/")[0] == tenant else None
    write = method in ("PUT", "POST", "PATCH")
    if not is_name(name):
        if write:
            return Decision(False, 400, "NAME_INVALID", "invalid repository name")
        return Decision(False, 404, "NAME_UNKNOWN", "repository name not known to registry")
    endpoint = segments[at] if at else ""
    if endpoint == "blobs" and at + 1 < len(segments) and segments[at + 1] == "uploads":
        endpoint = "uploads"
    if endpoint not in _CANNOT_EXIST:
        return Decision(False, 404, "NOT_FOUND", "no such registry endpoint")
    status, code, message = _CANNOT_EXIST[endpoint][write]
    return Decision(False, status, code, message)


# --- query parameters ---------------------------------------------------------------------------

# Distribution's upload state (`_state`): URL-safe base64 of an HMAC'd blob; Zot has none.
STATE = r"[A-Za-z0-9_=-]{1,4096}"
# A media type as RFC 6838 restricts its names (referrers' artifactType filter).
MEDIA_TYPE = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
PAGE_SIZE = r"[0-9]{1,6}"
# The catalog's sealed continuation (listing.CatalogCursor): base64url after an upper-case
# `C`, so it can never be a repository name (names are lower-case).
CURSOR = r"C[A-Za-z0-9_-]{38,2048}"

# The parameters each route takes, with the grammar of their values. Anything else a client
# adds is dropped: the backend never sees a parameter the gateway did not read.
_PARAMS: dict[tuple[str, str], dict[str, str]] = {
    ("upload", "POST"): {"digest": DIGEST, "mount": DIGEST, "from": NAME},
    ("upload", "PUT"): {"digest": DIGEST, "_state": STATE},
    ("upload", "PATCH"): {"_state": STATE},
    ("upload", "GET"): {"_state": STATE},
    ("upload", "DELETE"): {"_state": STATE},
    ("tags", "GET"): {"n": PAGE_SIZE, "last": TAG},
    ("tags", "HEAD"): {"n": PAGE_SIZE, "last": TAG},
    ("catalog", "GET"): {"n": PAGE_SIZE, "last": f"(?:{NAME})|(?:{CURSOR})"},
    ("catalog", "HEAD"): {"n": PAGE_SIZE, "last": f"(?:{NAME})|(?:{CURSOR})"},
    ("referrers", "GET"): {"artifactType": MEDIA_TYPE},
    ("referrers", "HEAD"): {"artifactType": MEDIA_TYPE},
}
_PARAM_RES = {
    route: {key: re.compile(grammar) for key, grammar in keys.items()}
    for route, keys in _PARAMS.items()
}
_PARAM_CODE = {"digest": "DIGEST_INVALID", "n": "PAGINATION_NUMBER_INVALID"}


@dataclass(frozen=True)
class Params:
    """The parameters forwarded to the backend, or the refusal of the request."""

    values: dict[str, str]
    refusal: Decision | None = None
    note: str | None = None  # why a parameter was dropped (access log)


def decide_params(
    tenant: str | None,
    route: Route,
    method: str,
    received: tuple[tuple[str, str], ...],
    rights: Rights | None = None,
) -> Params:
    """Keep the route's own parameters, each exactly once and in its grammar.

    A repeated parameter is refused (parsers disagree on which one counts). A mount whose
    source the caller may not pull (`rights`, default the owner rule), or that is malformed,
    is dropped: the upload then starts as a plain one (202), which every client handles,
    where a 403 would abort a containerd push.
    """
    grammar = _PARAM_RES.get((route.kind, method), {})
    values: dict[str, str] = {}
    for key, value in received:
        if key not in grammar:
            continue
        if key in values:
            return Params({}, _bad_param(key, f"query parameter {key!r} given more than once"))
        values[key] = value
    for key, value in values.items():
        if key not in ("mount", "from") and not grammar[key].fullmatch(value):
            return Params({}, _bad_param(key, f"invalid query parameter {key!r}"))
    if "mount" not in values and "from" not in values:
        return Params(values)
    mount, source = values.get("mount", ""), values.get("from", "")
    # Never from a mirror: mirrored content lives in its own store (Distribution) or is
    # nobody's in the isolation ledger (Zot); a plain upload of the bytes is what is safe.
    readable = (
        is_name(source)
        and not source.startswith(MIRROR_PREFIX)
        and (tenant is None or (rights or owner_rights(tenant))(source, "pull").allowed)
    )
    if grammar["mount"].fullmatch(mount) and readable:
        return Params(values)
    kept = {k: v for k, v in values.items() if k not in ("mount", "from")}
    return Params(kept, note="mount dropped")


def _bad_param(key: str, message: str) -> Decision:
    return Decision(False, 400, _PARAM_CODE.get(key, "UNSUPPORTED"), message)
