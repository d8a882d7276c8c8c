"""`/auth/token`: swap a Tabbify JWT (checked by Tabbify auth) for a registry token.

GET with `Authorization: Basic <any>:<jwt>` or `Bearer <jwt>` (Docker, containers/image,
oras), POST with an OAuth2 password form (containerd, BuildKit). Never a refresh_token:
Docker would switch to a refresh grant we do not offer.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import functools
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from addons.clients.authservice import AuthClient, Verdict
from addons.decisions.policy import CATALOG_SCOPE, ScopeError, granted_scopes, parse_scope
from addons.decisions.target import Target
from addons.decisions.tokens import LIFETIME, MAX_SCOPES, TokenSigner
from addons.engine import oci
from addons.gateway.gate import answered, fail_closed, has_large_body, respond
from addons.gateway.policy_store import PolicyFile
from addons.gateway.record import record

SERVICE = "tabbify-registry"
# A JWT is three base64url parts; anything else is not worth asking auth about.
_CREDENTIAL = re.compile(r"[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_=-]*){0,4}")
_MAX_CREDENTIAL = 16 * 1024


def credential_from_header(value: str) -> str | None:
    """The Tabbify JWT in `Basic base64(user:jwt)` or `Bearer jwt`, else None."""
    scheme, _, param = value.strip().partition(" ")
    param = param.strip()
    if scheme.lower() == "bearer":
        return param or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(param, validate=True).decode()
        except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII input
            return None
        _, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


def parse_form(body: bytes) -> dict[str, str] | None:
    """An OAuth2 form body (`application/x-www-form-urlencoded`): each field at most once,
    UTF-8, at most 32 fields. None if it is anything else."""
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=bool(body),
            max_num_fields=32,
        )
    except (UnicodeDecodeError, ValueError):
        return None
    form = dict(pairs)
    return form if len(form) == len(pairs) else None


def plausible(credential: str) -> bool:
    return len(credential) <= _MAX_CREDENTIAL and _CREDENTIAL.fullmatch(credential) is not None


def token_payload(token: str, issued: int, scopes: list[str] | None) -> dict[str, object]:
    payload: dict[str, object] = {
        "token": token,
        "access_token": token,
        "expires_in": LIFETIME,
        "issued_at": datetime.datetime.fromtimestamp(issued, datetime.UTC)
        .isoformat()
        .replace("+00:00", "Z"),
    }
    if scopes is not None:
        payload["scope"] = " ".join(scopes)
    return payload


@dataclass(frozen=True)
class Answer:
    response: http.Response
    decision: str  # allow | deny:<reason>
    tenant: str | None = None
    auth_seconds: float | None = None  # how long Tabbify auth took, when it was asked
    subject: str | None = None  # the Tabbify JWT's `sub`, for the access log


def scope_refusal(scopes: list[str]) -> str | None:
    """Why the requested scopes are refused before auth is asked, or None."""
    if len(scopes) > MAX_SCOPES:
        return f"at most {MAX_SCOPES} scopes per token"
    for scope in scopes:
        if scope != CATALOG_SCOPE:
            try:
                parse_scope(scope)
            except ScopeError as e:
                return str(e)
    return None


def registry_host(realm: str) -> str:
    """The host clients log in to, as named by the token realm (`docker login <host>`)."""
    return urlsplit(realm).netloc or "this registry"


def login_hint(realm: str) -> str:
    """What a client without a usable credential prints (clients show `message`, not
    `detail`): where to log in, and with what."""
    host = registry_host(realm)
    return (
        f"authentication required: log in to {host} with a Tabbify JWT as the password "
        f"(docker login {host})"
    )


class TokenEndpoint:
    def __init__(self, signer: TokenSigner, policies: PolicyFile) -> None:
        self.signer = signer
        self.policies = policies
        self.client: AuthClient | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_auth_url", str, "", "Tabbify auth base URL; empty = no token service."
        )
        loader.add_option(
            "registry_auth_timeout", float, 5.0, "Seconds to wait for Tabbify auth, at most."
        )

    def configure(self, updated: set[str]) -> None:
        if "registry_auth_url" in updated or "registry_auth_timeout" in updated:
            url = ctx.options.registry_auth_url
            if url and not re.match(r"https?://[^/]", url):
                raise exceptions.OptionsError(f"registry_auth_url={url!r} is not an http(s) URL")
            if not 0 < ctx.options.registry_auth_timeout <= 60:
                raise exceptions.OptionsError("registry_auth_timeout must be in (0, 60]")
            self.client = AuthClient(url, ctx.options.registry_auth_timeout) if url else None

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.kind != "token" or answered(flow):
            return
        method = flow.request.method
        if method not in ("GET", "POST"):
            rec.decision = "deny:method"
            respond(flow, oci.error_response(405, "UNSUPPORTED", "use GET or POST", method=method))
        elif has_large_body(flow.request):
            rec.decision = "deny:too-large"
            respond(
                flow,
                oci.error_response(413, "UNSUPPORTED", "token request too large", method=method),
            )
        elif flow.request.headers.get("content-encoding", "identity").lower() != "identity":
            # Never decompress for an unauthenticated caller: 405 bytes of brotli are 256 MiB.
            rec.decision = "deny:content-encoding"
            respond(
                flow,
                oci.error_response(
                    415, "UNSUPPORTED", "token requests are not compressed", method=method
                ),
            )

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.kind != "token" or flow.response is not None or answered(flow):
            return
        assert rec.target is not None
        outcome = await self.answer(flow.request, rec.target)
        flow.response, rec.tenant, rec.decision = outcome.response, outcome.tenant, outcome.decision
        rec.subject = outcome.subject
        rec.auth_seconds = outcome.auth_seconds

    async def answer(self, request: http.Request, target: Target) -> Answer:
        method = request.method

        def fail(status: int, code: str, message: str, why: str) -> Answer:
            return Answer(oci.error_response(status, code, message, method=method), f"deny:{why}")

        if self.client is None:
            return fail(404, "NOT_FOUND", "no token service in anonymous mode", "anonymous")

        if method == "POST":
            form = parse_form(request.raw_content or b"")
            if form is None:
                return fail(400, "UNSUPPORTED", "malformed token request form", "form")
            if form.get("grant_type") != "password":
                return fail(400, "UNSUPPORTED", "only grant_type=password is supported", "grant")
            credential, service = form.get("password"), form.get("service")
            scopes = form.get("scope", "").split()
        else:
            headers = request.headers.get_all("authorization")
            credential = credential_from_header(headers[0]) if len(headers) == 1 else None
            services = target.get_all("service")
            if len(services) > 1:
                return fail(400, "UNSUPPORTED", "more than one service", "service")
            service = services[0] if services else None
            scopes = [s for value in target.get_all("scope") for s in value.split()]

        if service is not None and service != SERVICE:
            return fail(400, "UNSUPPORTED", f"unknown service; this is {SERVICE}", "service")
        if credential is None or not plausible(credential):
            return fail(401, "UNAUTHORIZED", login_hint(self.realm()), "no-credential")
        if (refusal := scope_refusal(scopes)) is not None:
            return fail(400, "UNSUPPORTED", refusal, "scope")

        verdict = await self.validate(credential)
        timed = functools.partial(dataclasses.replace, auth_seconds=verdict.seconds)
        if verdict.outcome == "rejected":
            return timed(
                fail(
                    401,
                    "UNAUTHORIZED",
                    "Tabbify auth rejected the credential: log in again with a current "
                    f"Tabbify JWT as the password (docker login {registry_host(self.realm())})",
                    "rejected",
                )
            )
        if verdict.outcome == "unavailable":
            return timed(
                fail(503, "UNAVAILABLE", "Tabbify auth is unavailable; retry", "auth-down")
            )
        if verdict.outcome != "granted" or verdict.tenant is None:
            return timed(fail(403, "DENIED", verdict.reason or "no tenant", "tenant"))

        # Least privilege: a token asked for scopes carries only those the policy grants
        # (Distribution's token servers do the same). One asked for none (`docker login`)
        # carries the caller's rights under the policy, checked again on every request.
        granted = granted_scopes(self.policies.current(), verdict.tenant, verdict.subject, scopes)
        token, issued = self.signer.mint(
            verdict.tenant, subject=verdict.subject, scopes=granted if scopes else None
        )
        payload = token_payload(token, issued, granted if method == "POST" else None)
        return Answer(
            oci.json_response(200, payload),
            "allow",
            verdict.tenant,
            verdict.seconds,
            verdict.subject,
        )

    @staticmethod
    def realm() -> str:
        """The configured token realm (RegistryAccess's option), if loaded."""
        return str(getattr(ctx.options, "registry_realm", "") or "")

    async def validate(self, credential: str) -> Verdict:
        """Ask auth; the overall wait is bounded whatever auth does."""
        assert self.client is not None
        try:
            return await asyncio.wait_for(self.client.validate(credential), self.client.timeout + 1)
        except TimeoutError:
            return Verdict("unavailable", reason="auth timed out")

    async def done(self) -> None:
        if self.client is not None:
            await self.client.close()
