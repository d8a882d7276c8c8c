"""Hostile bytes at the gateway: raw sockets, no HTTP library between us and mitmproxy.

Every case asserts that the answer is a 4xx (never a 5xx, never a 2xx for a protected
resource) or a clean close, that error bodies are OCI JSON and never mitmproxy's HTML pages,
and (autouse fixture) that afterwards the same gateway process still answers `GET /v2/` with
401 within 2 s.

The comment on each case says what mitmproxy 12.3.1 itself does with it (observed on this
stack): most framing errors never reach our addons; mitmproxy answers 400 itself (through
`oci.protocol_error_response`, which replaces its HTML page builder) and closes.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import skopeo
from tests.support.rawhttp import Answer, Conn, exchange
from tests.support.stack import Stack, wait_for

pytestmark = pytest.mark.e2e

TIMEOUT = 10.0  # seconds, for every socket in this file
MIB = 1 << 20


def assert_clean(answer: Answer | None, expected: set[int | None]) -> None:
    """Status in `expected` (None = closed without an answer); 4xx only; OCI JSON, no HTML."""
    status = answer.status if answer else None
    assert status in expected, answer and (answer.head + answer.body)[:2000]
    if answer is None:
        return
    assert 400 <= answer.status < 500, answer.head
    assert b"<html" not in answer.body.lower(), answer.body[:500]
    assert "mitmproxy" not in (answer.header("server") or "").lower()
    if answer.body:
        assert (answer.header("content-type") or "").startswith("application/json"), answer.head
        errors = json.loads(answer.body)["errors"]
        assert errors and errors[0]["code"], answer.body


# --- the stack ------------------------------------------------------------------------------


def proc_status_mb(pids: dict[str, int], key: str) -> float:
    """The largest value of `key` (VmRSS, VmHWM) over the gateway workers, in MB."""
    values = []
    for pid in pids.values():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                values.append(int(line.split()[1]) / 1024)
    assert values, f"no {key} for {pids}"
    return max(values)


@pytest.fixture(scope="module")
def pid(registry: Stack) -> dict[str, int]:
    """The gateway workers' pids: the same ones must still serve after every case."""
    pids = registry.gateway_pids()
    assert len(pids) == registry.workers
    return pids


