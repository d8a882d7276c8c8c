"""Per-tenant storage quotas (`[[quota]]`): accounting only, pure.

Usage is counted from what the isolation ledger says each tenant owns, as Harbor does: a blob
that two tenants reference (one mounted it from the other) counts in full for each of them,
so no tenant's usage depends on what another tenant deletes. Digests whose size is unknown
count as 0: the gateway must record a size with every confirmed upload.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping


def usage(owned: Mapping[str, Iterable[str]], sizes: Mapping[str, int]) -> dict[str, int]:
    """Bytes per tenant: the sum of the sizes of the distinct digests it owns."""
    return {tenant: sum(sizes.get(d, 0) for d in set(digests)) for tenant, digests in owned.items()}


def incoming(owned_by_tenant: Collection[str], digest: str, size: int) -> int:
    """What storing `digest` adds to the tenant's usage: nothing if it already owns it."""
    return 0 if digest in owned_by_tenant else max(size, 0)


def would_exceed(
    tenant: str, usage: Mapping[str, int], quota: int | None, incoming_bytes: int
) -> bool:
    """True when accepting `incoming_bytes` more would take the tenant over its quota.

    Reaching the quota exactly is allowed. Adding nothing (a re-push, a manifest whose blobs
    the tenant already owns) never exceeds, even for a tenant already over a lowered quota:
    refusing it would free nothing and would block re-tagging and signatures.
    """
    if quota is None or incoming_bytes <= 0:
        return False
    return usage.get(tenant, 0) + incoming_bytes > quota


def quota_for(tenant: str, rules: Iterable[tuple[Iterable[str], int]]) -> int | None:
    """The quota of `tenant` from `[[quota]]` rules (tenants, bytes); `"*"` is every tenant.

    Several matching rules: the smallest limit applies. No matching rule: None (unlimited).
    """
    limits = [limit for tenants, limit in rules if tenant in (ts := set(tenants)) or "*" in ts]
    return min(limits) if limits else None


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics(
    usage: Mapping[str, int],
    quotas: Mapping[str, int | None],
    uploading: Mapping[str, int] | None = None,
) -> str:
    """Prometheus text for /metrics: usage per tenant, the quota where one is set, and the
    bytes in unfinished uploads of tenants under a quota (they count against it too)."""
    lines = [
        "# HELP tabbify_tenant_usage_bytes Bytes of the blobs and manifests a tenant "
        "references (a blob shared by mount counts for each tenant).",
        "# TYPE tabbify_tenant_usage_bytes gauge",
    ]
    lines += [
        f'tabbify_tenant_usage_bytes{{tenant="{_label(t)}"}} {n}' for t, n in sorted(usage.items())
    ]
    limited = sorted((t, q) for t, q in quotas.items() if q is not None)
    if limited:
        lines += [
            "# HELP tabbify_tenant_quota_bytes The tenant's storage quota.",
            "# TYPE tabbify_tenant_quota_bytes gauge",
        ]
        lines += [f'tabbify_tenant_quota_bytes{{tenant="{_label(t)}"}} {q}' for t, q in limited]
    if uploading:
        lines += [
            "# HELP tabbify_tenant_uploading_bytes Bytes in a tenant's unfinished uploads "
            "(tenants under a quota; they count against it).",
            "# TYPE tabbify_tenant_uploading_bytes gauge",
        ]
        lines += [
            f'tabbify_tenant_uploading_bytes{{tenant="{_label(t)}"}} {n}'
            for t, n in sorted(uploading.items())
        ]
    return "\n".join(lines) + "\n"


def refusal(used: int, limit: int, adding: int, rule: str) -> str:
    """What every client prints of a quota refusal: usage, limit, and the rule setting it."""
    more = f", {adding} more do not fit" if adding else ""
    return f"quota exceeded: {used} of {limit} bytes used{more} ({rule})"
