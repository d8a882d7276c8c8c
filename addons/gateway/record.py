"""What the gateway learns and decides about one flow: one typed record per flow.

The deciding addons fill it in; the gate (gate.Gate) forwards exactly what it says (the
canonical target from `target` and `params`) or delivers `answer`; the access log writes it
out. This module is the only one that touches `flow.metadata` (one key, `tabbify`): every
piece of per-flow state an addon keeps between its hooks, or hands to another addon, is a
field here, so what travels between addons is declared in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mitmproxy import http

from addons.decisions.target import Target

_KEY = "tabbify"
HEAD_KEPT = 16 * 1024  # bytes of a streamed manifest the live view may show


@dataclass(slots=True)
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
    cached: bool = False  # answered from this worker's content cache (contentcache.py)
    # ContentCache: a DELETE empties every worker's cache when answered; a manifest PUT (the
    # generation token seen at its head) fills it on 201; a read fills (key, token) on 200.
    cache_delete: bool = False
    cache_put: object | None = None
    cache_fill: object | None = None
    # The access-log line once written, until the live view's feed (flowfeed.py) takes it:
    # the feed reuses what the log computed instead of reading the flow again.
    line: dict[str, object] | None = None
    # What the gateway answers instead of forwarding (`respond`); the gate delivers it.
    answer: http.Response | None = None
    # Digests TenantIsolation records for the tenant once the backend confirms the push (201);
    # Accounting empties it when it refuses the push (over quota, ledger unavailable).
    pending: list[str] | None = None
    frozen: bool = False  # WriteFreeze counts this write in flight until it ends
    # WriteFreeze: a manifest PUT counted only in `request`, once its body (its links) is here.
    frozen_at_body: bool = False
    # Accounting: the upload session this request reserved bytes in (streamcap.InFlight).
    upload: object | None = None
    signed_digest: str | None = None  # SignedOnly: the manifest digest checked and asked for
    invalidates_signatures: bool = False  # SignedOnly: a manifest PUT/DELETE, see its response
    page_tags: bool = False  # Listing: a small tag list read whole, to page in `response`
    # MirrorGate: the digest a by-digest read from a mirror must have (then its DigestCheck),
    # whether the manifest is buffered and its references recorded, and the single-flight key
    # of a first blob pull that others wait for.
    mirror_verify: object | None = None
    mirror_record: bool = False
    mirror_first: str | None = None
    # The first HEAD_KEPT bytes of a streamed manifest answer, for the live view (flowfeed.py):
    # a copy of what passes, never a buffer the stream waits on.
    head_out: bytearray | None = None

    @property
    def allowed(self) -> bool:
        return self.decision == "allow" or self.decision.startswith("allow:")

    # Stream callables: mitmproxy hands each body chunk through these (streamed flows only).
    def count_in(self, chunk: bytes) -> bytes:
        self.bytes_in += len(chunk)
        return chunk

    def add_out(self, n: int) -> None:
        """Bytes of the answer's body sent on (the engine's PassThrough stream calls it)."""
        self.bytes_out += n

    def count_keep_out(self, chunk: bytes) -> bytes:
        """Counts the bytes sent on; keeps a copy of the first HEAD_KEPT bytes in `head_out`."""
        self.bytes_out += len(chunk)
        head = self.head_out
        if head is not None and len(head) < HEAD_KEPT:
            head += chunk[: HEAD_KEPT - len(head)]
        return chunk

    def discard_in(self, chunk: bytes) -> bytes:
        self.bytes_in += len(chunk)
        return b""


def record(flow: http.HTTPFlow) -> FlowRecord:
    rec = flow.metadata.get(_KEY)
    if rec is None:
        rec = flow.metadata[_KEY] = FlowRecord()
    return rec


def respond(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer `flow` with `response` instead of forwarding it; the gate delivers it (call from
    requestheaders)."""
    record(flow).answer = response


def answered(flow: http.HTTPFlow) -> bool:
    """Whether an addon already answered `flow` (`respond`)."""
    return record(flow).answer is not None
