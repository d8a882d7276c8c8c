"""/metrics: the node's Prometheus text, from what the workers publish. The workers' request
counters are summed and rendered by addons/decisions/metrics.py; here are the lines only the
admin program can write, because they span every worker or come from elsewhere: connections,
dropped log lines, the worker count, storage per tenant, the content caches, the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from addons import runstate
from addons.admin.workers import STALE, Workers, read_json
from addons.decisions import quota
from addons.engine import connections


def text(workers: Workers, log_dir: str) -> str:
    """The whole /metrics answer. `log_dir`: where `run`'s log relay counts what it dropped
    ("" when there is none)."""
    workers.refresh()
    live = workers.live(time.time())
    lines = [workers.metrics().render().rstrip("\n")]
    now, states = time.time(), []
    for worker in workers.current.values():
        state = dict(worker.get("connections") or {})
        if now - float(worker.get("time", 0)) >= STALE:
            state["open"] = 0  # gone: its connections are closed
        states.append(state)
    lines += connections.metrics_lines(states + workers.retired_connections)
    relayed = read_json(Path(log_dir) / runstate.LOG_DROPPED) if log_dir else None
    lines += log_lines(workers.current.values(), relayed)
    lines += [
        "# HELP tabbify_gateway_workers Gateway worker processes publishing their state.",
        "# TYPE tabbify_gateway_workers gauge",
        f"tabbify_gateway_workers {len(live)}",
    ]
    lines += usage_lines(workers.current.values())
    lines += cache_lines(live)
    lines += ledger_lines(live)
    return "\n".join(lines) + "\n"


def log_lines(states: Iterable[dict[str, Any]], relayed: dict[str, Any] | None) -> list[str]:
    """Lines dropped instead of blocking: by the gateway workers (access log queue full) and
    by `run`'s relay (a consumer not reading stdout/stderr; `relayed` is its dropped.json)."""
    by_workers = sum(int(s.get("access_log_dropped", 0)) for s in states)
    lines = [
        "# HELP tabbify_log_lines_dropped_total Log lines dropped instead of blocking.",
        "# TYPE tabbify_log_lines_dropped_total counter",
        f'tabbify_log_lines_dropped_total{{where="gateway"}} {by_workers}',
    ]
    for stream in ("stdout", "stderr"):
        count = int((relayed or {}).get(stream, 0))
        lines.append(f'tabbify_log_lines_dropped_total{{where="{stream}"}} {count}')
    return lines


def usage_lines(states: Iterable[dict[str, Any]]) -> list[str]:
    """Storage per tenant (contract §8 asks for it: the one place with a tenant label), as
    the newest worker state that carries it says (worker 0 computes it)."""
    found = [s["tenant_usage"] for s in states if isinstance(s.get("tenant_usage"), dict)]
    if not found:
        return []
    newest = max(found, key=lambda u: float(u.get("time", 0)))
    usage, quotas = newest.get("usage"), newest.get("quotas")
    if not isinstance(usage, dict) or not isinstance(quotas, dict):
        return []
    uploading = newest.get("uploading")
    uploading = uploading if isinstance(uploading, dict) else None
    return quota.metrics(usage, quotas, uploading).rstrip("\n").splitlines()


