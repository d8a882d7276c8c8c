"""What a request head and a chunked body must look like before the gateway reads further.

Pure functions, used by the engine patches (hardening.py) on the bytes mitmproxy and h11
buffer, and tested alone (tests/unit/test_connections.py).
"""

from __future__ import annotations

import re

from mitmproxy import http

MAX_HEAD = 1 << 20  # as Go's http.DefaultMaxHeaderBytes
MAX_HEADERS = 100  # registry clients send fewer than 20
MAX_CHUNK_LINE = 64 * 1024  # a chunk-size line (with extensions) or the trailer section

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than HTAB
# RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF, chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS
# ( token / quoted-string ) ] ), without the BWS before ";" (h11 refuses it too). At most 16
# hex digits, as Go's chunked reader (64 bits).
_EXT_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"[0-9A-Fa-f]{1,16}(?:;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*\r\n"
    % (_EXT_TOKEN, _EXT_TOKEN, _QUOTED)
)
_SIZE_PREFIX = re.compile(rb"[0-9A-Fa-f]{1,16}(?:[;\r]|\Z)")  # what may start a chunk line
_BAD_LINE_END = re.compile(rb"(?<!\r)\n|\r(?!\n)")  # a bare LF or CR


def head_problem(request: http.Request) -> tuple[int, str] | None:
    """Why a parsed request head must not go further (status, message), or None."""
    fields = request.headers.fields
    if len(fields) > MAX_HEADERS:
        return 431, f"more than {MAX_HEADERS} header fields"
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            return 400, "invalid header field name"
        if _BAD_VALUE.search(value):
            return 400, "invalid header field value (control character or line folding)"
    return None


def chunk_framing_problem(data: bytes | bytearray, trailer: bool, start: int = 0) -> str | None:
    """What is wrong with the buffered start of a chunk-size line (or of the trailer section),
    or None while it is (the beginning of) a valid one. Pure; reads at most MAX_CHUNK_LINE
    bytes of `data` and copies none. `start`: how much of `data` an earlier call found clean
    (a line dribbled byte by byte is scanned once, not once per byte)."""
    limit = min(len(data), MAX_CHUNK_LINE)
    again = max(0, start - 1)  # the byte before may have been a CR waiting for its LF
    if trailer:
        if data[:2] == b"\r\n":
            return None  # no trailer fields
        end = data.find(b"\r\n\r\n", again, limit + 4)
        stop = end + 4 if end >= 0 else limit - (data[limit - 1 : limit] == b"\r")
        bad = _BAD_LINE_END.search(data, again, stop)
        return "bare CR or LF in the trailer section" if bad else None
    end = data.find(b"\n", again, limit)
    if end >= 0:
        return None if _CHUNK_LINE.fullmatch(data, 0, end + 1) else "malformed chunk-size line"
    if limit and not _SIZE_PREFIX.match(data, 0, limit):
        return "malformed chunk size"
    return "bare CR in a chunk-size line" if data.find(b"\r", again, limit - 1) >= 0 else None
