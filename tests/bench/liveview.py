"""What the live view costs the hot path: small GETs through the gateway with the view closed
and open, in ONE run, alternating.

    .venv/bin/python -m tests.bench.liveview [--duration 10] [--rounds 3] [--workers N]
                                             [--json out.json]

Starts a full stack (`tabbify-registry run`, Distribution backend, auth on with the stand-in),
pushes a small image, then runs wrk (as tests.bench.compare does: 2 threads, 16 keep-alive
connections, authenticated manifest GET) `--rounds` times with the view closed and open,
interleaved (closed, open, closed, open, …) so that drift on this noisy machine hits both.
Besides the rate, each round reports the CPU time the gateway workers and the admin program
spent per request (/proc/<pid>/stat): other load on the machine moves the rate a lot, the
CPU per request much less.
"Open" is a viewer as the browser is one: an EventSource-like client reading
`/live/events` all the time (no rendering: an operator's browser runs on the operator's
machine, at the other end of the ssh tunnel). Before an open round the bench waits until
every worker streams.

Also the per-flow cost in-process (no network): `FlowFeed` keeping a snapshot of a
realistic finished flow (view closed), and keeping plus encoding and sending it (view open).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from addons.gateway.accesslog import AccessLog
from addons.gateway.flowfeed import FlowFeed
from tests.bench.compare import (
    OCI_MANIFEST,
    SMALL_REPO,
    SMALL_TAG,
    Wrk,
    find_tool,
    log,
    push_small_image,
    registry_token,
    start_stack,
    wrk_script,
)
from tests.support.stack import Stack, wait_for
from tests.support.standins.auth import tabbify_jwt

TENANT = "bench"


class Viewer:
    """Reads /live/events until stopped, as an open page does; counts the flow events."""

    def __init__(self, admin: str) -> None:
        self.admin = admin
        self.flows = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        host, port = self.admin.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(f"GET /live/events HTTP/1.1\r\nHost: {self.admin}\r\n\r\n".encode())
            buffer = b""
            while not self.stopped.is_set():
                data = s.recv(1 << 20)
                if not data:
                    return
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if b"event: flows" in event:
                        payload = event.split(b"data: ", 1)[1]
                        self.flows += payload.count(b'"seq":')

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(35)


def cpu_seconds(pids: list[int], user_only: bool = False) -> float:
    """user + system (or user only) CPU time of these processes so far (/proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + (0 if user_only else int(fields[12]))) / tick  # utime, stime
    return total


def streaming_workers(admin: str) -> int:
    r = requests.get(f"http://{admin}/live/overview", timeout=10)
    return int(r.json()["stats"]["workers_streaming"])


