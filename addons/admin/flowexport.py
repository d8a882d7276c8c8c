"""The live view's flows as a mitmproxy flow file (`mitmproxy -r`, `mitmdump -nr`,
`mitmproxy.io.FlowReader`), built from the redacted summaries the workers sent: the same
redaction as a capture, with the few bodies the view keeps (a manifest's or an error's first
16 KiB, redacted; none of a blob or a token answer). What the view knows beyond HTTP
(tenant, decision, rule, bytes, backend latency) goes into each flow's comment.
"""

from __future__ import annotations

import io
from http import HTTPStatus
from typing import Any

from mitmproxy import connection, flow, http
from mitmproxy import io as mitmio


def _fields(value: Any) -> tuple[tuple[bytes, bytes], ...]:
    if not isinstance(value, list):
        return ()
    return tuple(
        (str(pair[0]).encode(), str(pair[1]).encode())
        for pair in value
        if isinstance(pair, list) and len(pair) == 2
    )


def _number(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) else default


def _body(value: Any) -> bytes | None:
    return value.encode() if isinstance(value, str) else None


def _host_port(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[str, int]:
    for name, value in headers:
        if name.lower() == b"host":
            host, _, port = value.decode(errors="replace").rpartition(":")
            if port.isdigit() and host:
                return host.strip("[]"), int(port)
            return value.decode(errors="replace").strip("[]"), 80
    return "registry", 80


def comment(summary: dict[str, Any]) -> str:
    keys = ("tenant", "decision", "rule", "bytes_in", "bytes_out", "duration_ms", "backend_ms")
    return " ".join(f"{k}={summary[k]}" for k in keys if summary.get(k) is not None)


def http_flow(summary: dict[str, Any]) -> http.HTTPFlow:
    end = _number(summary.get("end"))
    start = end - _number(summary.get("duration_ms")) / 1000
    request_headers = _fields(summary.get("request_headers"))
    host, port = _host_port(request_headers)
    client = connection.Client(
        peername=(str(summary.get("client") or "0.0.0.0"), 0),
        sockname=("", 0),
        timestamp_start=start,
    )
    result = http.HTTPFlow(client, connection.Server(address=None))
    result.request = http.Request(
        host=host,
        port=port,
        method=str(summary.get("method") or "GET").encode(),
        scheme=b"http",
        authority=b"",
        path=str(summary.get("target") or "/").encode(),
        http_version=b"HTTP/1.1",
        headers=request_headers,
        content=_body(summary.get("request_body")),
        trailers=None,
        timestamp_start=start,
        timestamp_end=start,
    )
    status = summary.get("status")
    if isinstance(status, int) and summary.get("response_headers") is not None:
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        result.response = http.Response(
            http_version=b"HTTP/1.1",
            status_code=status,
            reason=reason,
            headers=_fields(summary.get("response_headers")),
            content=_body(summary.get("response_body")),
            trailers=None,
            timestamp_start=end,
            timestamp_end=end,
        )
    if summary.get("error"):
        result.error = flow.Error(str(summary["error"]), timestamp=end)
    result.comment = comment(summary)
    return result


def flow_file(summaries: list[dict[str, Any]]) -> bytes:
    out = io.BytesIO()
    writer = mitmio.FlowWriter(out)
    for summary in summaries:
        writer.add(http_flow(summary))
    return out.getvalue()
