"""What the content cache buys a user, in ONE run: request rates and CPU per request through
the gateway and straight to the backend, and whole `skopeo copy` pushes and pulls of a
10-layer image, cold and warm, through the gateway, direct and nginx.

    .venv/bin/python -m tests.bench.cache [--duration 5] [--rounds 3] [--layer-kib 1024]
                                          [--fill-mib 64] [--json out.json]

One gateway worker (REGISTRY_WORKERS=1), the Distribution backend with its per-run Basic
credential, auth on with the stand-in. For each request kind (manifest GET by digest, blob
HEAD by digest, manifest GET by tag) the Python load client (tests.bench.httpload: 8 keep-alive
connections) runs against the gateway and the backend in turn, `--rounds` times, alternating
which goes first; each run reports its rate and the CPU (/proc utime + stime) the gateway
worker and the backend spent per request. Ratios are taken per round (gateway / direct in
the same round) and their median reported: this machine's rates move ±20 % between minutes.

Then the cache is filled (`--fill-mib` of ~500 KiB manifests pushed and read by digest) and
the worker's resident memory read, with the cache's own /metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from tests.bench.compare import (
    OCI_MANIFEST,
    SMALL_REPO,
    SMALL_TAG,
    Nginx,
    cache_metrics,
    find_tool,
    push_small_image,
    registry_token,
    skopeo_copies,
    start_stack,
)
from tests.bench.httpload import load
from tests.bench.liveview import cpu_seconds
from tests.support.images import oci_layout
from tests.support.standins.auth import tabbify_jwt

TENANT = "bench"
CONNECTIONS = 8


def log(message: str) -> None:
    print(f"[tests.bench.cache] {message}", file=sys.stderr, flush=True)


def pid_of(stack: Any, program: str) -> int:
    out = stack.supervisorctl("pid", program).strip()
    if not out.isdigit() or not int(out):
        raise RuntimeError(f"no pid for {program}: {out}")
    return int(out)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    credential = tabbify_jwt({"sub": TENANT})
    with contextlib.ExitStack() as running:
        stack = start_stack(running, tmp, 1)
        gateway_pid, backend_pid = pid_of(stack, "gateway:gateway-0"), pid_of(stack, "backend")

        def bearer() -> dict[str, str]:
            return {"Authorization": f"Bearer {registry_token(stack, credential)}"}

        push_small_image(stack.url, bearer())
        accept = {"Accept": OCI_MANIFEST}
        r = requests.get(
            f"{stack.url}/v2/{SMALL_REPO}/manifests/{SMALL_TAG}", headers={**bearer(), **accept}
        )
        digest = r.headers["Docker-Content-Digest"]
        layer = r.json()["layers"][0]["digest"]
        kinds = {
            "manifest GET by digest": ("GET", f"/v2/{SMALL_REPO}/manifests/{digest}"),
            "blob HEAD by digest": ("HEAD", f"/v2/{SMALL_REPO}/blobs/{layer}"),
            "manifest GET by tag": ("GET", f"/v2/{SMALL_REPO}/manifests/{SMALL_TAG}"),
        }
        urls = {"gateway": stack.url, "direct": stack.backend_url}
        runs: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in kinds}
        for rnd in range(args.rounds):
            for kind, (method, path) in kinds.items():
                order = ("gateway", "direct") if rnd % 2 == 0 else ("direct", "gateway")
                this: dict[str, dict[str, float]] = {}
                for side in order:
                    headers = {**(bearer() if side == "gateway" else stack.backend_headers())}
                    headers.update(accept)
                    log(f"round {rnd + 1}: {kind} via {side}")
                    gw0, be0 = cpu_seconds([gateway_pid]), cpu_seconds([backend_pid])
                    res = load(urls[side] + path, method, headers, CONNECTIONS, args.duration)
                    gw1, be1 = cpu_seconds([gateway_pid]), cpu_seconds([backend_pid])
                    n = max(res.requests, 1)
                    this[side] = {
                        "rate": res.requests_per_s,
                        "errors": res.non_2xx_3xx + res.socket_errors,
                        "gateway_cpu_us": (gw1 - gw0) / n * 1e6,
                        "backend_cpu_us": (be1 - be0) / n * 1e6,
                    }
                runs[kind].append(this)
        time.sleep(1.5)
        admin = "http://" + stack.env["REGISTRY_ADMIN_ADDR"]
        after_load = cache_metrics(admin)

        # The 10-layer image: push and pull, cold then warm, on all three paths.
        nginx = Nginx(
            find_tool("nginx", "nginx-light"),
            tmp / "nginx",
            stack.backend_url.removeprefix("http://"),
        )
        running.callback(nginx.stop)
        nginx.start()
        layout = tmp / "image"
        oci_layout(layout, "v1", layer_sizes=(args.layer_kib * 1024,) * 10)
        user, password = stack.backend_auth or ("", "")
        creds = {"gateway": f"x:{credential}", "direct": f"{user}:{password}"}
        creds["nginx"] = creds["direct"]
        hosts = {
            "direct": stack.backend_url.removeprefix("http://"),
            "gateway": stack.host,
            "nginx": nginx.url.removeprefix("http://"),
        }
        copies = skopeo_copies(hosts, creds, layout, tmp, f"{TENANT}/ten")

        # Fill the cache: ~500 KiB manifests pushed and read back by digest.
        log(f"filling the cache with {args.fill_mib} MiB of manifests")
        pad = "x" * 500_000
        h = {**bearer(), "Content-Type": OCI_MANIFEST, **accept}
        base = json.loads(
            requests.get(
                f"{stack.url}/v2/{SMALL_REPO}/manifests/{digest}", headers=h, timeout=10
            ).content
        )
        for i in range(args.fill_mib * 2 + 8):
            body = json.dumps({**base, "annotations": {"n": f"{i}{pad}"}}).encode()
            r = requests.put(
                f"{stack.url}/v2/{SMALL_REPO}/manifests/fill{i}", data=body, headers=h, timeout=30
            )
            r.raise_for_status()
            d = r.headers["Docker-Content-Digest"]
            requests.get(f"{stack.url}/v2/{SMALL_REPO}/manifests/{d}", headers=h, timeout=30)
        time.sleep(1.5)
        full = cache_metrics(admin)
        full_rss = rss_mb(gateway_pid)

    def median(kind: str, key: str, side: str) -> float:
        return statistics.median(r[side][key] for r in runs[kind])

    summary = {}
    for kind in kinds:
        summary[kind] = {
            "gateway_rate": median(kind, "rate", "gateway"),
            "direct_rate": median(kind, "rate", "direct"),
            "paired_ratio": statistics.median(
                r["gateway"]["rate"] / r["direct"]["rate"] for r in runs[kind]
            ),
            "gateway_cpu_us_per_request": median(kind, "gateway_cpu_us", "gateway"),
            "backend_cpu_us_per_request_via_gateway": median(kind, "backend_cpu_us", "gateway"),
            "backend_cpu_us_per_request_direct": median(kind, "backend_cpu_us", "direct"),
            "errors": sum(r[s]["errors"] for r in runs[kind] for s in r),
        }
    return {
        "summary": summary,
        "runs": runs,
        "cache_after_load": after_load,
        "skopeo_10_layers": copies,
        "cache_full": full,
        "gateway_rss_cache_full_MB": full_rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layer-kib", type=int, default=1024)
    parser.add_argument("--fill-mib", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started, load_before = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tbf-cache-") as tmp:
        report = measure(args, Path(tmp))
    report["runtime_s"] = time.monotonic() - started
    report["loadavg_before_after"] = (load_before, os.getloadavg())
    print(f"{'request':<24}{'gateway/s':>10}{'direct/s':>10}{'ratio':>7}{'gw µs':>8}{'be µs':>8}")
    for kind, s in report["summary"].items():
        print(
            f"{kind:<24}{s['gateway_rate']:>10.0f}{s['direct_rate']:>10.0f}"
            f"{s['paired_ratio']:>7.2f}{s['gateway_cpu_us_per_request']:>8.0f}"
            f"{s['backend_cpu_us_per_request_via_gateway']:>8.0f}"
        )
    print("skopeo copy, 10 layers (s):")
    for side, t in report["skopeo_10_layers"].items():
        print(f"  {side:<8}" + "  ".join(f"{k}={v:.2f}" for k, v in t.items()))
    print(f"cache full: {report['cache_full']}")
    print(f"gateway RSS with the cache full: {report['gateway_rss_cache_full_MB']:.0f} MB")
    print(f"runtime {report['runtime_s']:.0f} s, load {report['loadavg_before_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
