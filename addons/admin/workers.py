"""What the gateway workers publish, as the admin program reads it: each worker writes its
state (counters, connections, caches, ledger, capture, live view) to `worker-<n>.json` in the
state directory once a second (addons/gateway/publish.py); here they are read, told live from
gone, and their counters summed so that they stay monotonic across a worker's restart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons import runstate
from addons.decisions.metrics import Metrics

STALE = 5.0  # seconds: a worker that has not published for this long is not counted live
MAX_STATE = 1 << 20


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_STATE))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Workers:
    """The workers' published states. Counters stay monotonic across a worker's restart: the
    last state of a pid that is gone is kept in `retired` and added to the sum."""

    directory: Path
    current: dict[str, dict[str, Any]] = field(default_factory=dict)
    retired: Metrics = field(default_factory=Metrics)
    retired_connections: list[dict[str, Any]] = field(default_factory=list)

    def refresh(self) -> None:
        for path in sorted(self.directory.glob(runstate.WORKER_GLOB)):
            state = read_json(path)
            if state is None:
                continue
            name, before = path.stem, self.current.get(path.stem)
            if before is not None and before.get("pid") != state.get("pid"):
                self.retired.add(before.get("metrics") or {})
                gone = dict(before.get("connections") or {}, open=0)
                self.retired_connections.append(gone)
            self.current[name] = state

    def live(self, now: float) -> list[dict[str, Any]]:
        return [s for s in self.current.values() if now - float(s.get("time", 0)) < STALE]

    def metrics(self) -> Metrics:
        total = Metrics()
        total.add(self.retired.state())
        for state in self.current.values():
            total.add(state.get("metrics") or {})
        return total

    def streaming(self) -> int:
        """Live workers that say they stream to the live view (addons/gateway/flowfeed.py)."""
        self.refresh()
        live = self.live(time.time())
        return sum(1 for s in live if (s.get("liveview") or {}).get("streaming"))
