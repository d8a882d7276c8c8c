"""Deciding requests: a parsed `Policy` answers whether a caller may pull, push or delete on a
repository (through a compiled view of the grants and restricts per caller), which names the
catalog may show it, and which other rules apply to a repository or a tenant (`lookups`).
`PolicyStore` (reload while running) lives in `addons/gateway/policy_store.py`.

Semantics (docs/policy.md says the same for operators):

- A caller is a tenant (JWT `network`, else `sub`) and a subject (JWT `sub`, may be unknown).
  A rule's `tenants` and `subjects` are exact values or `"*"` (any authenticated caller). When
  a rule has both, the caller must match both.
- Rights on a repository: the owner rule (tenant `t` may pull, push, delete on `t/<one or more
  segments>`, never the bare `t`) or any matching `[[grant]]`. Then every `[[restrict]]` that
  matches the caller must allow the action and, if it has `repositories`, the repository.
  Nothing else is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from addons.decisions.policy.lookups import (
    RepositoryIndex,
    RetentionPlan,
    quota_for,
    retention_plan,
)
from addons.decisions.policy.patterns import (
    GlobKey,
    any_of,
    glob_key,
    is_repository,
    key_depth,
    literal_prefix,
    repository_keys,
    tag_matches,
)
from addons.decisions.policy.rules import (
    ACTIONS,
    ANY,
    KINDS,
    MIRROR,
    Decision,
    Grant,
    Immutable,
    Quota,
    RequireSignature,
    Restrict,
    Retention,
    Rule,
)
from addons.decisions.routes import is_component

_VIEW_CACHE = 4096  # callers whose compiled view is kept per policy


def _caller_matches(rule: Grant | Restrict, tenant: str, subject: str | None) -> bool:
    if rule.tenants is not None and ANY not in rule.tenants and tenant not in rule.tenants:
        return False
    if rule.subjects is not None and ANY not in rule.subjects:
        return subject is not None and subject in rule.subjects
    return True


NO_RULE = Decision(False, "no rule")
MIRROR_DEFAULT = "mirror default (every authenticated caller may pull mirror/**)"
_MIRROR_READ_ONLY = Decision(False, "mirror/ is read-only")
# Pull on mirror/** for every caller, unless the file's own grants name mirror/ (then those
# decide who pulls there). [[restrict]] rules narrow it as any grant.
_MIRROR_GRANT_LINE = 0
_OWNER = Decision(True, "owner")
_BAD_NAME = Decision(False, "invalid repository name")
_BAD_TENANT = Decision(False, "invalid tenant")


@dataclass(frozen=True)
class _Limit:
    """One restrict as it applies to one action: allowed nowhere, anywhere or `within`."""

    name: str
    allowed: bool
    within: re.Pattern[str] | None

    def blocks(self, repository: str) -> bool:
        if not self.allowed:
            return True
        return self.within is not None and self.within.fullmatch(repository) is None


class _Grants:
    """One caller's grants for one action. Globs are bucketed by `glob_key` (usually the
    tenant at position 0) and each bucket is one regex whose alternatives are in file order,
    so a decision tries only the few globs that could match, and `lastgroup` names the first
    grant that does."""

    def __init__(self, policy: Policy, grants: list[Grant]) -> None:
        buckets: dict[GlobKey, dict[int, list[str]]] = {}
        for order, grant in enumerate(grants):
            for glob in grant.repositories:
                buckets.setdefault(glob_key(glob), {}).setdefault(order, []).append(glob)
        self.buckets = {
            key: re.compile("|".join(f"(?P<g{o}>{any_of(gs)})" for o, gs in by_order.items()))
            for key, by_order in buckets.items()
        }
        self.depth = key_depth(self.buckets)
        self.decisions = {f"g{o}": Decision(True, policy.name(g)) for o, g in enumerate(grants)}

    def first(self, repository: str) -> Decision | None:
        if not self.buckets:
            return None
        found = None
        for key in repository_keys(repository, self.depth):
            regex = self.buckets.get(key)
            if regex is not None and (m := regex.fullmatch(repository)) is not None:
                name = m.lastgroup or ""
                if found is None or int(name[1:]) < int(found[1:]):
                    found = name
        return None if found is None else self.decisions[found]


class _View:
    """One caller's rules, compiled: per action its grants and its restricts (file order)."""

    def __init__(self, policy: Policy, tenant: str, subject: str | None) -> None:
        ok = is_component(tenant) and tenant != MIRROR
        self.owner = tenant + "/" if ok else None
        grants = policy.grant_callers.applying(tenant, subject)
        restricts = policy.restrict_callers.applying(tenant, subject)
        self.grants = {a: policy.compiled([g for g in grants if a in g.actions]) for a in ACTIONS}
        self.limits = {
            action: tuple(
                _Limit(
                    policy.name(r),
                    action in r.actions,
                    re.compile(any_of(r.repositories)) if r.repositories else None,
                )
                for r in restricts
            )
            for action in ACTIONS
        }

    def decide(self, repository: str, action: str) -> Decision:
        if self.owner is None:
            return _BAD_TENANT
        if not is_repository(repository):
            return _BAD_NAME
        if repository.startswith(MIRROR + "/") and action != "pull":
            return _MIRROR_READ_ONLY  # whatever any rule grants
        if repository.startswith(self.owner):
            decision = _OWNER
        elif (granted := self.grants[action].first(repository)) is not None:
            decision = granted
        else:
            return NO_RULE
        for limit in self.limits[action]:
            if limit.blocks(repository):
                return Decision(False, limit.name)
        return decision


