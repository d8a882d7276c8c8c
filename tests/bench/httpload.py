"""A small closed-loop HTTP/1.1 load generator for what wrk cannot do: HEAD.

wrk 4.1 (Debian 12) never tells its response parser that a request was HEAD, so it waits for
the `Content-Length` bytes of a body that never comes and completes no request at all. This
client does what `wrk -c N -d T --latency` does for one fixed request: N keep-alive
connections, each sending the next request as soon as the previous answer is complete, for T
seconds; it reports the rate, the exact p50/p99 latency and the non-2xx/3xx count in the same
shape as tests.bench.compare's wrk results. It is Python (asyncio, one thread), so it costs the
machine more CPU per request than wrk: compare its numbers with each other, and with wrk's
through the calibration row that tests.bench.compare prints (the same GET with both clients).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

_CONTENT_LENGTH = re.compile(rb"^content-length:\s*(\d+)\s*$", re.IGNORECASE | re.MULTILINE)
TIMEOUT_S = 2.0  # wrk's default: a request slower than this is a socket error (timeout)
_CLOSE = re.compile(rb"^connection:\s*close\s*$", re.IGNORECASE | re.MULTILINE)


@dataclass
class LoadResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx_3xx: int  # like wrk: status > 399
    socket_errors: int


@dataclass
class _Tally:
    latencies: list[float]
    errors_status: int = 0
    errors_socket: int = 0


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (what wrk prints), of a non-empty sorted list."""
    rank = max(1, round(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def request_bytes(method: str, url: str, headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _one_connection(
    host: str, port: int, method: str, request: bytes, deadline: float, tally: _Tally
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.perf_counter() < deadline:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if method != "HEAD":
                    length = _CONTENT_LENGTH.search(head)
                    if length is None:
                        raise ValueError("response without Content-Length")
                    await reader.readexactly(int(length[1]))
            tally.latencies.append(time.perf_counter() - started)
            if int(head[9:12]) > 399:
                tally.errors_status += 1
            if _CLOSE.search(head):
                writer.close()
                writer = None
        # TimeoutError (asyncio.timeout) is an OSError.
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            tally.errors_socket += 1
            if writer is not None:
                writer.close()
                writer = None
    if writer is not None:
        writer.close()


async def _load(
    url: str, method: str, headers: dict[str, str], connections: int, duration: float
) -> LoadResult:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"plain http URLs only: {url}")
    request = request_bytes(method, url, headers)
    tally = _Tally(latencies=[])
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *(
            _one_connection(parts.hostname, parts.port or 80, method, request, deadline, tally)
            for _ in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    done = sorted(tally.latencies)
    if not done:
        raise RuntimeError(f"no {method} {url} completed ({tally.errors_socket} socket errors)")
    return LoadResult(
        requests_per_s=len(done) / elapsed,
        p50_ms=percentile(done, 50) * 1e3,
        p99_ms=percentile(done, 99) * 1e3,
        requests=len(done),
        non_2xx_3xx=tally.errors_status,
        socket_errors=tally.errors_socket,
    )


def load(
    url: str, method: str, headers: dict[str, str], connections: int, duration: float
) -> LoadResult:
    """`connections` keep-alive connections sending `method url` back to back for `duration` s."""
    return asyncio.run(_load(url, method, headers, connections, duration))
