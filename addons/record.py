"""What the gateway learns and decides about one flow, kept in `flow.metadata`.

The deciding addons fill it in; the gate (refusal.Gate) forwards exactly what it says (the
canonical target from `target` and `params`) or refuses; the access log writes it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mitmproxy import http

from addons.target import Target

_KEY = "tabbify"


@dataclass
class FlowRecord:
    kind: str = "other"  # token | registry | other
    target: Target | None = None  # the client's target, parsed once (intake)
    tenant: str | None = None
    subject: str | None = None
    repository: str | None = None
    reference: str | None = None
    route: str | None = None  # routes.Route.kind once decided: blob, upload, manifest, ...
    params: dict[str, str] = field(default_factory=dict)  # query parameters to forward
    decision: str = "deny"  # allow[:<note>] | deny:<reason>; deny until someone allows
    rule: str | None = None  # the policy rule that allowed it: owner, grant <file>:<line>
    # Checks that must complete (in the `request` hook, body read) before the flow may be
    # forwarded; the gate refuses a flow that still has one.
    holds: set[str] = field(default_factory=set)
    auth_seconds: float | None = None  # token flows: how long Tabbify auth took
    bytes_in: int = 0
    bytes_out: int = 0
    logged: bool = False
    cached: bool = False  # answered from this worker's content cache (addons/contentcache.py)
    # The access-log line once written, until the live view's feed (flowfeed.py) takes it:
    # the feed reuses what the log computed instead of reading the flow again.
    line: dict[str, object] | None = None

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
