"""Every request that is not `/auth/token`: who is it, may they, and pass it on streamed.

In order: outside /v2 → 404; no valid registry token → 401 with the Bearer challenge (realm
from configuration, never from Host); outside the tenant's namespace or the registry API →
403/405 (routes.check); allowed → cross-tenant mounts dropped, client forwarding and auth
headers scrubbed, body streamed both ways, backend addresses removed from the answer.
"""

from __future__ import annotations

import json
import re

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from addons import oci, routes
from addons.record import record
from addons.refusal import fail_closed, refuse
from addons.token_endpoint import SERVICE
from addons.tokens import InvalidToken, TokenSigner

_MAX_TOKEN = 8 * 1024
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
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


def challenge(realm: str, route: routes.Route | routes.Decision, method: str) -> str:
    value = f'Bearer realm="{realm}",service="{SERVICE}"'
    if isinstance(route, routes.Route) and route.name:
        actions = "pull" if method in ("GET", "HEAD") else "pull,push"
        value += f',scope="repository:{route.name}:{actions}"'
    return value


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
    except (ValueError, KeyError, IndexError, TypeError):
        return "UNKNOWN"
    return code if isinstance(code, str) and re.fullmatch(r"[A-Z_]{1,40}", code) else "UNKNOWN"


_SCRUBBED = ("authorization", "forwarded", "x-real-ip", "upgrade", "http2-settings")


def scrub(headers: http.Headers) -> None:
    """Nothing the client says about proxies or credentials reaches the backend, and no
    protocol upgrade: a 101 would turn the connection into a pipe past the gateway."""
    for name in list(headers.keys()):
        lower = name.lower()
        if lower in _SCRUBBED or lower.startswith("x-forwarded-"):
            del headers[name]


class RegistryAccess:
    def __init__(self, signer: TokenSigner) -> None:
        self.signer = signer

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
        if rec.kind == "token" or flow.response is not None:
            return
        request, method = flow.request, flow.request.method
        path, _, _ = request.path.partition("?")
        if path != "/v2" and not path.startswith("/v2/"):
            rec.decision = "deny:not-found"
            refuse(flow, oci.error_response(404, "NOT_FOUND", "not found", method=method))
            return
        rec.kind = "registry"

        tenant = None
        if not ctx.options.registry_anonymous:
            token = bearer_token(request.headers)
            try:
                tenant = self.signer.verify(token) if token else None
            except InvalidToken:
                tenant = None
            if tenant is None:
                rec.decision = "deny:unauthenticated"
                route = routes.parse(path, method)
                if isinstance(route, routes.Route):
                    rec.repository, rec.reference = route.name, route.reference
                auth = challenge(ctx.options.registry_realm, route, method)
                refuse(
                    flow,
                    oci.error_response(
                        401,
                        "UNAUTHORIZED",
                        "authentication required",
                        method=method,
                        headers={"WWW-Authenticate": auth},
                    ),
                )
                return
        rec.tenant = tenant

        decision = routes.check(tenant, path, method)
        if decision.route is not None:
            rec.repository, rec.reference = decision.route.name, decision.route.reference
            rec.route = decision.route.kind
        if not decision.allowed:
            rec.decision = f"deny:{decision.reason}"
            refuse(
                flow,
                oci.error_response(decision.status, decision.code, decision.reason, method=method),
            )
            return

        rec.decision = "allow"
        if decision.route and decision.route.kind == "upload" and method == "POST":
            self.sanitize_upload_start(flow, tenant)
        scrub(request.headers)
        request.stream = rec.count_in

    def sanitize_upload_start(self, flow: http.HTTPFlow, tenant: str | None) -> None:
        request = flow.request
        query, changed = routes.sanitize_mount(tenant, list(request.query.items(multi=True)))
        if changed:
            request.query = query
            record(flow).decision = f"allow:{changed}"
        # Distribution reads mount/from with FormValue: a form body would override the query.
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith(_FORM_TYPES):
            request.headers["content-type"] = "application/octet-stream"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.kind != "registry" or not rec.allowed:
            return
        headers = flow.response.headers  # type: ignore[union-attr]
        if "location" in headers:
            headers["location"] = relative(headers["location"])
        if "link" in headers:
            headers["link"] = relative_links(headers["link"])
        # Clients (Docker's `login`) look for it on /v2/; every backend answer carries it here.
        headers.setdefault(*oci.API_VERSION_HEADER)
        if flow.response.status_code >= 500:  # type: ignore[union-attr]
            return  # small, and rewritten in `response`: not streamed
        flow.response.stream = rec.count_out  # type: ignore[union-attr]

    def response(self, flow: http.HTTPFlow) -> None:
        """A backend 5xx keeps its status and error code but loses its message and detail:
        they carry storage paths and internal addresses (e.g. on a full disk)."""
        rec, response = record(flow), flow.response
        if rec.kind != "registry" or not rec.allowed or response is None:
            return
        if response.status_code < 500 or response.stream:
            return
        flow.response = oci.error_response(
            response.status_code,
            backend_error_code(response.content or b""),
            "the registry backend failed; retry",
            method=flow.request.method,
        )
