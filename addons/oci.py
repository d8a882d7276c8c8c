"""OCI distribution-spec error bodies and the responses that carry them."""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import http1

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")


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


def protocol_error_response(status_code: int, message: str = "") -> bytes:
    """mitmproxy's own errors (malformed requests, backend unreachable) as OCI bodies.

    Replaces mitmproxy's HTML error page builder (`_http1.make_error_response`), which no hook
    can restyle. Backend failures say nothing about the backend's address.
    """
    if status_code >= 500:
        code, message = "UNAVAILABLE", "the registry backend is unavailable; retry"
    elif status_code in (413, 431):
        code = "SIZE_INVALID"
    else:  # mitmproxy's text quotes its own options and internals: keep it generic
        code, message = "UNSUPPORTED", "malformed HTTP request"
    response = http.Response.make(
        status_code,
        error_body(code, message),
        {
            "Content-Type": "application/json",
            "Connection": "close",
            API_VERSION_HEADER[0]: API_VERSION_HEADER[1],
        },
    )
    return http1.assemble_response(response)
