"""Long soak: a million mixed requests through the gateway, RSS of every worker sampled.

    .venv/bin/python -m tests.bench.soak [--requests 1000000] [--every 100000] [--json out.json]

Starts a full stack (auth on, Distribution backend), pushes one small image, then sends
pipelined requests on 8 keep-alive connections, in a fixed mix that walks every hot path:
manifest GET by tag, blob HEAD (the ledger), tag list (paged by the gateway), a GET outside
the caller's namespace (403), one without a token (401), and a token exchange every 500th
request. Every `--every` requests it samples each gateway worker's RSS (/proc) and the
statuses seen; at the end it prints the RSS slope per 100 000 requests (least squares over
the samples after the first, which includes warm-up) and whether any 5xx was seen.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from tests.e2e.test_gateway import bearer, token
from tests.e2e.test_listing import push_image
from tests.support.stack import Stack
from tests.support.standins.auth import AuthStandin, tabbify_jwt

CONNECTIONS = 8
BATCH = 200  # requests written at once on a connection (pipelined), then read back


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def mix(host: str, auth: str, digest: str) -> list[bytes]:
    """One round of the mix (50 requests)."""
    h = f"Host: {host}\r\nAuthorization: {auth}\r\n"
    accept = "Accept: application/vnd.oci.image.manifest.v1+json\r\n"
    requests_ = (
        [f"GET /v2/soak/app/manifests/v1 HTTP/1.1\r\n{h}{accept}\r\n"] * 20
        + [f"HEAD /v2/soak/app/blobs/{digest} HTTP/1.1\r\n{h}\r\n"] * 20
        + [f"GET /v2/soak/app/tags/list?n=2 HTTP/1.1\r\n{h}\r\n"] * 5
        + [f"GET /v2/other/app/manifests/v1 HTTP/1.1\r\n{h}\r\n"] * 3
        + [f"GET /v2/soak/app/manifests/v1 HTTP/1.1\r\nHost: {host}\r\n\r\n"] * 2
    )
    return [r.encode() for r in requests_]


def read_response(reader, head: bool) -> int:  # type: ignore[no-untyped-def]
    status = int(reader.readline().split()[1])
    length, chunked = 0, False
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if head:
        return status
    if chunked:
        while (size := int(reader.readline().split(b";")[0], 16)) > 0:
            reader.read(size + 2)
        reader.readline()
    else:
        reader.read(length)
    return status


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=0, help="REGISTRY_WORKERS (0: cores)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    credential = tabbify_jwt({"sub": "soak"})
    auth_standin = AuthStandin().start()
    with tempfile.TemporaryDirectory(prefix="tbf-soak-") as tmp:
        env = {"REGISTRY_WORKERS": str(args.workers)} if args.workers else {}
        stack = Stack(Path(tmp) / "data", auth_standin.url, **env).start()
        try:
            h = bearer(token(stack, credential))
            push_image(stack, "soak/app", ["v1", "v2", "v3"], h)
            manifest = requests.get(
                f"{stack.url}/v2/soak/app/manifests/v1",
                headers={**h, "Accept": "application/vnd.oci.image.manifest.v1+json"},
                timeout=10,
            ).json()
            digest = manifest["layers"][0]["digest"]
            statuses: Counter[int] = Counter()
            done = 0
            lock = threading.Lock()
            samples: list[dict[str, object]] = []
            next_sample = 0

            def sample() -> None:
                pids = stack.gateway_pids()
                rss = {name: rss_kib(pid) for name, pid in pids.items()}
                samples.append({"requests": done, "rss_kib": rss, "time": time.time()})
                total = sum(rss.values()) / 1024
                print(f"{done:>9} requests  RSS {total:6.1f} MiB  {dict(statuses)}", flush=True)

            def one_connection(share: int) -> None:
                nonlocal done, next_sample
                fresh = bearer(token(stack, credential))["Authorization"]
                round_ = mix(stack.host, fresh, digest)
                sent = 0
                with socket.create_connection(("127.0.0.1", stack.port), timeout=60) as sock:
                    reader = sock.makefile("rb")
                    while sent < share:
                        batch = [round_[(sent + i) % len(round_)] for i in range(BATCH)]
                        sock.sendall(b"".join(batch))
                        seen = Counter(read_response(reader, r.startswith(b"HEAD")) for r in batch)
                        sent += BATCH
                        if sent % 500 < BATCH:  # a token exchange now and then
                            round_ = mix(
                                stack.host,
                                bearer(token(stack, credential))["Authorization"],
                                digest,
                            )
                        with lock:
                            statuses.update(seen)
                            done += BATCH
                            if done >= next_sample:
                                next_sample += args.every
                                sample()

            started = time.monotonic()
            share = args.requests // CONNECTIONS // BATCH * BATCH
            threads = [
                threading.Thread(target=one_connection, args=(share,)) for _ in range(CONNECTIONS)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - started
            sample()
        finally:
            stack.stop()
    auth_standin.stop()

    points = [(s["requests"], sum(s["rss_kib"].values()) / 1024) for s in samples[1:]]  # type: ignore[union-attr]
    slope = least_squares(points) * 100_000 if len(points) > 1 else float("nan")
    errors = sum(n for status, n in statuses.items() if status >= 500)
    print(
        f"\n{done} requests in {elapsed:.0f} s ({done / elapsed:.0f}/s); statuses {dict(statuses)}"
    )
    print(f"RSS slope (all workers): {slope:+.2f} MiB per 100 000 requests; 5xx: {errors}")
    if args.json:
        args.json.write_text(
            json.dumps({"samples": samples, "slope_mib_per_100k": slope, "statuses": statuses})
        )


def least_squares(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


if __name__ == "__main__":
    main()
