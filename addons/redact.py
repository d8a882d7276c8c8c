"""What may leave a gateway worker about a flow: headers and targets with every credential
replaced. One definition for the debug capture (capture.py) and the live view (flowfeed.py).

Replaced by REDACTED: the value of every Authorization, Proxy-Authorization, Cookie and
Set-Cookie header, and anything shaped like a JWT (`eyJ…`) in any other header value or in the
request target. Bodies never leave at all (tokens, JWT forms and layers stay out).
"""

from __future__ import annotations

import re

REDACTED = "REDACTED"
SECRET_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*")
_JWT_BYTES = re.compile(JWT.pattern.encode())
_REDACTED_BYTES = REDACTED.encode()

Fields = tuple[tuple[bytes, bytes], ...]


def text(value: str) -> str:
    """A request target or header value with every JWT-shaped part replaced."""
    return JWT.sub(REDACTED, value) if "eyJ" in value else value


def fields(headers: Fields) -> Fields:
    """Header fields with every credential replaced. The common case (nothing to replace) is
    one scan that returns the same tuple: this runs for every flow the live view keeps."""
    for name, value in headers:
        if name.lower() in SECRET_HEADERS or b"eyJ" in value:
            break
    else:
        return headers
    return tuple(
        (name, _REDACTED_BYTES)
        if name.lower() in SECRET_HEADERS
        else (name, _JWT_BYTES.sub(_REDACTED_BYTES, value) if b"eyJ" in value else value)
        for name, value in headers
    )
