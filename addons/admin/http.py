"""HTTP for the admin endpoint: request heads, the answers' security headers, and the checks
that keep browsers on other sites out of a loopback port.

Loopback alone does not protect a port from the operator's own browser: any web page it opens
may send requests to 127.0.0.1 (cross-site requests), and a DNS name that an attacker points
at 127.0.0.1 after the page loaded (DNS rebinding) makes them same-origin for the browser. So
every request, to the view and to every API, must pass `Guard.refusal`:

- `Host` must name this endpoint: its own address or `localhost`, with its port. A rebound
  name (`evil.example:5002`) fails here.
- `Origin`, when present, must be `http://` + that same Host: no other site's script.
- `Sec-Fetch-Site`, when present, must be `same-origin` or `none` (typed, bookmarked): a
  browser says so of every request another site's page makes, navigations included.

and anything that changes state (POST, DELETE, …) must pass `Guard.state_change_refusal`:
either the page's CSRF token in `X-CSRF-Token` (a custom header: another site's page cannot
send it without a CORS preflight, which is never answered), or none of what a browser always
sends with a cross-site form or fetch: no `Origin`, no `Sec-Fetch-Site` other than `none`, and
no form-like `Content-Type` (a form can only send those three). `curl -X POST …` has none of
them, so the curl API stays as it was.

No answer ever carries a CORS header.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

MAX_FIELDS = 100
# Headers whose value decides a check: given twice, which one counts would be a guess.
SINGLE = frozenset({"host", "origin", "sec-fetch-site", "content-type", "x-csrf-token"})
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
SAFE_METHODS = frozenset({"GET", "HEAD"})

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'"
)
SECURITY_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)


class BadRequest(ValueError):
    pass


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; the first value of a repeated one

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def parse_head(head: bytes) -> Request:
    """A request head (up to and including the blank line). Raises BadRequest."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as e:
        raise BadRequest("request head is not ASCII") from e
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise BadRequest("malformed request line")
    method, target = parts[0], parts[1]
    headers: dict[str, str] = {}
    fields = [line for line in lines[1:] if line]
    if len(fields) > MAX_FIELDS:
        raise BadRequest("too many header fields")
    for line in fields:
        raw, colon, value = line.partition(":")
        if not colon or not raw or any(c in raw for c in " \t"):  # no folding, no spaces
            raise BadRequest("malformed header field")
        name = raw.lower()
        if name in headers and name in SINGLE:
            raise BadRequest(f"{name} given twice")
        headers.setdefault(name, value.strip())
    split = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(split.query).items()}
    return Request(method, target, split.path, query, headers)


def head(status: int, content_type: str, length: int | None, extra: dict[str, str]) -> bytes:
    """The response head: HTTP/1.0, one request per connection, the security headers always."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.0 {status} {phrase}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (*SECURITY_HEADERS, *extra.items())]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Guard:
    def __init__(self, listen: str, csrf_token: str) -> None:
        """`listen`: this endpoint's host:port (IPv6 in brackets), as settings give it."""
        host, _, port = listen.rpartition(":")
        self.hosts = {f"{host.lower()}:{port}", f"localhost:{port}"}
        self.csrf_token = csrf_token

    def refusal(self, request: Request) -> str | None:
        """Why this request may not be served at all (403), else None."""
        host = (request.header("host") or "").lower()
        if host not in self.hosts:
            return "Host must name this endpoint (" + " or ".join(sorted(self.hosts)) + ")"
        origin = request.header("origin")
        if origin is not None and origin.lower() != f"http://{host}":
            return "Origin is not this endpoint"
        site = request.header("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return "requests from other sites are refused"
        return None

    def state_change_refusal(self, request: Request) -> str | None:
        """Why this request may not change state (403), else None. Safe methods always may."""
        if request.method in SAFE_METHODS:
            return None
        token = request.header("x-csrf-token")
        if token is not None:
            if hmac.compare_digest(token.encode(), self.csrf_token.encode()):
                return None
            return "wrong CSRF token"
        content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if request.header("origin") is not None or request.header("sec-fetch-site") not in (
            None,
            "none",
        ):
            return "a browser must send the page's CSRF token (X-CSRF-Token)"
        if content_type in FORM_TYPES:
            return f"Content-Type {content_type} needs the CSRF token (X-CSRF-Token)"
        return None
