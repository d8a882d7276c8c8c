"""The access policy (docs/policy.md): a TOML file parsed into rules, then requests decided.

Pure: no mitmproxy, no clock, no I/O except reading the file and the key files it names.
Callers import from here; the modules, one job each:

- `rules`: the rules as plain data, the decision, the errors
- `patterns`: repository globs and tag patterns (valid? matching? indexed)
- `toml_lines`: where each table and key is in the TOML text, for errors with a line
- `parsing`: a policy file read and checked into a `Policy` (`parse`, `load`)
- `evaluate`: `Policy`, which decides requests and lists what the catalog may show
- `lookups`: what else applies to a repository or tenant (retention, quota, rules by glob)
- `scopes`: token scopes parsed and granted
"""

from addons.decisions.policy.evaluate import EMPTY, MIRROR_DEFAULT, Policy
from addons.decisions.policy.parsing import load, parse
from addons.decisions.policy.patterns import (
    glob_error,
    glob_matches,
    is_repository,
    tag_matches,
    tag_pattern_error,
)
from addons.decisions.policy.rules import (
    ACTIONS,
    Decision,
    Grant,
    PolicyError,
    PolicyFileAbsent,
    RequireSignature,
)
from addons.decisions.policy.scopes import (
    CATALOG_SCOPE,
    ScopeError,
    granted_scopes,
    parse_scope,
    scope_actions,
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
