"""Stand-in for Tabbify auth speaking contract §4 (`POST /v1/validate`): the product's
`dev-auth` server (addons/cli/devauth.py) with a fixed key, so tests can mint tokens
before it starts, and fault modes switched at run time.

Tokens are real HS256 JWTs signed with the stand-in's own key; the gateway never sees that
key, it only asks.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from addons.cli.devauth import Answer, Server, Validator, make_handler, request_token

_VALIDATOR = Validator("tabbify-auth-standin-signing-key-0123456789")


def tabbify_jwt(claims: dict[str, Any]) -> str:
    return _VALIDATOR.issue(claims)


class AuthStandin:
    """mode: ok | garbage | error | slow | redirect. `calls` counts validate requests."""

    def __init__(self, slow_seconds: float = 10.0, host: str = "127.0.0.1") -> None:
        self.mode = "ok"
        self.slow_seconds = slow_seconds
        self.calls = 0
        self.bad_requests = 0
        standin = self

        def answer(path: str, authorization: str, body: bytes) -> Answer | None:
            standin.calls += 1
            token = request_token(path, authorization, body)
            if token is None:
                standin.bad_requests += 1
                return 400, {"error": "bad request"}
            if standin.mode == "slow":
                time.sleep(standin.slow_seconds)
            if standin.mode == "error":
                return 500, {"error": "boom"}
            if standin.mode == "garbage":
                return 200, "<html>not json</html>"
            if standin.mode == "redirect":
                return 302, None
            status, claims = _VALIDATOR.validate(token)
            # Alternate the two shapes the contract allows.
            if status == 200 and "wrap" in claims:
                return status, {"claims": claims}
            return status, claims

        class Handler(make_handler(answer)):  # type: ignore[misc]
            def send(self, status: int, payload: Any, raw: bytes | None = None) -> None:
                if status == 302:
                    self.send_response(302)
                    self.send_header("Location", "http://127.0.0.1:1/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif isinstance(payload, str):  # garbage: not JSON at all
                    super().send(status, None, raw=payload.encode())
                else:
                    super().send(status, payload, raw)

        self.server = Server((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> AuthStandin:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
