"""The mesh's health as the follower sees it: `$REGISTRY_DATA_DIR/mesh/status.json`.

    {"state": "ok" | "degraded", "reason": "..." | null, "since": <epoch>, "ula": "...",
     "checked": <epoch>, "next_check_by": <epoch>}

Written atomically by `run`'s bootstrap and by the follower after every attempt; read by the
gateway's /healthz, which adds what only it can see (the interface down, or a follower that has
stopped reporting). `degraded` means the node serves its current peers but cannot follow the
coordinator (or the coordinator sent entries it skipped): /healthz answers 200 with it, since
the registry works for everyone it can reach; `down` (no interface) answers 503.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from addons.runstate import write_atomic

OK, DEGRADED, DOWN, ABSENT = "ok", "degraded", "down", "absent"
MAX_STATUS_BYTES = 64 * 1024
MAX_REASON = 300


def next_status(
    prev: dict[str, Any] | None,
    state: str,
    reason: str | None,
    ula: str,
    now: float,
    next_check_by: float,
) -> dict[str, Any]:
    """The new status; `since` stays while state and reason stay the same."""
    if reason is not None and len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 1] + "…"
    same = prev is not None and prev.get("state") == state and prev.get("reason") == reason
    return {
        "state": state,
        "reason": reason,
        "since": prev["since"] if same and prev else now,
        "ula": ula,
        "checked": now,
        "next_check_by": next_check_by,
    }


class StatusFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = read(path)

    def write(self, state: str, reason: str | None, ula: str, next_check_in: float) -> None:
        now = time.time()
        self.last = next_status(self.last, state, reason, ula, now, now + next_check_in)
        data = json.dumps(self.last, ensure_ascii=True) + "\n"
        write_atomic(self.path, data.encode(), mode=0o644)


def read(path: Path) -> dict[str, Any] | None:
    """The status, or None when there is none or it is not a status."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_STATUS_BYTES + 1)[:MAX_STATUS_BYTES])
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _time(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def health(
    interface: str, up: bool, status: dict[str, Any] | None, now: float, followed: bool = True
) -> tuple[str, str | None]:
    """/healthz's `mesh` field and its reason: absent (no mesh), down (interface not up),
    degraded (the follower says so, has not reported in time, or never reported), ok.
    `followed`: a follower is expected to report (False: only the interface is judged)."""
    if not interface:
        return ABSENT, None
    if not up:
        return DOWN, f"interface {interface} is not up"
    if not followed:
        return OK, None
    if status is None:
        return DEGRADED, "no status from the mesh follower"
    next_by = _time(status.get("next_check_by"))
    if next_by is None or now > next_by:
        checked = _time(status.get("checked"))
        if checked is None:
            return DEGRADED, "the mesh follower has not reported"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(checked))
        return DEGRADED, f"the mesh follower has not reported since {when}"
    if status.get("state") == OK:
        return OK, None
    reason = status.get("reason")
    return DEGRADED, reason if isinstance(reason, str) and reason else "degraded"
