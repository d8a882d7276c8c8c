"""JSON read the way the Go programs behind the gateway read it, or refused.

The backend and cosign decode with Go's encoding/json; Python's json module accepts more (a
repeated key keeps its last value, NaN and Infinity, any depth). Wherever the gateway decides
on a JSON document that a Go program will act on (a manifest, a signature payload), it reads
it here: size-capped, UTF-8 only, no byte order mark, no repeated key, no non-standard
constant, nested at most `max_depth` levels. One reader, so the two can never drift apart.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # real manifests nest 4 levels (index → descriptor → platform/annotations)


class _Why(ValueError):
    """Raised by the parse hooks below: the message says what is wrong."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Why(f"repeats the key {key!r:.40} in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Why(f"contains {name}, which is not JSON")


def depth(doc: Any) -> int:
    """How deep containers nest in a parsed document (a scalar: 0). Iterative."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            stack.extend(
                (c, level + 1) for c in (node.values() if isinstance(node, dict) else node)
            )
    return deepest


def loads(
    raw: bytes, what: str, *, limit: int, error: type[Exception], max_depth: int = MAX_DEPTH
) -> Any:
    """`raw` parsed, or `error("<what> …")` saying why not."""
    if not isinstance(raw, bytes | bytearray):
        raise error(f"{what} is not bytes")
    if len(raw) > limit:
        raise error(f"{what} is larger than {limit} bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise error(f"{what} starts with a byte order mark")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise error(f"{what} nests deeper than {max_depth} levels") from None
    except _Why as e:
        raise error(f"{what} {e}") from None
    except ValueError:  # JSONDecodeError, and Python's own limit on an integer's digits
        raise error(f"{what} is not JSON") from None
    if depth(doc) > max_depth:
        raise error(f"{what} nests deeper than {max_depth} levels")
    return doc
