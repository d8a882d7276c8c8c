"""Property-based tests (hypothesis) of the namespace check and of token parsing.

The example-based tables live in test_routes.py / test_tokens.py; here the inputs are random:
arbitrary text paths (unicode, %-escapes, `..`, `//`, up to 100 KB), header values as the wire
delivers them (bytes, which mitmproxy decodes with surrogateescape), arbitrary token strings
and single-character tampering of real tokens.

The grammar oracle below is written out from the distribution spec (FIELD-NOTES, "Repository
name", tag, digest) and the route table in README "Choices", not imported from decisions/routes.py:
a change that loosens the product's grammar makes these properties fail.
"""

from __future__ import annotations

import base64
import json
import re
import string
import time

import jwt
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mitmproxy import http

from addons.decisions import routes, target
from addons.decisions.routes import COMPONENT, Route, check, decide_params, is_name, owns, parse
from addons.decisions.tokens import InvalidToken, TokenSigner
from addons.gateway.access import bearer_token
from addons.gateway.token_endpoint import credential_from_header, plausible

PROPS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WIDE = settings(PROPS, max_examples=300)  # the cheap never-raises properties get more examples
FEW = settings(PROPS, max_examples=60)  # for the 100 KB inputs
# Whole file: < 10 s on a loaded 2-core machine.

# --- the oracle: distribution-spec grammar and the README route table -------------------------

_COMP = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = rf"{_COMP}(?:/{_COMP})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
_DIGEST = r"(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})"
_UPLOAD = r"[A-Za-z0-9][A-Za-z0-9_=-]{0,255}"
ORACLE: list[tuple[re.Pattern[str], frozenset[str]]] = [
    (re.compile(r"/v2/?"), frozenset({"GET", "HEAD"})),
    (re.compile(r"/v2/_catalog"), frozenset({"GET", "HEAD"})),
    (re.compile(rf"/v2/(?P<name>{_NAME})/blobs/{_DIGEST}"), frozenset({"GET", "HEAD", "DELETE"})),
    (re.compile(rf"/v2/(?P<name>{_NAME})/blobs/uploads/"), frozenset({"POST"})),
    (
        re.compile(rf"/v2/(?P<name>{_NAME})/blobs/uploads/{_UPLOAD}"),
        frozenset({"GET", "PATCH", "PUT", "DELETE"}),
    ),
    (
        re.compile(rf"/v2/(?P<name>{_NAME})/manifests/(?:{_TAG}|{_DIGEST})"),
        frozenset({"GET", "HEAD", "PUT", "DELETE"}),
    ),
    (re.compile(rf"/v2/(?P<name>{_NAME})/tags/list"), frozenset({"GET", "HEAD"})),
    (re.compile(rf"/v2/(?P<name>{_NAME})/referrers/{_DIGEST}"), frozenset({"GET", "HEAD"})),
]


def oracle(tenant: str | None, path: str, method: str) -> bool:
    """Allowed per the spec grammar, the route table and the namespace rule."""
    for pattern, allowed_methods in ORACLE:
        m = pattern.fullmatch(path)
        if m and method in allowed_methods:
            name = m.groupdict().get("name")
            return name is None or tenant is None or name.startswith(tenant + "/")
    return False


# --- strategies -------------------------------------------------------------------------------

SHA256 = "sha256:" + "a" * 64
SHA512 = "sha512:" + "b" * 128
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "get", ""]

# Every character, lone surrogates included (mitmproxy hands out surrogateescape'd str).
any_char = st.characters(exclude_categories=())
any_text = st.text(any_char, max_size=200)
surrogates = st.sampled_from(["\udc80", "\udcff", "\ud800", "\udfff", "\udcc3\udca9"])

