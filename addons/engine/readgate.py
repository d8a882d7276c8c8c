"""A client is not read while a blocking hook of its connection is running (hardening patch 16).

While a hook runs, mitmproxy pauses the layers and keeps every event that comes meanwhile in a
queue, and its connection handler goes on reading the client's socket as fast as it sends:
a request body sent during a slow hook (a GC freeze, a quota waiting for room, a backend
lookup) was held in memory whole, over a gigabyte in seconds from one connection. The
handler now stops reading the client while any blocking hook of its connection is pending
(dispatch.py counts them), so what the client sends waits in the kernel's socket buffers
and TCP flow control holds the client. Nothing a hook waits for comes from its own client:
an HTTP/1 connection carries one request at a time, and a hook's decision needs what was
read before it started.
"""

from __future__ import annotations

import asyncio
from typing import Any


def _state(handler: Any) -> tuple[list[int], asyncio.Event]:
    state = handler.__dict__.get("_readgate")
    if state is None:
        idle = asyncio.Event()
        idle.set()
        state = handler.__dict__["_readgate"] = ([0], idle)
    return state


def hold(handler: Any, task: asyncio.Task[Any]) -> None:
    """A blocking hook of this handler runs in `task`: its client waits until it is done."""
    count, idle = _state(handler)
    count[0] += 1
    idle.clear()

    def release(_: asyncio.Task[Any]) -> None:
        count[0] -= 1
        if count[0] == 0:
            idle.set()

    task.add_done_callback(release)


async def wait(handler: Any, connection: Any) -> None:
    """Before a read of `connection`: a client waits while a blocking hook is pending."""
    if connection is handler.client:
        count, idle = _state(handler)
        if count[0]:
            await idle.wait()