def worker_feed_states(stack: Stack) -> list[dict[str, Any]]:
    out = []
    for path in sorted((stack.data_dir / "run" / "workers").glob("worker-*.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()).get("liveview") or {})
    return out


def finished_flows(n: int) -> list[http.HTTPFlow]:
    """`n` manifest GETs as the gateway finishes them: headers as a client and the backend
    send them (an allowed request's Authorization is gone by then: RegistryAccess removed it
    before forwarding), and the access-log line the feed takes."""
    headers = http.Headers(
        host="registry.mesh:5000",
        user_agent="containers/5.23.1 (github.com/containers/image)",
        accept=f"{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json",
        accept_encoding="gzip",
        docker_distribution_api_version="registry/2.0",
    )
    response_headers = http.Headers(
        content_type=OCI_MANIFEST,
        content_length="528",
        docker_content_digest="sha256:" + "a" * 64,
        docker_distribution_api_version="registry/2.0",
        etag='"sha256:' + "a" * 64 + '"',
    )
    access_log = AccessLog(out=io.StringIO())
    flows = []
    for _ in range(n):
        request = tutils.treq(path=b"/v2/bench/small/manifests/v1", headers=headers.copy())
        flow = tflow.tflow(req=request, resp=tutils.tresp(headers=response_headers.copy()))
        access_log.response(flow)
        flows.append(flow)
    return flows


def per_flow_cost(n: int = 10_000) -> dict[str, float]:
    """µs per flow for the feed alone: closed (keep a snapshot) and open (keep, then encode
    and send in ticks of 100 flows, about one tick at 500 req/s per worker)."""
    closed = FlowFeed()
    flows = finished_flows(n)
    started = time.perf_counter()
    for flow in flows:
        closed.response(flow)
    result = {"closed_us_per_flow": (time.perf_counter() - started) / n * 1e6}
    with tempfile.TemporaryDirectory() as tmp:
        sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sink.bind(f"{tmp}/s")
        sink.setblocking(False)
        opened = FlowFeed()
        opened.start(f"{tmp}/s")
        flows = finished_flows(n)
        spent = 0.0
        for i in range(0, n, 100):
            started = time.perf_counter()
            for flow in flows[i : i + 100]:
                opened.response(flow)
            opened.send_pending()
            spent += time.perf_counter() - started
            with contextlib.suppress(BlockingIOError):
                while True:
                    sink.recv(1 << 20)  # the admin program's part, not counted
        result["open_us_per_flow"] = spent / n * 1e6
        result["open_dropped"] = opened.dropped
        opened.stop()
        sink.close()
    return result


def measure(args: argparse.Namespace, tmp: Path, wrk_bin: str) -> dict[str, Any]:
    credential = tabbify_jwt({"sub": TENANT})
    rounds: list[dict[str, Any]] = []
    with contextlib.ExitStack() as running:
        stack = start_stack(running, tmp, args.workers)
        admin = stack.env["REGISTRY_ADMIN_ADDR"]

        def bearer() -> dict[str, str]:
            return {"Authorization": f"Bearer {registry_token(stack, credential)}"}

        push_small_image(stack.url, bearer())
        wrk = Wrk(wrk_bin, tmp, args.duration)
        gateway = list(stack.gateway_pids().values())
        admin_pid = [int(stack.supervisorctl("pid", "admin").strip())]
        url = f"{stack.url}/v2/{SMALL_REPO}/manifests/{SMALL_TAG}"
        for i in range(args.rounds * 2):
            view = "open" if i % 2 else "closed"
            viewer = None
            if view == "open":
                viewer = Viewer(admin)
                wait_for(lambda: streaming_workers(admin) == stack.workers, 15)
            else:  # the workers stop within CONTROL_TTL + their publishing second
                wait_for(lambda: streaming_workers(admin) == 0, 15)
            log(f"round {i // 2 + 1}: view {view}, wrk manifest GET ({args.duration} s)")
            script = wrk_script("GET", {**bearer(), "Accept": OCI_MANIFEST})
            before = cpu_seconds(gateway), cpu_seconds(admin_pid)
            r = wrk.run(url, script)
            if viewer is not None:
                time.sleep(1)  # the last tick's flows
            after = cpu_seconds(gateway), cpu_seconds(admin_pid)
            row = {"view": view, **r.__dict__}
            # CPU per request: what the view costs, whatever else runs on the machine.
            row["gateway_cpu_us_per_req"] = (after[0] - before[0]) / r.requests * 1e6
            row["admin_cpu_us_per_req"] = (after[1] - before[1]) / r.requests * 1e6
            if viewer is not None:
                viewer.stop()
                row["viewer_flows"] = viewer.flows
            rounds.append(row)
        feeds = worker_feed_states(stack)
        overview = requests.get(f"http://{admin}/live/overview", timeout=10).json()["stats"]
    return {"rounds": rounds, "worker_feeds": feeds, "admin": overview}


def paired(rounds: list[dict[str, Any]], key: str) -> float:
    """The median over (closed, open) neighbours of open/closed: drift between pairs cancels."""
    pairs = zip(rounds[0::2], rounds[1::2], strict=False)
    return statistics.median(o[key] / c[key] for c, o in pairs)


def summary(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {
        "paired_open_over_closed": {
            "req_s": paired(rounds, "requests_per_s"),
            "gateway_cpu_per_req": paired(rounds, "gateway_cpu_us_per_req"),
        }
    }
    for view in ("closed", "open"):
        rows = [r for r in rounds if r["view"] == view]
        out[view] = {
            "gateway_cpu_us_median": statistics.median(r["gateway_cpu_us_per_req"] for r in rows),
            "admin_cpu_us_median": statistics.median(r["admin_cpu_us_per_req"] for r in rows),
            "req_s_median": statistics.median(r["requests_per_s"] for r in rows),
            "p50_ms_median": statistics.median(r["p50_ms"] for r in rows),
            "p99_ms_median": statistics.median(r["p99_ms"] for r in rows),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="closed/open pairs")
    parser.add_argument("--workers", type=int, default=0, help="REGISTRY_WORKERS")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    wrk_bin = find_tool("wrk", "wrk")
    log("per-flow cost of the feed, in-process")
    cost = per_flow_cost()
    with tempfile.TemporaryDirectory(prefix="tbf-liveview-") as tmp:
        measured = measure(args, Path(tmp), wrk_bin)
    rounds = measured["rounds"]
    table = summary(rounds)
    print("view    req/s    p50 ms   p99 ms   gateway µs CPU/req  admin µs CPU/req  viewer got")
    for r in rounds:
        got = r.get("viewer_flows", "")
        print(
            f"{r['view']:7} {r['requests_per_s']:7.0f}  {r['p50_ms']:7.1f}  {r['p99_ms']:7.1f}  "
            f"{r['gateway_cpu_us_per_req']:18.0f}  {r['admin_cpu_us_per_req']:16.0f}  {got}"
        )
    closed, opened = table["closed"], table["open"]
    ratio = opened["req_s_median"] / closed["req_s_median"]
    print(
        f"median: closed {closed['req_s_median']:.0f} req/s, open {opened['req_s_median']:.0f}"
        f" req/s: open/closed {ratio:.3f}; gateway CPU per request closed"
        f" {closed['gateway_cpu_us_median']:.0f} µs, open {opened['gateway_cpu_us_median']:.0f} µs;"
        f" admin CPU per request open {opened['admin_cpu_us_median']:.0f} µs"
    )
    print(
        f"per flow, in-process: closed {cost['closed_us_per_flow']:.1f} µs,"
        f" open {cost['open_us_per_flow']:.1f} µs"
    )
    pairs = table["paired_open_over_closed"]
    print(
        f"paired open/closed (median over neighbouring rounds): req/s {pairs['req_s']:.3f},"
        f" gateway CPU per request {pairs['gateway_cpu_per_req']:.3f}"
    )
    print(f"worker feeds: {measured['worker_feeds']}")
    print(f"admin: {measured['admin']}")
    if args.json:
        report = {"args": vars(args) | {"json": str(args.json)}, "cost": cost, **measured}
        report["summary"] = table
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
