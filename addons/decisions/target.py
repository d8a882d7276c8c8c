"""The request target, read once and strictly; the backend gets it back in canonical form.

The gateway decides on its own parse of the target and must never forward bytes that another
parser (Go's net/url in the backend) reads differently: `#` (Go keeps it inside the raw
query, Python stops there), `;` (a query separator for older Go), a literal `+` (a space in
form decoding, a plus elsewhere), percent-escapes in the path, bytes outside RFC 3986. Such
targets are refused here; everything else is re-encoded from the parse (`canonical`), so
what the backend receives is exactly what the gateway decided on. Pure, no mitmproxy.

Grammar of what passes (origin-form; absolute-form is reduced to its path and query):

    target = path [ "?" query ]
    path   = "/" *( ALPHA / DIGIT / "-" / "." / "_" / "~" / "/" / ":" / "=" )
    query  = [ pair *( "&" pair ) ]
    pair   = key [ "=" value ]
    key    = 1*qchar          value = *qchar    (each decoded once: percent-escapes only)
    qchar  = ALPHA / DIGIT / "-" / "." / "_" / "~" / "/" / ":" / "," / "@" / "!" / "$"
             / "'" / "(" / ")" / "*" / pct-encoded
    pct-encoded = "%" HEXDIG HEXDIG   (decoded bytes must be UTF-8)

Which keys a route takes, and the grammar of their values, is routes.py's business.

One exception: the token endpoint's query is answered by the gateway and never forwarded, so
there (`form=True`) a `+` is taken as a space, as clients that encode with Go's url.Values
send several scopes in one `scope` value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

MAX_TARGET = 16 * 1024  # Go's default header limit is 1 MiB; no registry URL is near 16 KiB
_PATH = re.compile(r"/[A-Za-z0-9\-._~/:=]*")
_QUERY_CHARS = re.compile(r"[A-Za-z0-9\-._~/:,@!$'()*%&=]*")
_FORM_QUERY_CHARS = re.compile(r"[A-Za-z0-9\-._~/:,@!$'()*%&=+]*")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# What `canonical` leaves unescaped in values: unreserved plus `/` and `:` (names, digests).
_SAFE = "-._~/:"


class TargetError(ValueError):
    """A request target the gateway will not forward: 400, never a guess."""


@dataclass(frozen=True)
class Target:
    path: str
    params: tuple[tuple[str, str], ...]  # decoded, in the order the client sent them

    def get_all(self, key: str) -> list[str]:
        return [v for k, v in self.params if k == key]


def _decode(component: str, form: bool = False) -> str:
    if form:
        component = component.replace("+", " ")
    if _BAD_ESCAPE.search(component):
        raise TargetError("malformed percent-escape in the query")
    raw = _ESCAPE.sub(lambda m: chr(int(m[1], 16)), component).encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TargetError("query parameter is not UTF-8") from None


def parse(raw: bytes, form: bool = False) -> Target:
    """Parse a raw origin-form target (`path?query`); `form`: `+` is a space (a query the
    gateway answers itself, never forwarded). Raises TargetError."""
    if len(raw) > MAX_TARGET:
        raise TargetError("request target too long")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise TargetError("request target is not ASCII") from None
    path, sep, query = text.partition("?")
    if not _PATH.fullmatch(path):
        raise TargetError("request path has characters outside the registry grammar")
    if not sep or not query:
        return Target(path, ())
    if not (_FORM_QUERY_CHARS if form else _QUERY_CHARS).fullmatch(query):
        raise TargetError("request query has characters that parsers read differently")
    params = []
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if not key:
            raise TargetError("empty query parameter")
        params.append((_decode(key, form), _decode(value, form)))
    return Target(path, tuple(params))


def canonical(path: str, params: dict[str, str] | None = None) -> str:
    """The target the backend receives: the decided path and parameters, re-encoded."""
    if not params:
        return path
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe=_SAFE)}" for k, v in params.items())
    return f"{path}?{query}"
