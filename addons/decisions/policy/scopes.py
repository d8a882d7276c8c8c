"""Token scopes: `repository:<name>:<actions>` parsed, the requested scopes a policy allows
(what the token endpoint grants), and what a token's granted scopes then allow."""

from __future__ import annotations

import re
from collections.abc import Iterable

from addons.decisions.policy.evaluate import Policy
from addons.decisions.policy.patterns import MAX_NAME
from addons.decisions.policy.rules import ACTIONS, ANY, shown
from addons.decisions.routes import NAME

CATALOG_SCOPE = "registry:catalog:*"
_SCOPE = re.compile(rf"repository:(?P<name>{NAME}):(?P<actions>[a-z*]+(?:,[a-z*]+)*)")


class ScopeError(ValueError):
    """A requested scope outside the grammar (the token endpoint answers 400)."""


def parse_scope(scope: str) -> tuple[str, tuple[str, ...]]:
    """`repository:<name>:<actions>` → (name, actions in canonical order, `*` expanded)."""
    m = _SCOPE.fullmatch(scope)
    if m is None or len(m["name"]) > MAX_NAME:
        raise ScopeError(f"malformed scope {shown(scope)}")
    given = m["actions"].split(",")
    if unknown := [a for a in given if a not in ACTIONS and a != ANY]:
        raise ScopeError(f"unknown action {shown(unknown[0])} in scope {shown(scope)}")
    return m["name"], ACTIONS if ANY in given else tuple(a for a in ACTIONS if a in given)


def granted_scopes(
    policy: Policy, tenant: str, subject: str | None, requested: Iterable[str]
) -> list[str]:
    """Requested scopes ∩ policy, as Distribution's token servers answer: one scope per
    repository (first-request order) with the allowed actions in canonical order, scopes with
    nothing allowed dropped. `registry:catalog:*` is kept: the catalog is filtered per caller.
    ScopeError for a malformed scope."""
    wanted: dict[str, set[str]] = {}  # name (or the catalog scope) -> actions
    for scope in requested:
        if scope == CATALOG_SCOPE:
            wanted.setdefault(scope, set())
            continue
        name, actions = parse_scope(scope)
        wanted.setdefault(name, set()).update(actions)
    granted = []
    for name, actions in wanted.items():
        if name == CATALOG_SCOPE:
            granted.append(CATALOG_SCOPE)
            continue
        allowed = [
            a for a in ACTIONS if a in actions and policy.decide(tenant, subject, name, a).allowed
        ]
        if allowed:
            granted.append(f"repository:{name}:{','.join(allowed)}")
    return granted


def scope_actions(scopes: Iterable[str]) -> dict[str, frozenset[str]]:
    """What a token's granted scopes allow, by repository, for checking each request against
    the token (least privilege) as well as against the current policy. ScopeError if any
    scope is malformed; `registry:catalog:*` is not a repository and is left out."""
    allowed: dict[str, set[str]] = {}
    for scope in scopes:
        if scope != CATALOG_SCOPE:
            name, actions = parse_scope(scope)
            allowed.setdefault(name, set()).update(actions)
    return {name: frozenset(actions) for name, actions in allowed.items()}
