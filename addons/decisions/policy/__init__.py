"""The access policy (docs/policy.md): a TOML file parsed into rules, then requests decided.

Pure: no mitmproxy, no clock, no I/O except reading the file and the key files it names.
Callers import from here, never from the modules, which are free to move.
"""

from addons.decisions.policy.evaluate import (
    ACTIONS,
    CATALOG_SCOPE,
    EMPTY,
    MIRROR_DEFAULT,
    Decision,
    Grant,
    Policy,
    PolicyError,
    PolicyFileAbsent,
    RequireSignature,
    ScopeError,
    glob_error,
    glob_matches,
    granted_scopes,
    is_repository,
    load,
    parse,
    parse_scope,
    scope_actions,
    tag_matches,
    tag_pattern_error,
)

__all__ = [
    "ACTIONS",
    "CATALOG_SCOPE",
    "EMPTY",
    "MIRROR_DEFAULT",
    "Decision",
    "Grant",
    "Policy",
    "PolicyError",
    "PolicyFileAbsent",
    "RequireSignature",
    "ScopeError",
    "glob_error",
    "glob_matches",
    "granted_scopes",
    "is_repository",
    "load",
    "parse",
    "parse_scope",
    "scope_actions",
    "tag_matches",
    "tag_pattern_error",
]
