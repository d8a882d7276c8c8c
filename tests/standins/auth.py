"""Stand-in for Tabbify auth speaking CONTRACTS §4 (`POST /v1/validate`).

Tokens are real HS256 JWTs signed with the stand-in's own key; the gateway never sees that
key, it only asks. `mode` switches behaviour at run time for fault tests.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt

_KEY = "tabbify-auth-standin-signing-key-0123456789"


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # Every validation is a new connection (HTTP/1.0): the standard library's backlog of 5
    # drops SYNs when dozens of logins arrive at once, and a retransmitted SYN waits 1-3 s,
    # which a loaded machine turns into the gateway's 5 s auth deadline. A real service's
    # backlog is in the hundreds.
    request_queue_size = 256


def tabbify_jwt(claims: dict[str, Any]) -> str:
    return jwt.encode({"iat": int(time.time()), **claims}, _KEY, algorithm="HS256")


class AuthStandin:
    """mode: ok | garbage | error | slow | redirect. `calls` counts validate requests."""

    def __init__(self, slow_seconds: float = 10.0, host: str = "127.0.0.1") -> None:
        self.mode = "ok"
        self.slow_seconds = slow_seconds
        self.calls = 0
        self.bad_requests = 0
        standin = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as a real service would: every answer carries a Content-Length;
            # and no Nagle delay between the head and the body of an answer.
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                standin.calls += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
                try:
                    sent = json.loads(body).get("token")
                except ValueError:
                    sent = None
                if self.path != "/v1/validate" or sent != bearer:
                    standin.bad_requests += 1
                    return self.answer(400, {"error": "bad request"})
                if standin.mode == "slow":
                    time.sleep(standin.slow_seconds)
                if standin.mode == "error":
                    return self.answer(500, {"error": "boom"})
                if standin.mode == "garbage":
                    return self.answer(200, None, raw=b"<html>not json</html>")
                if standin.mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://127.0.0.1:1/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                try:
                    claims = jwt.decode(bearer, _KEY, algorithms=["HS256"])
                except jwt.PyJWTError:
                    return self.answer(401, {"error": "invalid token"})
                # Alternate the two shapes the contract allows.
                payload = {"claims": claims} if "wrap" in claims else claims
                return self.answer(200, payload)

            def answer(self, status: int, payload: Any, raw: bytes | None = None) -> None:
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # The gateway may have given up waiting (slow mode): expected.
                with contextlib.suppress(BrokenPipeError):
                    self.wfile.write(data)

        self.server = Server((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> AuthStandin:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