class Policy:
    """A parsed policy. Immutable; the per-caller compiled views are cached on it."""

    def __init__(self, source: str, rules: Iterable[Rule] = (), files: tuple[Path, ...] = ()):
        self.source = source
        self.files = files  # key files the policy read (the reloader watches them too)
        self.rules = tuple(sorted(rules, key=lambda r: r.line))
        self.grants = tuple(r for r in self.rules if isinstance(r, Grant))
        effective = self.grants
        if not any(
            literal_prefix(g).startswith(MIRROR + "/") for r in self.grants for g in r.repositories
        ):
            mirror = Grant(_MIRROR_GRANT_LINE, (MIRROR + "/**",), ("pull",), (ANY,), None)
            effective = (mirror, *self.grants)
        self.restricts = tuple(r for r in self.rules if isinstance(r, Restrict))
        self.immutables = tuple(r for r in self.rules if isinstance(r, Immutable))
        self.signatures = tuple(r for r in self.rules if isinstance(r, RequireSignature))
        self.retentions = tuple(r for r in self.rules if isinstance(r, Retention))
        self.quotas = tuple(r for r in self.rules if isinstance(r, Quota))
        self.grant_callers = _CallerIndex(effective)
        self.restrict_callers = _CallerIndex(self.restricts)
        self._immutable = RepositoryIndex(self.immutables)
        self._signature = RepositoryIndex(self.signatures)
        self._retention = RepositoryIndex(self.retentions)
        self._views: dict[tuple[str, str | None], _View] = {}
        self._grant_sets: dict[tuple[int, ...], _Grants] = {}

    def name(self, rule: Rule) -> str:
        if rule.line == _MIRROR_GRANT_LINE:
            return MIRROR_DEFAULT
        return f"{rule.kind} {self.source}:{rule.line}"

    def counts(self) -> dict[str, int]:
        return {kind: sum(1 for r in self.rules if r.kind == kind) for kind in KINDS}

    def _view(self, tenant: str, subject: str | None) -> _View:
        key = (tenant, subject)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _VIEW_CACHE:
                self._views.clear()
                self._grant_sets.clear()
            view = self._views[key] = _View(self, tenant, subject)
        return view

    def compiled(self, grants: list[Grant]) -> _Grants:
        """Compiled once per distinct set of grants: callers that share their rules (every
        caller, for grants to '*') share the regexes too."""
        key = tuple(id(g) for g in grants)
        found = self._grant_sets.get(key)
        if found is None:
            found = self._grant_sets[key] = _Grants(self, grants)
        return found

    def decide(self, tenant: str, subject: str | None, repository: str, action: str) -> Decision:
        """May this caller do `action` (pull, push, delete) on `repository`?"""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        return self._view(tenant, subject).decide(repository, action)

    def pullable(self, tenant: str, subject: str | None) -> Callable[[str], bool]:
        """Predicate for the catalog: exactly the repositories this caller may pull."""
        view = self._view(tenant, subject)
        return lambda repository: view.decide(repository, "pull").allowed

    def pull_prefixes(self, tenant: str, subject: str | None) -> list[str]:
        """Name prefixes outside which this caller can pull nothing: its own namespace and
        each pull grant's leading literal segments ('' = anywhere). The catalog scans only
        these ranges (then filters each name with `pullable`)."""
        prefixes = {tenant + "/"}
        for grant in self.grant_callers.applying(tenant, subject):
            # Mirrored repositories are not in the catalog (nobody's in the ledger).
            if "pull" in grant.actions and grant.line != _MIRROR_GRANT_LINE:
                prefixes.update(literal_prefix(glob) for glob in grant.repositories)
        ordered = sorted(prefixes)
        # Keep the widest: a prefix inside another one's range adds nothing.
        return [p for i, p in enumerate(ordered) if not any(p.startswith(q) for q in ordered[:i])]

    def has_immutable(self, repository: str) -> bool:
        """Whether any [[immutable]] rule covers some tag of this repository."""
        return any(True for _ in self._immutable.matching(repository))

    def is_immutable(self, repository: str, tag: str) -> str | None:
        """The name of the first [[immutable]] rule covering this tag, or None."""
        for rule in self._immutable.matching(repository):
            if any(tag_matches(p, tag) for p in rule.tags):
                return self.name(rule)
        return None

    def signature_rules(self, repository: str) -> tuple[RequireSignature, ...]:
        """Every matching [[require_signature]]; each one must be satisfied by one of its keys."""
        return tuple(self._signature.matching(repository))

    def retention(self, repository: str) -> RetentionPlan | None:
        return retention_plan(self._retention.matching(repository), self.name)

    def quota(self, tenant: str) -> Quota | None:
        """The quota naming this tenant, else the one for '*', else None (no quota)."""
        return quota_for(self.quotas, tenant)


class _CallerIndex[R: (Grant, Restrict)]:
    """Rules by the tenant or subject they name (a rule naming both is filed under its
    tenants), so building a caller's view only looks at rules that can apply to it."""

    def __init__(self, rules: tuple[R, ...]) -> None:
        self.rules = rules
        self.tenants: dict[str, list[int]] = {}
        self.subjects: dict[str, list[int]] = {}
        self.anyone: list[int] = []
        for position, rule in enumerate(rules):
            if rule.tenants is not None and ANY not in rule.tenants:
                for t in rule.tenants:
                    self.tenants.setdefault(t, []).append(position)
            elif rule.subjects is not None and ANY not in rule.subjects:
                for s in rule.subjects:
                    self.subjects.setdefault(s, []).append(position)
            else:
                self.anyone.append(position)

    def applying(self, tenant: str, subject: str | None) -> list[R]:
        """The rules that apply to this caller, in file order."""
        positions = {*self.anyone, *self.tenants.get(tenant, ())}
        if subject is not None:
            positions.update(self.subjects.get(subject, ()))
        rules = (self.rules[p] for p in sorted(positions))
        return [r for r in rules if _caller_matches(r, tenant, subject)]


EMPTY = Policy("(no policy file)")  # today's rule: the owner rule alone
