"""The access policy (contract §7, §8): parse a TOML file into rules, then decide requests.

Pure: no mitmproxy, no clock, no I/O except reading the file and the key files it names.
`PolicyStore` (reload while running) lives in `addons/gateway/policy_store.py`.

Semantics (docs/policy.md says the same for operators):

- A caller is a tenant (JWT `network`, else `sub`) and a subject (JWT `sub`, may be unknown).
  A rule's `tenants` and `subjects` are exact values or `"*"` (any authenticated caller). When
  a rule has both, the caller must match both.
- Rights on a repository: the owner rule (tenant `t` may pull, push, delete on `t/<one or more
  segments>`, never the bare `t`) or any matching `[[grant]]`. Then every `[[restrict]]` that
  matches the caller must allow the action and, if it has `repositories`, the repository.
  Nothing else is allowed.
- Repository globs: `*` is exactly one segment, `**` one or more (so `acme/**` is what the
  owner rule gives `acme`, and never matches `acme` itself). At most one `**` per glob, which
  keeps matching linear in the name's length.
- Tag patterns: `*` is any run of tag characters, empty included (`v*` matches `v`).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from addons.decisions.routes import COMPONENT, NAME

ACTIONS = ("pull", "push", "delete")  # canonical order, also of granted token scopes
ANY = "*"
MAX_NAME = 255  # distribution/reference's limit on a repository name
_VIEW_CACHE = 4096  # callers whose compiled view is kept per policy

_COMPONENT_RE = re.compile(COMPONENT)
_NAME_RE = re.compile(NAME)
_TAG_CHARS = re.compile(r"[A-Za-z0-9._*-]+")
_TAG_FIRST = re.compile(r"[A-Za-z0-9_*]")
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


class PolicyError(Exception):
    """A policy the registry refuses; str() is one line, `<file>:<line>: <what is wrong>`."""


class PolicyFileAbsent(PolicyError):
    """There is no file at the path (where the default rule applies, if it is optional)."""


# --- rules: plain data, one frozen dataclass per table kind -----------------------------------


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


@dataclass(frozen=True)
class RetentionPlan:
    """The matching [[retention]] rules combined field by field to whatever keeps more."""

    keep_last: int | None  # None: no rule limits the number of tags
    untagged_after: timedelta | None  # None: no rule removes untagged manifests
    protected_tags: tuple[str, ...]
    rules: tuple[str, ...]

    def protects(self, tag: str) -> bool:
        return any(tag_matches(p, tag) for p in self.protected_tags)


# --- globs and tag patterns ----------------------------------------------------------------


def glob_error(glob: str) -> str | None:
    """Why `glob` is not a repository glob, or None if it is one."""
    segments = glob.split("/")
    if segments.count("**") > 1:
        return "at most one '**' per glob"
    for segment in segments:
        if segment in ("*", "**"):
            continue
        if "*" in segment:
            return f"'*' and '**' must be whole segments, not part of {segment!r}"
        if _COMPONENT_RE.fullmatch(segment) is None:
            return f"{segment!r} is not a repository name component"
    return None


def glob_regex(glob: str) -> str:
    """Regex source for a valid glob: `*` one segment, `**` one or more."""
    parts = []
    for segment in glob.split("/"):
        if segment == "**":
            parts.append(r"[^/]+(?:/[^/]+)*")
        elif segment == "*":
            parts.append(r"[^/]+")
        else:
            parts.append(re.escape(segment))
    return "/".join(parts)


def glob_matches(glob: str, repository: str) -> bool:
    return re.fullmatch(glob_regex(glob), repository) is not None


def tag_pattern_error(pattern: str) -> str | None:
    if not _TAG_CHARS.fullmatch(pattern):
        return "only letters, digits, '.', '_', '-' and '*'"
    if not _TAG_FIRST.match(pattern):
        return "a tag cannot start with '.' or '-'"
    if len(pattern.replace("*", "")) > 128:
        return "longer than a tag can be"
    return None


def tag_matches(pattern: str, tag: str) -> bool:
    """`*` = any run of characters. Leftmost-first search of the literal parts is exact for
    `*`-only patterns and linear in the tag's length (a regex could backtrack badly)."""
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == tag
    first, *middle, last = parts
    if len(tag) < len(first) + len(last) or not tag.startswith(first) or not tag.endswith(last):
        return False
    at, end = len(first), len(tag) - len(last)
    for part in middle:
        found = tag.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return True


