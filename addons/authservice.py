"""Tabbify auth (CONTRACTS §4): is this Tabbify JWT good, and whose is it?

Blocking on purpose (requests): the token endpoint runs it off mitmproxy's event loop in a
thread, with a bounded timeout. Every failure mode maps to one outcome; none of them grants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import requests

from addons.routes import is_component

Outcome = Literal["granted", "rejected", "unavailable", "refused"]


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    tenant: str | None = None
    reason: str = ""
    seconds: float = 0.0  # how long auth took, for the metrics


def tenant_from_claims(claims: dict[str, Any]) -> str | None:
    """Tenant = claim `network`, falling back to `sub`; None if absent or not a valid
    repository path component (it becomes the first segment of every repository name)."""
    for key in ("network", "sub"):
        value = claims.get(key)
        if value is not None:
            return value if isinstance(value, str) and is_component(value) else None
    return None


def judge(status: int, payload: Any) -> Verdict:
    """Map auth's answer to a verdict. Pure, so every branch is unit-tested."""
    if 200 <= status < 300:
        if not isinstance(payload, dict):
            return Verdict("unavailable", reason="auth answered 2xx without a JSON object")
        claims = payload.get("claims", payload)
        if not isinstance(claims, dict):
            return Verdict("unavailable", reason="auth answered 2xx with malformed claims")
        tenant = tenant_from_claims(claims)
        if tenant is None:
            return Verdict("refused", reason="credential has no usable tenant")
        return Verdict("granted", tenant=tenant)
    if 400 <= status < 500:
        return Verdict("rejected", reason=f"auth rejected the credential ({status})")
    return Verdict("unavailable", reason=f"auth answered {status}")


class AuthClient:
    def __init__(self, base_url: str, timeout: float) -> None:
        self.url = base_url.rstrip("/") + "/v1/validate"
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy variables between us and auth

    def validate(self, credential: str) -> Verdict:
        started = time.monotonic()
        try:
            r = self.session.post(
                self.url,
                json={"token": credential},
                headers={"Authorization": f"Bearer {credential}"},
                timeout=self.timeout,
                allow_redirects=False,
            )
            try:
                payload: Any = r.json()
            except ValueError:
                payload = None
            verdict = judge(r.status_code, payload)
        except requests.RequestException as e:
            verdict = Verdict("unavailable", reason=f"auth unreachable ({type(e).__name__})")
        return Verdict(verdict.outcome, verdict.tenant, verdict.reason, time.monotonic() - started)
