"""OCI distribution-spec error bodies and the responses that carry them."""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import http1

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
# What the gateway's own backend reads of a manifest accept (walk, GC, tag and signature
# checks): every image and index type, so the backend never converts or refuses one.
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]}).encode()


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    method: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> http.Response:
    """An OCI error. A HEAD answer carries no body: mitmproxy would send it anyway and
    desynchronise the client's keep-alive connection."""
    body = b"" if method == "HEAD" else error_body(code, message, detail)
    response = http.Response.make(
        status,
        body,
        {"Content-Type": "application/json", API_VERSION_HEADER[0]: API_VERSION_HEADER[1]},
    )
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def json_response(status: int, payload: dict[str, Any]) -> http.Response:
    return http.Response.make(
        status,
        json.dumps(payload).encode(),
        {"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def wire_error(
    status: int, code: str, message: str, *, method: str = "GET", **headers: str
) -> bytes:
    """An OCI error answer as bytes for the wire (no body for HEAD), closing the connection:
    for answers given below mitmproxy's hooks (malformed heads, timeouts, connection caps)."""
    response = http.Response.make(
        status,
        b"" if method == "HEAD" else error_body(code, message),
        {
            "Content-Type": "application/json",
            "Connection": "close",
            API_VERSION_HEADER[0]: API_VERSION_HEADER[1],
            **headers,
        },
    )
    return http1.assemble_response(response)


def protocol_error_response(status_code: int, message: str = "", *, method: str = "GET") -> bytes:
    """mitmproxy's own errors (malformed requests, backend unreachable) as OCI answers.

    Replaces mitmproxy's HTML error page builder (`_http1.make_error_response`), which no hook
    can restyle. Its messages quote its options and internals, and backend failures would name
    the backend's address: both are replaced by generic ones.
    """
    if status_code >= 500:
        code, message = "UNAVAILABLE", "the registry backend is unavailable; retry"
    elif status_code in (413, 431):
        code = "SIZE_INVALID"
    else:
        code, message = "UNSUPPORTED", "malformed HTTP request"
    return wire_error(status_code, code, message, method=method)