ALNUM = string.ascii_lowercase + string.digits
_runs = st.text(st.sampled_from(ALNUM), min_size=1, max_size=8)
_seps = st.sampled_from([".", "_", "__", "-", "--", "---"])
# Cheap builder of COMPONENT strings (st.from_regex is slow; it is used for the round trip).
components = st.builds(
    lambda first, rest: first + "".join(sep + run for sep, run in rest),
    _runs,
    st.lists(st.tuples(_seps, _runs), max_size=3),
)
digests = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()),
    st.binary(min_size=64, max_size=64).map(lambda b: "sha512:" + b.hex()),
)
_TAG_CHARS = string.ascii_letters + string.digits + "._-"
tags = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + string.digits + "_"),
    st.text(st.sampled_from(_TAG_CHARS), max_size=127),
)
upload_ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + string.digits),
    st.text(st.sampled_from(string.ascii_letters + string.digits + "_=-"), max_size=255),
)
tenants = st.one_of(
    st.sampled_from(["acme", "globex", "a", "acme-x", "acme.x", "a__b"]), components
)
methods = st.one_of(st.sampled_from(METHODS), st.text(max_size=8))

# Path pieces that sit near the grammar's edges: traversal, escapes, look-alikes, control chars.
TRICKY = [
    "v2",
    "acme",
    "globex",
    "acmex",
    "acme-x",
    "app",
    "blobs",
    "uploads",
    "manifests",
    "tags",
    "list",
    "referrers",
    "latest",
    SHA256,
    SHA512,
    "6f9619ff-8b86-d011-b42d-00c04fc964ff",
    "",
    ".",
    "..",
    "...",
    "%2F",
    "%2f",
    "%2e",
    "%2e%2e",
    "%252F",
    "acme%2Fapp",
    "%00",
    "%",
    "ACME",
    "Acme",
    "\uff41cme",
    "acme\u0301",
    "\u0130",
    "\u212a",
    "acme\u200b",
    "a\x00",
    "a\n",
    "a\r\n",
    "a b",
    "a\t",
    "_catalog",
    "_zot",
    "_oci",
    "sha256:",
    "~",
    ";",
    "a;b",
    "?",
    "#",
    "\\",
    "acme\\..\\globex",
    "acme/../globex",
    "..%2f",
    "%2e%2e%2fglobex",
    "\udcff",
]
segments = st.one_of(st.sampled_from(TRICKY), any_text.filter(lambda s: len(s) < 20), components)


@st.composite
def near_paths(draw: st.DrawFn) -> str:
    """A path assembled from pieces near the grammar's edges."""
    prefix = draw(st.sampled_from(["/v2/", "/v2", "/V2/", "//v2/", "/v2//", "", "/", "v2/"]))
    body = "/".join(draw(st.lists(segments, max_size=8)))
    suffix = draw(st.sampled_from(["", "/", "//", "/.", "/..", "?x=1", "#f", "\n", "%2F"]))
    return prefix + body + suffix


