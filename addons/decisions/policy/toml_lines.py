"""Where each table and key is in a policy's TOML text: tomllib reports lines only for syntax
errors, and every other error of a policy file names its line too."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Table:
    line: int
    keys: dict[str, int] = field(default_factory=dict)


@dataclass
class Lines:
    """Where things are in the file: tomllib reports lines only for syntax errors."""

    tables: dict[str, list[Table]] = field(default_factory=dict)  # [[kind]] headers in order
    top: dict[str, int] = field(default_factory=dict)  # top-level keys and [table] headers

    def table(self, kind: str, index: int) -> Table:
        entries = self.tables.get(kind, [])
        return entries[index] if index < len(entries) else Table(self.top.get(kind, 1))


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


def locate(text: str) -> Lines:
    lines = Lines()
    current: Table | None = None  # None: top level; a dummy table inside other tables
    for number, line in _starts_outside_values(text):
        if header := _HEADER_LINE.match(line):
            parts = [_unquote(p) for p in re.findall(_KEY_PART, header[2])]
            entries = lines.tables.get(parts[0])
            if len(parts) == 1 and header[1] == "[[":
                current = Table(number)
                lines.tables.setdefault(parts[0], []).append(current)
            elif len(parts) > 1 and entries:
                entries[-1].keys.setdefault(parts[1], number)  # [grant.x]: key x of the last
                current = Table(number)
            else:
                lines.top.setdefault(parts[0], number)
                current = Table(number)
        elif key := _KEY_LINE.match(line):
            (lines.top if current is None else current.keys).setdefault(_unquote(key[1]), number)
    return lines
