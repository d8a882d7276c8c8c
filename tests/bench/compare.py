"""Gateway, direct backend and nginx side by side, in ONE run.

    .venv/bin/python -m tests.bench.compare [--blob-mib 1024] [--small-blob-mib 256] [--duration 10]
                                            [--json out.json]

Starts a full stack (`tabbify-registry run`, Distribution backend, auth on with the stand-in)
and Debian's nginx as a plain streaming reverse proxy over the SAME backend, then measures the
three paths to that backend (direct, gateway, nginx):

- blob push and pull throughput, with a large and a small blob;
- authenticated manifest GET with wrk (2 threads, 16 keep-alive connections) and HEAD with
  tests.bench.httpload (wrk 4.1 cannot do HEAD; the same GET with that client calibrates it):
  requests/s, p50 and p99 latency, non-2xx/3xx and socket error counts;
- `/auth/token` exchanges per second through the gateway, next to the auth stand-in's own
  `POST /v1/validate` rate (the other side of every exchange);
- the gateway's peak RSS (VmHWM) over the large-blob transfers, and separately, after a
  restart of the gateway, over the small-blob ones.

Needs `nginx` (nginx-light) and `wrk`: `scripts/setup.sh --test` installs both. Noisy
machine: compare only within one run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

from addons.decisions.tokens import LIFETIME
from tests.bench.httpload import LoadResult, load
from tests.bench.throughput import MIB, Body, peak_rss_mb, pull, push
from tests.support.images import oci_layout
from tests.support.stack import Stack, free_port, wait_for
from tests.support.standins.auth import AuthStandin, tabbify_jwt

PATHS = ("direct", "gateway", "nginx")
TENANT = "bench"
SMALL_REPO = f"{TENANT}/small"
SMALL_TAG = "v1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WRK_THREADS, WRK_CONNECTIONS = 2, 16
# wrk exits on its own after --duration; anything beyond that margin is a hang.
WRK_GRACE_S = 60
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_tool(name: str, package: str) -> str:
    """The binary's path, else exit with a line that says how to get it."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
    found = shutil.which(name, path=path)
    if found is None:
        sys.exit(
            f"tests.bench.compare: `{name}` not found (Debian package {package}); "
            "`scripts/setup.sh --test` installs it"
        )
    return found


# ----------------------------------------------------------------------------- nginx


NGINX_CONF = """\
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    upstream backend {{
        server {backend};
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;

        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 900s;
            proxy_send_timeout 900s;
        }}
    }}
}}
"""


class Nginx:
    """Debian's nginx in the foreground as a streaming reverse proxy to `backend` (host:port),
    with its config, pid, logs and temp paths all inside `tmp`."""

    def __init__(self, binary: str, tmp: Path, backend: str) -> None:
        self.binary, self.tmp = binary, tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = tmp / "nginx.conf"
        self.log = tmp / "nginx.log"
        # As root, workers would switch to `nobody` and lose the (0700) temp dir.
        user = "user root root;" if os.geteuid() == 0 else ""
        tmp.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(NGINX_CONF.format(tmp=tmp, user=user, backend=backend, port=self.port))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "-p",
                    str(self.tmp),
                    "-e",
                    str(self.tmp / "error.log"),
                    "-c",
                    str(self.conf),
                    "-g",
                    "daemon off;",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.errors()}")
            # 401: the backend wants the run's credential, nginx passes the answer on.
            return requests.get(f"{self.url}/v2/", timeout=2).status_code in (200, 401)

        wait_for(ready, timeout=20)
        return self

    def errors(self) -> str:
        logs = (self.log, self.tmp / "error.log")
        return "\n".join(p.read_text(errors="replace") for p in logs if p.exists())

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # fast shutdown; the workers follow the master
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# ----------------------------------------------------------------------------- wrk


_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value)
    if m is None:
        raise ValueError(f"unexpected wrk duration {value!r}")
    return float(m[1]) * _TIME_UNITS_MS[m[2]]


