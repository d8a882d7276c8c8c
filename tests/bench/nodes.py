"""Several registry nodes on one bucket, simulated on this machine: N complete nodes
(`tabbify-registry run`, Distribution on one SeaweedFS bucket, the S3 ledger, one gateway
worker each) and M concurrent clients.

    .venv/bin/python -m tests.bench.nodes [--nodes 2] [--clients 16] [--duration 10] [--blobs 300]

Reports:
1. ledger misses while clients spread over the nodes: blobs pushed through node 0, then M
   clients HEAD random blobs on random nodes; a digest asked for the first time on a node
   that did not record it is a ledger miss there (one S3 HEAD), later asks are hits. Miss
   rate as the gateways count it (/metrics), and the latency a miss adds per request.
   And what a lookup that always misses costs at the gateway: globex HEADs acme's digests
   (refused by isolation after one S3 HEAD each time: negative answers are never cached),
   against `GET /v2/` (token check, no ledger, a backend answer that touches no storage).
2. throughput, one node against all nodes: M keep-alive connections, all on node 0, then
   spread over every node: `GET /v2/` (what the gateways can do) and an authenticated blob
   HEAD by digest (isolation hit, then Distribution stats the blob in S3).
3. re-authentication when a client moves between nodes on per-run token keys (the default):
   401 with the challenge, a token exchange on the new node (Tabbify auth checks the JWT),
   the retried request; against the same request with a token that node accepts (what
   REGISTRY_TOKEN_KEY_FILE gives).
Everything runs on the same cores as the load generator: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import tempfile
import time
from pathlib import Path

import requests

from tests.bench.httpload import _CONTENT_LENGTH, _load, percentile, request_bytes
from tests.e2e.test_gateway import push_blob
from tests.support.stack import Stack
from tests.support.standins.auth import AuthStandin, tabbify_jwt
from tests.support.standins.seaweed import SeaweedS3

BUCKET = "tbf-bench-nodes"
REPO = "acme/bench"


def token(base: str, credential: str) -> str:
    r = requests.get(f"{base}/auth/token", auth=("x", credential), timeout=10)
    r.raise_for_status()
    return str(r.json()["token"])


def start_nodes(root: Path, n: int, auth_url: str, s3: SeaweedS3) -> list[Stack]:
    (root / "http-secret").write_text(os.urandom(24).hex())
    stacks = [Stack(root / f"node{i}", auth_url) for i in range(n)]
    members = ",".join(f"127.0.0.1:{s.backend_port}" for s in stacks)
    for s in stacks:
        s.env.update(
            REGISTRY_STORAGE="s3",
            REGISTRY_S3_BUCKET=BUCKET,
            REGISTRY_S3_REGION="us-east-1",
            REGISTRY_S3_ENDPOINT=s3.url,
            REGISTRY_LEDGER_URL=f"s3://{BUCKET}/ledger",
            REGISTRY_WORKERS="1",
            REGISTRY_HTTP_SECRET_FILE=str(root / "http-secret"),
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench-secret",
            AWS_EC2_METADATA_DISABLED="true",
        )
        if n >= 2:
            s.env["REGISTRY_CLUSTER_MEMBERS"] = members
        s.start(wait=False)
    for s in stacks:
        s.wait_ready(90)
    return stacks


async def spread_clients(
    stacks: list[Stack], tokens: list[str], digests: list[str], clients: int, duration: float
) -> tuple[list[float], list[float]]:
    """(latencies of first asks of a (node, digest), latencies of repeated asks)."""
    asked: set[tuple[int, str]] = set()
    first: list[float] = []
    again: list[float] = []
    deadline = time.perf_counter() + duration
    rng = random.Random(7)

    async def client() -> None:
        conns: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        while time.perf_counter() < deadline:
            node, digest = rng.randrange(len(stacks)), rng.choice(digests)
            if node not in conns:
                conns[node] = await asyncio.open_connection("127.0.0.1", stacks[node].port)
            reader, writer = conns[node]
            url = f"{stacks[node].url}/v2/{REPO}/blobs/{digest}"
            # Node 0 recorded every blob when they were pushed: only other nodes look up.
            cold = node != 0 and (node, digest) not in asked
            asked.add((node, digest))
            start = time.perf_counter()
            writer.write(request_bytes("HEAD", url, {"Authorization": f"Bearer {tokens[node]}"}))
            head = await reader.readuntil(b"\r\n\r\n")
            (first if cold else again).append(time.perf_counter() - start)
            assert head.startswith(b"HTTP/1.1 200"), head[:40]
        for _, writer in conns.values():
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return sorted(first), sorted(again)


async def throughput(
    stacks: list[Stack], tokens: list[str], path: str, clients: int, duration: float
) -> tuple[float, float]:
    """(requests/s, p50 ms) of `clients` connections spread evenly over `stacks`."""
    share = [clients // len(stacks) + (i < clients % len(stacks)) for i in range(len(stacks))]
    results = await asyncio.gather(
        *(
            _load(
                f"{s.url}{path}",
                "HEAD" if "/blobs/" in path else "GET",
                {"Authorization": f"Bearer {t}"},
                c,
                duration,
            )
            for s, t, c in zip(stacks, tokens, share, strict=True)
            if c
        )
    )
    for r in results:
        assert r.non_2xx_3xx == 0 and r.socket_errors == 0, r
    return sum(r.requests_per_s for r in results), max(r.p50_ms for r in results)


async def always_missing(
    node: Stack, credential: str, digests: list[str]
) -> tuple[list[float], list[float]]:
    """(globex HEADs of acme's digests, GET /v2/ as acme): one request at a time."""
    globex = await asyncio.to_thread(token, node.url, tabbify_jwt({"sub": "globex"}))
    acme = await asyncio.to_thread(token, node.url, credential)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    refused: list[float] = []
    base: list[float] = []
    for digest in digests:
        for method, path, t, out in (
            ("HEAD", f"/v2/globex/x/blobs/{digest}", globex, refused),
            ("GET", "/v2/", acme, base),
        ):
            start = time.perf_counter()
            writer.write(request_bytes(method, node.url + path, {"Authorization": f"Bearer {t}"}))
            head = await reader.readuntil(b"\r\n\r\n")
            if method == "GET":
                length = _CONTENT_LENGTH.search(head)
                await reader.readexactly(int(length[1]) if length else 0)
            out.append(time.perf_counter() - start)
            assert head.startswith(b"HTTP/1.1 404" if method == "HEAD" else b"HTTP/1.1 200")
    writer.close()
    return sorted(refused), sorted(base)


def reauth_cost(
    stacks: list[Stack], credential: str, rounds: int
) -> tuple[list[float], list[float]]:
    """(a request with a token the node accepts, 401 + token exchange + the retried request)."""
    a, b = stacks[0], stacks[1]
    url = f"{b.url}/v2/"
    session = requests.Session()
    valid = {"Authorization": f"Bearer {token(b.url, credential)}"}
    foreign = {"Authorization": f"Bearer {token(a.url, credential)}"}
    plain, moved = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        assert session.get(url, headers=valid, timeout=10).status_code == 200
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        r = session.get(url, headers=foreign, timeout=10)
        assert r.status_code == 401 and "Bearer realm=" in r.headers["WWW-Authenticate"]
        r = session.get(f"{b.url}/auth/token", auth=("x", credential), timeout=10)
        fresh = {"Authorization": f"Bearer {r.json()['token']}"}
        assert session.get(url, headers=fresh, timeout=10).status_code == 200
        moved.append(time.perf_counter() - start)
    return sorted(plain), sorted(moved)


def gateway_lookups(stack: Stack) -> dict[str, int]:
    """The node's ledger lookups from its admin endpoint's /metrics."""
    text = requests.get(f"http://{stack.env['REGISTRY_ADMIN_ADDR']}/metrics", timeout=5).text
    found = dict(re.findall(r'tabbify_ledger_lookups_total\{result="(\w+)"\} (\d+)', text))
    return {"hit": int(found.get("hit", 0)), "miss": int(found.get("miss", 0))}


def ms(values: list[float], p: float) -> float:
    return percentile(values, p) * 1e3 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--blobs", type=int, default=300)
    args = parser.parse_args()
    assert args.nodes >= 2, "at least two nodes"
    credential = tabbify_jwt({"sub": "user", "network": "acme"})
    with tempfile.TemporaryDirectory(prefix="tbf-bench-nodes-") as tmp:
        root = Path(tmp)
        s3 = SeaweedS3(root / "seaweed").start()
        s3.create_bucket(BUCKET)
        auth = AuthStandin().start()
        stacks: list[Stack] = []
        try:
            stacks = start_nodes(root, args.nodes, auth.url, s3)
            tokens = [token(s.url, credential) for s in stacks]
            h = {"Authorization": f"Bearer {tokens[0]}"}
            digests = [push_blob(stacks[0], REPO, os.urandom(1024), h) for _ in range(args.blobs)]

            before = [gateway_lookups(s) for s in stacks]
            first, again = asyncio.run(
                spread_clients(stacks, tokens, digests, args.clients, args.duration)
            )
            time.sleep(1.5)  # the workers publish their counters once a second
            counted = [
                {k: after[k] - b[k] for k in after}
                for after, b in zip((gateway_lookups(s) for s in stacks), before, strict=True)
            ]
            total = len(first) + len(again)
            hits, misses = sum(c["hit"] for c in counted), sum(c["miss"] for c in counted)
            print(f"{args.nodes} nodes x {args.clients} clients, {args.blobs} blobs via node 0")
            print(
                f"1. ledger: {total} blob HEADs; the gateways counted {hits} hits and {misses} "
                f"misses (tabbify_ledger_lookups_total): miss rate {misses / (hits + misses):.1%} "
                "(" + ", ".join(f"node {i}: {c['miss']}" for i, c in enumerate(counted)) + ")"
            )
            print(
                f"   latency p50/p99: first ask on a node that did not record it (a miss) "
                f"{ms(first, 50):.1f}/{ms(first, 99):.1f} ms, every other ask "
                f"{ms(again, 50):.1f}/{ms(again, 99):.1f} ms; a miss adds "
                f"~{ms(first, 50) - ms(again, 50):.1f} ms (p50)"
            )

            refused, base = asyncio.run(always_missing(stacks[1], credential, digests))
            print(
                f"   a lookup that always misses (globex, refused by isolation): p50/p99 "
                f"{ms(refused, 50):.1f}/{ms(refused, 99):.1f} ms against GET /v2/ "
                f"{ms(base, 50):.1f}/{ms(base, 99):.1f} ms"
            )
            blob_head = f"/v2/{REPO}/blobs/{digests[0]}"
            for name, path in (("GET /v2/", "/v2/"), ("blob HEAD", blob_head)):
                c, d = args.clients, args.duration
                one = asyncio.run(throughput(stacks[:1], tokens[:1], path, c, d))
                every = asyncio.run(throughput(stacks, tokens, path, c, d))
                print(
                    f"2. throughput, {name}: one node {one[0]:.0f} req/s (p50 {one[1]:.1f} ms), "
                    f"{args.nodes} nodes {every[0]:.0f} req/s (p50 {every[1]:.1f} ms): "
                    f"{every[0] / one[0]:.2f}x on {os.cpu_count()} cores"
                )

            direct = asyncio.run(
                _load(
                    f"{stacks[0].backend_url}{blob_head}",
                    "HEAD",
                    stacks[0].backend_headers(),
                    args.clients,
                    args.duration,
                )
            )
            print(
                f"   (node 0's backend direct, no gateway: blob HEAD {direct.requests_per_s:.0f} "
                f"req/s, p50 {direct.p50_ms:.1f} ms: Distribution reads S3 for every HEAD)"
            )

            plain, moved = reauth_cost(stacks, credential, 200)
            print(
                f"3. moving to another node, per-run keys: 401 + token + retry "
                f"{ms(moved, 50):.1f}/{ms(moved, 99):.1f} ms (p50/p99) against "
                f"{ms(plain, 50):.1f}/{ms(plain, 99):.1f} ms with a token the node accepts: "
                f"+{ms(moved, 50) - ms(plain, 50):.1f} ms once per move (and per token lifetime)"
            )
        finally:
            for s in stacks:
                s.stop()
            auth.stop()
            s3.stop()


if __name__ == "__main__":
    main()
