"""routes.check / parse / decide_params: the namespace table (contract §3).

The raw path is judged exactly as sent: anything outside the distribution-spec grammar is
denied, never cleaned.
"""

from __future__ import annotations

import pytest

from addons.decisions import routes
from addons.decisions.routes import Route, check, decide_params, is_component, parse

SHA256 = "sha256:" + "a" * 64
SHA512 = "sha512:" + "b" * 128
UUID = "6f9619ff-8b86-d011-b42d-00c04fc964ff"


def denied(decision, status: int = 403, code: str = "DENIED") -> bool:
    return not decision.allowed and decision.status == status and decision.code == code


# --- the basic table --------------------------------------------------------------------------


def test_own_repository_is_allowed():
    d = check("acme", "/v2/acme/app/manifests/v1")
    assert d.allowed
    assert d.route == Route("manifest", "acme/app", "v1")


def test_other_tenants_repository_is_denied():
    d = check("acme", "/v2/globex/app/manifests/v1")
    assert denied(d)
    # the route is still known, for the access log
    assert d.route == Route("manifest", "globex/app", "v1")


@pytest.mark.parametrize("path", ["/v2/", "/v2"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_base_endpoint_is_allowed(path, method):
    d = check("acme", path, method)
    assert d.allowed
    assert d.route == Route("base")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_base_endpoint_other_methods_unsupported(method):
    assert denied(check("acme", "/v2/", method), 405, "UNSUPPORTED")


def test_the_catalog_is_allowed_to_every_caller():
    for tenant in ("acme", None):
        d = check(tenant, "/v2/_catalog")
        assert d.allowed and d.route == Route("catalog")


def test_tenant_prefix_is_a_whole_segment():
    assert denied(check("acme", "/v2/acmex/app/manifests/v1"))
    assert denied(check("acmex", "/v2/acme/app/manifests/v1"))
    assert denied(check("acme", "/v2/acme-x/app/manifests/v1"))
    assert check("acmex", "/v2/acmex/app/manifests/v1").allowed


@pytest.mark.parametrize(
    "path",
    [
        "/v2/acme/manifests/v1",
        f"/v2/acme/blobs/{SHA256}",
        "/v2/acme/tags/list",
        "/v2/acme/blobs/uploads/",
    ],
)
def test_bare_tenant_name_is_denied(path):
    """The repository must start with `<tenant>/`: `acme` itself is not inside `acme/`."""
    method = "POST" if path.endswith("uploads/") else "GET"
    assert denied(check("acme", path, method))


def test_nested_repository_names_are_allowed():
    d = check("acme", "/v2/acme/team/app/manifests/latest")
    assert d.allowed
    assert d.route == Route("manifest", "acme/team/app", "latest")


def test_repository_component_named_like_an_endpoint():
    """`acme/blobs` is a legal repository name; the last endpoint keyword wins, as in
    distribution's router."""
    d = check("acme", "/v2/acme/blobs/manifests/v1")
    assert d.allowed
    assert d.route == Route("manifest", "acme/blobs", "v1")


# --- anything not in the grammar is denied, not cleaned ---------------------------------------

NOT_CLEANED = [
    # %-escapes
    "/v2/acme%2fapp/manifests/v1",
    "/v2/acme%2Fapp/manifests/v1",
    "/v2/acme/%2e%2e/globex/app/manifests/v1",
    "/v2/acme/app/manifests/%2e%2e",
    "/v2/acme/app%20/manifests/v1",
    "/v2/%61cme/app/manifests/v1",
    # dot segments
    "/v2/acme/./app/manifests/v1",
    "/v2/acme/../globex/app/manifests/v1",
    "/v2/acme/app/../../globex/app/manifests/v1",
    "/v2/acme/app/manifests/..",
    "/v2/acme/app/manifests/.",
    "/v2/acme/app/blobs/uploads/..",
    "/v2/acme/app/blobs/uploads/../x",
    # empty segments
    "//v2/acme/app/manifests/v1",
    "/v2//acme/app/manifests/v1",
    "/v2/acme//app/manifests/v1",
    "/v2/acme/app//manifests/v1",
    "/v2/acme/app/manifests//v1",
    "/v2/acme/app/",
    "/v2/acme/app",
    # upper case in the name
    "/V2/acme/app/manifests/v1",
    "/v2/Acme/app/manifests/v1",
    "/v2/acme/App/manifests/v1",
    "/v2/acme/app/Manifests/v1",
    # unicode
    "/v2/acme/äpp/manifests/v1",
    "/v2/acme/app/manifests/v\uff11",  # fullwidth 1
    "/v2/\u0430cme/app/manifests/v1",  # Cyrillic a
    # trailing junk
    "/v2/acme/app/manifests/v1/extra",
    "/v2/acme/app/manifests/v1 ",
    "/v2/acme/app/manifests/v1\n",
    "/v2/acme/app/manifests/v1;x",
    "/v2/acme/app/manifests/v1#frag",
    "/v2/acme/app/tags/list/",
    "/v2/acme/app/tags/listx",
    "/v2/acme/app/referrers/",
    f"/v2/acme/app/blobs/{SHA256}/",
    f"/v2/acme/app/blobs/{SHA256}x",
    # bad references
    "/v2/acme/app/manifests/",
    "/v2/acme/app/manifests/" + "a" * 129,
    "/v2/acme/app/manifests/-v1",
    "/v2/acme/app/blobs/sha256:short",
    "/v2/acme/app/blobs/sha256:" + "A" * 64,
    "/v2/acme/app/blobs/sha384:" + "a" * 96,
    "/v2/acme/app/blobs/v1",
    "/v2/acme/app/referrers/v1",
    # bad name components
    "/v2/acme/-app/manifests/v1",
    "/v2/acme/app-/manifests/v1",
    "/v2/acme/a..b/manifests/v1",
    "/v2/acme/a___b/manifests/v1",
    # backend extensions and other non-repository endpoints
    "/v2/_zot/ext/search",
    "/v2/_zot/ext/mgmt",
    "/v2/_zot/ext/userprefs",
    "/v2/_oci/ext/discover",
    "/v2/_zot/pprof/",
    "/v2/acme/app/_zot/ext/search",
    "/v2/acme/_catalog",
    "/v2/acme/app/blobs",
    "/v2/acme/app/blobs/uploads",
]


def refused(decision) -> bool:
    """Refused with a client error, whatever the spec's code: never allowed, never a 5xx."""
    return not decision.allowed and 400 <= decision.status < 500


@pytest.mark.parametrize("path", NOT_CLEANED)
def test_paths_outside_the_grammar_are_refused(path):
    assert refused(check("acme", path, "GET")), path


@pytest.mark.parametrize("path", NOT_CLEANED)
def test_paths_outside_the_grammar_are_refused_for_anonymous_too(path):
    assert refused(check(None, path, "GET")), path


# What cannot exist in the caller's own namespace is refused as the distribution spec wants
# (404 for reads, 400 for writes); in another tenant's namespace it stays 403.
IN_NAMESPACE = [
    ("GET", "/v2/acme/app/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
    ("HEAD", "/v2/acme/app/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/acme/app/manifests/sha256:totallywrong", 404, "MANIFEST_UNKNOWN"),
    ("DELETE", "/v2/acme/app/manifests/-x", 404, "MANIFEST_UNKNOWN"),
    ("PUT", "/v2/acme/app/manifests/-x", 400, "MANIFEST_INVALID"),
    ("GET", "/v2/acme/app/blobs/sha256:short", 404, "BLOB_UNKNOWN"),
    ("HEAD", "/v2/acme/app/blobs/md5:abc", 404, "BLOB_UNKNOWN"),
    ("PATCH", "/v2/acme/app/blobs/uploads/..", 404, "BLOB_UPLOAD_UNKNOWN"),
    ("GET", "/v2/acme/app/referrers/sha256:x", 400, "DIGEST_INVALID"),
    ("GET", "/v2/acme/App/tags/list", 404, "NAME_UNKNOWN"),
    ("PUT", "/v2/acme/App/manifests/v1", 400, "NAME_INVALID"),
    ("GET", "/v2/acme/app/tags/other", 404, "NOT_FOUND"),
    ("GET", "/v2/acme/app", 404, "NOT_FOUND"),
]


@pytest.mark.parametrize(("method", "path", "status", "code"), IN_NAMESPACE)
def test_what_cannot_exist_in_the_own_namespace_gets_the_spec_answer(method, path, status, code):
    assert denied(check("acme", path, method), status, code)
    assert denied(check(None, path, method), status, code)  # anonymous: everything is own
    foreign = path.replace("/v2/acme/", "/v2/globex/")
    assert denied(check("acme", foreign, method))  # 403, whatever would exist there


def test_a_push_to_the_bare_tenant_says_how_repositories_are_named():
    d = check("acme", "/v2/acme/manifests/v1", "PUT")
    assert denied(d) and "acme/<name>" in d.reason
    d = check("acme", "/v2/acme/blobs/uploads/", "POST")
    assert denied(d) and "acme/<name>" in d.reason


def test_extensions_stay_denied_in_every_mode():
    for tenant in ("acme", None):
        assert denied(check(tenant, "/v2/_zot/ext/search"))
        assert denied(check(tenant, "/v2/_oci/ext/discover"))


# --- every route kind with its methods --------------------------------------------------------

ROUTES = [
    # (path tail, kind, reference, allowed methods)
    (f"blobs/{SHA256}", "blob", SHA256, {"GET", "HEAD", "DELETE"}),
    (f"blobs/{SHA512}", "blob", SHA512, {"GET", "HEAD", "DELETE"}),
    ("blobs/uploads/", "upload", None, {"POST"}),
    (f"blobs/uploads/{UUID}", "upload", UUID, {"GET", "PATCH", "PUT", "DELETE"}),
    ("blobs/uploads/c2Vzc2lvbi1pZA==", "upload", "c2Vzc2lvbi1pZA==", {"GET", "PATCH", "PUT"}),
    ("manifests/v1.2.3", "manifest", "v1.2.3", {"GET", "HEAD", "PUT", "DELETE"}),
    ("manifests/Latest_build-7", "manifest", "Latest_build-7", {"GET", "HEAD", "PUT"}),
    ("manifests/_x", "manifest", "_x", {"GET"}),
    ("manifests/" + "t" * 128, "manifest", "t" * 128, {"GET"}),
    (f"manifests/{SHA256}", "manifest", SHA256, {"GET", "HEAD", "PUT", "DELETE"}),
    (f"manifests/{SHA512}", "manifest", SHA512, {"GET", "HEAD"}),
    ("tags/list", "tags", None, {"GET", "HEAD"}),
    (f"referrers/{SHA256}", "referrers", SHA256, {"GET", "HEAD"}),
    (f"referrers/{SHA512}", "referrers", SHA512, {"GET", "HEAD"}),
]
ALL_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}


@pytest.mark.parametrize(("tail", "kind", "reference", "methods"), ROUTES)
def test_valid_routes_with_their_methods(tail, kind, reference, methods):
    path = f"/v2/acme/app/{tail}"
    for method in methods:
        d = check("acme", path, method)
        assert d.allowed, (method, path)
        assert d.route == Route(kind, "acme/app", reference)


# full method sets per kind, for the 405 check
METHODS = {
    "blob": {"GET", "HEAD", "DELETE"},
    "upload-start": {"POST"},
    "upload": {"GET", "PATCH", "PUT", "DELETE"},
    "manifest": {"GET", "HEAD", "PUT", "DELETE"},
    "tags": {"GET", "HEAD"},
    "referrers": {"GET", "HEAD"},
}
WRONG_METHOD = [
    (f"blobs/{SHA256}", METHODS["blob"]),
    ("blobs/uploads/", METHODS["upload-start"]),
    (f"blobs/uploads/{UUID}", METHODS["upload"]),
    ("manifests/v1", METHODS["manifest"]),
    (f"manifests/{SHA256}", METHODS["manifest"]),
    ("tags/list", METHODS["tags"]),
    (f"referrers/{SHA256}", METHODS["referrers"]),
]


@pytest.mark.parametrize(("tail", "allowed"), WRONG_METHOD)
def test_wrong_method_is_unsupported(tail, allowed):
    path = f"/v2/acme/app/{tail}"
    for method in sorted(ALL_METHODS - allowed):
        assert denied(check("acme", path, method), 405, "UNSUPPORTED"), (method, path)


def test_lower_case_method_is_unsupported():
    assert denied(check("acme", "/v2/acme/app/manifests/v1", "get"), 405, "UNSUPPORTED")


# --- anonymous dev mode -----------------------------------------------------------------------


def test_anonymous_owns_every_repository():
    for name in ("acme/app", "globex/app", "app", "a/b/c"):
        d = check(None, f"/v2/{name}/manifests/v1")
        assert d.allowed, name
        assert d.route == Route("manifest", name, "v1")


def test_anonymous_still_follows_the_route_table():
    assert check(None, "/v2/").allowed
    assert denied(check(None, "/v2/_zot/ext/search"))
    assert denied(check(None, "/v2/acme/app/manifests/v1", "POST"), 405, "UNSUPPORTED")
    assert refused(check(None, "/v2/acme%2fapp/manifests/v1"))


def test_parse_returns_route_or_refusal():
    assert parse("/v2/acme/app/tags/list") == Route("tags", "acme/app", None)
    refusal = parse("/v2/_zot/ext/search")
    assert not isinstance(refusal, Route)
    assert refusal.status == 403


# --- decide_params: each route's parameters, once, in their grammar -------------------------

UPLOAD_START = Route("upload", "acme/app", None)


def upload_start(tenant: str | None, *query: tuple[str, str]) -> routes.Params:
    return decide_params(tenant, UPLOAD_START, "POST", tuple(query))


def test_same_tenant_mount_is_kept():
    decided = upload_start("acme", ("mount", SHA256), ("from", "acme/other"))
    assert decided == routes.Params({"mount": SHA256, "from": "acme/other"})


def test_cross_tenant_mount_is_dropped_and_the_rest_kept():
    decided = upload_start("acme", ("mount", SHA256), ("from", "globex/secret"), ("digest", SHA512))
    assert decided.values == {"digest": SHA512}
    assert decided.refusal is None and decided.note == "mount dropped"


@pytest.mark.parametrize(
    "source",
    ["acmex/app", "acme", "acme/../globex/secret", "acme/Other", "acme%2fother", "acme//other", ""],
)
def test_a_mount_source_outside_the_namespace_or_grammar_is_dropped(source):
    decided = upload_start("acme", ("mount", SHA256), ("from", source))
    assert decided.values == {} and decided.note == "mount dropped"


@pytest.mark.parametrize("digest", ["sha256:abc", "sha256:" + "A" * 64, "md5:" + "a" * 32, ""])
def test_an_invalid_mount_digest_is_dropped(digest):
    decided = upload_start("acme", ("mount", digest), ("from", "acme/other"))
    assert decided.values == {} and decided.note == "mount dropped"


@pytest.mark.parametrize(
    "query",
    [
        (("mount", SHA256), ("mount", SHA256), ("from", "acme/other")),
        (("mount", SHA256), ("from", "acme/other"), ("from", "acme/other")),
        (("mount", SHA256), ("from", "acme/other"), ("from", "globex/secret")),
        (("digest", SHA256), ("digest", SHA512)),
    ],
)
def test_a_repeated_parameter_is_refused_not_guessed(query):
    decided = decide_params("acme", UPLOAD_START, "POST", query)
    assert decided.refusal is not None and decided.refusal.status == 400
    assert decided.values == {}


def test_mount_and_from_only_count_together():
    assert upload_start("acme", ("mount", SHA256)).values == {}
    assert upload_start("acme", ("from", "acme/other")).values == {}


def test_anonymous_keeps_a_valid_mount_from_anywhere():
    decided = upload_start(None, ("mount", SHA256), ("from", "globex/secret"))
    assert decided.values == {"mount": SHA256, "from": "globex/secret"}


def test_parameters_a_route_does_not_take_are_not_forwarded():
    decided = upload_start("acme", ("n", "10"), ("x", ""), ("_state", "abc"), ("digest", SHA256))
    assert decided == routes.Params({"digest": SHA256})
    blob = decide_params("acme", Route("blob", "acme/app", SHA256), "GET", (("digest", SHA256),))
    assert blob == routes.Params({})


@pytest.mark.parametrize(
    ("route", "method", "query", "code"),
    [
        (UPLOAD_START, "POST", (("digest", "sha256:short"),), "DIGEST_INVALID"),
        (
            Route("upload", "acme/app", UUID),
            "PUT",
            (("digest", "SHA256:" + "a" * 64),),
            "DIGEST_INVALID",
        ),
        (Route("upload", "acme/app", UUID), "PATCH", (("_state", "a b"),), "UNSUPPORTED"),
        (Route("tags", "acme/app"), "GET", (("n", "-1"),), "PAGINATION_NUMBER_INVALID"),
        (Route("tags", "acme/app"), "GET", (("n", "1e3"),), "PAGINATION_NUMBER_INVALID"),
        (Route("tags", "acme/app"), "GET", (("last", "../x"),), "UNSUPPORTED"),
        (
            Route("referrers", "acme/app", SHA256),
            "GET",
            (("artifactType", "a b/c"),),
            "UNSUPPORTED",
        ),
    ],
)
def test_a_parameter_outside_its_grammar_is_refused(route, method, query, code):
    decided = decide_params("acme", route, method, query)
    assert decided.refusal is not None
    assert (decided.refusal.status, decided.refusal.code) == (400, code)


@pytest.mark.parametrize(
    ("route", "method", "query"),
    [
        (Route("upload", "acme/app", UUID), "PUT", (("digest", SHA256), ("_state", "YWJj=="))),
        (Route("tags", "acme/app"), "GET", (("n", "10"), ("last", "v1.2"))),
        (
            Route("referrers", "acme/app", SHA256),
            "GET",
            (("artifactType", "application/vnd.dev.cosign.artifact.sig.v1+json"),),
        ),
    ],
)
def test_valid_parameters_are_forwarded(route, method, query):
    assert decide_params("acme", route, method, query) == routes.Params(dict(query))


# --- is_component -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["acme", "a", "0", "a1", "ac-me", "ac--me", "ac_me", "ac__me", "ac.me", "a.b-c_d"]
)
def test_valid_components(value):
    assert is_component(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Acme",
        "acme/x",
        "-acme",
        "acme-",
        "_acme",
        "acme.",
        "a..b",
        "a___b",
        "a_.b",
        ".",
        "..",
        "äcme",
        "acme\n",
        " acme",
    ],
)
def test_invalid_components(value):
    assert not is_component(value)


