"""The first look at every request: its target parsed once, and what kind of request it is.

Everything after this reads `record(flow).target` (target.py's strict parse), never mitmproxy's
own view of the path or query: there is one parse, and the gate forwards what it says.

The method is taken as the client's exact bytes. Methods are case-sensitive (RFC 9110 §9.1),
but mitmproxy's `request.method` upper-cases them, while the request line is forwarded as
sent: `get /v2/…` would be decided as GET and reach the backend as `get`. So a method that is
not exactly one the registry API uses is refused here (405), before any decision; after this,
`flow.request.method` is the exact method every later addon decides on.
"""

from __future__ import annotations

from mitmproxy import http

from addons.decisions import routes, target
from addons.engine import oci
from addons.gateway.gate import fail_closed, respond
from addons.gateway.record import record

TOKEN_PATH = "/auth/token"
METHODS = routes.METHODS


def kind_of(path: str) -> str:
    if path == TOKEN_PATH:
        return "token"
    if path == "/v2" or path.startswith("/v2/"):
        return "registry"
    return "other"


class Intake:
    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec, method = record(flow), flow.request.method
        if flow.request.data.method not in METHODS:
            rec.decision = "deny:method"
            respond(
                flow,
                oci.error_response(
                    405,
                    "UNSUPPORTED",
                    "method not supported (methods are case-sensitive)",
                    method="GET",  # never HEAD's bodiless answer: `head` is not HEAD
                    headers={"Allow": ", ".join(m.decode() for m in sorted(METHODS))},
                ),
            )
            return
        try:
            raw = flow.request.data.path
            # The token endpoint's query is the gateway's own (form-decoded, never forwarded).
            rec.target = target.parse(raw, form=raw.split(b"?", 1)[0] == TOKEN_PATH.encode())
        except target.TargetError as e:
            rec.decision = "deny:malformed-target"
            # Whatever follows a malformed request on this connection is not trusted either.
            respond(
                flow,
                oci.error_response(
                    400, "UNSUPPORTED", str(e), method=method, headers={"Connection": "close"}
                ),
            )
            return
        rec.kind = kind_of(rec.target.path)
        if rec.kind == "other":
            rec.decision = "deny:not-found"
            respond(flow, oci.error_response(404, "NOT_FOUND", "not found", method=method))
