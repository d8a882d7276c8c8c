"""The live view's feed: the gateway workers' side of it (theirs is addons/gateway/flowfeed.py).

The workers send redacted flow summaries only while a viewer is connected; `WorkerFeed`:

- receives them on a unix datagram socket, `<state dir>/liveview.sock` (mode 0600),
  dropping repeats (by worker pid and sequence number) and counting what cannot be read,
- puts each new flow in the ring and the overview (flows.py) and hands it to `deliver`,
- tells the workers to stream while someone looks (`wanted`, the view's to say), by writing
  `<state dir>/liveview.json` (`until`: a few seconds ahead, renewed every second while
  someone looks; `seen`: the last sequence number it holds of each worker).

`LiveView` (liveview.py) holds a feed and serves what it holds: pages and streams. The feed
asks it two things only, given as callables: whether someone looks, and where a new flow goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from addons import runstate
from addons.admin.flows import RING_SIZE, Entry, FlowRing, Overview
from addons.runstate import write_json

logger = logging.getLogger("admin")

CONTROL_EVERY = 1.0
CONTROL_TTL = 5.0  # seconds the workers keep streaming without a renewal
RECV_BUFFER = 4 << 20
FORGET_AFTER = 3600.0  # seconds after which a silent worker pid is forgotten
MAX_SUN_PATH = 107


class FeedProtocol(asyncio.DatagramProtocol):
    def __init__(self, live: WorkerFeed) -> None:
        self.live = live

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.live.receive(data, time.time())

    def error_received(self, exc: Exception) -> None:  # nothing to answer on a datagram socket
        pass


class WorkerFeed:
    """The flows the workers sent, kept in a ring and an overview; and their control file."""

    def __init__(
        self,
        state_dir: Path,
        ring_size: int = RING_SIZE,
        wanted: Callable[[], bool] = lambda: False,
        deliver: Callable[[Entry], None] = lambda entry: None,
    ) -> None:
        self.state_dir = state_dir
        # Should the workers stream (someone looks)? And who gets a new flow, just put in the
        # ring (the view's viewers)? Both the view's to answer.
        self.wanted = wanted
        self.deliver = deliver
        self.ring = FlowRing(ring_size)
        self.overview = Overview()
        self.seen: dict[int, int] = {}  # worker pid -> last sequence number received
        self.heard: dict[int, float] = {}  # worker pid -> when
        self.worker_dropped: dict[int, int] = {}  # worker pid -> its count
        self.retired_dropped = 0  # the counts of workers gone for an hour
        self.bad_input = 0  # datagrams or flow lines that could not be read
        self.control_on = False
        self.arrived = asyncio.Event()  # set, and replaced, whenever flows arrive
        self.feed_error: str | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        path = self.state_dir / runstate.LIVEVIEW_SOCKET
        if len(os.fsencode(path)) > MAX_SUN_PATH:
            self.feed_error = f"{path}: too long for a unix socket"
            logger.warning("live view: %s; the view gets no flows", self.feed_error)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock.bind(str(path))
            os.chmod(path, 0o600)
            for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
                if option is None:
                    continue
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, RECV_BUFFER)
                    break
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: FeedProtocol(self), sock=sock
            )
        self.write_control()
        self._task = asyncio.create_task(self._control_loop())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None:
            self._transport.close()
        with contextlib.suppress(OSError):
            write_json(self.state_dir / runstate.LIVEVIEW, {"until": 0})

    def receive(self, data: bytes, now: float) -> int:
        """One datagram of a worker (addons/gateway/flowfeed.py: a JSON head line, then one line per
        flow, `<brief JSON> TAB <headers JSON>`); returns the flows kept. What cannot be read
        is counted in `bad_input`."""
        head_line, _, body = data.partition(b"\n")
        try:
            head = json.loads(head_line)
            pid = head["pid"]
            if not isinstance(pid, int):
                raise TypeError("pid")
        except (ValueError, KeyError, TypeError):
            self.bad_input += 1
            return 0
        dropped = head.get("dropped")
        self.worker_dropped[pid] = dropped if isinstance(dropped, int) else 0
        self.heard[pid] = now
        last, kept = self.seen.get(pid, 0), 0
        for line in body.split(b"\n"):
            if not line:
                continue
            brief, _, rest = line.partition(b"\t")
            headers, _, kept_bodies = rest.partition(b"\t")
            try:
                flow = json.loads(brief)
            except ValueError:
                self.bad_input += 1
                continue
            seq = flow.get("seq") if isinstance(flow, dict) else None
            if not isinstance(seq, int) or seq <= last:
                continue  # sent again after a restart of this program, or not a flow
            last = seq
            entry = self.ring.add(
                flow,
                brief.decode("utf-8", "replace"),
                headers.decode("utf-8", "replace") or None,
                kept_bodies.decode("utf-8", "replace") or None,
            )
            self.overview.add(flow, now)
            self.deliver(entry)
            kept += 1
        self.seen[pid] = last
        if kept:
            self.arrived.set()
            self.arrived = asyncio.Event()
        return kept

    def dropped_by_workers(self) -> int:
        """Flows the workers dropped rather than block (their counts, the gone ones' too)."""
        return sum(self.worker_dropped.values()) + self.retired_dropped

    def forget_gone(self, now: float) -> None:
        """Workers not heard of for an hour are gone (restarted): their entries go, their
        drop counts stay in the sum."""
        for pid in [p for p, t in self.heard.items() if now - t > FORGET_AFTER]:
            self.retired_dropped += self.worker_dropped.pop(pid, 0)
            self.heard.pop(pid)
            self.seen.pop(pid, None)

    def write_control(self) -> None:
        """Ask the workers to stream (or stop) in liveview.json; see addons/gateway/flowfeed.py."""
        wanted = self.wanted()
        if wanted:
            now = time.time()
            recent = sorted(self.heard, key=lambda p: -self.heard[p])[:64]
            seen = {str(pid): self.seen[pid] for pid in recent if pid in self.seen}
            write_json(
                self.state_dir / runstate.LIVEVIEW, {"until": now + CONTROL_TTL, "seen": seen}
            )
        elif self.control_on:
            write_json(self.state_dir / runstate.LIVEVIEW, {"until": 0})
        self.control_on = wanted

    async def _control_loop(self) -> None:
        while True:
            await asyncio.sleep(CONTROL_EVERY)
            self.forget_gone(time.time())
            try:
                self.write_control()
            except OSError:
                logger.exception("live view: cannot write %s", runstate.LIVEVIEW)