def is_repository(name: str) -> bool:
    return len(name) <= MAX_NAME and _NAME_RE.fullmatch(name) is not None


# --- parsing -------------------------------------------------------------------------------


@dataclass
class _Table:
    line: int
    keys: dict[str, int] = field(default_factory=dict)


@dataclass
class _Lines:
    """Where things are in the file: tomllib reports lines only for syntax errors."""

    tables: dict[str, list[_Table]] = field(default_factory=dict)  # [[kind]] headers in order
    top: dict[str, int] = field(default_factory=dict)  # top-level keys and [table] headers

    def table(self, kind: str, index: int) -> _Table:
        entries = self.tables.get(kind, [])
        return entries[index] if index < len(entries) else _Table(self.top.get(kind, 1))


_KEY_PART = r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)"""
_HEADER_LINE = re.compile(rf"\s*(\[\[?)\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*\]")
_KEY_LINE = re.compile(rf"\s*({_KEY_PART})\s*[.=]")


def _unquote(part: str) -> str:
    return part[1:-1] if part[:1] in "\"'" else part


def _starts_outside_values(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for every line that begins outside any string, array or inline
    table, so that a PEM key's base64 line ending in `=`, or a nested array, is never taken for
    a key or a header. tomllib has already accepted the text: this need not validate it."""
    open_ml: str | None = None  # '"""' or "'''" while inside a multi-line string
    depth = 0  # open [ and { outside strings
    for number, line in enumerate(text.split("\n"), 1):
        if open_ml is None and depth == 0:
            yield number, line
        i = 0
        while i < len(line):
            char = line[i]
            if open_ml is not None:
                if open_ml == '"""' and char == "\\":
                    i += 2
                elif line.startswith(open_ml, i):
                    i += 3
                    for _ in range(2):  # up to two quotes may end the content at the close
                        if line.startswith(open_ml[0], i) and not line.startswith(open_ml, i):
                            i += 1
                    open_ml = None
                else:
                    i += 1
            elif char == "#":
                break
            elif line.startswith('"""', i) or line.startswith("'''", i):
                open_ml, i = line[i : i + 3], i + 3
            elif char in "\"'":
                i += 1
                while i < len(line) and line[i] != char:
                    i += 2 if char == '"' and line[i] == "\\" else 1
                i += 1
            else:
                depth += (char in "[{") - (char in "]}")
                i += 1


def _locate(text: str) -> _Lines:
    lines = _Lines()
    current: _Table | None = None  # None: top level; a dummy table inside other tables
    for number, line in _starts_outside_values(text):
        if header := _HEADER_LINE.match(line):
            parts = [_unquote(p) for p in re.findall(_KEY_PART, header[2])]
            entries = lines.tables.get(parts[0])
            if len(parts) == 1 and header[1] == "[[":
                current = _Table(number)
                lines.tables.setdefault(parts[0], []).append(current)
            elif len(parts) > 1 and entries:
                entries[-1].keys.setdefault(parts[1], number)  # [grant.x]: key x of the last
                current = _Table(number)
            else:
                lines.top.setdefault(parts[0], number)
                current = _Table(number)
        elif key := _KEY_LINE.match(line):
            (lines.top if current is None else current.keys).setdefault(_unquote(key[1]), number)
    return lines


class _Reader:
    """Validates one table of the file; every error names the line of the offending key."""

    def __init__(self, where: str, kind: str, table: dict[str, Any], lines: _Table) -> None:
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
                raise self.fail(key, f"{key!r}: bad value {_shown(item)}: {why}")
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


