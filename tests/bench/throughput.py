"""Blob push/pull throughput through the gateway vs straight to the backend, in ONE run.

    .venv/bin/python -m tests.bench.throughput [--size-mib 1024] [--json out.json]

Starts a full stack (`tabbify-registry run`, Distribution backend, auth on with the stand-in),
pushes and pulls one blob of the given size each way, and reports MB/s, the gateway/direct
ratio and the gateway's peak RSS (VmHWM of a gateway worker). Noisy machine: compare within
a run.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from tests.support.stack import Stack
from tests.support.standins.auth import AuthStandin, tabbify_jwt

MIB = 1 << 20


class Body:
    """`size` bytes from a repeated random MiB (unique per seed), streamed with a known length."""

    def __init__(self, size: int, seed: bytes) -> None:
        self.size, self.left = size, size
        self.chunk = hashlib.sha256(seed).digest() + os.urandom(MIB - 32)

    def __len__(self) -> int:
        return self.left

    def read(self, n: int = -1) -> bytes:
        offset = (self.size - self.left) % MIB  # the stream is the chunk repeated
        n = min(MIB - offset if n < 0 else n, MIB - offset, self.left)
        self.left -= n
        return self.chunk[offset : offset + n]

    def digest(self) -> str:
        h, left = hashlib.sha256(), self.size
        while left:
            n = min(MIB, left)
            h.update(self.chunk[:n])
            left -= n
        return "sha256:" + h.hexdigest()


def push(base: str, repo: str, body: Body, headers: dict[str, str]) -> float:
    digest = body.digest()
    r = requests.post(f"{base}/v2/{repo}/blobs/uploads/", headers=headers, timeout=30)
    r.raise_for_status()
    location = r.headers["Location"]
    url = location if location.startswith("http") else base + location
    target = urlsplit(url)
    # http.client with 1 MiB sends: requests' 8 KiB blocks would make the client the bottleneck.
    conn = http.client.HTTPConnection(target.netloc, timeout=600, blocksize=MIB)
    sep = "&" if target.query else "?"
    started = time.perf_counter()
    conn.request(
        "PUT",
        f"{target.path}?{target.query}{sep}digest={digest}",
        body=body,
        headers={
            **headers,
            "Content-Type": "application/octet-stream",
            "Content-Length": str(body.size),
        },
    )
    r = conn.getresponse()
    elapsed = time.perf_counter() - started
    assert r.status == 201, r.read()
    conn.close()
    return elapsed


def pull(base: str, repo: str, digest: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    h = hashlib.sha256()
    with requests.get(
        f"{base}/v2/{repo}/blobs/{digest}", headers=headers, stream=True, timeout=600
    ) as r:
        r.raise_for_status()
        for chunk in r.iter_content(MIB):
            h.update(chunk)
    elapsed = time.perf_counter() - started
    assert "sha256:" + h.hexdigest() == digest, "pulled bytes differ"
    return elapsed


def peak_rss_mb(stack: Stack) -> float:
    """The largest peak RSS (VmHWM) over the gateway workers, in MB (per worker)."""
    peaks = []
    for pid in stack.gateway_pids().values():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks) if peaks else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workers", type=int, default=0, help="REGISTRY_WORKERS")
    args = parser.parse_args()
    size = args.size_mib * MIB

    auth = AuthStandin().start()
    with tempfile.TemporaryDirectory(prefix="tbf-bench-") as tmp:
        workers = {"REGISTRY_WORKERS": str(args.workers)} if args.workers else {}
        stack = Stack(Path(tmp) / "data", auth.url, **workers).start()
        try:
            credential = tabbify_jwt({"sub": "bench"})
            r = requests.get(f"{stack.url}/auth/token", auth=("x", credential), timeout=10)
            gw_headers = {"Authorization": f"Bearer {r.json()['token']}"}
            results = {}
            for path, base, headers in (
                ("direct", stack.backend_url, stack.backend_headers()),
                ("gateway", stack.url, gw_headers),
            ):
                body = Body(size, path.encode())
                push_s = push(base, f"bench/{path}", body, headers)
                pull_s = pull(base, f"bench/{path}", body.digest(), headers)
                results[path] = {"push_MBps": size / push_s / 1e6, "pull_MBps": size / pull_s / 1e6}
            results["ratio"] = {
                k: results["gateway"][k] / results["direct"][k] for k in ("push_MBps", "pull_MBps")
            }
            results["gateway_peak_rss_MB"] = peak_rss_mb(stack)
        finally:
            stack.stop()
            auth.stop()

    print(f"blob {args.size_mib} MiB   push MB/s   pull MB/s")
    for path in ("direct", "gateway"):
        print(f"{path:>12}   {results[path]['push_MBps']:9.0f}   {results[path]['pull_MBps']:9.0f}")
    ratio = results["ratio"]
    print(f"{'ratio':>12}   {ratio['push_MBps']:9.2f}   {ratio['pull_MBps']:9.2f}")
    print(f"gateway peak RSS: {results['gateway_peak_rss_MB']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
