"""/capture: the debug capture's control. The admin program asks every live worker to write
its share of a bounded capture (`capture.json` in the state directory; the workers' side is
addons/gateway/capture.py), waits for them, and joins their parts into one flow file.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addons import runstate
from addons.admin.workers import Workers
from addons.runstate import write_json

logger = logging.getLogger("admin")
MAX_SECONDS, MAX_MB = 3600.0, 1024.0


def positive(value: str) -> float | None:
    """A finite number > 0, else None (`nan`, `inf`, `-1`, `1e999` are refused)."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


@dataclass
class Capture:
    state_dir: Path  # where the request is written for the workers
    capture_dir: Path  # where the workers write their parts, and the joined file goes
    workers: Workers

    def request_path(self) -> Path:
        return self.state_dir / runstate.CAPTURE

    async def start(self, seconds: float, max_mb: float) -> None:
        await self.stop()
        capture_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.workers.refresh()
        workers = max(1, len(self.workers.live(time.time())))
        total = int(min(max(max_mb, 0.1), MAX_MB) * 1024 * 1024)
        request = {
            "id": capture_id,
            "until": time.time() + min(max(seconds, 1.0), MAX_SECONDS),
            "max_bytes": total // workers,  # each worker writes its share of the bound
        }
        write_json(self.request_path(), request)
        logger.warning("debug capture %s requested", capture_id)
        # Answer once every live worker writes its part: what follows is captured.
        deadline = time.monotonic() + 3
        while not self.all_capturing(capture_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """End the capture, wait (bounded) for every worker to close its part, join them."""
        request = runstate.read_request(self.request_path()) or {}
        if not request.get("id"):
            return
        write_json(self.request_path(), {**request, "until": 0})
        deadline = time.monotonic() + 3
        while self.capturing(request["id"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self.join()

    def all_capturing(self, capture_id: str) -> bool:
        self.workers.refresh()
        live = self.workers.live(time.time())
        return bool(live) and all((s.get("capture") or {}).get("id") == capture_id for s in live)

    def capturing(self, capture_id: str) -> bool:
        """Does a live worker still write a part of this capture?"""
        self.workers.refresh()
        live = self.workers.live(time.time())
        return any((s.get("capture") or {}).get("id") == capture_id for s in live)

    def status(self) -> dict[str, Any]:
        request = runstate.read_request(self.request_path()) or {}
        capture_id = request.get("id")
        active = bool(capture_id) and float(request.get("until", 0)) > time.time()
        self.workers.refresh()
        if not active and capture_id and not self.capturing(capture_id):
            self.join()
            request = runstate.read_request(self.request_path()) or request
        joined = request.get("flows")
        flows = joined if isinstance(joined, int) else self.captured_flows(capture_id)
        path = self.capture_dir / f"capture-{capture_id}.flows" if capture_id else None
        return {
            "active": active,
            "id": capture_id,
            "flows": flows,
            "file": str(path) if path else None,
        }

    def captured_flows(self, capture_id: object) -> int:
        """Flows the workers wrote for this capture: each worker's count of its part, while
        it writes and after it stopped (a worker's `id` is None once its part ends: `last`
        names the capture its count is of)."""
        total = 0
        for state in self.workers.current.values():
            part = state.get("capture") or {}
            if capture_id in (part.get("id"), part.get("last")):
                flows = part.get("flows", 0)
                total += flows if isinstance(flows, int) else 0
        return total

    def join(self) -> None:
        """Join the workers' parts of a finished capture into one flow file (mitmproxy flow
        files are a sequence of flows: the parts concatenate), and keep its flow count in the
        request (`flows`): a worker restarted later no longer has its count."""
        request = runstate.read_request(self.request_path()) or {}
        capture_id = request.get("id")
        if not capture_id:
            return
        parts = sorted(self.capture_dir.glob(f"capture-{capture_id}.w*.flows"))
        if not parts:
            return
        self.workers.refresh()
        before = request.get("flows")  # joined once already: a late part was left over
        flows = max(self.captured_flows(capture_id), before if isinstance(before, int) else 0)
        with open(self.capture_dir / f"capture-{capture_id}.flows", "ab") as joined:
            for part in parts:
                joined.write(part.read_bytes())
                part.unlink()
        write_json(self.request_path(), {**request, "flows": flows})
