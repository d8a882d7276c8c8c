"""An upstream registry for the mirror tests, as Docker Hub is one: a plain Distribution on
loopback holding the images, and in front of it a tiny HTTP stand-in for Docker Hub's token
auth (a Bearer challenge; the token endpoint takes the robot's `user:token` as Basic, the
only way Distribution's proxy sends credentials), which can also serve wrong bytes for chosen
digests (a tampering upstream). All of it is the upstream, not Tabbify."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.support.stack import free_port, wait_for

USER, TOKEN = "robot", "upstream-secret-" + os.urandom(6).hex()


class Upstream:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Upstream:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "version": "0.1",
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}},
            "http": {"addr": f"127.0.0.1:{self.port}"},
        }
        (self.root / "config.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(self.root / "config.json")],
            env={"PATH": os.environ["PATH"]},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: http_status(self.port, "/v2/") == 200)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


def http_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


class _Quiet(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up mid-answer (a cut connection) is expected here


class HubFront:
    """Docker Hub's front: `/v2/…` needs `Bearer <token of the day>`, got from `/token` with
    the robot's Basic credential; everything else is forwarded to `upstream_port`, but the
    body of any blob whose digest is in `self.bad` has one byte flipped (length and
    Docker-Content-Digest kept). `self.requests` counts the forwarded requests."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bad: set[str] = set()
        self.requests: list[str] = []
        self.hang = False  # True: every /v2/ request waits a minute before any answer
        self.bearer = "hub-" + os.urandom(8).hex()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _answer(self, status: int, body: bytes, **headers: str) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self) -> None:
                basic = "Basic " + base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
                if self.path.startswith("/token"):
                    if self.headers.get("authorization") != basic:
                        return self._answer(401, b"{}")
                    return self._answer(200, json.dumps({"token": outer.bearer}).encode())
                if self.headers.get("authorization") != f"Bearer {outer.bearer}":
                    challenge = f'Bearer realm="{outer.url}/token",service="hub"'
                    return self._answer(401, b"{}", WWW_Authenticate=challenge)
                outer.requests.append(f"{self.command} {self.path}")
                if outer.hang:
                    time.sleep(60)
                conn = http.client.HTTPConnection("127.0.0.1", outer.upstream_port, timeout=30)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                # Every header as sent (several Accept fields: a dict would keep one).
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", f"127.0.0.1:{outer.upstream_port}")
                for k, v in self.headers.items():
                    if k.lower() not in ("host", "authorization", "content-length"):
                        conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                r = conn.getresponse()
                data = r.read()
                if self.command == "GET" and any(self.path.endswith(d) for d in outer.bad):
                    data = bytes([data[0] ^ 0xFF]) + data[1:] if data else data
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                size = r.getheader("content-length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(size or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                return None

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = _Quiet(("127.0.0.1", self.port), Handler)

    def start(self) -> HubFront:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
