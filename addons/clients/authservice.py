"""Tabbify auth (contract §4): is this Tabbify JWT good, and whose is it?

Every failure mode maps to one outcome; none of them grants.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from addons.decisions.routes import is_component

RESERVED_TENANT = "mirror"  # mirrored upstream registries (addons/config/mirrors.py)

Outcome = Literal["granted", "rejected", "unavailable", "refused"]
MAX_ANSWER = 64 * 1024  # a verdict is a few hundred bytes of claims


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    tenant: str | None = None
    reason: str = ""
    seconds: float = 0.0  # how long auth took, for the metrics
    subject: str | None = None  # the JWT's `sub`, for policy rules that name subjects


_SUBJECT = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}")  # as policy `subjects` may name them


def subject_from_claims(claims: dict[str, Any]) -> str | None:
    """The JWT's `sub` when it is something a policy can name (a policy cannot name any
    other value, so nothing is lost by leaving it out)."""
    value = claims.get("sub")
    return value if isinstance(value, str) and _SUBJECT.fullmatch(value) else None


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
        if tenant == RESERVED_TENANT:
            return Verdict("refused", reason=f"tenant name {tenant!r} is reserved for mirrors")
        return Verdict("granted", tenant=tenant, subject=subject_from_claims(claims))
    if 400 <= status < 500:
        return Verdict("rejected", reason=f"auth rejected the credential ({status})")
    return Verdict("unavailable", reason=f"auth answered {status}")


class AuthClient:
    """Asks Tabbify auth on the gateway's event loop (httpx, keep-alive connections): no
    thread per exchange. The answer is read to at most MAX_ANSWER bytes, redirects are not
    followed, and the whole exchange has one deadline (`timeout`)."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.url = base_url.rstrip("/") + "/v1/validate"
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        # Made on first use, inside the loop that will use it; no proxy variables between us
        # and auth (trust_env off).
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout, follow_redirects=False, trust_env=False
            )
        return self._client

    async def validate(self, credential: str) -> Verdict:
        started = time.monotonic()
        try:
            verdict = await asyncio.wait_for(self._ask(credential), self.timeout)
        except TimeoutError:
            verdict = Verdict("unavailable", reason="auth timed out")
        except (httpx.HTTPError, OSError) as e:
            verdict = Verdict("unavailable", reason=f"auth unreachable ({type(e).__name__})")
        return dataclasses.replace(verdict, seconds=time.monotonic() - started)

    async def _ask(self, credential: str) -> Verdict:
        request = self.client().build_request(
            "POST",
            self.url,
            json={"token": credential},
            headers={"Authorization": f"Bearer {credential}"},
        )
        response = await self.client().send(request, stream=True)
        try:
            body = b""
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_ANSWER:
                    return Verdict("unavailable", reason="auth answered too much")
        finally:
            await response.aclose()
        try:
            payload: Any = json.loads(body)
        except (ValueError, RecursionError):
            payload = None
        return judge(response.status_code, payload)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
