"""Every registry request (`/v2…`): who is it, may they, and pass it on streamed.

In order: no valid registry token → 401 with the Bearer challenge (realm from configuration,
never from Host); not a registry API route → 403/405; the action on the repository (pull,
push, delete) refused by the current access policy → 403 naming the rule, or not covered by
the scopes the token was issued for → 403 with a challenge for that scope (RFC 6750
insufficient_scope; routes.check with `rights`); the route's query parameters kept, each once
and in its grammar (routes.decide_params; a mount from a repository the caller may not pull
is dropped); client forwarding and auth headers scrubbed, body streamed both ways, backend
addresses removed from the answer. The gate then forwards exactly that, with the run's backend
credential. A backend that refuses that credential (401) is the gateway's fault, answered 502:
its challenge (realm) never reaches a client, who could do nothing about it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from addons.decisions import routes
from addons.decisions.policy import Policy
from addons.decisions.tokens import Identity, InvalidToken, TokenSigner
from addons.engine import oci
from addons.engine.splice import PassThrough
from addons.gateway.gate import answered, fail_closed, respond
from addons.gateway.policy_store import PolicyFile
from addons.gateway.record import record
from addons.gateway.token_endpoint import SERVICE, login_hint

_MAX_TOKEN = 8 * 1024
_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def bearer_token(headers: http.Headers) -> str | None:
    """The token of exactly one `Authorization: Bearer <token>` header, else None."""
    values = headers.get_all("authorization")
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN or not token.isascii():
        return None
    return token


def challenge(
    realm: str,
    route: routes.Route | routes.Decision,
    method: str,
    params: tuple[tuple[str, str], ...] = (),
) -> str:
    """The Bearer challenge, with the scopes the request needs: its repository's, and for a
    mount the source's pull too (as Distribution asks), so that a client that takes the
    challenge's scope for its token (reggie, oras-py) gets one the mount can use."""
    value = f'Bearer realm="{realm}",service="{SERVICE}"'
    if isinstance(route, routes.Route) and route.name:
        scopes = [f"repository:{route.name}:{scope_actions(route, method)}"]
        source = dict(params).get("from", "")
        mount = route.kind == "upload" and method == "POST"
        if mount and routes.is_name(source) and source != route.name:
            scopes.append(f"repository:{source}:pull")
        value += f',scope="{" ".join(scopes)}"'
    return value


def scope_actions(route: routes.Route, method: str) -> str:
    """The actions a client should ask a token for to send this request (what Docker and
    containers/image ask for themselves: a push needs pull too)."""
    action = routes.action(route, method)
    return "pull" if action == "pull" else f"pull,{action}"


def rights(policy: Policy, identity: Identity) -> routes.Rights:
    """The caller's rights: the current policy's decision, then the token's scopes."""

    def decide(name: str, action: str) -> routes.Decision:
        decided = policy.decide(identity.tenant, identity.subject, name, action)
        if not decided.allowed:
            if decided.rule == "no rule":  # the common case: another tenant's repository
                foreign = routes.foreign(identity.tenant, name)
                return dataclasses.replace(
                    foreign,
                    reason=f"{action} on {name} denied: {foreign.reason}, and no rule grants "
                    f"{action} there",
                )
            return routes.Decision(
                False, 403, "DENIED", f"{action} on {name} denied by {decided.rule}"
            )
        if not identity.token_allows(name, action):
            return routes.Decision(
                False, 401, "UNAUTHORIZED", f"token not issued for {action} on {name}"
            )
        return routes.Decision(True, reason=decided.rule)

    return decide


def relative(url: str) -> str:
    """Strip scheme and authority: the backend's address never reaches a client."""
    return _ABSOLUTE.sub("", url) or "/"


def relative_links(value: str) -> str:
    """`<http://backend/v2/...>; rel="next"` → `</v2/...>; rel="next"`."""
    return re.sub(r"<([^>]*)>", lambda m: f"<{relative(m[1])}>", value)


