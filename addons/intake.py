"""The first look at every request: its target parsed once, and what kind of request it is.

Everything after this reads `record(flow).target` (target.py's strict parse), never mitmproxy's
own view of the path or query: there is one parse, and the gate forwards what it says.
"""

from __future__ import annotations

from mitmproxy import http

from addons import oci, target
from addons.gate import fail_closed, respond
from addons.record import record

TOKEN_PATH = "/auth/token"


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