@pytest.fixture(scope="module")
def acme_token(registry: Stack, acme_jwt: str) -> str:
    r = requests.get(
        f"{registry.url}/auth/token",
        params={"service": "tabbify-registry"},
        auth=("x", acme_jwt),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["token"]


def assert_still_serving(stack: Stack, pid: dict[str, int], source: str | None = None) -> None:
    started = time.monotonic()
    answer = exchange(
        stack.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", source=source
    )
    assert answer is not None and answer.status == 401, answer
    assert time.monotonic() - started < 2.0
    assert stack.gateway_pids() == pid, "a gateway process was restarted"


@pytest.fixture(autouse=True)
def still_serving(registry: Stack, pid: dict[str, int]):
    yield
    assert_still_serving(registry, pid)


# --- one request, one answer ----------------------------------------------------------------

Build = Callable[[str], bytes]  # token → request bytes
REQ = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"
PROTECTED = b"GET /v2/acme/hostile/tags/list HTTP/1.1\r\nHost: x\r\n"


def auth(token: str) -> bytes:
    return f"Authorization: Bearer {token}\r\n".encode()


def case(id: str, build: Build | bytes, expected: set[int | None], shut_write: bool = False):
    b: Build = build if callable(build) else (lambda _t, raw=build: raw)
    return pytest.param(b, expected, shut_write, id=id)


CASES = [
    # The request line. mitmproxy splits it on whitespace into exactly three parts and checks
    # only `HTTP/d.d`: anything else is "Bad HTTP request line" → 400 from mitmproxy, close.
    case("garbage-request-line", b"GARBAGE\r\n\r\n", {400}),
    case("http09-line", b"GET /v2/\r\n\r\n", {400}),
    # HTTP/0.9 for real (no blank line) and then EOF: mitmproxy waits for the end of the head,
    # sees the client close, logs it and closes: no answer.
    case("http09-then-eof", b"GET /v2/\r\n", {None}, shut_write=True),
    case("unknown-http-version", b"GET /v2/ HTTP/9\r\n\r\n", {400}),
    # `HTTP/2.0` over an HTTP/1 connection passes mitmproxy's `HTTP/d.d` check: our addons
    # answer (no token → 401).
    case("http2-version-on-h1", b"GET /v2/ HTTP/2.0\r\n\r\n", {401}),
    # The HTTP/2 preface on a plain connection: mitmproxy closes without an answer.
    case("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {None}),
    # mitmproxy does not validate method tokens: `G(T` / `\xffGET` reach the addons, whose
    # first look (intake) refuses any method that is not exactly one the API uses (405).
    case("method-invalid-chars", b"G(T /v2/ HTTP/1.1\r\n\r\n", {405}),
    case(
        "method-invalid-chars-token", lambda t: b"G(T /v2/ HTTP/1.1\r\n" + auth(t) + b"\r\n", {405}
    ),
    case(
        "method-non-utf8-token",
        lambda t: b"\xffGET /v2/acme/hostile/tags/list HTTP/1.1\r\n" + auth(t) + b"\r\n",
        {405},
    ),
    # Absolute-form target: in reverse mode mitmproxy replaces the destination with the
    # configured backend; the addons see path /v2/ (no token → 401).
    case("absolute-uri-other-host", b"GET http://evil.example/v2/ HTTP/1.1\r\n\r\n", {401}),
    # A scheme mitmproxy has no default port for: "Bad HTTP request line" → 400.
    case("absolute-uri-ftp", b"GET ftp://evil.example/v2/ HTTP/1.1\r\n\r\n", {400}),
    # CONNECT in reverse mode: mitmproxy's request validation ("not running in regular/upstream
    # mode") → 400, close. Our addons see it first and refuse it too (404, not /v2).
    case("connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", {400}),
    # `OPTIONS *`: parsed by mitmproxy; no route takes OPTIONS → 405 before the target is read.
    case("options-asterisk", b"OPTIONS * HTTP/1.1\r\n\r\n", {405}),
    # Sizes. mitmproxy itself has no limit on the request line, header count or header size
    # ("FIXME: protect against header size DoS" in its Http1Server). The gateway's: a target
    # over 16 KiB is malformed (target.py) → 400; more than 100 header fields → 431; a head
    # over 1 MiB → 431 (test_an_endless_line_is_cut_off).
    case("100kb-request-line", b"GET /v2/" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", {400}),
    case(
        "200-headers",
        REQ + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
        {431},
    ),
    case("1mb-header-value", REQ + b"X-Big: " + b"a" * MIB + b"\r\n\r\n", {401, 431, None}),
    # Framing (RFC 9112 §6.3). mitmproxy's validate_inbound_headers (on by default) refuses
    # Content-Length with Transfer-Encoding, several Transfer-Encodings, a non-chunked or
    # unknown coding, chunked on HTTP/1.0 → 400 and close, before any addon decides.
    case(
        "content-length-and-chunked",
        b"POST /v2/acme/hostile/blobs/uploads/ HTTP/1.1\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
    case(
        "content-length-and-chunked-token",
        lambda t: (
            b"POST /v2/acme/hostile/blobs/uploads/ HTTP/1.1\r\n"
            + auth(t)
            + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            + PROTECTED  # a smuggled second request: never parsed (the connection closes)
            + auth(t)
            + b"\r\n"
        ),
        {400},
    ),
    case(
        "chunked-twice",
        b"POST /v2/acme/hostile/blobs/uploads/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
    case(
        "unknown-transfer-coding",
        b"POST /v2/acme/hostile/blobs/uploads/ HTTP/1.1\r\nTransfer-Encoding: chonked\r\n\r\n",
        {400},
    ),
    case(
        "identity-transfer-coding",
        b"POST /v2/acme/hostile/blobs/uploads/ HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
        {400},
    ),
    case(
        "chunked-on-http10",
        b"POST /v2/acme/hostile/blobs/uploads/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        {400},
    ),
    # Repeated Content-Length: mitmproxy joins them ("5, 6", even "5, 5") and its strict
    # parser refuses the joined value → 400, close.
    case(
        "two-different-content-lengths",
        b"PUT /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!",
        {400},
    ),
    case(
        "two-equal-content-lengths",
        b"PUT /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\nContent-Length: 5\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        {400},
    ),
    case("negative-content-length", b"PUT /v2/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", {400}),
    case("non-numeric-content-length", b"PUT /v2/ HTTP/1.1\r\nContent-Length: abc\r\n\r\n", {400}),
    case("plus-content-length", b"PUT /v2/ HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello", {400}),
    # 20 digits is a valid Content-Length for mitmproxy. the gate treats it as a large body:
    # streamed into the discard sink, 401/403 sent at once with `connection: close`; mitmproxy
    # keeps draining until the client goes away.
    case(
        "huge-content-length",
        b"PUT /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\n"
        b"Content-Length: 99999999999999999999\r\n\r\nabc",
        {401},
    ),
    case(
        "huge-content-length-foreign-repo-token",
        lambda t: (
            b"PUT /v2/globex/app/blobs/uploads/u HTTP/1.1\r\n"
            + auth(t)
            + b"Content-Length: 99999999999999999999\r\n\r\nabc"
        ),
        {403},
    ),
    # Chunked bodies are parsed by h11's ChunkedReader, made strict (hardening.py). A bad chunk
    # size is a protocol error: mitmproxy closed without an answer; the gateway answers 400
    # before the close (more variants: test_malformed_chunked_framing_is_answered_400_at_once).
    case(
        "invalid-chunk-size",
        b"PATCH /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ZZ\r\nabc\r\n0\r\n\r\n",
        {400},
    ),
    case(
        "invalid-chunk-size-token",
        lambda t: (
            b"PATCH /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\n"
            + auth(t)
            + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n"
        ),
        {400},
    ),
    # A 20-hex-digit chunk size is accepted by h11 (an endless body); the gateway takes at
    # most 16 digits, as Go's reader does → 400.
    case(
        "huge-chunk-size",
        b"PATCH /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"FFFFFFFFFFFFFFFFFFFF\r\nabc",
        {400},
    ),
    # Chunk extensions that follow the grammar are accepted up to the 64 KiB line bound (and
    # dropped when mitmproxy re-chunks): 64 KB of `;x=y` is refused by the addons (401) or,
    # with a token on an own repository, reaches the backend (unknown upload → 404).
    case(
        "chunk-extension-abuse",
        b"PATCH /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5" + b";x=y" * 16_000 + b"\r\nhello\r\n0\r\n\r\n",
        {401},
    ),
    case(
        "chunk-extension-abuse-token",
        lambda t: (
            b"PATCH /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\n"
            + auth(t)
            + b"Transfer-Encoding: chunked\r\n\r\n5"
            + b";x=y" * 16_000
            + b"\r\nhello\r\n0\r\n\r\n"
        ),
        {404},
    ),
    # Truncated body, then EOF: "peer closed connection without sending complete message
    # body" → mitmproxy closes without an answer (the refusal of a small body is never sent).
    case(
        "truncated-body",
        b"PUT /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\nContent-Length: 1000\r\n\r\nabc",
        {None, 401},
        shut_write=True,
    ),
    case(
        "truncated-body-token",
        lambda t: (
            b"PATCH /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\n"
            + auth(t)
            + b"Content-Length: 1000\r\n\r\nabc"
        ),
        {None, 400, 404},
        shut_write=True,
    ),
    # Header lines. A name with a space or NUL fails validate_inbound_headers → 400; a line
    # without a colon or with an empty name fails mitmproxy's head parser → 400. `X:: y` is a
    # header `X` with value `: y` (valid) → the addons answer 401.
    case("header-name-with-space", REQ + b"Bad Name: x\r\n\r\n", {400}),
    case("header-empty-name", REQ + b": x\r\n\r\n", {400}),
    case("header-without-colon", REQ + b"NoColon\r\n\r\n", {400}),
    case("header-name-double-colon", REQ + b"X:: y\r\n\r\n", {401}),
    case("nul-in-header-name", REQ + b"X\x00A: a\r\n\r\n", {400}),
    # NUL in the path is a malformed target (target.py) → 400. NUL in a header value passes
    # mitmproxy but not the head check (framing.head_problem) → 400 and close.
    case("nul-in-path", b"GET /v2/\x00 HTTP/1.1\r\n\r\n", {400}),
    case("nul-in-header-value", REQ + b"X-A: a\x00b\r\n\r\n", {400}),
    case(
        "nul-after-valid-token",
        lambda t: PROTECTED + b"Authorization: Bearer " + t.encode() + b"\x00\r\n\r\n",
        {400},
    ),
    # Bare CR: mitmproxy splits lines on LF and leaves the CR inside the value, which a Go
    # backend would read differently → 400. LF-only line ends are accepted.
    case("bare-cr-in-value", REQ + b"X-A: a\rContent-Length: 5\r\n\r\n", {400}),
    case("lf-only-line-ends", b"GET /v2/ HTTP/1.1\nHost: x\n\n", {401}),
    # obs-fold: mitmproxy appends continuation lines to the previous value (keeping "\r\n "),
    # Go joins them with a space: refused by the head check → 400; a continuation with no
    # previous header → 400 "Invalid headers" from mitmproxy.
    case("obs-fold", REQ + b"X-A: a\r\n b\r\n\r\n", {400}),
    case("obs-fold-first-line", b"GET /v2/ HTTP/1.1\r\n b\r\n\r\n", {400}),
    case(
        "obs-fold-authorization",
        lambda t: PROTECTED + b"Authorization: Bearer\r\n " + t.encode() + b"\r\n\r\n",
        {400},
    ),
    # Host: not needed in reverse mode (the destination is configured); never used for the
    # realm (checked below).
    case("no-host", b"GET /v2/ HTTP/1.1\r\n\r\n", {401}),
    # Authorization ambiguity: the addons take exactly one `Authorization: Bearer` header.
    case("duplicate-valid-token", lambda t: PROTECTED + auth(t) + auth(t) + b"\r\n", {401}),
    case(
        "valid-then-junk-token",
        lambda t: PROTECTED + auth(t) + b"Authorization: Bearer junk\r\n\r\n",
        {401},
    ),
    case(
        "junk-then-valid-token",
        lambda t: PROTECTED + b"Authorization: Bearer junk\r\n" + auth(t) + b"\r\n",
        {401},
    ),
    case(
        "two-credentials-one-header",
        lambda t: PROTECTED + b"Authorization: Bearer " + t.encode() + b", Bearer junk\r\n\r\n",
        {401},
    ),
    case("basic-instead-of-bearer", PROTECTED + b"Authorization: Basic eDp5\r\n\r\n", {401}),
    # Upgrades: mitmproxy's disable_h2c addon drops h2c; a websocket upgrade without a token is
    # answered 401 by the addons (nothing reaches the backend).
    case(
        "websocket-upgrade",
        REQ + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        {401},
    ),
    case(
        "h2c-upgrade",
        REQ + b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        {401},
    ),
]

# A valid acme token on globex's repositories through path tricks: the raw path is judged as
# sent, never cleaned: an escape, `;` or `\\` makes it a malformed target (target.py, 400
# UNSUPPORTED); `..` segments under acme/ make a name that cannot exist in acme's namespace
# (404 NAME_UNKNOWN); anything else is not a repository endpoint of acme's (403 DENIED).
TRICK_PATHS = [
    "/v2/acme%2F..%2Fglobex/app/tags/list",
    "/v2/acme/%2e%2e/globex/app/tags/list",
    "/v2/acme/..%2Fglobex/app/tags/list",
    "/v2/acme/../globex/app/tags/list",
    "/v2/acme/./../globex/app/tags/list",
    "/v2/acme//../globex/app/tags/list",
    "/v2/globex%2Fapp/tags/list",
    "/v2/globex%2fapp/manifests/latest",
    "/v2/acme%252F..%252Fglobex/app/tags/list",
    "/v2/acme/app/..;/../../globex/app/tags/list",
    "/v2/acme\\..\\globex/app/tags/list",
    "/v2/Globex/app/tags/list",
    "/v2/globex/app/tags/list",
    "/v2/globex/app/tags/list?ns=acme",
    "/v2/acme/app/tags/list/../../../../globex/app/tags/list",
]


@pytest.mark.parametrize(("build", "expected", "shut_write"), CASES)
def test_hostile_request(registry, acme_token, build, expected, shut_write):
    conn = Conn(registry.port)
    try:
        conn.send(build(acme_token))
        if shut_write:
            conn.shut_write()
        answer = conn.read_answer()
        assert_clean(answer, expected)
        if answer is not None and answer.status == 400:
            # mitmproxy's own 400 closes the connection: nothing after a bad head is parsed.
            assert conn.closed()
    finally:
        conn.close()


@pytest.mark.parametrize("path", TRICK_PATHS)
def test_valid_token_on_a_foreign_path_trick_is_denied(registry, acme_token, path):
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + auth(acme_token) + b"\r\n"
    answer = exchange(registry.port, request)
    # 400 malformed, 403 another tenant's, or 404 for a name in acme's own namespace that
    # cannot exist (`acme/../globex/app` is no repository of anybody's).
    assert_clean(answer, {400, 403, 404})
    assert answer is not None
    code = json.loads(answer.body)["errors"][0]["code"]
    assert code == {403: "DENIED", 400: "UNSUPPORTED", 404: "NAME_UNKNOWN"}[answer.status]


@pytest.mark.parametrize("method", [b"get", b"Get", b"gET", b"head", b"delete", b"OPTIONS"])
@pytest.mark.parametrize("path", [b"/v2/", b"/v2/acme/hostile/tags/list", b"/v2/_catalog"])
def test_a_method_not_spelled_exactly_is_refused_before_any_decision(
    registry, acme_token, method, path
):
    """Methods are case-sensitive (RFC 9110): `get` is not GET. mitmproxy upper-cases the
    method it shows the addons but forwards the request line as sent, so `get /v2/` was
    decided as GET and answered by the backend. Refused with or without a token."""
    for credentials in (auth(acme_token), b""):
        request = method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n" + credentials + b"\r\n"
        answer = exchange(registry.port, request)
        assert_clean(answer, {405})
        assert answer is not None
        assert json.loads(answer.body)["errors"][0]["code"] == "UNSUPPORTED"
    # The access log says what was sent, not mitmproxy's upper-cased reading of it.
    shown = method.decode()
    wait_for(
        lambda: any(
            line["method"] == shown and line["decision"] == "deny:method"
            for line in registry.access_log()
        )
    )
    # Control: the exact method, same token, same path.
    answer = exchange(
        registry.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + auth(acme_token) + b"\r\n"
    )
    assert answer is not None and answer.status == 200, answer


def test_the_token_used_above_is_valid(registry, acme_token):
    """Control: the same token reaches the backend on its own namespace (unknown repo: 404)."""
    answer = exchange(registry.port, PROTECTED + auth(acme_token) + b"\r\n")
    assert answer is not None and answer.status == 404
    assert json.loads(answer.body)["errors"][0]["code"] == "NAME_UNKNOWN"


def test_absolute_form_to_another_host_reaches_only_our_backend(registry, acme_token):
    """mitmproxy (reverse mode) ignores the authority of an absolute-form target: the request
    goes to the configured backend, through the same checks."""
    base = b"GET http://evil.example/v2/ HTTP/1.1\r\nHost: evil.example\r\n" + auth(acme_token)
    answer = exchange(registry.port, base + b"\r\n")
    assert answer is not None and answer.status == 200  # /v2/ with a valid token
    assert answer.header("docker-distribution-api-version") == "registry/2.0"
    request = b"GET http://evil.example/v2/globex/a/tags/list HTTP/1.1\r\n" + auth(acme_token)
    assert_clean(exchange(registry.port, request + b"\r\n"), {403})
    # The catalog of an absolute-form target is still the caller's own, from the gateway.
    request = b"GET http://evil.example/v2/_catalog HTTP/1.1\r\n" + auth(acme_token)
    answer = exchange(registry.port, request + b"\r\n")
    assert answer is not None and answer.status == 200
    assert all(r.startswith("acme/") for r in json.loads(answer.body)["repositories"])


def test_the_realm_never_comes_from_host(registry):
    answer = exchange(registry.port, b"GET /v2/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert answer is not None and answer.status == 401
    challenge = answer.header("www-authenticate") or ""
    assert f'realm="{registry.url}/auth/token"' in challenge
    assert "evil" not in challenge


# --- several requests on one connection -----------------------------------------------------


def test_pipelined_requests_get_two_answers(registry):
    conn = Conn(registry.port)
    try:
        conn.send(REQ + b"\r\n" + REQ + b"\r\n")
        first, second = conn.read_answer(), conn.read_answer()
        assert first is not None and first.status == 401
        assert second is not None and second.status == 401
    finally:
        conn.close()


def test_a_token_does_not_carry_over_to_the_next_pipelined_request(registry, acme_token):
    conn = Conn(registry.port)
    try:
        conn.send(PROTECTED + auth(acme_token) + b"\r\n" + PROTECTED + b"\r\n")
        first, second = conn.read_answer(), conn.read_answer()
        assert first is not None and first.status == 404  # reached the backend
        assert_clean(second, {401})
    finally:
        conn.close()


def test_a_smuggled_second_request_in_a_body_is_not_a_request(registry, acme_token):
    """A body that looks like a request stays a body: the length mitmproxy enforces wins."""
    inner = PROTECTED + auth(acme_token) + b"\r\n"
    outer = b"PUT /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(inner)
    conn = Conn(registry.port)
    try:
        conn.send(outer + inner + REQ + b"\r\n")
        first, second = conn.read_answer(), conn.read_answer()
        assert_clean(first, {401})  # the PUT, body and all
        assert_clean(second, {401})  # the trailing request; the inner one never ran
    finally:
        conn.close()


def test_a_leading_empty_line_is_ignored(registry):
    """RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line.

    mitmproxy 12.3.1 (h11's ReceiveBuffer) drops the leading CRLF and then waits for more
    data instead of parsing the request already buffered: the client gets no answer at all.
    """
    conn = Conn(registry.port, timeout=3)
    try:
        conn.send(b"\r\n" + REQ + b"\r\n")
        try:
            answer = conn.read_answer()
        except TimeoutError:
            pytest.fail("no answer within 3 s to a request preceded by one empty line")
        assert answer is not None and answer.status == 401
    finally:
        conn.close()


# --- TLS on the plain-HTTP port ------------------------------------------------------------


def client_hello(server_name: str = "registry.test") -> bytes:
    """The bytes a TLS client sends first (a real ClientHello, from Python's ssl)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_on_the_plain_port_gets_a_plain_http_400(registry):
    """The port speaks plain HTTP only (WireGuard encrypts the mesh): a ClientHello gets a
    plain `HTTP/1.1 400` (OCI JSON) and the connection closes, never a mitmproxy certificate.
    Go clients (Docker, containerd, containers/image) then fall back to HTTP for an insecure
    registry ("server gave HTTP response to HTTPS client"); a bare close was EOF, which
    `docker manifest` does not retry over HTTP."""
    hello = client_hello()
    started = time.monotonic()
    conn = Conn(registry.port)
    try:
        assert conn.send(hello)
        answer = conn.read_answer()
        assert answer is not None
        assert answer.head.startswith(b"HTTP/1.1 400 "), answer.head
        assert answer.header("connection") == "close"
        assert int(answer.header("content-length") or -1) == len(answer.body)
        assert_clean(answer, {400})
        assert "plain HTTP" in json.loads(answer.body)["errors"][0]["message"]
        assert conn.closed()
    finally:
        conn.close()
    assert time.monotonic() - started < 2

    # A ClientHello split over two segments: the answer still arrives whole, no reset.
    conn = Conn(registry.port)
    try:
        assert conn.send(hello[:100])
        time.sleep(0.2)
        conn.send(hello[100:])
        answer = conn.read_answer()
        assert answer is not None and answer.status == 400
        assert conn.closed()
    finally:
        conn.close()

    # Python's TLS stack reads the answer as a record it cannot parse: fails at once.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", registry.port), timeout=TIMEOUT) as raw,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(raw, server_hostname="evil.example")


def test_a_go_client_insisting_on_tls_gets_the_well_known_message(registry):
    """containers/image (skopeo, podman) with TLS verification on: the message names the
    cause instead of a bare EOF. With --tls-verify=false it falls back to HTTP (every skopeo
    test in this suite goes through that fallback)."""
    ref = f"docker://{registry.host}/acme/tls-probe:v1"
    r = skopeo("inspect", "--raw", "--tls-verify=true", ref)
    assert r.returncode != 0
    assert "server gave HTTP response to HTTPS client" in r.stderr, r.stderr
    r = skopeo("inspect", "--raw", "--tls-verify=false", ref)
    assert "401" in r.stderr or "unauthorized" in r.stderr.lower(), r.stderr  # plain HTTP


def test_a_client_that_never_closes_after_the_tls_answer_is_closed(registry):
    """After the 400 only our side is closed (so late ClientHello bytes are not answered with
    a reset that could discard the answer); a client that then neither closes nor stops
    sending is cut after plain_http.TLS_LINGER seconds."""
    conn = Conn(registry.port)
    try:
        assert conn.send(client_hello())
        assert conn.read_answer() is not None
        time.sleep(3)
        still_open = conn.send(b"x" * 64)
        time.sleep(0.2)  # the reset for the first write arrives, the second write sees it
        still_open = still_open and conn.send(b"y" * 64)
        assert not still_open
    finally:
        conn.close()


# --- request bodies the engine cannot read --------------------------------------------------

# Chunked framing that RFC 9112 §7.1 does not allow. Before the gateway read chunked bodies
# strictly, h11 (mitmproxy's reader) waited for ever for the CRLF of an LF-only line, accepted
# `5 ` and 20 hex digits, and closed without an answer on the rest.
BAD_CHUNKS = {
    "lf-only-lines": b"5\nhello\n0\n\n",
    "hex-prefix-size": b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    "plus-size": b"+5\r\nhello\r\n0\r\n\r\n",
    "minus-size": b"-5\r\nhello\r\n0\r\n\r\n",
    "empty-size": b"\r\nhello\r\n0\r\n\r\n",
    "leading-space-size": b" 5\r\nhello\r\n0\r\n\r\n",
    "leading-tab-size": b"\t5\r\nhello\r\n0\r\n\r\n",
    "trailing-space-size": b"5 \r\nhello\r\n0\r\n\r\n",
    "empty-extension": b"5;\r\nhello\r\n0\r\n\r\n",
    "extension-without-value": b"5;a=\r\nhello\r\n0\r\n\r\n",
    "extension-unterminated-quote": b'5;a="x\r\nhello\r\n0\r\n\r\n',
    "extension-with-nul": b"5;a\x00b\r\nhello\r\n0\r\n\r\n",
    "extension-with-space-inside": b"5;a b\r\nhello\r\n0\r\n\r\n",
    "bare-cr-in-size-line": b"5\rhello\r\n0\r\n\r\n",
    "bare-cr-after-data": b"5\r\nhello\r0\r\n\r\n",
    "no-crlf-after-data": b"5\r\nhelloXX0\r\n\r\n",
    "17-hex-digits": b"1" + b"0" * 16 + b"\r\nhello",
    "20-hex-digits": b"F" * 20 + b"\r\nhello",
    "bare-cr-in-trailer": b"5\r\nhello\r\n0\r\nX-A: a\rb\r\n\r\n",
    "lf-only-trailer": b"5\r\nhello\r\n0\r\nX-A: a\n\n",
}


def new_upload(registry: Stack, token: str, repo: str) -> str:
    r = requests.post(
        f"{registry.url}/v2/{repo}/blobs/uploads/",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return r.headers["Location"]


def chunked_patch(location: str, token: str | None, body: bytes) -> bytes:
    return (
        f"PATCH {location} HTTP/1.1\r\nHost: x\r\n".encode()
        + (auth(token) if token else b"")
        + b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
    )


@pytest.mark.parametrize("with_token", [True, False], ids=["upload", "no-token"])
@pytest.mark.parametrize("body", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_malformed_chunked_framing_is_answered_400_at_once(registry, acme_token, body, with_token):
    """Into a real upload (the body streams to the backend) and without a token (the refusal
    waits for nothing): 400 with an OCI body within 2 s, and the connection closed."""
    location = (
        new_upload(registry, acme_token, "acme/framing/app")
        if with_token
        else "/v2/acme/framing/app/blobs/uploads/u"
    )
    conn = Conn(registry.port, timeout=3.0)
    try:
        started = time.monotonic()
        conn.send(chunked_patch(location, acme_token if with_token else None, body))
        answer = conn.read_answer()
        elapsed = time.monotonic() - started
        assert_clean(answer, {400})
        assert answer is not None and answer.header("connection") == "close"
        assert elapsed < 2.0, elapsed
        assert conn.closed()
    finally:
        conn.close()


def published_in_flight(registry: Stack) -> dict[str, int]:
    """The writes in flight each gateway worker publishes (what `gc` waits for)."""
    from addons.cli.gc import live_workers

    workers = live_workers(registry.data_dir / "run" / "workers", time.time())
    assert len(workers) == registry.workers
    return {name: w["freeze"]["in_flight"] for name, w in workers.items()}


def test_a_chunked_patch_with_a_trailer_is_answered_and_holds_no_gc(registry, acme_token) -> None:
    """A trailer section is read and dropped (RFC 9110 §6.5.1): the upload goes on with the
    body. mitmproxy raised NotImplementedError on it: no answer, and the flow stayed counted
    as a write in flight for ever, so every `gc` waited for it and removed nothing."""
    from addons.cli.gc import Freeze

    repo = "acme/trailer/app"
    answers = []
    for token in (acme_token, None):  # an upload, and a refusal that reads the body first
        conn = Conn(registry.port, timeout=5.0)
        try:
            location = new_upload(registry, acme_token, repo)
            conn.send(
                chunked_patch(
                    location, token, b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-B: c\r\n\r\n"
                )
            )
            answers.append(conn.read_answer())
        finally:
            conn.close()
    upload, refusal = answers
    assert upload is not None and upload.status == 202, upload
    assert_clean(refusal, {401})
    assert upload.header("range") == "0-4"
    r = requests.put(
        f"{registry.url}{upload.header('location')}",
        params={"digest": "sha256:" + hashlib.sha256(b"hello").hexdigest()},
        headers={"Authorization": f"Bearer {acme_token}"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 5
    while any(published_in_flight(registry).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(published_in_flight(registry).values()), published_in_flight(registry)
    with Freeze(registry.data_dir / "run" / "workers", wait=10):
        pass  # every worker reports the freeze with nothing in flight: a GC may run


# --- slow, idle and endless clients ---------------------------------------------------------


def test_slow_and_idle_clients_do_not_starve_others(registry, pid):
    """20 half-sent request lines and 200 silent connections from one address, held: a
    client from another address is still served within 2 s. Every held connection costs one
    socket and a little memory, nothing else; those of the one address beyond its cap of
    connections without a complete head are refused at once (503)."""
    stalled = [Conn(registry.port) for _ in range(20)]
    idle: list[Conn] = []
    try:
        for conn in stalled:
            assert conn.send(b"GET /v2/ HT")
        idle = [Conn(registry.port) for _ in range(200)]
        time.sleep(0.5)
        for _ in range(10):
            assert_still_serving(registry, pid, source="127.0.0.3")
            time.sleep(0.1)
        # The stalled clients were only waiting: finishing a request line gets an answer.
        assert stalled[0].send(b"TP/1.1\r\nHost: x\r\n\r\n")
        assert_clean(stalled[0].read_answer(), {401})
    finally:
        for conn in stalled + idle:
            conn.close()
    time.sleep(0.5)
    assert_still_serving(registry, pid)
    assert proc_status_mb(pid, "VmHWM") < 200


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET /v2/ HTTP/1.1\r\nX-Big: ", id="header-value"),
        pytest.param(
            b"PATCH /v2/acme/hostile/blobs/uploads/u HTTP/1.1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5;",
            id="chunk-extension",
        ),
    ],
)
def test_an_endless_line_is_cut_off(registry, pid, head):
    """A client that never ends a header (or chunk-size) line must not make the gateway hold
    all of it: the gateway has to stop reading or close long before 64 MiB. Runs last in this
    module: when it fails, it leaves a large peak RSS behind.

    mitmproxy 12.3.1 buffers an unterminated request head without limit (its Http1Server has
    `# FIXME: protect against header size DoS`), likewise an unterminated chunk-size line
    (h11's ChunkedReader, used without h11's own max_incomplete_event_size); and when such a
    client disconnects it logs `repr()` of the whole buffer: 64 MiB sent → ~65 MB held while
    the connection is open, ~330 MB VmHWM after it closes. Any number of clients can do this.
    """
    before = proc_status_mb(pid, "VmRSS")
    conn = Conn(registry.port)
    sent, cut_off, answer = 0, False, None
    try:
        conn.send(head)
        chunk = b"a" * MIB
        try:
            while sent < 64 * MIB:
                if not conn.send(chunk):  # closed or reset by the gateway
                    cut_off = True
                    break
                sent += len(chunk)
        except TimeoutError:  # the gateway stopped reading
            cut_off = True
        time.sleep(1.0)  # let the gateway read what the kernel buffered
        held = proc_status_mb(pid, "VmRSS") - before
        if not cut_off:
            conn.shut_write()
            answer = conn.read_answer()
    finally:
        conn.close()
    time.sleep(1.0)
    assert cut_off, (
        f"the gateway took {sent // MIB} MiB of one unterminated line "
        f"(VmRSS +{held:.0f} MB while the connection was open)"
    )
    assert_clean(answer, {None, 400, 401, 413, 431})
    assert proc_status_mb(pid, "VmHWM") < 200
