"""The policy's rules as plain data (one frozen dataclass per table kind), the decision a
request gets, and the errors a policy file raises: what every other module here shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

ACTIONS = ("pull", "push", "delete")  # canonical order, also of granted token scopes
ANY = "*"
MIRROR = "mirror"  # the reserved namespace of mirrored registries (addons/config/mirrors.py)
KINDS = ("grant", "restrict", "immutable", "require_signature", "retention", "quota")


class PolicyError(Exception):
    """A policy the registry refuses; str() is one line, `<file>:<line>: <what is wrong>`."""


class PolicyFileAbsent(PolicyError):
    """There is no file at the path (where the default rule applies, if it is optional)."""


def shown(value: str) -> str:
    """A value as an error line quotes it: short, and never a whole PEM key."""
    if value.lstrip().startswith("-----BEGIN"):
        return "(inline PEM key)"
    return repr(value) if len(value) <= 80 else repr(value[:77] + "...")


@dataclass(frozen=True)
class Grant:
    kind: ClassVar[str] = "grant"
    line: int
    repositories: tuple[str, ...]
    actions: tuple[str, ...]
    tenants: tuple[str, ...] | None = None
    subjects: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Restrict:
    kind: ClassVar[str] = "restrict"
    line: int
    actions: tuple[str, ...]
    repositories: tuple[str, ...] | None = None  # None: wherever the caller's other rules allow
    tenants: tuple[str, ...] | None = None
    subjects: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Immutable:
    kind: ClassVar[str] = "immutable"
    line: int
    repositories: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class RequireSignature:
    """A manifest of a matching repository needs a signature by one of `keys` (§8)."""

    kind: ClassVar[str] = "require_signature"
    line: int
    repositories: tuple[str, ...]
    keys: tuple[str, ...]  # normalised SubjectPublicKeyInfo PEM, one per configured key
    public_keys: tuple[PublicKeyTypes, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Retention:
    kind: ClassVar[str] = "retention"
    line: int
    repositories: tuple[str, ...]
    keep_last: int | None = None
    untagged_after: timedelta | None = None
    protected_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Quota:
    kind: ClassVar[str] = "quota"
    line: int
    tenants: tuple[str, ...]
    bytes: int


Rule = Grant | Restrict | Immutable | RequireSignature | Retention | Quota


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # what decided: "owner", "grant <file>:<line>", "restrict <file>:<line>", ...