@st.composite
def huge_paths(draw: st.DrawFn) -> str:
    """Up to ~100 KB: a valid or tricky head, one piece repeated, a valid or tricky tail."""
    head = draw(st.sampled_from(["/v2/", "/v2/acme/", "/v2/acme/app/", "/v2/globex/"]))
    piece = draw(
        st.one_of(
            st.sampled_from(
                ["a/", "a-", "a.", "a__", "-", "_", "/", "../", "%2F", "a", "é", "blobs/"]
            ),
            segments,
        )
    )
    times = draw(st.integers(1, 100_000 // max(1, len(piece))))
    tail = draw(
        st.sampled_from(["", "/tags/list", "tags/list", "/blobs/" + SHA256, "/manifests/v1", "x"])
    )
    return head + piece * times + tail


# (tail, method) pairs the route table allows, built once (strategies are costly to build).
valid_tails = st.one_of(
    st.tuples(digests.map("blobs/{}".format), st.sampled_from(["GET", "HEAD", "DELETE"])),
    st.tuples(st.just("blobs/uploads/"), st.just("POST")),
    st.tuples(
        upload_ids.map("blobs/uploads/{}".format),
        st.sampled_from(["GET", "PATCH", "PUT", "DELETE"]),
    ),
    st.tuples(
        st.one_of(tags, digests).map("manifests/{}".format),
        st.sampled_from(["GET", "HEAD", "PUT", "DELETE"]),
    ),
    st.tuples(st.just("tags/list"), st.sampled_from(["GET", "HEAD"])),
    st.tuples(digests.map("referrers/{}".format), st.sampled_from(["GET", "HEAD"])),
)
# The part of a repository name after its tenant: `app`, `team/app`, ...
rest_of_names = st.lists(components, min_size=1, max_size=4).map("/".join)


def request_for(name: str, tail_method: tuple[str, str]) -> tuple[str, str]:
    tail, method = tail_method
    return f"/v2/{name}/{tail}", method


paths = st.one_of(
    any_text, near_paths(), st.text(st.sampled_from("/v2acmeglobx.%_-:"), max_size=60)
)


# --- routes.check -----------------------------------------------------------------------------

REFUSALS = {
    (403, "DENIED"),
    (405, "UNSUPPORTED"),
    (404, "MANIFEST_UNKNOWN"),
    (404, "BLOB_UNKNOWN"),
    (404, "BLOB_UPLOAD_UNKNOWN"),
    (404, "NAME_UNKNOWN"),
    (404, "NOT_FOUND"),
    (400, "MANIFEST_INVALID"),
    (400, "DIGEST_INVALID"),
    (400, "NAME_INVALID"),
}


def assert_safe_if_allowed(tenant: str | None, path: str, method: str) -> routes.Decision:
    decision = check(tenant, path, method)  # never raises: an exception would fail the test
    assert isinstance(decision, routes.Decision)
    assert decision.allowed == oracle(tenant, path, method), (tenant, path, method, decision)
    if not decision.allowed:
        assert (decision.status, decision.code) in REFUSALS, decision
        if tenant is not None and (decision.status, decision.code) != (405, "UNSUPPORTED"):
            # Only the caller's own namespace gets the spec's 404/400: elsewhere 403.
            own = path.startswith(f"/v2/{tenant}/")
            assert (decision.status == 403) == (not own) or decision.code == "DENIED", decision
        return decision
    route = decision.route
    assert route is not None
    if tenant is not None and route.kind != "base":
        assert route.name is not None and route.name.startswith(tenant + "/")
    assert path.isascii()
    for bad in ("%", "//", "/./", "/../", "\\", "?", "#", " "):
        assert bad not in path, (bad, path)
    assert not path.endswith(("/.", "/.."))
    assert path.isprintable()
    # Determinism: the same input gives the same answer, and parse agrees with check.
    assert check(tenant, path, method) == decision
    assert parse(path, method) == route
    # Anonymous mode sees the same route (only the namespace is off).
    assert check(None, path, method) == routes.Decision(True, route=route)
    return decision


@WIDE
@given(tenant=st.one_of(st.none(), tenants), path=paths, method=methods)
@example(tenant="acme", path="/v2/acme/../globex/app/manifests/v1", method="GET")
@example(tenant="acme", path="/v2/acme/%2e%2e/globex/app/manifests/v1", method="GET")
@example(tenant="acme", path="/v2/acme%2Fapp/manifests/v1", method="GET")
@example(tenant="acme", path="/v2/acme//app/manifests/v1", method="GET")
@example(tenant="acme", path="/v2/acme/app/manifests/v1\n", method="GET")
@example(tenant="acme", path="/v2/\uff41cme/app/manifests/v1", method="GET")
@example(tenant="acme", path="/v2/acme/app/manifests/v1\udcff", method="GET")
@example(tenant="acme", path="/v2/acme/app/blobs/uploads/tags/list", method="GET")
def test_check_never_raises_and_allows_only_the_grammar(tenant, path, method):
    assert_safe_if_allowed(tenant, path, method)


@FEW
@given(tenant=st.one_of(st.none(), tenants), path=huge_paths(), method=st.sampled_from(METHODS))
def test_check_on_100kb_paths_is_fast_and_safe(tenant, path, method):
    started = time.perf_counter()
    assert_safe_if_allowed(tenant, path, method)
    assert time.perf_counter() - started < 1.0  # no catastrophic regex backtracking


@PROPS
@given(data=st.data(), tenant=tenants)
def test_own_valid_requests_are_allowed_with_the_right_route(data, tenant):
    """Control for the denials: the generators really produce grammar-valid requests."""
    name = f"{tenant}/{data.draw(rest_of_names)}"
    path, method = request_for(name, data.draw(valid_tails))
    decision = assert_safe_if_allowed(tenant, path, method)
    assert decision.allowed, (path, method)
    assert decision.route is not None and decision.route.name == name


@PROPS
@given(data=st.data(), tenant=tenants, other=tenants)
def test_valid_requests_under_another_tenant_are_denied_403(data, tenant, other):
    # Another tenant, another tenant sharing our prefix (acme → acmex, acme-x, acme.x), or a
    # repository named exactly like the tenant (no `/`: not inside the namespace).
    owner = data.draw(
        st.sampled_from(
            [other, tenant + "x", tenant + "-x", tenant + ".x", tenant + "__x", "x" + tenant]
        )
    )
    if owner == tenant:
        owner = tenant + "0"
    name = data.draw(st.sampled_from([f"{owner}/{data.draw(rest_of_names)}", tenant, owner]))
    path, method = request_for(name, data.draw(valid_tails))
    decision = check(tenant, path, method)
    assert not decision.allowed
    assert (decision.status, decision.code) == (403, "DENIED")
    assert decision.route is not None and decision.route.name == name  # kept for the log


@PROPS
@given(tenant=tenants, path=paths, method=methods)
def test_an_allowed_path_under_a_prefixed_tenant_is_not_ours(tenant, path, method):
    """Whatever `tenant` may send, `tenant + 'x'` (a different tenant) may not, and back."""
    for a, b in ((tenant, tenant + "x"), (tenant + "x", tenant)):
        d = check(a, path, method)
        if d.allowed and d.route is not None and d.route.name is not None:
            assert not check(b, path, method).allowed


# --- routes.decide_params: query parameters and mounts ----------------------------------------

query_keys = st.one_of(
    st.sampled_from(["from", "mount", "digest", "From", "from ", " from", "from\x00", "mount[]"]),
    any_text.filter(lambda s: len(s) < 10),
)


# Mount values, as templates over the tenant `{t}` (strategies are built once).
mount_templates = st.one_of(
    rest_of_names.map(lambda r: "{t}/" + r),
    rest_of_names.map(lambda r: "globex/" + r),
    st.sampled_from(
        [
            "{t}",
            SHA256,
            SHA512,
            "{t}/../globex/app",
            "{t}%2F..%2Fglobex",
            "{t}/app ",
            "{t}/App",
            "{t}x/app",
            "{t}-x/app",
            "",
            "{t}/app\n",
            "{t}/app\udcff",
            "{t}//app",
        ]
    ),
    any_text.map(lambda s: s.replace("{", "(").replace("}", ")")),
)


UPLOAD_START = Route("upload", "acme/app", None)


@PROPS
@given(data=st.data(), tenant=st.one_of(st.none(), tenants))
def test_decided_params_never_keep_a_foreign_mount_source(data, tenant):
    pairs = data.draw(st.lists(st.tuples(query_keys, mount_templates), max_size=6))
    query = tuple((k, v.format(t=tenant or "acme")) for k, v in pairs)
    decided = decide_params(tenant, UPLOAD_START, "POST", query)
    if decided.refusal is not None:
        # Refused only for ambiguity or a bad digest, never silently passed on.
        assert decided.values == {}
        keys = [k for k, _ in query if k in ("digest", "mount", "from")]
        assert len(keys) != len(set(keys)) or decided.refusal.code == "DIGEST_INVALID"
        return
    # Only ever keeps what was received, under the route's own keys.
    assert set(decided.values.items()) <= set(query)
    assert set(decided.values) <= {"digest", "mount", "from"}
    assert ("mount" in decided.values) == ("from" in decided.values)
    if "from" in decided.values:
        source = decided.values["from"]
        assert is_name(source) and owns(tenant, source)
        if tenant is not None:
            assert source.startswith(tenant + "/")
        assert re.fullmatch(_DIGEST, decided.values["mount"])


@PROPS
@given(data=st.data(), tenant=tenants)
def test_decided_params_keep_a_clean_own_mount(data, tenant):
    source = f"{tenant}/{data.draw(rest_of_names)}"
    digest = data.draw(digests)
    query = (("mount", digest), ("from", source), ("x", data.draw(any_text)))
    decided = decide_params(tenant, UPLOAD_START, "POST", query)
    assert decided.refusal is None and decided.note is None
    assert decided.values == {"mount": digest, "from": source}


# --- the request target: one parse, forwarded canonically -------------------------------------

target_chars = st.sampled_from(
    [
        *"azAZ09-._~/:=?&#;+% ,@!$'()*[]\\\"<>^`{|}",
        *("%2F", "%26", "%3D", "%23", "%2B", "%00", "%ff", "%G1", "\x7f", "\xff", "\n"),
    ]
)
targets = st.one_of(
    st.lists(target_chars, max_size=40).map(lambda cs: "/v2/" + "".join(cs)),
    st.builds(
        lambda path, q: f"{path}?{q}",
        st.sampled_from(["/v2/acme/app/blobs/uploads/", "/v2/acme/app/tags/list"]),
        st.lists(target_chars, max_size=60).map("".join),
    ),
)


@WIDE
@given(raw=targets)
def test_a_target_either_refused_or_canonical_round_trips(raw):
    from urllib.parse import parse_qsl, urlsplit

    try:
        parsed = target.parse(raw.encode("utf-8", "surrogateescape"))
    except target.TargetError:
        return
    # Nothing a parser could read two ways survives the parse: no fragment, no `;` or `+`
    # in the query, no escapes in the path, nothing outside printable ASCII.
    path, _, query = raw.partition("?")
    assert not set("#;+ \\") & set(query), raw
    assert "%" not in path and "#" not in path, raw
    assert raw.isascii() and raw.isprintable(), raw
    params = dict(parsed.params)
    forwarded = target.canonical(parsed.path, params)
    # What the backend receives parses (as Python's and Go's readers both do) back to exactly
    # the decided path and parameters, and is already canonical.
    split = urlsplit(forwarded)
    assert split.path == parsed.path
    assert dict(parse_qsl(split.query, keep_blank_values=True)) == params
    assert target.canonical(*_reparse(forwarded)) == forwarded


def _reparse(forwarded: str) -> tuple[str, dict[str, str]]:
    again = target.parse(forwarded.encode())
    return again.path, dict(again.params)


# --- header parsing: /auth/token credentials and registry bearer tokens ----------------------

header_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda s, b: s + b,
        st.sampled_from([b"Bearer ", b"bearer ", b"Basic ", b"BASIC  ", b"Bearer\t", b" Bearer "]),
        st.binary(max_size=300),
    ),
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


header_texts = st.one_of(
    any_text,
    st.builds(
        lambda s, t: s + t, st.sampled_from(["Bearer ", "Basic ", "basic ", "Bearer  "]), any_text
    ),
    st.builds(lambda s, t: s + t, st.sampled_from(["Basic ", "Bearer "]), surrogates),
    st.binary(max_size=200).map(lambda b: "Basic " + b64(b)),  # invalid UTF-8, no colon, ...
    st.text(max_size=40).map(lambda t: "Basic " + b64(t.encode("utf-8", "surrogatepass"))),
)


@WIDE
@given(value=header_texts)
@example(value="Basic \udcff")
@example(value="Basic " + b64(b"x:\xff\xfe"))
@example(value="Basic " + b64(b"x:") + "\udc80")
@example(value="Basic " + "A" * 100_001)
def test_credential_from_header_never_raises(value):
    credential = credential_from_header(value)
    assert credential is None or (isinstance(credential, str) and credential)
    if credential is not None and plausible(credential):
        assert credential.isascii() and len(credential) <= 16 * 1024
        assert re.fullmatch(r"[A-Za-z0-9_=.-]+", credential)


@WIDE
@given(raw=header_bytes)
def test_credential_from_wire_bytes_never_raises(raw):
    value = http.Headers([(b"Authorization", raw)])["authorization"]  # surrogateescape'd
    credential = credential_from_header(value)
    assert credential is None or (isinstance(credential, str) and credential)


@PROPS
@given(
    user=st.text(max_size=30).filter(lambda u: ":" not in u),
    password=st.text(min_size=1, max_size=60),
)
def test_basic_credentials_round_trip(user, password):
    value = "Basic " + b64(f"{user}:{password}".encode())
    assert credential_from_header(value) == password


@WIDE
@given(
    fields=st.lists(
        st.tuples(
            st.sampled_from(
                [b"Authorization", b"authorization", b"AUTHORIZATION", b"X-Auth", b"Authorization "]
            ),
            header_bytes,
        ),
        max_size=4,
    )
)
def test_bearer_token_never_raises_and_needs_exactly_one_header(fields):
    headers = http.Headers(fields)
    token = bearer_token(headers)
    if len(headers.get_all("authorization")) != 1:
        assert token is None
    if token is not None:
        assert isinstance(token, str) and token.isascii() and 0 < len(token) <= 8 * 1024
        assert token == token.strip()


@PROPS
@given(
    token=st.text(
        st.sampled_from(string.ascii_letters + string.digits + "-_."), min_size=1, max_size=100
    )
)
def test_two_authorization_headers_are_never_a_bearer_token(token):
    """Even the same valid token twice: ambiguous, refused."""
    headers = http.Headers([(b"Authorization", b"Bearer " + token.encode())] * 2)
    assert bearer_token(headers) is None
    headers = http.Headers(
        [(b"Authorization", b"Bearer " + token.encode()), (b"Authorization", b"Bearer junk")]
    )
    assert bearer_token(headers) is None


@PROPS
@given(
    token=st.text(
        st.sampled_from(string.ascii_letters + string.digits + "-_."), min_size=1, max_size=100
    )
)
def test_a_single_bearer_header_round_trips(token):
    assert bearer_token(http.Headers([(b"Authorization", f"Bearer {token}".encode())])) == token


# --- TokenSigner.verify -----------------------------------------------------------------------

SIGNER = TokenSigner(b"p" * 32)
OTHER = TokenSigner(b"q" * 32)
B64URL = string.ascii_letters + string.digits + "-_"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
headers_json = st.one_of(
    st.fixed_dictionaries(
        {
            "alg": st.sampled_from(["HS256", "none", "None", "RS256", "HS512", ""]),
            "typ": st.just("JWT"),
        }
    ),
    st.dictionaries(
        st.sampled_from(["alg", "typ", "kid", "jku", "crit", "b64"]), json_values, max_size=4
    ),
    json_values,
)
payloads_json = st.one_of(
    st.fixed_dictionaries(
        {
            "iss": st.sampled_from(["tabbify-registry", "x"]),
            "aud": st.sampled_from(["tabbify-registry", ["tabbify-registry"], "x"]),
            "sub": st.one_of(tenants, json_values),
            "iat": st.integers(0, 2**40),
            "exp": st.one_of(
                st.integers(-(2**63), 2**63), st.floats(allow_nan=False), st.text(max_size=5)
            ),
        }
    ),
    json_values,
)


MINTED: dict[str, str] = {}  # jti → tenant of every token SIGNER minted in this module


def mint(tenant: str) -> str:
    token, _ = SIGNER.mint(tenant)
    MINTED[unverified_claims(token)["jti"]] = tenant
    return token


def unverified_claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


@st.composite
def jwt_shaped(draw: st.DrawFn) -> str:
    """Three-ish base64url parts: random JSON, parts of real tokens (ours or another signer's,
    recombined), or noise."""
    tenant = draw(tenants)
    real_h, real_p, real_s = (mint(tenant) if draw(st.booleans()) else OTHER.mint(tenant)[0]).split(
        "."
    )
    header = draw(
        st.one_of(
            headers_json.map(lambda j: b64url(json.dumps(j).encode())),
            st.just(real_h),
            st.text(B64URL, max_size=40),
        )
    )
    payload = draw(
        st.one_of(
            payloads_json.map(lambda j: b64url(json.dumps(j).encode())),
            st.just(real_p),
            st.text(B64URL, max_size=60),
        )
    )
    sig = draw(st.one_of(st.just(real_s), st.binary(max_size=64).map(b64url), st.just("")))
    extra = draw(st.lists(st.text(B64URL, max_size=10), max_size=2))
    return ".".join([header, payload, sig, *extra])


def verify_or_none(token: str) -> str | None:
    try:
        return SIGNER.verify(token).tenant
    except InvalidToken:
        return None


@WIDE
@given(token=st.one_of(any_text, jwt_shaped(), st.text(B64URL + ".=", max_size=400)))
@example(token="\udcff.\udcff.\udcff")
@example(token="." * 10_000)
@example(token="a" * 100_000)
@example(token=mint("acme") + "\udcff")
@example(token=mint("acme") + "=")
@example(token=mint("acme") + ".")
@example(token=" " + mint("acme"))
def test_verify_raises_only_invalid_token_and_grants_nothing_unminted(token):
    # Anything but InvalidToken escapes verify_or_none and fails the test.
    tenant = verify_or_none(token)
    if tenant is not None:
        # Accepted: it must carry the claims of a token SIGNER minted, for that same tenant.
        assert MINTED.get(unverified_claims(token).get("jti")) == tenant, token


@PROPS
@given(tenant=tenants, other_tenant=tenants)
def test_tokens_of_another_signer_are_refused(tenant, other_tenant):
    token, _ = OTHER.mint(tenant)
    assert verify_or_none(token) is None
    # A payload of ours under another signature, and another payload under our signature.
    ours = SIGNER.mint(other_tenant)[0].split(".")
    theirs = token.split(".")
    assert verify_or_none(".".join([ours[0], ours[1], theirs[2]])) is None
    if ours[1] != theirs[1]:
        assert verify_or_none(".".join([ours[0], theirs[1], ours[2]])) is None


@settings(PROPS, max_examples=150)  # st.from_regex is the slow part
@given(tenant=st.from_regex(COMPONENT, fullmatch=True))
def test_mint_verify_round_trips_for_every_valid_tenant(tenant):
    token, issued = SIGNER.mint(tenant)
    assert abs(issued - time.time()) < 5
    assert SIGNER.verify(token).tenant == tenant
    assert token.isascii() and len(token) <= 8 * 1024  # fits bearer_token's cap for sane tenants
    assert bearer_token(http.Headers([(b"Authorization", f"Bearer {token}".encode())])) == token


@PROPS
@given(data=st.data(), tenant=tenants)
def test_tampering_one_character_never_yields_another_tenant(data, tenant):
    token = mint(tenant)
    i = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.one_of(st.sampled_from(B64URL + ".=+/ "), any_char))
    if replacement == token[i]:
        replacement = "A" if token[i] != "A" else "B"
    tampered = token[:i] + replacement + token[i + 1 :]
    result = verify_or_none(tampered)
    assert result in (None, tenant)
    if result is not None:
        # Only a padding-insensitive change can survive: the last character of a segment.
        assert i + 1 == len(token) or token[i + 1] == ".", (i, replacement)


def test_tampering_every_position_of_a_real_token():
    """Exhaustive complement: every position, every base64url character (and `.`, `=`)."""
    token = mint("acme")
    survivors = []
    for index in range(len(token)):
        for c in B64URL + ".=":
            if c == token[index]:
                continue
            result = verify_or_none(token[:index] + c + token[index + 1 :])
            assert result in (None, "acme")
            if result is not None:
                survivors.append(index)
    # Only padding-insensitive changes (last character of a segment) may survive.
    assert all(i + 1 == len(token) or token[i + 1] == "." for i in survivors)


def test_round_trip_control():
    token, _ = SIGNER.mint("acme")
    assert SIGNER.verify(token).tenant == "acme"
    assert check("acme", "/v2/acme/app/manifests/v1").route == Route("manifest", "acme/app", "v1")