def parse_wrk(output: str) -> LoadResult:
    """The numbers of a `wrk --latency` report."""

    def find(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, output, re.MULTILINE)

    rate = find(r"^Requests/sec:\s+([\d.]+)")
    p50 = find(r"^\s+50%\s+(\S+)")
    p99 = find(r"^\s+99%\s+(\S+)")
    total = find(r"^\s+(\d+) requests in ")
    if rate is None or p50 is None or p99 is None or total is None:
        raise RuntimeError(f"cannot read wrk's report:\n{output}")
    if int(total[1]) == 0:
        raise RuntimeError(f"wrk completed no request:\n{output}")
    non_2xx = find(r"^\s+Non-2xx or 3xx responses:\s+(\d+)")
    sockets = find(r"^\s+Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    return LoadResult(
        requests_per_s=float(rate[1]),
        p50_ms=_ms(p50[1]),
        p99_ms=_ms(p99[1]),
        requests=int(total[1]),
        non_2xx_3xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sockets.groups()) if sockets else 0,
    )


def lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string of ASCII is a valid Lua string literal


def wrk_script(method: str, headers: dict[str, str], body: str | None = None) -> str:
    lines = [f"wrk.method = {lua_string(method)}"]
    lines += [f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()]
    if body is not None:
        lines.append(f"wrk.body = {lua_string(body)}")
    return "\n".join(lines) + "\n"


class Wrk:
    def __init__(self, binary: str, tmp: Path, duration: int) -> None:
        self.binary, self.tmp, self.duration = binary, tmp, duration
        self.runs = 0

    def run(self, url: str, script: str) -> LoadResult:
        self.runs += 1
        lua = self.tmp / f"wrk-{self.runs}.lua"
        lua.write_text(script)
        out = subprocess.run(
            [
                self.binary,
                f"-t{WRK_THREADS}",
                f"-c{WRK_CONNECTIONS}",
                f"-d{self.duration}s",
                "--latency",
                "-s",
                str(lua),
                url,
            ],
            capture_output=True,
            text=True,
            timeout=self.duration + WRK_GRACE_S,
        )
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}{out.stdout}")
        return parse_wrk(out.stdout)


# ----------------------------------------------------------------------------- registry


def registry_token(stack: Stack, credential: str) -> str:
    r = requests.get(
        f"{stack.url}/auth/token",
        params={"service": "tabbify-registry"},
        auth=("x", credential),
        timeout=10,
    )
    r.raise_for_status()
    return str(r.json()["token"])


