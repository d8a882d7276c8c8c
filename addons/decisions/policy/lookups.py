"""What applies to a repository or a tenant besides access, as gc, the gateway's hooks and
`policy explain` ask it: the rules whose repository globs match a name ([[immutable]],
[[require_signature]], [[retention]]), the matching retention rules combined into one plan, and
a tenant's [[quota]]."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from addons.decisions.policy.patterns import (
    GlobKey,
    glob_key,
    glob_regex,
    is_repository,
    key_depth,
    repository_keys,
    tag_matches,
)
from addons.decisions.policy.rules import ANY, Immutable, Quota, RequireSignature, Retention, Rule


@dataclass(frozen=True)
class RetentionPlan:
    """The matching [[retention]] rules combined field by field to whatever keeps more."""

    keep_last: int | None  # None: no rule limits the number of tags
    untagged_after: timedelta | None  # None: no rule removes untagged manifests
    protected_tags: tuple[str, ...]
    rules: tuple[str, ...]

    def protects(self, tag: str) -> bool:
        return any(tag_matches(p, tag) for p in self.protected_tags)


def retention_plan(rules: list[Retention], name: Callable[[Rule], str]) -> RetentionPlan | None:
    """The matching rules (file order) combined, or None if there are none."""
    if not rules:
        return None
    keeps = [r.keep_last for r in rules if r.keep_last is not None]
    afters = [r.untagged_after for r in rules if r.untagged_after is not None]
    return RetentionPlan(
        keep_last=max(keeps) if keeps else None,
        untagged_after=max(afters) if afters else None,
        protected_tags=tuple(dict.fromkeys(p for r in rules for p in r.protected_tags)),
        rules=tuple(name(r) for r in rules),
    )


def quota_for(quotas: Iterable[Quota], tenant: str) -> Quota | None:
    """The quota naming this tenant, else the one for '*', else None (no quota)."""
    fallback = None
    for rule in quotas:
        if tenant in rule.tenants:
            return rule
        if ANY in rule.tenants:
            fallback = rule
    return fallback


class RepositoryIndex:
    """Rules with repository globs, bucketed by `glob_key`, so a lookup only tries the globs
    that could match."""

    def __init__(self, rules: Iterable[Immutable | RequireSignature | Retention]) -> None:
        self.buckets: dict[GlobKey, list[tuple[int, Any, re.Pattern[str]]]] = {}
        for order, rule in enumerate(rules):
            for glob in rule.repositories:
                entry = (order, rule, re.compile(glob_regex(glob)))
                self.buckets.setdefault(glob_key(glob), []).append(entry)
        self.depth = key_depth(self.buckets)

    def matching(self, repository: str) -> list[Any]:
        if not self.buckets or not is_repository(repository):
            return []
        found = {
            order: rule
            for key in repository_keys(repository, self.depth)
            for order, rule, regex in self.buckets.get(key, ())
            if regex.fullmatch(repository)
        }
        return [found[order] for order in sorted(found)]