def cache_lines(live: list[dict[str, Any]]) -> list[str]:
    """The content caches of the live workers (addons/gateway/contentcache.py), summed; and each
    worker's resident memory."""
    caches = [w["cache"] for w in live if isinstance(w.get("cache"), dict)]
    lines: list[str] = []
    if caches:

        def total(key: str) -> int:
            return sum(int(c.get(key, 0)) for c in caches)

        hits, misses = total("hits"), total("misses")
        lines += [
            "# HELP tabbify_cache_lookups_total Manifest and blob-HEAD lookups by digest in the"
            " workers' content caches.",
            "# TYPE tabbify_cache_lookups_total counter",
            f'tabbify_cache_lookups_total{{result="hit"}} {hits}',
            f'tabbify_cache_lookups_total{{result="miss"}} {misses}',
            "# HELP tabbify_cache_hit_ratio Hits over lookups since the workers started.",
            "# TYPE tabbify_cache_hit_ratio gauge",
            f"tabbify_cache_hit_ratio {hits / (hits + misses) if hits + misses else 0:.4f}",
            "# HELP tabbify_cache_entries Answers held in the workers' content caches.",
            "# TYPE tabbify_cache_entries gauge",
            f"tabbify_cache_entries {total('entries')}",
            "# HELP tabbify_cache_bytes Bytes the workers' content caches hold (bound: "
            "tabbify_cache_max_bytes).",
            "# TYPE tabbify_cache_bytes gauge",
            f"tabbify_cache_bytes {total('bytes')}",
            "# TYPE tabbify_cache_max_bytes gauge",
            f"tabbify_cache_max_bytes {total('max_bytes')}",
            "# HELP tabbify_cache_evictions_total Entries dropped to stay within the bound.",
            "# TYPE tabbify_cache_evictions_total counter",
            f"tabbify_cache_evictions_total {total('evictions')}",
            "# HELP tabbify_cache_clears_total Caches emptied by a delete or GC.",
            "# TYPE tabbify_cache_clears_total counter",
            f"tabbify_cache_clears_total {total('clears')}",
        ]
    rss = [(w.get("worker"), w.get("rss")) for w in live if isinstance(w.get("rss"), int)]
    if rss:
        lines += [
            "# HELP tabbify_gateway_worker_rss_bytes Resident memory of each gateway worker.",
            "# TYPE tabbify_gateway_worker_rss_bytes gauge",
            *(f'tabbify_gateway_worker_rss_bytes{{worker="{n}"}} {v}' for n, v in rss),
        ]
    return lines


def ledger_lines(live: list[dict[str, Any]]) -> list[str]:
    """The isolation ledger as the live workers see it (none: no lines)."""
    ledgers = [s["ledger"] for s in live if isinstance(s.get("ledger"), dict)]
    if not ledgers:
        return []
    up = all(ledger.get("state") != "down" for ledger in ledgers)
    whole = all(ledger.get("state") != "rebuilding" for ledger in ledgers)
    errors = sum(int(ledger.get("errors", 0)) for ledger in ledgers)
    recreated = sum(int(ledger.get("recreated", 0)) for ledger in ledgers)
    lines = [
        "# HELP tabbify_ledger_up 1 while the isolation ledger can record pushes.",
        "# TYPE tabbify_ledger_up gauge",
        f"tabbify_ledger_up {int(up)}",
        "# HELP tabbify_ledger_whole 0 while the ledger lost records and is rebuilt from"
        " the backend (what it does not hold is answered 503).",
        "# TYPE tabbify_ledger_whole gauge",
        f"tabbify_ledger_whole {int(whole)}",
        "# HELP tabbify_ledger_errors_total Ledger failures (each answered 503).",
        "# TYPE tabbify_ledger_errors_total counter",
        f"tabbify_ledger_errors_total {errors}",
        "# HELP tabbify_ledger_recreated_total Times the ledger file was found deleted or"
        " replaced and reopened.",
        "# TYPE tabbify_ledger_recreated_total counter",
        f"tabbify_ledger_recreated_total {recreated}",
        "# HELP tabbify_ledger_lookups_total Tenant-digest checks: answered from memory"
        " (hit) or by asking the ledger's store (miss: SQLite, or one S3 HEAD).",
        "# TYPE tabbify_ledger_lookups_total counter",
    ]
    for result, key in (("hit", "hits"), ("miss", "misses")):
        total = sum(int(ledger.get(key, 0)) for ledger in ledgers)
        lines.append(f'tabbify_ledger_lookups_total{{result="{result}"}} {total}')
    return lines
