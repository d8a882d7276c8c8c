"""Registry tokens: HS256 JWTs signed with a secret that lives only in memory.

`run` makes the secret once per run and hands it to every gateway worker through an
inherited, sealed memfd (never a file, never the environment): a token minted by any worker
verifies on all of them, and a restart of the run makes a new one, so every issued token dies
with it and clients come back through the 401 challenge. Verification is local: no call to
auth on the hot path.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Sequence

import jwt

ISSUER = "tabbify-registry"
AUDIENCE = "tabbify-registry"
LIFETIME = 300  # seconds; CONTRACTS §3
_ALGORITHMS = ["HS256"]  # pinned: `none`, RS/ES confusion and friends are refused by PyJWT
_REQUIRED = ["exp", "iat", "iss", "aud", "sub"]


class InvalidToken(Exception):
    """Any reason a bearer value is not a live registry token; never shown in detail."""


class TokenSigner:
    CACHE = 10_000

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._also_verify: tuple[bytes, ...] = ()  # REGISTRY_TOKEN_KEY_FILE: rotation
        # token → (tenant, exp): a client sends the same token for minutes; verifying it once
        # is enough until it expires. Only tokens that passed full verification get here.
        self._verified: dict[str, tuple[str, int]] = {}

    def use_keys(self, keys: Sequence[bytes]) -> None:
        """Shared keys (REGISTRY_TOKEN_KEY_FILE, addons/token_keys.py): the first signs, every
        one verifies. Forgets what was verified, so a key taken out stops at once."""
        if not keys:
            raise ValueError("no token key")
        self._secret, self._also_verify = keys[0], tuple(keys[1:])
        self._verified = {}

    def mint(self, tenant: str, now: float | None = None) -> tuple[str, int]:
        """A token for `tenant` and its issue time (epoch seconds)."""
        issued = int(now if now is not None else time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": tenant,
            "iat": issued,
            "nbf": issued,
            "exp": issued + LIFETIME,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._secret, algorithm="HS256"), issued

    def verify(self, token: str) -> str:
        """The tenant inside a valid, unexpired token of ours; InvalidToken otherwise."""
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
        tenant = claims.get("sub")
        if not isinstance(tenant, str) or not tenant:
            raise InvalidToken("no tenant")
        if len(self._verified) >= self.CACHE:
            self._verified.clear()
        self._verified[token] = (tenant, int(claims["exp"]))
        return tenant
