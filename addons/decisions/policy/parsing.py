"""Reading a policy file: its TOML into rules, each table checked key by key, and every error
one line, `<file>:<line>: <what is wrong>` (the line of the offending key where there is one);
the key files a [[require_signature]] names are read too."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from addons.decisions.policy.evaluate import Policy
from addons.decisions.policy.patterns import glob_error, tag_pattern_error
from addons.decisions.policy.rules import (
    ACTIONS,
    ANY,
    KINDS,
    MIRROR,
    Grant,
    Immutable,
    PolicyError,
    PolicyFileAbsent,
    Quota,
    RequireSignature,
    Restrict,
    Retention,
    Rule,
    shown,
)
from addons.decisions.policy.toml_lines import Table, locate
from addons.decisions.routes import is_component

_SUBJECT = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}")
_DURATION = re.compile(r"([0-9]{1,9})([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"([0-9]{1,18})(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)")
_SIZE_UNITS = {
    "B": 1,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what cosign signs with


class _Reader:
    """Validates one table of the file; every error names the line of the offending key."""

    def __init__(self, where: str, kind: str, table: dict[str, Any], lines: Table) -> None:
        self.where, self.kind, self.table, self.lines = where, kind, table, lines

    def fail(self, key: str | None, message: str) -> PolicyError:
        line = self.lines.keys.get(key, self.lines.line) if key else self.lines.line
        return PolicyError(f"{self.where}:{line}: [[{self.kind}]] {message}")

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for key in self.table:
            if key not in allowed:
                raise self.fail(
                    key, f"unknown key {key!r} (expected one of {', '.join(sorted(allowed))})"
                )

    def strings(
        self, key: str, check: Callable[[str], str | None], required: bool = True
    ) -> tuple[str, ...] | None:
        """A non-empty list of strings, each passing `check` (which returns why not)."""
        if key not in self.table:
            if required:
                raise self.fail(None, f"needs {key!r}")
            return None
        value = self.table[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"{key!r} must be a list of strings")
        if not value:
            raise self.fail(key, f"{key!r} must not be empty")
        for item in value:
            if (why := check(item)) is not None:
                raise self.fail(key, f"{key!r}: bad value {shown(item)}: {why}")
        return tuple(value)

    def caller(self) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
        tenants = self.strings("tenants", _tenant_error, required=False)
        subjects = self.strings("subjects", _subject_error, required=False)
        if tenants is None and subjects is None:
            raise self.fail(None, "needs 'tenants' or 'subjects' ('*' = any caller)")
        return tenants, subjects

    def repositories(self, required: bool = True) -> tuple[str, ...] | None:
        return self.strings("repositories", glob_error, required)

    def actions(self) -> tuple[str, ...]:
        given = self.strings("actions", _action_error)
        assert given is not None
        return tuple(a for a in ACTIONS if a in given)

    def scalar(self, key: str, parse: Callable[[object], Any], what: str) -> Any:
        if key not in self.table:
            return None
        try:
            return parse(self.table[key])
        except ValueError:
            raise self.fail(key, f"{key!r} must be {what}, not {self.table[key]!r}") from None


def _tenant_error(value: str) -> str | None:
    if value == MIRROR:
        return "'mirror' is the reserved namespace of mirrored registries, not a tenant"
    if value == ANY or is_component(value):
        return None
    return "a tenant is one repository name component (lower case), or '*'"


def _subject_error(value: str) -> str | None:
    if value != ANY and "*" in value:
        return "subjects match exactly; only '*' alone means any caller"
    if not _SUBJECT.fullmatch(value):
        return "1 to 255 characters, no spaces or control characters"
    return None


def _action_error(value: str) -> str | None:
    return None if value in ACTIONS else f"actions are {', '.join(ACTIONS)}"


def parse_duration(value: object) -> timedelta:
    m = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if m is None or int(m[1]) == 0:
        raise ValueError(value)
    return timedelta(seconds=int(m[1]) * _DURATION_UNITS[m[2]])


def parse_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(value)
    return int(m[1]) * _SIZE_UNITS[m[2]]


def _keep_last(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(value)


def _public_key(text: str, base_dir: Path) -> tuple[PublicKeyTypes, Path | None]:
    """A PEM public key given inline or as a path (relative to the policy file's directory)."""
    path = None
    if text.lstrip().startswith("-----BEGIN"):
        data = text.encode()
    else:
        path = base_dir / text
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read key file {str(path)!r}: {e.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _EC_CURVES):
        return key, path
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key, path
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key, path
    raise ValueError("unsupported key (ECDSA P-256/P-384/P-521, RSA >= 2048 or Ed25519)")


def _pem(key: PublicKeyTypes) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _grant(r: _Reader) -> Grant:
    r.check_keys(("repositories", "tenants", "subjects", "actions"))
    repositories = r.repositories()
    tenants, subjects = r.caller()
    assert repositories is not None
    return Grant(r.lines.line, repositories, r.actions(), tenants, subjects)


def _restrict(r: _Reader) -> Restrict:
    r.check_keys(("repositories", "tenants", "subjects", "actions"))
    tenants, subjects = r.caller()
    return Restrict(r.lines.line, r.actions(), r.repositories(required=False), tenants, subjects)


def _immutable(r: _Reader) -> Immutable:
    r.check_keys(("repositories", "tags"))
    repositories, tags = r.repositories(), r.strings("tags", tag_pattern_error)
    assert repositories is not None and tags is not None
    return Immutable(r.lines.line, repositories, tags)


def _require_signature(r: _Reader, base_dir: Path, files: list[Path]) -> RequireSignature:
    r.check_keys(("repositories", "keys"))
    repositories = r.repositories()
    loaded: dict[str, PublicKeyTypes] = {}

    def load_key(text: str) -> str | None:
        try:
            loaded[text], path = _public_key(text, base_dir)
        except ValueError as e:
            return str(e)
        if path is not None:
            files.append(path)
        return None

    keys = r.strings("keys", load_key)
    assert repositories is not None and keys is not None
    public_keys = tuple(loaded[k] for k in keys)
    return RequireSignature(
        r.lines.line, repositories, tuple(_pem(k) for k in public_keys), public_keys
    )


def _retention(r: _Reader) -> Retention:
    r.check_keys(("repositories", "keep_last", "untagged_after", "protected_tags"))
    repositories = r.repositories()
    keep_last = r.scalar("keep_last", _keep_last, "a whole number >= 0")
    after = r.scalar("untagged_after", parse_duration, 'a duration such as "30m", "24h", "7d"')
    protected = r.strings("protected_tags", tag_pattern_error, required=False) or ()
    if keep_last is None and after is None:
        raise r.fail(None, "needs 'keep_last' or 'untagged_after'")
    assert repositories is not None
    return Retention(r.lines.line, repositories, keep_last, after, protected)


def _quota(r: _Reader) -> Quota:
    r.check_keys(("tenants", "bytes"))
    tenants = r.strings("tenants", _tenant_error)
    if "bytes" not in r.table:
        raise r.fail(None, "needs 'bytes'")
    size = r.scalar("bytes", parse_size, 'a number of bytes >= 0 or a size such as "10GiB"')
    assert tenants is not None
    return Quota(r.lines.line, tenants, size)


def _syntax_error(where: str, text: str, error: tomllib.TOMLDecodeError) -> PolicyError:
    message = str(error)
    if m := re.search(r" \(at line (\d+), column \d+\)$", message):
        line, message = int(m[1]), message[: m.start()]
    else:  # "(at end of document)": the last line with anything on it
        message = re.sub(r" \(at end of document\)$", "", message)
        line = max(1, len(text.rstrip().split("\n")))
    return PolicyError(f"{where}:{line}: invalid TOML: {message}")


def parse(text: str, source: str, base_dir: Path | None = None) -> Policy:
    """The policy in `text`; `source` names it in errors and rule names. Relative key paths
    are resolved against `base_dir` (default: the directory of `source`)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(source, text, e) from None
    lines = locate(text)
    base_dir = Path(source).parent if base_dir is None else base_dir
    files: list[Path] = []
    rules: dict[str, list[Rule]] = {kind: [] for kind in KINDS}
    for kind, value in data.items():
        line = lines.tables[kind][0].line if lines.tables.get(kind) else lines.top.get(kind, 1)
        if kind not in KINDS:
            raise PolicyError(
                f"{source}:{line}: unknown table or key {kind!r} "
                f"(expected [[{']], [['.join(KINDS)}]])"
            )
        if not lines.tables.get(kind) or not isinstance(value, list):
            raise PolicyError(f"{source}:{line}: write {kind} rules as [[{kind}]] tables")
        for index, table in enumerate(value):
            reader = _Reader(source, kind, table, lines.table(kind, index))
            if kind == "require_signature":
                rules[kind].append(_require_signature(reader, base_dir, files))
            else:
                rules[kind].append(_READERS[kind](reader))
    _check_quotas(source, rules["quota"])
    return Policy(source, [r for kind in KINDS for r in rules[kind]], tuple(files))


_READERS: dict[str, Callable[[_Reader], Rule]] = {
    "grant": _grant,
    "restrict": _restrict,
    "immutable": _immutable,
    "retention": _retention,
    "quota": _quota,
}


def _check_quotas(source: str, quotas: list[Rule]) -> None:
    """A tenant (or '*') in two quotas is an error: which one applies would be a guess."""
    seen: dict[str, int] = {}
    for rule in quotas:
        assert isinstance(rule, Quota)
        for tenant in rule.tenants:
            if tenant in seen:
                raise PolicyError(
                    f"{source}:{rule.line}: [[quota]] tenant {tenant!r} already has a quota "
                    f"at line {seen[tenant]}"
                )
            seen[tenant] = rule.line


def load(path: str | Path) -> Policy:
    """Read and parse a policy file (PolicyError if it cannot be read or is invalid)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise PolicyFileAbsent(f"{source}: cannot read: {e.strerror}") from None
    except OSError as e:
        raise PolicyError(f"{source}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise PolicyError(f"{source}:{line}: not UTF-8") from None
    return parse(text, source)
