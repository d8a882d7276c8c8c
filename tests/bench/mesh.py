"""Blob push/pull over the WireGuard tunnel: through the gateway vs plain HTTP, in ONE run.

    .venv/bin/python -m tests.bench.mesh [--size-mib 256]

Builds the test underlay (namespaces, wireguard-go, coordinator stand-in; root needed), runs
`tabbify-registry run` in one namespace and a client in another, then moves the same number
of bytes both ways through the tunnel: to and from the gateway ([ULA]:5000, auth on, real token)
and to and from a plain Python HTTP server on the registry's ULA (port 8099).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
from pathlib import Path

from tests.e2e.test_mesh import MeshRegistry
from tests.support.netns import Underlay, WgClient, poll
from tests.support.standins.auth import AuthStandin, tabbify_jwt
from tests.support.standins.coordinator import CoordinatorStandin

PLAIN_SERVER = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    SIZE = int(sys.argv[2]); CHUNK = bytes(1 << 20)
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", str(SIZE))
            self.end_headers()
            left = SIZE
            while left:
                n = min(left, len(CHUNK)); self.wfile.write(CHUNK[:n]); left -= n
        def do_PUT(self):
            left = int(self.headers["Content-Length"])
            while left:
                left -= len(self.rfile.read(min(left, 1 << 20)))
            self.send_response(201); self.send_header("Content-Length", "0"); self.end_headers()
    ThreadingHTTPServer.address_family = __import__("socket").AF_INET6
    ThreadingHTTPServer((sys.argv[1], 8099), H).serve_forever()
    """
)

CLIENT = textwrap.dedent(
    """
    import hashlib, http.client, json, sys, time, urllib.parse, urllib.request, base64
    host, size, jwt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    MIB = 1 << 20; chunk = bytes(MIB)
    class Body:
        def __init__(self): self.left = size
        def read(self, n=-1):
            n = min(MIB if n < 0 else n, MIB, self.left); self.left -= n; return chunk[:n]
    def timed_put(port, path, headers):
        c = http.client.HTTPConnection(host, port, timeout=600, blocksize=MIB)
        t = time.perf_counter()
        c.request("PUT", path, body=Body(), headers={**headers, "Content-Length": str(size)})
        r = c.getresponse(); r.read(); assert r.status == 201, r.status
        return time.perf_counter() - t
    def timed_get(port, path, headers):
        c = http.client.HTTPConnection(host, port, timeout=600)
        t = time.perf_counter(); c.request("GET", path, headers=headers); r = c.getresponse()
        assert r.status == 200, r.status
        n = 0
        while data := r.read(MIB): n += len(data)
        assert n == size
        return time.perf_counter() - t
    basic = base64.b64encode(f"x:{jwt}".encode()).decode()
    c = http.client.HTTPConnection(host, 5000, timeout=30)
    c.request("GET", "/auth/token?service=tabbify-registry",
              headers={"Authorization": "Basic " + basic})
    token = json.loads(c.getresponse().read())["token"]
    auth = {"Authorization": "Bearer " + token}
    h = hashlib.sha256()
    left = size
    while left:
        n = min(left, MIB); h.update(chunk[:n]); left -= n
    digest = "sha256:" + h.hexdigest()
    c.request("POST", "/v2/bench/mesh/blobs/uploads/", headers=auth)
    r = c.getresponse(); r.read(); location = r.getheader("Location")
    out = {
        "gateway_push": timed_put(5000, f"{location}&digest={digest}", auth),
        "gateway_pull": timed_get(5000, f"/v2/bench/mesh/blobs/{digest}", auth),
        "plain_push": timed_put(8099, "/sink", {}),
        "plain_pull": timed_get(8099, "/blob", {}),
    }
    print(json.dumps(out))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="tbf-mesh-bench-") as tmp, Underlay() as net:
        coordinator = CoordinatorStandin(net.gateway).start()
        auth = AuthStandin(host=net.gateway).start()
        reg_host = net.add_host("reg")
        env = {"MESH_COORDINATOR_URL": coordinator.url, "REGISTRY_AUTH_URL": auth.url}
        registry = MeshRegistry(reg_host, env, Path(tmp) / "data")
        try:
            ula = registry.start()
            reg_host.popen([sys.executable, "-c", PLAIN_SERVER, ula, str(size)])
            reg_host.wait_port(ula, 8099)
            client_host = net.add_host("cli")
            WgClient(client_host, coordinator)
            # The follower applies the client as a peer within a poll interval.
            poll(lambda: reg_host.run(["wg", "show", registry.ifname, "peers"]).stdout.strip(), 15)
            r = client_host.run(
                [sys.executable, "-c", CLIENT, ula, str(size), tabbify_jwt({"sub": "bench"})],
                timeout=900,
            )
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            seconds = json.loads(r.stdout)
        finally:
            registry.stop()
            auth.stop()
            coordinator.stop()
    mbps = {k: size / v / 1e6 for k, v in seconds.items()}
    print(f"{args.size_mib} MiB over WireGuard   push MB/s   pull MB/s")
    print(f"{'plain HTTP':>22}   {mbps['plain_push']:9.0f}   {mbps['plain_pull']:9.0f}")
    print(f"{'gateway':>22}   {mbps['gateway_push']:9.0f}   {mbps['gateway_pull']:9.0f}")
    print(
        f"{'ratio':>22}   {mbps['gateway_push'] / mbps['plain_push']:9.2f}   "
        f"{mbps['gateway_pull'] / mbps['plain_pull']:9.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(mbps, indent=2))


if __name__ == "__main__":
    main()
