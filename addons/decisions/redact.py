"""What may leave a gateway worker about a flow: headers and targets with every credential
replaced. One definition for the debug capture (capture.py) and the live view (flowfeed.py).

Replaced by REDACTED: the value of every Authorization, Proxy-Authorization, Cookie and
Set-Cookie header, and anything shaped like a JWT (`eyJ…`) in any other header value or in the
request target. Bodies leave only for the live view, and only the few it shows (a manifest,
an error's JSON; see flowfeed.bodies), cut to their first bytes and with every JWT-shaped part
replaced (`body`); never a token answer, a form, a blob or anything streamed.
"""

from __future__ import annotations

import re
from itertools import chain

REDACTED = "REDACTED"
SECRET_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*")
_JWT_BYTES = re.compile(JWT.pattern.encode())
_REDACTED_BYTES = REDACTED.encode()

Fields = tuple[tuple[bytes, bytes], ...]


def text(value: str) -> str:
    """A request target or header value with every JWT-shaped part replaced."""
    return JWT.sub(REDACTED, value) if "eyJ" in value else value


def scan(headers: Fields) -> tuple[bool, int]:
    """(may hold a credential, bytes of names and values), in one pass done in C: header
    names and values joined, then substring searches. A false alarm (a value that happens to
    end in "cookie") only costs the exact pass of `fields`; a credential is never missed, since
    each secret header's name appears as `\0name\0` (lower-cased) in the joined bytes."""
    if not headers:
        return False, 0
    joined = b"\0" + b"\0".join(chain.from_iterable(headers)) + b"\0"
    lower = joined.lower()
    suspect = b"eyJ" in joined or b"authorization\0" in lower or b"cookie\0" in lower
    return suspect, len(joined) - len(headers) * 2 - 1


def fields(headers: Fields) -> Fields:
    """Header fields with every credential replaced; the same tuple when there is none (the
    common case allocates nothing: this runs for every flow the live view keeps)."""
    return replaced(headers) if scan(headers)[0] else headers


def replaced(headers: Fields) -> Fields:
    """The exact pass: every credential replaced (after `scan` found one may be there)."""
    return tuple(
        (name, _REDACTED_BYTES)
        if name.lower() in SECRET_HEADERS
        else (name, _JWT_BYTES.sub(_REDACTED_BYTES, value) if b"eyJ" in value else value)
        for name, value in headers
    )


def body(data: bytes, limit: int) -> tuple[str, bool]:
    """The first `limit` bytes of a body as text, every JWT-shaped part replaced, and whether
    it was cut. Cut first: a JWT cut in two keeps its dots up to the cut (the regex still
    finds it), and a bare `eyJ…` head without a dot is no token."""
    cut = len(data) > limit
    text_ = data[:limit].decode("utf-8", "replace")
    return (JWT.sub(REDACTED, text_) if "eyJ" in text_ else text_), cut