def put_blob(base: str, repo: str, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """Upload `data` (POST then monolithic PUT); its OCI descriptor without mediaType."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = requests.post(f"{base}/v2/{repo}/blobs/uploads/", headers=headers, timeout=30)
    r.raise_for_status()
    location = r.headers["Location"]
    url = location if location.startswith("http") else base + location
    r = requests.put(
        url,
        params={"digest": digest},
        data=data,
        headers={**headers, "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    if r.status_code != 201:
        raise RuntimeError(f"blob upload: {r.status_code} {r.text}")
    return {"digest": digest, "size": len(data)}


def push_small_image(base: str, headers: dict[str, str]) -> None:
    """A config blob, one layer and an OCI manifest under SMALL_REPO:SMALL_TAG."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    layer = os.urandom(4096)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **put_blob(base, SMALL_REPO, config, headers),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                **put_blob(base, SMALL_REPO, layer, headers),
            }
        ],
    }
    r = requests.put(
        f"{base}/v2/{SMALL_REPO}/manifests/{SMALL_TAG}",
        data=json.dumps(manifest).encode(),
        headers={**headers, "Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    if r.status_code != 201:
        raise RuntimeError(f"manifest push: {r.status_code} {r.text}")


def check_manifest(urls: dict[str, str], headers: Callable[[str], dict[str, str]]) -> None:
    """HEAD and GET of the small manifest answer 200 on every path, or stop here."""
    for path, base in urls.items():
        for method in ("HEAD", "GET"):
            url = f"{base}/v2/{SMALL_REPO}/manifests/{SMALL_TAG}"
            r = requests.request(method, url, headers=headers(path), timeout=10)
            if r.status_code != 200:
                raise RuntimeError(f"{method} manifest via {path}: {r.status_code} {r.text}")


def blob_round_trip(base: str, repo: str, size: int, headers: dict[str, str]) -> dict[str, float]:
    body = Body(size, repo.encode())
    push_s = push(base, repo, body, headers)
    pull_s = pull(base, repo, body.digest(), headers)
    return {"push_MBps": size / push_s / 1e6, "pull_MBps": size / pull_s / 1e6}


def skopeo_copies(
    hosts: dict[str, str], creds: dict[str, str], layout: Path, tmp: Path, repo: str
) -> dict[str, dict[str, float]]:
    """`skopeo copy` of the OCI layout's image: push cold (a new repository) and warm (every
    blob already there), then pull cold and warm (into new directories), on every path;
    seconds per copy."""

    def copy(*args: str) -> float:
        started = time.monotonic()
        out = subprocess.run(
            ["skopeo", "--insecure-policy", "copy", *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(f"skopeo copy {args[-2:]}: {out.stderr}")
        return time.monotonic() - started

    times: dict[str, dict[str, float]] = {}
    for path, host in hosts.items():
        ref = f"docker://{host}/{repo}-{path}:v1"
        t: dict[str, float] = {}
        for phase in ("cold", "warm"):
            log(f"skopeo push ({phase}) via {path}")
            t[f"push_{phase}_s"] = copy(
                "--dest-tls-verify=false", "--dest-creds", creds[path], f"oci:{layout}:v1", ref
            )
        for phase in ("cold", "warm"):
            log(f"skopeo pull ({phase}) via {path}")
            out = tmp / f"pull-{path}-{phase}"
            t[f"pull_{phase}_s"] = copy(
                "--src-tls-verify=false", "--src-creds", creds[path], ref, f"oci:{out}:v1"
            )
        times[path] = t
    return times


def cache_metrics(admin: str) -> dict[str, float]:
    """The workers' content-cache lines of /metrics (tabbify_cache_*), and their RSS."""
    out = {}
    for line in requests.get(f"{admin}/metrics", timeout=10).text.splitlines():
        if line.startswith(("tabbify_cache", "tabbify_gateway_worker_rss")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# ----------------------------------------------------------------------------- report

# metric -> path -> value; a path a metric does not apply to is absent.
Results = dict[str, dict[str, float]]


@dataclass
class Row:
    key: str
    label: str
    fmt: str
    ratios: bool = True


def load_rows(prefix: str, label: str) -> list[Row]:
    return [
        Row(f"{prefix}_rps", f"{label} (req/s)", "{:.0f}"),
        Row(f"{prefix}_p50_ms", f"{label} p50 (ms)", "{:.2f}"),
        Row(f"{prefix}_p99_ms", f"{label} p99 (ms)", "{:.2f}"),
        Row(f"{prefix}_non_2xx", f"{label} non-2xx/3xx", "{:.0f}", ratios=False),
        Row(f"{prefix}_socket_errors", f"{label} socket errors", "{:.0f}", ratios=False),
    ]


def rows(blob_mib: int, small_mib: int) -> list[Row]:
    out: list[Row] = []
    for mib in (blob_mib, small_mib):
        out += [
            Row(f"blob_{mib}MiB_push_MBps", f"blob push {mib} MiB (MB/s)", "{:.0f}"),
            Row(f"blob_{mib}MiB_pull_MBps", f"blob pull {mib} MiB (MB/s)", "{:.0f}"),
        ]
    out += load_rows("manifest_get", "manifest GET, wrk")
    out += load_rows("manifest_head", "manifest HEAD, py client [a]")
    out += load_rows("manifest_get_py", "manifest GET, py client [a]")
    out += load_rows("manifest_digest", "manifest GET by digest, wrk [d]")
    out += load_rows("token", "token exchange [b]")
    out += [
        Row(f"skopeo10_{op}_s", f"skopeo copy, 10 layers, {op.replace('_', ' ')} (s) [e]", "{:.2f}")
        for op in ("push_cold", "push_warm", "pull_cold", "pull_warm")
    ]
    out += [
        Row("cache_hit_ratio", "gateway cache hit ratio [d]", "{:.3f}", ratios=False),
        Row("cache_MB", "gateway cache held (MB) [d]", "{:.3f}", ratios=False),
    ]
    out += [
        Row(f"gateway_peak_rss_{mib}MiB_MB", f"gateway peak RSS, {mib} MiB (MB){note}", "{:.0f}")
        for mib, note in ((blob_mib, ""), (small_mib, " [c]"))
    ]
    out.append(
        Row("gateway_rss_idle_MB", "gateway peak RSS, idle after restart (MB) [c]", "{:.0f}")
    )
    return out


def table(results: Results, layout: list[Row]) -> str:
    def cell(row: Row, value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else row.fmt.format(value)

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"

    header = ["metric", *PATHS, "gateway/direct", "gateway/nginx"]
    body = []
    for row in layout:
        values = results.get(row.key, {})
        gw = values.get("gateway")
        body.append(
            [
                row.label,
                *(cell(row, values.get(p)) for p in PATHS),
                ratio(gw, values.get("direct")) if row.ratios else "-",
                ratio(gw, values.get("nginx")) if row.ratios else "-",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


NOTES = """\
All request rates: {c} concurrent keep-alive connections for {d} s each; wrk with -t{t}.
[a] wrk 4.1 cannot do HEAD (it waits for a body), so HEAD uses tests/bench/httpload.py (Python
    asyncio, one thread); the same GET with that client sets its numbers against wrk's.
[b] direct = the auth stand-in's own POST /v1/validate (the other side of every exchange;
    HTTP/1.0, a new connection per request); gateway = GET /auth/token, Basic x:<tabbify jwt>.
[c] after `supervisorctl restart gateway:*`: a fresh process for the second peak.
[d] the gateway answers a manifest by digest from its content cache (gateway/contentcache.py);
    hit ratio and bytes held from /metrics at the end of the run.
[e] 10 random layers of --layer-kib each; cold = a new repository / an empty directory, warm
    = the same copy again. Times: a ratio above 1 means the gateway is slower.
Latency ratios above 1 mean the gateway is slower."""


# ----------------------------------------------------------------------------- the run


def record(results: Results, key: str, path: str, value: float) -> None:
    results.setdefault(key, {})[path] = value


def record_load(results: Results, prefix: str, path: str, r: LoadResult) -> None:
    record(results, f"{prefix}_rps", path, r.requests_per_s)
    record(results, f"{prefix}_p50_ms", path, r.p50_ms)
    record(results, f"{prefix}_p99_ms", path, r.p99_ms)
    record(results, f"{prefix}_non_2xx", path, r.non_2xx_3xx)
    record(results, f"{prefix}_socket_errors", path, r.socket_errors)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def start_stack(running: contextlib.ExitStack, tmp: Path, workers: int | None) -> Stack:
    """The auth stand-in and a registry stack (`workers` gateway processes; None = the
    default), both stopped when `running` closes."""
    auth = AuthStandin().start()
    running.callback(auth.stop)
    env = {"REGISTRY_WORKERS": str(workers)} if workers else {}
    stack = Stack(tmp / "data", auth.url, **env)
    running.callback(lambda: stack.proc is not None and stack.stop())
    log(f"starting the stack (gateway {stack.url}, backend {stack.backend_url})")
    return stack.start()


def measure(args: argparse.Namespace, tmp: Path, nginx_bin: str, wrk_bin: str) -> dict[str, Any]:
    results: Results = {}
    raw: dict[str, dict[str, Any]] = {}
    credential = tabbify_jwt({"sub": TENANT})
    with contextlib.ExitStack() as running:
        stack = start_stack(running, tmp, args.workers)

        nginx = Nginx(nginx_bin, tmp / "nginx", stack.backend_url.removeprefix("http://"))
        running.callback(nginx.stop)
        log(f"starting nginx on {nginx.url}")
        nginx.start()

        urls = {"direct": stack.backend_url, "gateway": stack.url, "nginx": nginx.url}
        wrk = Wrk(wrk_bin, tmp, args.duration)

        def bearer() -> dict[str, str]:
            """A fresh registry token (they live LIFETIME s), for the gateway."""
            return {"Authorization": f"Bearer {registry_token(stack, credential)}"}

        def auth_for(path: str) -> dict[str, str]:
            """The gateway takes a registry token; the backend (direct, and through nginx,
            which passes the header on) only the run's credential."""
            return bearer() if path == "gateway" else stack.backend_headers()

        # Blobs, and the gateway's peak RSS over them: the large blob first (it has served
        # only a few small requests yet), then the small one after a restart of the gateway.
        for mib, fresh in ((args.blob_mib, False), (args.small_blob_mib, True)):
            if fresh:
                log("restarting the gateway for a separate peak")
                out = stack.supervisorctl("restart", "gateway:*")
                if "started" not in out:
                    raise RuntimeError(f"restart gateway: {out}")
                stack.wait_ready()
                record(results, "gateway_rss_idle_MB", "gateway", peak_rss_mb(stack))
            for path in PATHS:
                log(f"blob {mib} MiB push + pull via {path}")
                speeds = blob_round_trip(
                    urls[path],
                    f"{TENANT}/{path}-{mib}",
                    mib * MIB,
                    auth_for(path),
                )
                for k, v in speeds.items():
                    record(results, f"blob_{mib}MiB_{k}", path, v)
                if path == "gateway":
                    record(results, f"gateway_peak_rss_{mib}MiB_MB", path, peak_rss_mb(stack))

        # Manifests: a small image, visible on all three paths, then request rates on each.
        log(f"pushing {SMALL_REPO}:{SMALL_TAG} through the gateway")
        push_small_image(stack.url, bearer())
        accept = {"Accept": OCI_MANIFEST}
        check_manifest(urls, lambda path: {**auth_for(path), **accept})
        manifest = f"/v2/{SMALL_REPO}/manifests/{SMALL_TAG}"
        for path in PATHS:
            log(f"wrk manifest GET via {path} ({args.duration} s)")
            script = wrk_script("GET", {**auth_for(path), **accept})
            r = wrk.run(urls[path] + manifest, script)
            record_load(results, "manifest_get", path, r)
            raw[f"manifest_get_wrk_{path}"] = asdict(r)
        # wrk cannot do HEAD (see tests.bench.httpload); the Python client does it, and the same GET
        # once more so that its numbers can be set against wrk's.
        for method in ("HEAD", "GET"):
            for path in PATHS:
                log(f"python client manifest {method} via {path} ({args.duration} s)")
                r = load(
                    urls[path] + manifest,
                    method,
                    {**auth_for(path), **accept},
                    WRK_CONNECTIONS,
                    args.duration,
                )
                key = "manifest_head" if method == "HEAD" else "manifest_get_py"
                record_load(results, key, path, r)
                raw[f"manifest_{method.lower()}_python_{path}"] = asdict(r)

        # The same manifest by digest: the gateway answers it from memory.
        digest = requests.get(
            stack.url + manifest, headers={**bearer(), **accept}, timeout=10
        ).headers["Docker-Content-Digest"]
        for path in PATHS:
            log(f"wrk manifest GET by digest via {path} ({args.duration} s)")
            script = wrk_script("GET", {**auth_for(path), **accept})
            r = wrk.run(f"{urls[path]}/v2/{SMALL_REPO}/manifests/{digest}", script)
            record_load(results, "manifest_digest", path, r)
            raw[f"manifest_digest_wrk_{path}"] = asdict(r)

        # A whole image: skopeo copies of 10 layers, cold and warm, on every path.
        layout = tmp / "ten-layers"
        oci_layout(layout, "v1", layer_sizes=(args.layer_kib * 1024,) * 10)
        user, password = stack.backend_auth or ("", "")
        hosts = {p: u.removeprefix("http://") for p, u in urls.items()}
        creds = {p: f"{user}:{password}" for p in PATHS} | {"gateway": f"x:{credential}"}
        copies = skopeo_copies(hosts, creds, layout, tmp, f"{TENANT}/ten")
        for path, times in copies.items():
            for key, seconds in times.items():
                record(results, f"skopeo10_{key}", path, seconds)
        time.sleep(1.5)  # the workers publish once a second
        cache = cache_metrics("http://" + stack.env["REGISTRY_ADMIN_ADDR"])
        record(results, "cache_hit_ratio", "gateway", cache.get("tabbify_cache_hit_ratio", 0))
        record(results, "cache_MB", "gateway", cache.get("tabbify_cache_bytes", 0) / 1e6)
        raw["cache_metrics"] = cache

        # Token exchanges through the gateway, and the stand-in's own rate.
        log(f"wrk /auth/token via gateway ({args.duration} s)")
        basic = "Basic " + base64.b64encode(f"x:{credential}".encode()).decode()
        r = wrk.run(
            f"{stack.url}/auth/token?service=tabbify-registry",
            wrk_script("GET", {"Authorization": basic}),
        )
        record_load(results, "token", "gateway", r)
        raw["token_gateway"] = asdict(r)
        log(f"wrk POST /v1/validate on the auth stand-in ({args.duration} s)")
        r = wrk.run(
            f"{stack.env['REGISTRY_AUTH_URL']}/v1/validate",
            wrk_script(
                "POST",
                {"Authorization": f"Bearer {credential}", "Content-Type": "application/json"},
                json.dumps({"token": credential}),
            ),
        )
        record_load(results, "token", "direct", r)
        raw["validate_standin"] = asdict(r)

    return {"results": results, "load_runs": raw}


def command(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return (out.stdout + out.stderr).strip()  # `nginx -v` answers on stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blob-mib", type=int, default=1024)
    parser.add_argument("--small-blob-mib", type=int, default=256)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--layer-kib", type=int, default=1024, help="skopeo image layer size")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--workers", type=int, default=0, help="REGISTRY_WORKERS (default: the product's)"
    )
    args = parser.parse_args()
    if args.blob_mib == args.small_blob_mib:
        parser.error("--blob-mib and --small-blob-mib must differ")
    if not 1 <= args.duration <= LIFETIME - 60:
        parser.error(
            f"--duration must be in [1, {LIFETIME - 60}]: registry tokens live {LIFETIME} s"
        )

    # SIGTERM (and SIGINT) unwind through the `finally`s that stop every process started here.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    nginx_bin = find_tool("nginx", "nginx-light")
    wrk_bin = find_tool("wrk", "wrk")
    started, load_before = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tbf-compare-") as tmp:
        measured = measure(args, Path(tmp), nginx_bin, wrk_bin)
    runtime, load_after = time.monotonic() - started, os.getloadavg()

    print(table(measured["results"], rows(args.blob_mib, args.small_blob_mib)))
    print(NOTES.format(t=WRK_THREADS, c=WRK_CONNECTIONS, d=args.duration))
    print(
        f"runtime: {runtime:.0f} s; load average (1, 5, 15 min) before "
        f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, after "
        f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    )
    if args.json:
        report = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "uname": command("uname", "-a"),
            "nproc": int(command("nproc")),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runtime_s": runtime,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "nginx": command(nginx_bin, "-v"),
            "wrk_options": {"threads": WRK_THREADS, "connections": WRK_CONNECTIONS},
            **measured,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