def _shown(value: str) -> str:
    """A value as an error line quotes it: short, and never a whole PEM key."""
    if value.lstrip().startswith("-----BEGIN"):
        return "(inline PEM key)"
    return repr(value) if len(value) <= 80 else repr(value[:77] + "...")


def _tenant_error(value: str) -> str | None:
    if value == MIRROR:
        return "'mirror' is the reserved namespace of mirrored registries, not a tenant"
    if value == ANY or _COMPONENT_RE.fullmatch(value):
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


KINDS = ("grant", "restrict", "immutable", "require_signature", "retention", "quota")


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
    lines = _locate(text)
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


# --- evaluation ----------------------------------------------------------------------------


def _caller_matches(rule: Grant | Restrict, tenant: str, subject: str | None) -> bool:
    if rule.tenants is not None and ANY not in rule.tenants and tenant not in rule.tenants:
        return False
    if rule.subjects is not None and ANY not in rule.subjects:
        return subject is not None and subject in rule.subjects
    return True


def _any_of(globs: Iterable[str]) -> str:
    return "|".join(f"(?:{glob_regex(g)})" for g in globs)


NO_RULE = Decision(False, "no rule")
MIRROR = "mirror"  # the reserved namespace of mirrored registries (addons/config/mirrors.py)
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


GlobKey = tuple[int, str] | None


def _glob_key(glob: str) -> GlobKey:
    """Where a glob is indexed: its first literal segment and that segment's position, when
    no `**` comes before it (then the position is fixed); None for globs without one."""
    for position, segment in enumerate(glob.split("/")):
        if segment == "**":
            return None
        if segment != "*":
            return position, segment
    return None


def _repository_keys(repository: str, depth: int) -> list[GlobKey]:
    """The index keys under which a glob matching `repository` can be: None, and per segment
    its position and value (a glob's first literal is one of the name's segments, at the same
    position), for positions below `depth` (the index holds no deeper key)."""
    parts = repository.split("/", depth)  # parts[:depth] are whole segments
    return [None, *enumerate(parts[:depth])]


def _depth(keys: Iterable[GlobKey]) -> int:
    return max((key[0] + 1 for key in keys if key is not None), default=0)


class _Grants:
    """One caller's grants for one action. Globs are bucketed by `_glob_key` (usually the
    tenant at position 0) and each bucket is one regex whose alternatives are in file order,
    so a decision tries only the few globs that could match, and `lastgroup` names the first
    grant that does."""

    def __init__(self, policy: Policy, grants: list[Grant]) -> None:
        buckets: dict[GlobKey, dict[int, list[str]]] = {}
        for order, grant in enumerate(grants):
            for glob in grant.repositories:
                buckets.setdefault(_glob_key(glob), {}).setdefault(order, []).append(glob)
        self.buckets = {
            key: re.compile("|".join(f"(?P<g{o}>{_any_of(gs)})" for o, gs in by_order.items()))
            for key, by_order in buckets.items()
        }
        self.depth = _depth(self.buckets)
        self.decisions = {f"g{o}": Decision(True, policy.name(g)) for o, g in enumerate(grants)}

    def first(self, repository: str) -> Decision | None:
        if not self.buckets:
            return None
        found = None
        for key in _repository_keys(repository, self.depth):
            regex = self.buckets.get(key)
            if regex is not None and (m := regex.fullmatch(repository)) is not None:
                name = m.lastgroup or ""
                if found is None or int(name[1:]) < int(found[1:]):
                    found = name
        return None if found is None else self.decisions[found]