def backend_error_code(body: bytes) -> str:
    """The first OCI error code of a backend error body, else UNKNOWN."""
    try:
        code = json.loads(body)["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return "UNKNOWN"
    return code if isinstance(code, str) and re.fullmatch(r"[A-Z_]{1,40}", code) else "UNKNOWN"


logger = logging.getLogger(__name__)
_REFUSED_LOGGED = [0.0]  # when a refused backend credential was last logged (once a minute)


def credential_refused(method: str) -> http.Response:
    """The answer to a backend 401: the backend refused the gateway's own credential."""
    now = time.monotonic()
    if not _REFUSED_LOGGED[0] or now - _REFUSED_LOGGED[0] > 60:
        _REFUSED_LOGGED[0] = now
        logger.error(
            "the backend refused the gateway's credential (401): is the backend the one this "
            "run started, with its htpasswd file (README, threat model)?"
        )
    return oci.error_response(
        502, "UNAVAILABLE", "the registry backend refused the gateway; retry later", method=method
    )


_SCRUBBED = frozenset(
    {b"authorization", b"forwarded", b"x-real-ip", b"upgrade", b"http2-settings", b"trailer"}
)


def scrub(headers: http.Headers) -> None:
    """Nothing the client says about proxies or credentials reaches the backend, and no
    protocol upgrade: a 101 would turn the connection into a pipe past the gateway. No
    `Trailer` either: the engine reads a trailer section and drops it, so the backend must not
    be told to expect fields it will never get.
    One pass over the fields (mitmproxy's `keys()` is quadratic in the header count)."""
    headers.fields = tuple(
        (name, value)
        for name, value in headers.fields
        if (lower := name.lower()) not in _SCRUBBED and not lower.startswith(b"x-forwarded-")
    )


class RegistryAccess:
    def __init__(self, signer: TokenSigner, policies: PolicyFile) -> None:
        self.signer = signer
        self.policies = policies

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_anonymous",
            bool,
            False,
            "Anonymous dev mode: no token, no namespaces. Off = every /v2 request needs a token.",
        )
        loader.add_option(
            "registry_realm", str, "", "Absolute token realm URL sent in the Bearer challenge."
        )

    def configure(self, updated: set[str]) -> None:
        if not {"registry_realm", "registry_anonymous"} & updated:
            return
        realm = ctx.options.registry_realm
        if not ctx.options.registry_anonymous and not re.match(r"https?://[^/]+/", realm):
            raise exceptions.OptionsError(
                f"registry_realm={realm!r} must be an absolute http(s) URL when tokens are required"
            )

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.kind != "registry" or answered(flow) or rec.target is None:
            return
        request, method, path = flow.request, flow.request.method, rec.target.path

        def deny(status: int, code: str, message: str, why: str = "", **headers: str) -> None:
            rec.decision = f"deny:{why or message}"
            respond(flow, oci.error_response(status, code, message, method=method, headers=headers))

        identity, realm = None, ctx.options.registry_realm
        if not ctx.options.registry_anonymous:
            token = bearer_token(request.headers)
            try:
                identity = self.signer.verify(token) if token else None
            except InvalidToken:
                identity = None
            if identity is None:
                route = routes.parse(path, method)
                if isinstance(route, routes.Route):
                    rec.repository, rec.reference = route.name, route.reference
                return deny(
                    401,
                    "UNAUTHORIZED",
                    login_hint(realm),
                    "unauthenticated",
                    **{"WWW-Authenticate": challenge(realm, route, method, rec.target.params)},
                )
            rec.tenant, rec.subject = identity.tenant, identity.subject
        caller = rights(self.policies.current(), identity) if identity else None

        decision = routes.check(rec.tenant, path, method, caller)
        if decision.route is not None:
            rec.repository, rec.reference = decision.route.name, decision.route.reference
            rec.route = decision.route.kind
        if decision.status == 401 and decision.route is not None:
            # The policy allows it, the token was not issued for it. RFC 6750's answer:
            # 403 with a challenge naming the scope needed (error="insufficient_scope"); a
            # client that reuses one token across operations (oras-py) asks for a new one on
            # a 403, and retries with the same token on a 401.
            value = challenge(realm, decision.route, method, rec.target.params)
            value += ',error="insufficient_scope"'
            return deny(403, "DENIED", decision.reason, "scope", **{"WWW-Authenticate": value})
        if not decision.allowed or decision.route is None:
            return deny(decision.status, decision.code, decision.reason)
        rec.rule = decision.reason or None
        params = routes.decide_params(rec.tenant, decision.route, method, rec.target.params, caller)
        if params.refusal is not None:
            refusal = params.refusal
            return deny(refusal.status, refusal.code, refusal.reason)

        rec.params = params.values
        rec.decision = f"allow:{params.note}" if params.note else "allow"
        if rec.route == "upload" and method in ("POST", "PATCH", "PUT"):
            # Blob bytes are octets. Distribution reads `mount`/`from`/`digest` with FormValue,
            # so a form-typed body would be a second, unchecked source of parameters.
            request.headers["content-type"] = "application/octet-stream"
        scrub(request.headers)
        request.stream = rec.count_in

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.kind != "registry" or not rec.allowed or answered(flow):
            return
        headers = flow.response.headers  # type: ignore[union-attr]
        headers.pop("www-authenticate", None)  # the backend's challenge is never the client's
        if "location" in headers:
            headers["location"] = relative(headers["location"])
        if "link" in headers:
            headers["link"] = relative_links(headers["link"])
        # Clients (Docker's `login`) look for it on /v2/; every backend answer carries it here.
        headers.setdefault(*oci.API_VERSION_HEADER)
        status = flow.response.status_code  # type: ignore[union-attr]
        if status >= 500 or status == 401:
            return  # small, and rewritten in `response`: not streamed
        kind = headers.get("content-type", "").partition(";")[0].strip().lower()
        if (rec.route == "manifest" and flow.request.method == "GET" and status == 200) or (
            status >= 400 and (kind == "application/json" or kind.endswith("+json"))
        ):
            # The live view shows a pulled manifest's or an error's first 16 KiB: a copy of
            # what streams by (flowfeed.bodies), the stream itself unchanged.
            rec.head_out = bytearray()
            flow.response.stream = rec.count_keep_out  # type: ignore[union-attr]
        else:
            flow.response.stream = PassThrough(rec.add_out)  # type: ignore[union-attr]

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        """A backend 5xx keeps its status and error code but loses its message and detail:
        they carry storage paths and internal addresses (e.g. on a full disk)."""
        rec, response = record(flow), flow.response
        if rec.kind != "registry" or not rec.allowed or response is None or answered(flow):
            return
        if response.status_code == 401 and not response.stream:
            flow.response = credential_refused(flow.request.method)
            return
        if response.status_code < 500 or response.stream:
            return
        flow.response = oci.error_response(
            response.status_code,
            backend_error_code(response.content or b""),
            "the registry backend failed; retry",
            method=flow.request.method,
        )
