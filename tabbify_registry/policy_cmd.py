"""`tabbify-registry policy check [FILE]` and `policy explain ...` (CONTRACTS §7).

Exit status: check 0 = valid (or no policy file at the configured path: the default rule),
1 = invalid; explain 0 = allow, 1 = deny; 2 = a usage or setting error (any command).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

from addons.policy import ACTIONS, Policy, PolicyError, is_repository, load
from addons.policy_store import describe, read
from addons.routes import is_component
from tabbify_registry import deployment
from tabbify_registry.settings import ConfigError, parse_data_dir, parse_policy_file


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    policy = sub.add_parser("policy", help="check the access policy or explain a decision")
    commands = policy.add_subparsers(dest="policy_command", required=True)
    check = commands.add_parser("check", help="validate a policy file")
    check.add_argument("file", nargs="?", help="default: REGISTRY_POLICY_FILE")
    explain = commands.add_parser("explain", help="print allow/deny and the deciding rule")
    explain.add_argument("--tenant", required=True)
    explain.add_argument("--subject", help="the JWT's sub (default: none)")
    explain.add_argument("--repository", required=True)
    explain.add_argument("--action", required=True, choices=ACTIONS)
    explain.add_argument("--file", help="policy file (default: REGISTRY_POLICY_FILE)")


def configured(env: Mapping[str, str], file: str | None) -> Policy:
    """An explicit file must exist; the configured one may be absent (the default rule)."""
    return load(file) if file is not None else read(parse_policy_file(env))


def check(env: Mapping[str, str], file: str | None) -> int:
    policy = configured(env, file)
    print(describe(Path(file) if file else parse_policy_file(env), policy))
    return 0


def explain(env: Mapping[str, str], args: argparse.Namespace) -> int:
    if not is_component(args.tenant):
        raise ConfigError(f"--tenant {args.tenant!r} is not a valid tenant")
    if not is_repository(args.repository):
        raise ConfigError(f"--repository {args.repository!r} is not a repository name")
    policy = configured(env, args.file)
    decision = policy.decide(args.tenant, args.subject, args.repository, args.action)
    print(f"{'allow' if decision.allowed else 'deny'} {decision.rule}")
    return 0 if decision.allowed else 1


def main(env: Mapping[str, str], args: argparse.Namespace) -> int:
    if args.policy_command == "explain" or args.file is None:
        # The deployment's policy file (and mode), as `run` uses them there.
        env = deployment.environment(env, required=False)
        recorded = deployment.read(parse_data_dir(env)) is not None
        if args.policy_command == "explain" and recorded and not env.get("REGISTRY_AUTH_URL"):
            raise ConfigError(
                f"the registry at {parse_data_dir(env)} runs in anonymous dev mode (no "
                "REGISTRY_AUTH_URL): no policy applies there"
            )
    try:
        if args.policy_command == "check":
            return check(env, args.file)
        return explain(env, args)
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1 if args.policy_command == "check" else 2
