"""Prometheus text metrics (contract §6), fed by the access log, served by the admin addon.

Labels are bounded on purpose: status class, allow/deny, token outcome. Never a tenant or a
repository: they are unbounded and belong in the access log.
"""

from __future__ import annotations

import bisect
from collections import Counter

BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def add(self, other: dict[str, object]) -> None:
        """Add another histogram's state (several worker processes, one view)."""
        counts = other.get("counts")
        if isinstance(counts, list) and len(counts) == len(self.counts):
            self.counts = [a + int(b) for a, b in zip(self.counts, counts, strict=True)]
            self.sum += float(other.get("sum", 0.0))  # type: ignore[arg-type]

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {cumulative}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.tokens: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.spliced = 0
        self.auth_latency = Histogram()
        self.backend_latency = Histogram()

    def observe(
        self,
        *,
        status: int | None,
        decision: str,
        kind: str,
        bytes_in: int,
        bytes_out: int,
        auth_seconds: float | None,
        backend_seconds: float | None,
        spliced: int = 0,
    ) -> None:
        status_class = f"{status // 100}xx" if status else "none"
        verdict = "allow" if decision.startswith("allow") else "deny"
        self.requests[(status_class, verdict)] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.spliced += spliced
        if kind == "token":
            self.tokens["granted" if verdict == "allow" else decision.partition(":")[2]] += 1
        if auth_seconds is not None:
            self.auth_latency.observe(auth_seconds)
        if backend_seconds is not None:
            self.backend_latency.observe(backend_seconds)

    def state(self) -> dict[str, object]:
        """Everything counted, as JSON-ready data (what a worker publishes)."""
        return {
            "requests": [[c, d, n] for (c, d), n in self.requests.items()],
            "tokens": dict(self.tokens),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "spliced": self.spliced,
            "auth_latency": {"counts": self.auth_latency.counts, "sum": self.auth_latency.sum},
            "backend_latency": {
                "counts": self.backend_latency.counts,
                "sum": self.backend_latency.sum,
            },
        }

    def add(self, state: dict[str, object]) -> None:
        """Add a published state to this one: the admin endpoint's sum over the workers."""
        for row in state.get("requests") or []:  # type: ignore[attr-defined]
            status_class, decision, n = row
            self.requests[(str(status_class), str(decision))] += int(n)
        for outcome, n in (state.get("tokens") or {}).items():  # type: ignore[attr-defined]
            self.tokens[str(outcome)] += int(n)
        self.bytes_in += int(state.get("bytes_in", 0))  # type: ignore[arg-type]
        self.bytes_out += int(state.get("bytes_out", 0))  # type: ignore[arg-type]
        self.spliced += int(state.get("spliced", 0))  # type: ignore[arg-type]
        self.auth_latency.add(state.get("auth_latency") or {})  # type: ignore[arg-type]
        self.backend_latency.add(state.get("backend_latency") or {})  # type: ignore[arg-type]

    def render(self) -> str:
        lines = [
            "# HELP tabbify_requests_total Requests through the gateway.",
            "# TYPE tabbify_requests_total counter",
        ]
        for (status_class, decision), n in sorted(self.requests.items()):
            lines.append(
                f'tabbify_requests_total{{status_class="{status_class}",decision="{decision}"}} {n}'
            )
        lines += [
            "# HELP tabbify_bytes_total Body bytes through the gateway.",
            "# TYPE tabbify_bytes_total counter",
            f'tabbify_bytes_total{{direction="in"}} {self.bytes_in}',
            f'tabbify_bytes_total{{direction="out"}} {self.bytes_out}',
            "# HELP tabbify_spliced_bytes_total Bytes out moved in the kernel (splice).",
            "# TYPE tabbify_spliced_bytes_total counter",
            f"tabbify_spliced_bytes_total {self.spliced}",
            "# HELP tabbify_token_exchanges_total /auth/token answers by outcome.",
            "# TYPE tabbify_token_exchanges_total counter",
        ]
        for outcome, n in sorted(self.tokens.items()):
            lines.append(f'tabbify_token_exchanges_total{{outcome="{outcome}"}} {n}')
        lines += [
            "# HELP tabbify_auth_latency_seconds Time Tabbify auth took to validate a JWT.",
            "# TYPE tabbify_auth_latency_seconds histogram",
            *self.auth_latency.lines("tabbify_auth_latency_seconds"),
            "# HELP tabbify_backend_latency_seconds Request end to backend response headers.",
            "# TYPE tabbify_backend_latency_seconds histogram",
            *self.backend_latency.lines("tabbify_backend_latency_seconds"),
        ]
        return "\n".join(lines) + "\n"
