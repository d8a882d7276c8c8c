"""The live view's table rows as HTML, drawn into the page itself so that its first paint
shows the newest flows (a screenshot, a slow script): the same cells live.js `row` draws, and
every value escaped into a text node.
"""

from __future__ import annotations

import html
import re
from typing import Any

from addons.admin.flows import status_class


def _bytes(n: object) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool):
        return ""
    value, units, i = float(n), ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{round(value)} B"
    return f"{value:.1f} {units[i]}" if value < 10 else f"{value:.0f} {units[i]}"


def _ms(n: object) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool):
        return ""
    return f"{n / 1000:.2f} s" if n >= 1000 else f"{n:.1f} ms"


_DIGEST = re.compile(r"^(sha256|sha512):([0-9a-f]{12})[0-9a-f]+$")


def _text(value: object) -> str:
    return "" if value is None else str(value)


def row_cells(flow: dict[str, Any]) -> list[tuple[str, str]]:
    """(class, text) of each cell of a flow's row: what live.js `row` draws."""
    status = flow.get("status")
    verdict = _text(flow.get("decision")).partition(":")
    reason = [f"rule {flow['rule']}"] if flow.get("rule") else []
    if verdict[2]:
        reason.append(verdict[2])
    if flow.get("error"):
        reason.append(f"error: {flow['error']}")
    reference = _text(flow.get("reference"))
    digest = _DIGEST.match(reference)
    repository = flow.get("repository")
    return [
        ("c-time", _text(flow.get("time"))[11:23]),
        ("c-tenant", _text(flow.get("tenant")) or "-"),
        ("c-subject", _text(flow.get("subject"))),
        ("c-method", _text(flow.get("method"))),
        ("c-repository", _text(repository))
        if repository
        else ("c-repository path", _text(flow.get("target")).split("?")[0]),
        ("c-reference", f"{digest[1]}:{digest[2]}…" if digest else reference),
        ("c-status", "—" if status is None else _text(status)),
        ("c-decision", verdict[0]),
        ("c-rule", " · ".join(reason)),
        ("c-in num", _bytes(flow.get("bytes_in"))),
        ("c-out num", _bytes(flow.get("bytes_out"))),
        ("c-duration num", _ms(flow.get("duration_ms"))),
        ("c-backend num", _ms(flow.get("backend_ms"))),
        ("c-host", _text(flow.get("host"))),
        ("c-agent", _text(flow.get("user_agent"))),
    ]


def rows_html(flows: list[dict[str, Any]]) -> str:
    """The newest flows as table rows, every value escaped into a text node (no script runs:
    the page's CSP forbids inline script, and nothing here is markup a client wrote)."""
    out = []
    for flow in flows:
        klass = status_class(flow)
        verdict = _text(flow.get("decision")).partition(":")[0]
        cells = "".join(
            f'<td class="{c}">{html.escape(t, quote=False)}</td>' for c, t in row_cells(flow)
        )
        out.append(
            f'<tr class="flow s{klass} d-{html.escape(verdict)}" data-id="{int(flow["id"])}" '
            f'title="{html.escape(_text(flow.get("method")) + " " + _text(flow.get("target")))}"'
            f">{cells}</tr>"
        )
    return "\n".join(out)
