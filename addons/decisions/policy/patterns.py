"""Repository globs and tag patterns: whether one is valid (and why not), what it matches,
and the keys under which globs are indexed so that a lookup tries only those that could match.

- Repository globs: `*` is exactly one segment, `**` one or more (so `acme/**` is what the
  owner rule gives `acme`, and never matches `acme` itself). At most one `**` per glob, which
  keeps matching linear in the name's length.
- Tag patterns: `*` is any run of tag characters, empty included (`v*` matches `v`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from addons.decisions.routes import NAME, is_component

MAX_NAME = 255  # distribution/reference's limit on a repository name

_NAME_RE = re.compile(NAME)
_TAG_CHARS = re.compile(r"[A-Za-z0-9._*-]+")
_TAG_FIRST = re.compile(r"[A-Za-z0-9_*]")


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
        if not is_component(segment):
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


def any_of(globs: Iterable[str]) -> str:
    return "|".join(f"(?:{glob_regex(g)})" for g in globs)


def literal_prefix(glob: str) -> str:
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


GlobKey = tuple[int, str] | None


def glob_key(glob: str) -> GlobKey:
    """Where a glob is indexed: its first literal segment and that segment's position, when
    no `**` comes before it (then the position is fixed); None for globs without one."""
    for position, segment in enumerate(glob.split("/")):
        if segment == "**":
            return None
        if segment != "*":
            return position, segment
    return None


def repository_keys(repository: str, depth: int) -> list[GlobKey]:
    """The index keys under which a glob matching `repository` can be: None, and per segment
    its position and value (a glob's first literal is one of the name's segments, at the same
    position), for positions below `depth` (the index holds no deeper key)."""
    parts = repository.split("/", depth)  # parts[:depth] are whole segments
    return [None, *enumerate(parts[:depth])]


def key_depth(keys: Iterable[GlobKey]) -> int:
    return max((key[0] + 1 for key in keys if key is not None), default=0)
