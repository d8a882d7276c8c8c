"""`tabbify-registry policy check [--policy FILE]` and `policy explain ...` (contract §7).

Both take the policy file the same way: `--policy FILE`, else the deployment's
REGISTRY_POLICY_FILE (`check FILE` and `explain --file FILE` still work).

`explain` prints the access decision first (`allow <rule>` / `deny <rule>`), then what else
the policy says about that request, one line each, every rule by file:line:
- `--tag T` with `--action push|delete`: whether an `[[immutable]]` rule refuses it;
- a pull: each `[[require_signature]]` rule the repository's manifests must satisfy, and
  its keys (SHA-256 of the key's DER SubjectPublicKeyInfo:
  `openssl pkey -pubin -in key.pub -outform DER | sha256sum`);
- an allowed push: the tenant's `[[quota]]` and the rule that sets it.

Exit status: check 0 = valid (or no policy file at the configured path: the default rule),
1 = invalid; explain 0 = allowed, 1 = refused (by the access rules or an immutable tag);
2 = a usage or setting error (any command).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from addons.cli import deployment
from addons.config.settings import ConfigError, parse_data_dir, parse_policy_file
from addons.decisions.policy import ACTIONS, Policy, PolicyError, is_repository, load
from addons.decisions.routes import TAG, is_component
from addons.gateway.policy_store import describe, read

_POLICY_HELP = "policy file (default: the deployment's REGISTRY_POLICY_FILE)"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    policy = sub.add_parser(
        "policy",
        help="check the access policy or explain a decision",
        description="Check the access policy file, or explain what it decides for a request.",
    )
    commands = policy.add_subparsers(dest="policy_command", required=True)
    check = commands.add_parser(
        "check", help="validate a policy file", description="Validate a policy file."
    )
    check.add_argument("--policy", metavar="FILE", help=_POLICY_HELP)
    check.add_argument("file", nargs="?", metavar="FILE", help="the same as --policy FILE")
    explain = commands.add_parser(
        "explain",
        help="print allow/deny and the deciding rule",
        description="Print allow or deny and the rule deciding it; then, one line each, the "
        "immutable rule refusing --tag, the signature rules a pull must satisfy, and the "
        "tenant's quota on an allowed push. Exit 0 = allowed, 1 = refused.",
    )
    explain.add_argument("--tenant", required=True)
    explain.add_argument("--subject", help="the JWT's sub (default: none)")
    explain.add_argument("--repository", required=True)
    explain.add_argument("--action", required=True, choices=ACTIONS)
    explain.add_argument("--tag", help="a tag pushed or deleted: is it immutable?")
    explain.add_argument("--policy", metavar="FILE", help=_POLICY_HELP)
    explain.add_argument("--file", help=argparse.SUPPRESS)  # the former name of --policy


def policy_file(args: argparse.Namespace) -> str | None:
    """The file named on the command line (--policy, or the older spellings), if any."""
    given = [f for f in (args.policy, args.file) if f is not None]
    if len(given) > 1 and given[0] != given[1]:
        raise ConfigError("give the policy file once (--policy FILE)")
    return given[0] if given else None


def configured(env: Mapping[str, str], file: str | None) -> Policy:
    """An explicit file must exist; the configured one may be absent (the default rule)."""
    return load(file) if file is not None else read(parse_policy_file(env))


def check(env: Mapping[str, str], file: str | None) -> int:
    policy = configured(env, file)
    print(describe(Path(file) if file else parse_policy_file(env), policy))
    return 0


def key_fingerprint(pem: str) -> str:
    """`sha256:<hex>` of the key's DER SubjectPublicKeyInfo (what `openssl pkey -pubin
    -outform DER | sha256sum` prints for its PEM file)."""
    key = serialization.load_pem_public_key(pem.encode())
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def details(policy: Policy, args: argparse.Namespace, allowed: bool) -> tuple[list[str], bool]:
    """The lines after the access decision, and whether one of them refuses the request."""
    lines, refused = [], False
    if args.tag is not None:
        rule = policy.is_immutable(args.repository, args.tag)
        if rule is None:
            lines.append(f"tag {args.tag}: no [[immutable]] rule covers it")
        else:
            # The first push of a covered tag goes through; only a change is refused.
            what = "a push over an existing tag" if args.action == "push" else "a delete"
            lines.append(f"tag {args.tag}: immutable by {rule}: {what} is refused")
            refused = True
    if args.action == "pull":
        for sig in policy.signature_rules(args.repository):
            keys = ", ".join(key_fingerprint(k) for k in sig.keys)
            lines.append(f"signature required by {policy.name(sig)}: one of {keys}")
    if args.action == "push" and allowed:  # what an allowed push may store
        quota = policy.quota(args.tenant)
        if quota is not None:
            lines.append(f"quota {quota.bytes} bytes for {args.tenant} by {policy.name(quota)}")
    return lines, refused


def explain(env: Mapping[str, str], args: argparse.Namespace, file: str | None) -> int:
    if not is_component(args.tenant):
        raise ConfigError(f"--tenant {args.tenant!r} is not a valid tenant")
    if not is_repository(args.repository):
        raise ConfigError(f"--repository {args.repository!r} is not a repository name")
    if args.tag is not None:
        if not re.fullmatch(TAG, args.tag):
            raise ConfigError(f"--tag {args.tag!r} is not a tag")
        if args.action == "pull":
            raise ConfigError("--tag goes with --action push or delete (tags are immutable)")
    policy = configured(env, file)
    decision = policy.decide(args.tenant, args.subject, args.repository, args.action)
    lines, refused = details(policy, args, decision.allowed)
    print(f"{'allow' if decision.allowed else 'deny'} {decision.rule}")
    for line in lines:
        print(line)
    return 0 if decision.allowed and not refused else 1


def main(env: Mapping[str, str], args: argparse.Namespace) -> int:
    file = policy_file(args)
    if args.policy_command == "explain" or file is None:
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
            return check(env, file)
        return explain(env, args, file)
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1 if args.policy_command == "check" else 2