class _View:
    """One caller's rules, compiled: per action its grants and its restricts (file order)."""

    def __init__(self, policy: Policy, tenant: str, subject: str | None) -> None:
        ok = _COMPONENT_RE.fullmatch(tenant) and tenant != MIRROR
        self.owner = tenant + "/" if ok else None
        grants = policy.grant_callers.applying(tenant, subject)
        restricts = policy.restrict_callers.applying(tenant, subject)
        self.grants = {a: policy.compiled([g for g in grants if a in g.actions]) for a in ACTIONS}
        self.limits = {
            action: tuple(
                _Limit(
                    policy.name(r),
                    action in r.actions,
                    re.compile(_any_of(r.repositories)) if r.repositories else None,
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
            _literal_prefix(g).startswith(MIRROR + "/") for r in self.grants for g in r.repositories
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
        self._immutable = _RepositoryIndex(self.immutables)
        self._signature = _RepositoryIndex(self.signatures)
        self._retention = _RepositoryIndex(self.retentions)
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
                prefixes.update(_literal_prefix(glob) for glob in grant.repositories)
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
        rules: list[Retention] = list(self._retention.matching(repository))
        if not rules:
            return None
        keeps = [r.keep_last for r in rules if r.keep_last is not None]
        afters = [r.untagged_after for r in rules if r.untagged_after is not None]
        return RetentionPlan(
            keep_last=max(keeps) if keeps else None,
            untagged_after=max(afters) if afters else None,
            protected_tags=tuple(dict.fromkeys(p for r in rules for p in r.protected_tags)),
            rules=tuple(self.name(r) for r in rules),
        )

    def quota(self, tenant: str) -> Quota | None:
        """The quota naming this tenant, else the one for '*', else None (no quota)."""
        fallback = None
        for rule in self.quotas:
            if tenant in rule.tenants:
                return rule
            if ANY in rule.tenants:
                fallback = rule
        return fallback


def _literal_prefix(glob: str) -> str:
    """`acme/base/**` → `acme/base/`, `acme/app` → `acme/app`, `*/public/**` → ``."""
    segments = glob.split("/")
    lead = []
    for segment in segments:
        if segment in ("*", "**"):
            break
        lead.append(segment)
    if not lead:
        return ""
    return "/".join(lead) + ("/" if len(lead) < len(segments) else "")


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


class _RepositoryIndex:
    """Rules with repository globs, bucketed by `_glob_key`, so a lookup only tries the globs
    that could match."""

    def __init__(self, rules: Iterable[Immutable | RequireSignature | Retention]) -> None:
        self.buckets: dict[GlobKey, list[tuple[int, Any, re.Pattern[str]]]] = {}
        for order, rule in enumerate(rules):
            for glob in rule.repositories:
                entry = (order, rule, re.compile(glob_regex(glob)))
                self.buckets.setdefault(_glob_key(glob), []).append(entry)
        self.depth = _depth(self.buckets)

    def matching(self, repository: str) -> list[Any]:
        if not self.buckets or not is_repository(repository):
            return []
        found = {
            order: rule
            for key in _repository_keys(repository, self.depth)
            for order, rule, regex in self.buckets.get(key, ())
            if regex.fullmatch(repository)
        }
        return [found[order] for order in sorted(found)]


EMPTY = Policy("(no policy file)")  # today's rule: the owner rule alone


# --- token scopes --------------------------------------------------------------------------

CATALOG_SCOPE = "registry:catalog:*"
_SCOPE = re.compile(rf"repository:(?P<name>{NAME}):(?P<actions>[a-z*]+(?:,[a-z*]+)*)")


class ScopeError(ValueError):
    """A requested scope outside the grammar (the token endpoint answers 400)."""


def parse_scope(scope: str) -> tuple[str, tuple[str, ...]]:
    """`repository:<name>:<actions>` → (name, actions in canonical order, `*` expanded)."""
    m = _SCOPE.fullmatch(scope)
    if m is None or len(m["name"]) > MAX_NAME:
        raise ScopeError(f"malformed scope {_shown(scope)}")
    given = m["actions"].split(",")
    if unknown := [a for a in given if a not in ACTIONS and a != ANY]:
        raise ScopeError(f"unknown action {_shown(unknown[0])} in scope {_shown(scope)}")
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
