"""Large blob transfers through the gateway, direct and nginx, in ONE run, with the CPU each
process spent on them.

    .venv/bin/python -m tests.bench.transfer [--mib 256] [--rounds 6] [--workers 1] [--json F]

One stack (auth on) and Debian's nginx as a streaming reverse proxy over the same backend
(tests.bench.compare's). One blob is pushed once per path, then pulled `--rounds` times per
path, the order of the paths rotated every round; then pushed again `--rounds` times per path
(new repositories). Reported per path: the median MB/s, and the CPU seconds per GB of the
proxy (gateway workers, or nginx's master and workers), the backend and this client. A rate
moves with whatever else the two cores do; CPU per GB moves much less, and the proxy's is
what a faster engine changes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.bench.cache import pid_of
from tests.bench.compare import Nginx, find_tool, log, registry_token, start_stack
from tests.bench.liveview import cpu_seconds
from tests.bench.throughput import MIB, Body, pull, push
from tests.support.standins.auth import tabbify_jwt

PATHS = ("direct", "gateway", "nginx")
TENANT = "bench"


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(stat[1]) == pid:
                    found.append(int(entry.name))
    return found


Sample = tuple[float, float, float, float, float]


def timed(action: Callable[[], float], proxy: list[int], backend: list[int]) -> Sample:
    """(seconds, proxy CPU, backend CPU, client CPU, proxy user CPU) of one transfer."""
    p0, b0, c0 = cpu_seconds(proxy), cpu_seconds(backend), own_cpu()
    u0 = cpu_seconds(proxy, user_only=True)
    seconds = action()
    return (
        seconds,
        cpu_seconds(proxy) - p0,
        cpu_seconds(backend) - b0,
        own_cpu() - c0,
        cpu_seconds(proxy, user_only=True) - u0,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--workers", type=int, default=1, help="REGISTRY_WORKERS")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    nginx_bin = find_tool("nginx", "nginx-light")
    size = args.mib * MIB
    samples: dict[str, dict[str, list[Sample]]] = {
        op: {p: [] for p in PATHS} for op in ("pull", "push")
    }
    credential = tabbify_jwt({"sub": TENANT})
    with tempfile.TemporaryDirectory(prefix="tbf-transfer-") as tmp, contextlib.ExitStack() as run:
        stack = start_stack(run, Path(tmp), args.workers)
        nginx = Nginx(nginx_bin, Path(tmp) / "nginx", stack.backend_url.removeprefix("http://"))
        run.callback(nginx.stop)
        nginx.start()
        assert nginx.proc is not None
        urls = {"direct": stack.backend_url, "gateway": stack.url, "nginx": nginx.url}
        proxies = {
            "direct": [],
            "gateway": list(stack.gateway_pids().values()),
            "nginx": [nginx.proc.pid, *children(nginx.proc.pid)],
        }
        backend = [pid_of(stack, "backend")]

        def auth(path: str) -> dict[str, str]:
            if path == "gateway":
                return {"Authorization": f"Bearer {registry_token(stack, credential)}"}
            return stack.backend_headers()

        digests = {}
        for path in PATHS:
            body = Body(size, b"transfer")
            digests[path] = body.digest()
            push(urls[path], f"{TENANT}/pull-{path}", body, auth(path))
        for r in range(args.rounds):
            order = PATHS[r % 3 :] + PATHS[: r % 3]
            for path in order:
                headers = auth(path)
                s = timed(
                    functools.partial(
                        pull, urls[path], f"{TENANT}/pull-{path}", digests[path], headers
                    ),
                    proxies[path],
                    backend,
                )
                samples["pull"][path].append(s)
                log(f"pull {path}: {size / s[0] / 1e6:.0f} MB/s, proxy CPU {s[1]:.2f} s")
        for r in range(args.rounds):
            order = PATHS[r % 3 :] + PATHS[: r % 3]
            for path in order:
                headers = auth(path)
                body = Body(size, f"push-{r}".encode())
                s = timed(
                    functools.partial(push, urls[path], f"{TENANT}/push-{path}-{r}", body, headers),
                    proxies[path],
                    backend,
                )
                samples["push"][path].append(s)
                log(f"push {path}: {size / s[0] / 1e6:.0f} MB/s, proxy CPU {s[1]:.2f} s")
        time.sleep(0.1)
        if os.environ.get("TBF_SPLICE_STATS"):
            print([x for x in stack.log.read_text().splitlines() if "splice stats" in x][-1:])

    gb = size / 1e9
    report: dict[str, dict[str, dict[str, float]]] = {}
    for op, by_path in samples.items():
        report[op] = {}
        for path, runs in by_path.items():
            report[op][path] = {
                "MBps": statistics.median(size / s[0] / 1e6 for s in runs),
                "proxy_cpu_s_per_GB": statistics.median(s[1] for s in runs) / gb,
                "proxy_user_s_per_GB": statistics.median(s[4] for s in runs) / gb,
                "backend_cpu_s_per_GB": statistics.median(s[2] for s in runs) / gb,
                "client_cpu_s_per_GB": statistics.median(s[3] for s in runs) / gb,
            }
        # Paired: each round's gateway against the same round's other paths.
        for other in ("direct", "nginx"):
            ratios = [
                by_path["gateway"][i][0] and by_path[other][i][0] / by_path["gateway"][i][0]
                for i in range(args.rounds)
            ]
            report[op][f"gateway_rate_x_{other}"] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
    print(f"\n{args.mib} MiB blob, {args.rounds} rounds, {args.workers} gateway worker(s)")
    print(
        f"{'':6} {'path':8} {'MB/s':>6} {'proxy s/GB':>10} {'(user)':>7} {'backend':>8} "
        f"{'client':>7}"
    )
    for op in ("pull", "push"):
        for path in PATHS:
            v = report[op][path]
            print(
                f"{op:6} {path:8} {v['MBps']:6.0f} {v['proxy_cpu_s_per_GB']:10.2f} "
                f"{v['proxy_user_s_per_GB']:7.2f} "
                f"{v['backend_cpu_s_per_GB']:8.2f} {v['client_cpu_s_per_GB']:7.2f}"
            )
        for other in ("direct", "nginx"):
            r = report[op][f"gateway_rate_x_{other}"]
            print(
                f"{op:6} gateway rate x {other}: {r['median']:.2f} "
                f"({r['min']:.2f} to {r['max']:.2f}, paired)"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
