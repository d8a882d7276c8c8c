"""The live view's flows as data: the ring of the last flows the workers sent (`FlowRing`,
with the few bodies it keeps under a byte budget), the view's filters (`Filters`, the same
ones the page applies), and the per-second, per-tenant counts behind the overview
(`Overview`). Pure: no sockets, no clock of its own (the caller says `now`).
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Any

RING_SIZE = 10_000
OVERVIEW_WINDOW = 600  # seconds of per-tenant counts kept
CHART_SECONDS = 300  # seconds the chart shows
TABLE_SECONDS = 60  # seconds the per-tenant table sums
MAX_TENANTS = 20
HEADERS = ("request_headers", "response_headers")
BODIES = ("request_body", "response_body", "body_cut", "body_dropped")
BODY_BUDGET = 32 << 20  # bytes of bodies the ring keeps (10 000 flows: the oldest lose theirs)


@dataclass(slots=True)
class Entry:
    id: int
    flow: dict[str, Any]  # the flow without its headers, with `id`: table, filters, overview
    brief: str  # its JSON, as pages get it
    headers: str | None = None  # JSON {"request_headers", "response_headers"}, as sent
    bodies: str | None = None  # JSON {"request_body", "response_body", "body_cut"}, as sent

    def full(self) -> dict[str, Any]:
        """The flow with its headers and bodies, parsed only when someone opens it or
        downloads it."""
        extra: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            parsed = json.loads(self.headers) if self.headers else None
            if isinstance(parsed, dict):
                extra = {k: parsed.get(k) for k in HEADERS}
        with contextlib.suppress(ValueError):
            parsed = json.loads(self.bodies) if self.bodies else None
            if isinstance(parsed, dict):
                extra.update((k, parsed[k]) for k in BODIES if k in parsed)
        return {**self.flow, **extra}


class FlowRing:
    """The last `capacity` flows, with ids that grow by one: a flow is found by arithmetic."""

    def __init__(self, capacity: int = RING_SIZE, body_budget: int = BODY_BUDGET) -> None:
        self.entries: deque[Entry] = deque(maxlen=capacity)
        self.last_id = 0
        self.evicted = 0
        self.body_budget = body_budget
        self.with_bodies: deque[Entry] = deque()  # oldest first
        self.body_bytes = 0

    def keep_bodies(self, entry: Entry) -> None:
        """Bodies stay while all fit `body_budget` (the oldest go first), not as long as
        their flow: a flow the ring lets go lets its bodies go too."""
        if entry.bodies is None:
            return
        self.with_bodies.append(entry)
        self.body_bytes += len(entry.bodies)
        while self.with_bodies and (
            self.body_bytes > self.body_budget
            or self.with_bodies[0].id <= self.last_id - len(self.entries)
        ):
            oldest = self.with_bodies.popleft()
            self.body_bytes -= len(oldest.bodies or "")
            oldest.bodies = '{"body_dropped":true}'

    def add(
        self,
        flow: dict[str, Any],
        brief: str | None = None,
        headers: str | None = None,
        bodies: str | None = None,
    ) -> Entry:
        """`brief`: the JSON text `flow` was read from, reused as it is (the id spliced in);
        without it, the headers in `flow` are split off and the rest encoded here."""
        self.last_id += 1
        if brief is None or "id" in flow or not brief.startswith("{"):
            found = {k: flow.pop(k) for k in HEADERS if k in flow}
            if headers is None and found:
                headers = json.dumps(found, separators=(",", ":"))
            flow["id"] = self.last_id
            brief = json.dumps(flow, separators=(",", ":"))
        else:
            flow["id"] = self.last_id
            brief = f'{{"id":{self.last_id},' + brief[1:]
        if len(self.entries) == self.entries.maxlen:
            self.evicted += 1
        entry = Entry(self.last_id, flow, brief, headers, bodies)
        self.entries.append(entry)
        self.keep_bodies(entry)
        return entry

    def get(self, entry_id: int) -> Entry | None:
        if not self.entries:
            return None
        i = entry_id - self.entries[0].id
        return self.entries[i] if 0 <= i < len(self.entries) else None

    def after(self, entry_id: int, limit: int) -> list[Entry]:
        """The flows after `entry_id`, oldest first; the newest `limit` of them."""
        n = min(max(self.last_id - entry_id, 0), len(self.entries), limit)
        return list(islice(self.entries, len(self.entries) - n, None))


def status_class(flow: dict[str, Any]) -> str:
    status = flow.get("status")
    return f"{status // 100}xx" if isinstance(status, int) else "none"


@dataclass(frozen=True)
class Filters:
    """The view's filters; the page applies the same ones to what it shows."""

    tenant: str | None = None  # exact; "-" = no tenant
    repository: str = ""  # a substring
    status: str | None = None  # "2xx" … "5xx", "none"
    decision: str | None = None  # "allow" | "deny"

    @classmethod
    def from_query(cls, query: dict[str, str]) -> Filters:
        return cls(
            tenant=query.get("tenant") or None,
            repository=query.get("repository", ""),
            status=query.get("status") or None,
            decision=query.get("decision") or None,
        )

    def match(self, flow: dict[str, Any]) -> bool:
        if self.tenant is not None and (flow.get("tenant") or "-") != self.tenant:
            return False
        if self.repository and self.repository not in str(flow.get("repository") or ""):
            return False
        if self.status is not None and status_class(flow) != self.status:
            return False
        if self.decision is not None:
            verdict = str(flow.get("decision") or "").partition(":")[0]
            if verdict != self.decision:
                return False
        return True


