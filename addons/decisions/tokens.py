"""Registry tokens: HS256 JWTs signed with a secret that lives only in memory.

`run` makes the secret once per run and hands it to every gateway worker through an
inherited, sealed memfd (never a file, never the environment): a token minted by any worker
verifies on all of them, and a restart of the run makes a new one, so every issued token dies
with it and clients come back through the 401 challenge. Verification is local: no call to
auth on the hot path.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

from addons.decisions.policy import ScopeError, scope_actions

ISSUER = "tabbify-registry"
AUDIENCE = "tabbify-registry"
LIFETIME = 300  # seconds; contract §3
_ALGORITHMS = ["HS256"]  # pinned: `none`, RS/ES confusion and friends are refused by PyJWT
_REQUIRED = ["exp", "iat", "iss", "aud", "sub"]


MAX_SCOPES = 32  # per token: a token stays far below the 8 KiB a bearer value may have


class InvalidToken(Exception):
    """Any reason a bearer value is not a live registry token; never shown in detail."""


@dataclass(frozen=True)
class Identity:
    """Who a verified token speaks for, and what it was issued for."""

    tenant: str
    subject: str | None = None  # the Tabbify JWT's `sub` (policy rules may name it)
    # Repository → actions the token was issued for (the granted scopes), or None: a token
    # asked for without scopes carries every right the policy gives (docker login, then
    # per-repository tokens). Each request is checked against the policy *and* this.
    access: dict[str, frozenset[str]] | None = None

    def token_allows(self, repository: str, action: str) -> bool:
        return self.access is None or action in self.access.get(repository, ())


class TokenSigner:
    CACHE = 10_000

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._also_verify: tuple[bytes, ...] = ()  # REGISTRY_TOKEN_KEY_FILE: rotation
        # token → (identity, exp): a client sends the same token for minutes; verifying it
        # once is enough until it expires. Only tokens that passed full verification get here.
        self._verified: dict[str, tuple[Identity, int]] = {}

    def use_keys(self, keys: Sequence[bytes]) -> None:
        """Shared keys (REGISTRY_TOKEN_KEY_FILE, config/token_keys.py): the first signs, every
        one verifies. Forgets what was verified, so a key taken out stops at once."""
        if not keys:
            raise ValueError("no token key")
        self._secret, self._also_verify = keys[0], tuple(keys[1:])
        self._verified = {}

    def derived_keys(self, label: bytes) -> list[bytes]:
        """Keys for another use of the same secret(s) (the catalog's cursors): the first seals,
        all open, so they follow the token keys' sharing and rotation."""
        return [
            hmac.new(key, label, hashlib.sha256).digest()
            for key in (self._secret, *self._also_verify)
        ]

    def mint(
        self,
        tenant: str,
        now: float | None = None,
        subject: str | None = None,
        scopes: list[str] | None = None,
    ) -> tuple[str, int]:
        """A token for `tenant` (and `subject`), limited to `scopes` when given, and its issue
        time (epoch seconds)."""
        issued = int(now if now is not None else time.time())
        claims: dict[str, object] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": tenant,
            "iat": issued,
            "nbf": issued,
            "exp": issued + LIFETIME,
            "jti": uuid.uuid4().hex,
        }
        if subject is not None:
            claims["subject"] = subject
        if scopes is not None:
            claims["access"] = scopes
        return jwt.encode(claims, self._secret, algorithm="HS256"), issued

    def verify(self, token: str) -> Identity:
        """Who a valid, unexpired token of ours speaks for; InvalidToken otherwise."""
        hit = self._verified.get(token)
        if hit is not None and time.time() < hit[1]:
            return hit[0]
        for n, key in enumerate((self._secret, *self._also_verify)):
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=_ALGORITHMS,
                    audience=AUDIENCE,
                    issuer=ISSUER,
                    options={"require": _REQUIRED},
                )
                break
            except jwt.InvalidSignatureError:
                if n == len(self._also_verify):
                    raise InvalidToken("InvalidSignatureError") from None
            except (jwt.PyJWTError, ValueError, TypeError) as e:
                raise InvalidToken(type(e).__name__) from None
        identity = _identity(claims)
        if len(self._verified) >= self.CACHE:
            self._verified.clear()
        self._verified[token] = (identity, int(claims["exp"]))
        return identity


def _identity(claims: dict[str, object]) -> Identity:
    """Our own claims, still checked: a signed token is only as good as its shape."""
    tenant, subject, scopes = claims.get("sub"), claims.get("subject"), claims.get("access")
    if not isinstance(tenant, str) or not tenant:
        raise InvalidToken("no tenant")
    if subject is not None and not isinstance(subject, str):
        raise InvalidToken("bad subject")
    if scopes is None:
        return Identity(tenant, subject)
    if not isinstance(scopes, list) or len(scopes) > MAX_SCOPES:
        raise InvalidToken("bad access")
    if not all(isinstance(s, str) for s in scopes):
        raise InvalidToken("bad access")
    try:
        return Identity(tenant, subject, scope_actions(scopes))
    except ScopeError:
        raise InvalidToken("bad access") from None