def test_the_policy_decides_on_the_action_each_route_needs():
    asked = []

    def rights(name: str, action: str) -> routes.Decision:
        asked.append((name, action))
        return routes.Decision(name == "acme/base/img" and action == "pull", 403, "DENIED", "r")

    for path, method, action in [
        ("/v2/acme/base/img/manifests/v1", "GET", "pull"),
        ("/v2/acme/base/img/manifests/v1", "PUT", "push"),
        ("/v2/acme/base/img/manifests/v1", "DELETE", "delete"),
        (f"/v2/acme/base/img/blobs/{SHA256}", "HEAD", "pull"),
        ("/v2/acme/base/img/blobs/uploads/", "POST", "push"),
        ("/v2/acme/base/img/tags/list", "GET", "pull"),
    ]:
        asked.clear()
        d = check("globex", path, method, rights)
        assert asked == [("acme/base/img", action)]
        assert d.allowed == (action == "pull") and d.route is not None


def test_a_mount_survives_only_from_a_repository_the_caller_may_pull():
    def rights(name: str, action: str) -> routes.Decision:
        return routes.Decision(name.startswith(("globex/", "acme/base/")), reason="grant")

    query = (("mount", SHA256), ("from", "acme/base/img"))
    kept = decide_params("globex", UPLOAD_START, "POST", query, rights)
    assert kept.values == dict(query)
    query = (("mount", SHA256), ("from", "acme/private"))
    dropped = decide_params("globex", UPLOAD_START, "POST", query, rights)
    assert dropped.values == {} and dropped.note == "mount dropped"
