"""`tabbify-registry dev-auth`: a development stand-in for the Tabbify auth service.

It speaks what the gateway asks of auth (`POST /v1/validate`, `Authorization: Bearer <jwt>`,
body `{"token": "<jwt>"}`; 2xx with the claims, 401 for a token it did not sign) so that a
user can try tenants on one machine: it prints one `<tenant> <jwt>` line per tenant, then
serves until SIGTERM/SIGINT. The JWTs are HS256, signed with a key made per run and never
written anywhere: a new run prints new tokens and refuses the old ones. Loopback only: it
grants every token it made to whoever holds it, which is no service to offer a network.

The test suite's auth stand-in (tests/standins/auth.py) is this server with fault modes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt

from addons.config.settings import Address, ConfigError, parse_address
from addons.decisions.routes import is_component

DEFAULT_LISTEN = "127.0.0.1:5003"
DEFAULT_TENANTS = ("acme", "globex")

Answer = tuple[int, Any]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # Every validation may be a new connection: the standard library's backlog of 5 drops
    # SYNs when dozens of logins arrive at once, and a retransmitted SYN waits 1-3 s (the
    # gateway's auth deadline is 5 s). A real service's backlog is in the hundreds.
    request_queue_size = 256


class Server6(Server):
    address_family = socket.AF_INET6


class Validator:
    """Issues HS256 JWTs and validates them as the auth service would."""

    def __init__(self, key: str | None = None) -> None:
        self.key = key or secrets.token_urlsafe(32)

    def issue(self, claims: dict[str, Any]) -> str:
        return jwt.encode({"iat": int(time.time()), **claims}, self.key, algorithm="HS256")

    def validate(self, bearer: str) -> Answer:
        try:
            claims = jwt.decode(bearer, self.key, algorithms=["HS256"])
        except jwt.PyJWTError:
            return 401, {"error": "invalid token"}
        return 200, claims


def request_token(path: str, authorization: str, body: bytes) -> str | None:
    """The JWT of a well-formed validate request (the same in the header and the body)."""
    bearer = authorization.removeprefix("Bearer ")
    try:
        sent = json.loads(body).get("token")
    except (ValueError, AttributeError):
        sent = None
    if path != "/v1/validate" or not bearer or sent != bearer:
        return None
    return bearer


def make_handler(answer: Callable[[str, str, bytes], Answer | None]) -> type:
    """A request handler for POSTs; `answer(path, authorization, body)` returns (status,
    JSON payload), or None when it already wrote the response itself."""

    class Handler(BaseHTTPRequestHandler):
        # Keep-alive, as a real service would: every answer carries a Content-Length; and
        # no Nagle delay between the head and the body of an answer.
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or "0")
            body = self.rfile.read(min(length, 1 << 20))
            result = answer(self.path, self.headers.get("Authorization", ""), body)
            if result is not None:
                self.send(*result)

        def send(self, status: int, payload: Any, raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            # The gateway may have given up waiting: expected.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(data)

    return Handler


def serve(address: Address, validator: Validator) -> Server:
    def answer(path: str, authorization: str, body: bytes) -> Answer:
        token = request_token(path, authorization, body)
        if token is None:
            return 400, {"error": "bad request"}
        return validator.validate(token)

    server_class = Server6 if ":" in address.host else Server
    return server_class((address.host, address.port), make_handler(answer))


def parse_listen(value: str) -> Address:
    address = parse_address("--listen", value)
    if not address.is_loopback:
        raise ConfigError(
            f"--listen {address.hostport}: dev-auth grants the tokens it prints to anyone who "
            "holds them, so it listens on loopback only"
        )
    return address


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dev = sub.add_parser(
        "dev-auth",
        help="a development stand-in for Tabbify auth: prints '<tenant> <jwt>' lines, serves",
    )
    dev.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"loopback (default {DEFAULT_LISTEN})"
    )
    dev.add_argument(
        "--tenant",
        action="append",
        dest="tenants",
        metavar="NAME",
        help=f"a tenant to print a JWT for, repeatable (default: {', '.join(DEFAULT_TENANTS)})",
    )


def main(args: argparse.Namespace) -> int:
    address = parse_listen(args.listen)
    tenants = list(dict.fromkeys(args.tenants or DEFAULT_TENANTS))
    for tenant in tenants:
        if not is_component(tenant) or tenant == "mirror":
            raise ConfigError(
                f"--tenant {tenant!r} is not a valid tenant (a repository path component)"
            )
    validator = Validator()
    try:
        server = serve(address, validator)
    except OSError as e:
        raise ConfigError(f"--listen {address.hostport}: {e.strerror}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    threading.Thread(target=server.serve_forever, name="dev-auth", daemon=True).start()
    for tenant in tenants:
        print(tenant, validator.issue({"sub": f"dev@{tenant}", "network": tenant}))
    sys.stdout.flush()
    print(
        f"dev-auth: serving on http://{address.hostport} until stopped; run the registry with "
        f"REGISTRY_AUTH_URL=http://{address.hostport}",
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0