class Overview:
    """Per-second counts per tenant: requests, 4xx, 5xx or failed, bytes in, bytes out."""

    def __init__(self, window: int = OVERVIEW_WINDOW) -> None:
        self.window = window
        self.seconds: dict[int, dict[str, list[int]]] = {}

    def add(self, flow: dict[str, Any], now: float) -> None:
        end = flow.get("end")
        second = int(end if isinstance(end, int | float) else now)
        if second <= now - self.window or second > now + 5:
            return
        tenant = str(flow.get("tenant") or "-")
        row = self.seconds.setdefault(second, {}).setdefault(tenant, [0, 0, 0, 0, 0])
        status = flow.get("status")
        row[0] += 1
        if isinstance(status, int) and 400 <= status < 500:
            row[1] += 1
        elif not isinstance(status, int) or status >= 500 or flow.get("error"):
            row[2] += 1
        for i, key in ((3, "bytes_in"), (4, "bytes_out")):
            value = flow.get(key)
            row[i] += value if isinstance(value, int) else 0

    def prune(self, now: float) -> None:
        for second in [s for s in self.seconds if s <= now - self.window]:
            del self.seconds[second]

    def snapshot(self, now: float) -> dict[str, Any]:
        self.prune(now)
        last = int(now)
        first = last - CHART_SECONDS + 1
        series: dict[str, list[int]] = {
            k: [0] * CHART_SECONDS for k in ("requests", "4xx", "5xx", "bytes_in", "bytes_out")
        }
        tenants: dict[str, list[int]] = {}
        sparks: dict[str, list[int]] = {}
        for second, rows in self.seconds.items():
            if not first <= second <= last:
                continue
            i = second - first
            for tenant, row in rows.items():
                for key, value in zip(series, row, strict=True):
                    series[key][i] += value
                sparks.setdefault(tenant, [0] * (CHART_SECONDS // 10))[i // 10] += row[0]
                if second > last - TABLE_SECONDS:
                    total = tenants.setdefault(tenant, [0, 0, 0, 0, 0])
                    for j, value in enumerate(row):
                        total[j] += value
        table = []
        for tenant in sorted(sparks, key=lambda t: -sum(sparks[t]))[:MAX_TENANTS]:
            requests, client, server, bytes_in, bytes_out = tenants.get(tenant, [0] * 5)
            table.append(
                {
                    "tenant": tenant,
                    "requests": requests,
                    "rps": round(requests / TABLE_SECONDS, 2),
                    "client_error_rate": round(client / requests, 4) if requests else 0,
                    "error_rate": round(server / requests, 4) if requests else 0,
                    "bytes_in_per_s": round(bytes_in / TABLE_SECONDS),
                    "bytes_out_per_s": round(bytes_out / TABLE_SECONDS),
                    "spark": sparks[tenant],
                }
            )
        return {"end": last, "seconds": CHART_SECONDS, "series": series, "tenants": table}
