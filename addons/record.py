"""What the gateway learns about one flow, kept in `flow.metadata` for the access log."""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

_KEY = "tabbify"


@dataclass
class FlowRecord:
    kind: str = "other"  # token | registry | other
    tenant: str | None = None
    repository: str | None = None
    reference: str | None = None
    route: str | None = None  # routes.Route.kind once decided: blob, upload, manifest, ...
    decision: str = "deny"  # allow[:<note>] | deny:<reason>; deny until someone allows
    auth_seconds: float | None = None  # token flows: how long Tabbify auth took
    bytes_in: int = 0
    bytes_out: int = 0
    logged: bool = False

    @property
    def allowed(self) -> bool:
        return self.decision == "allow" or self.decision.startswith("allow:")

    # Stream callables: mitmproxy hands each body chunk through these (streamed flows only).
    def count_in(self, chunk: bytes) -> bytes:
        self.bytes_in += len(chunk)
        return chunk

    def count_out(self, chunk: bytes) -> bytes:
        self.bytes_out += len(chunk)
        return chunk

    def discard_in(self, chunk: bytes) -> bytes:
        self.bytes_in += len(chunk)
        return b""


def record(flow: http.HTTPFlow) -> FlowRecord:
    rec = flow.metadata.get(_KEY)
    if rec is None:
        rec = flow.metadata[_KEY] = FlowRecord()
    return rec
