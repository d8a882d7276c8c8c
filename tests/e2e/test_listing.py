"""Tag lists and the catalog through the gateway, as the distribution spec pages them.

Distribution 2.8 ignores `n` and `last` on tag lists: the gateway pages them. The catalog
comes from the gateway (never the backend's unfiltered one): only the caller's repositories,
sorted, paged with relative `Link` headers; the same answer whatever other tenants hold.
Real clients: skopeo list-tags, podman search.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
import requests

from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.support.images import image_manifest
from tests.support.stack import Stack
from tests.support.standins.auth import tabbify_jwt

pytestmark = pytest.mark.e2e

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACME_REPOS = ["acme/listing/a", "acme/listing/b", "acme/listing/c"]
TAGS = ["v1", "v2", "v3", "v4"]


def push_image(stack: Stack, repo: str, tags: list[str], h: dict[str, str]) -> None:
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(4).hex()})
    layer = b"layer " + os.urandom(64)
    push_blob(stack, repo, config.encode(), h)
    push_blob(stack, repo, layer, h)
    body = image_manifest((sha256(config.encode()), len(config)), [(sha256(layer), len(layer))])
    for tag in tags:
        r = requests.put(
            f"{stack.url}/v2/{repo}/manifests/{tag}",
            data=body,
            headers={**h, "Content-Type": OCI_MANIFEST},
            timeout=10,
        )
        assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def listed(registry: Stack, acme_jwt: str, globex_jwt: str) -> Iterator[Stack]:
    a, g = bearer(token(registry, acme_jwt)), bearer(token(registry, globex_jwt))
    for repo in ACME_REPOS:
        push_image(registry, repo, TAGS, a)
    push_image(registry, "globex/private", ["v1"], g)
    yield registry


def pages(stack: Stack, first: str, h: dict[str, str], key: str) -> list[list[str]]:
    """Follow `Link: <…>; rel="next"` from `first`; every link must be relative."""
    out, url = [], first
    while url:
        r = requests.get(stack.url + url, headers=h, timeout=10)
        assert r.status_code == 200, r.text
        out.append(r.json()[key])
        link = r.headers.get("Link")
        if link is None:
            break
        assert link.startswith("</v2/") and link.endswith('>; rel="next"'), link
        url = link[1 : link.index(">")]
        assert len(out) < 20
    return out


def test_tag_lists_are_paged_by_the_gateway(listed, acme_jwt):
    a = bearer(token(listed, acme_jwt))
    repo = ACME_REPOS[0]
    assert pages(listed, f"/v2/{repo}/tags/list?n=2", a, "tags") == [["v1", "v2"], ["v3", "v4"]]
    assert pages(listed, f"/v2/{repo}/tags/list?n=3&last=v1", a, "tags") == [["v2", "v3", "v4"]]
    assert pages(listed, f"/v2/{repo}/tags/list", a, "tags") == [TAGS]
    r = requests.get(f"{listed.url}/v2/{repo}/tags/list?n=-1", headers=a, timeout=10)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"


def test_skopeo_lists_tags_through_the_gateway(listed, acme_jwt):
    r = subprocess.run(
        ["skopeo", "list-tags", "--tls-verify=false", "--creds", f"x:{acme_jwt}",
         f"docker://{listed.host}/{ACME_REPOS[1]}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["Tags"] == TAGS


def test_the_catalog_lists_only_the_callers_repositories_in_pages(listed, acme_jwt, globex_jwt):
    a, g = bearer(token(listed, acme_jwt)), bearer(token(listed, globex_jwt))
    everything = [
        name for page in pages(listed, "/v2/_catalog", a, "repositories") for name in page
    ]
    assert set(ACME_REPOS) <= set(everything)
    assert all(name.startswith("acme/") for name in everything), everything
    assert everything == sorted(everything)
    paged = pages(listed, "/v2/_catalog?n=2", a, "repositories")
    assert [name for page in paged for name in page] == everything
    assert all(len(page) <= 2 for page in paged) and len(paged) >= 2
    theirs = [n for page in pages(listed, "/v2/_catalog", g, "repositories") for n in page]
    assert "globex/private" in theirs and not [n for n in theirs if not n.startswith("globex/")]


def test_what_others_hold_changes_nothing_in_a_catalog(listed, acme_jwt, globex_jwt):
    a, g = bearer(token(listed, acme_jwt)), bearer(token(listed, globex_jwt))
    before = requests.get(f"{listed.url}/v2/_catalog?n=1000", headers=a, timeout=10)
    for i in range(30):
        push_image(listed, f"globex/many/r{i:02d}", ["v1"], g)
    after = requests.get(f"{listed.url}/v2/_catalog?n=1000", headers=a, timeout=10)
    assert before.status_code == after.status_code == 200
    assert before.content == after.content
    assert before.headers.get("Link") == after.headers.get("Link") is None


def test_podman_search_lists_the_callers_repositories(listed, acme_jwt, tmp_path):
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
    login = subprocess.run(
        ["podman", "login", "--tls-verify=false", "-u", "x", "--password-stdin", listed.host],
        input=acme_jwt, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    r = subprocess.run(
        ["podman", "search", "--tls-verify=false", "--format", "{{.Name}}", f"{listed.host}/"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    found = {line.split("/", 1)[1] for line in r.stdout.split()}
    assert set(ACME_REPOS) <= found
    assert not [name for name in found if not name.startswith("acme/")]


# --- the catalog at its scan bound ----------------------------------------------------------

SHARED_POLICY = """
[[grant]]
repositories = ["acme/*/public"]
tenants = ["globex"]
actions = ["pull"]

[[grant]]
repositories = ["acme/a/public"]
tenants = ["initech"]
actions = ["pull"]
"""
INITECH = tabbify_jwt({"sub": "ops", "network": "initech"})
SCAN = 10  # REGISTRY_CATALOG_SCAN: names one catalog page looks at
PUBLIC = ["acme/a/public", "acme/c/public", "acme/e/public"]
SECRET = [f"acme/{x}{i:02d}/secret" for x in "bd" for i in range(SCAN + 2)]


@pytest.fixture(scope="module")
def bounded(tmp_path_factory, auth, acme_jwt: str) -> Iterator[Stack]:
    """Globex may pull `acme/*/public`, whose literal prefix is `acme/`: its catalog scans
    all of acme's names, and runs of acme's secret repositories longer than the scan bound
    sit between the public ones."""
    data = tmp_path_factory.mktemp("bounded") / "data"
    data.mkdir()
    (data / "policy.toml").write_text(SHARED_POLICY)
    stack = Stack(data, auth.url, REGISTRY_CATALOG_SCAN=str(SCAN)).start()
    a = bearer(token(stack, acme_jwt))
    for repo in PUBLIC + SECRET:
        push_image(stack, repo, ["v1"], a)
    push_image(stack, "initech/app", ["v1"], bearer(token(stack, INITECH)))
    yield stack
    stack.stop()


def raw_pages(stack: Stack, first: str, h: dict[str, str]) -> list[requests.Response]:
    out, url = [], first
    while url:
        r = requests.get(stack.url + url, headers=h, timeout=10)
        assert r.status_code == 200, r.text
        out.append(r)
        link = r.headers.get("Link")
        if link is None:
            break
        assert link.startswith("</v2/_catalog?") and link.endswith('>; rel="next"'), link
        url = link[1 : link.index(">")]
        assert len(out) <= len(PUBLIC + SECRET) + 2, "paging does not end"
    return out


@pytest.mark.parametrize("n", [1, 2, 100])
def test_a_catalog_page_at_its_scan_bound_names_nothing_the_caller_may_not_list(
    bounded, globex_jwt, n
):
    """Every page, body and headers, over the whole paging: no secret name, not even as the
    `last` of a Link; and the pages still reach every repository the caller may list."""
    g = bearer(token(bounded, globex_jwt))
    answers = raw_pages(bounded, f"/v2/_catalog?n={n}", g)
    listed = [name for r in answers for name in r.json()["repositories"]]
    assert listed == PUBLIC
    for r in answers:
        everything = r.content.decode() + "".join(f"{k}: {v}\n" for k, v in r.headers.items())
        assert "secret" not in everything, everything
        if "Link" in r.headers:  # `last` is a listed name, or sealed (no name in it at all)
            last = r.headers["Link"].split("last=", 1)[1].split(">", 1)[0]
            assert last in PUBLIC or (last.startswith("C") and "/" not in last), last
    # A cursor is the caller's own: another caller gets nothing from it.
    sealed = [r.headers["Link"] for r in answers if "last=C" in r.headers.get("Link", "")]
    assert sealed, "the scan bound was never reached: the test proves nothing"


def test_a_catalog_cursor_opens_for_its_caller_only(bounded, globex_jwt, acme_jwt):
    g, a = bearer(token(bounded, globex_jwt)), bearer(token(bounded, acme_jwt))
    link = requests.get(f"{bounded.url}/v2/_catalog?n=100", headers=g, timeout=10).headers["Link"]
    url = link[1 : link.index(">")]
    assert "last=C" in url
    r = requests.get(bounded.url + url, headers=a, timeout=10)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "UNSUPPORTED"
    # The owner sees everything of its own, in pages through the same bound.
    mine = [
        name for r in raw_pages(bounded, "/v2/_catalog?n=5", a) for name in r.json()["repositories"]
    ]
    assert mine == sorted(PUBLIC + SECRET)


def test_a_grant_of_one_repository_pages_past_it(bounded):
    """A grant naming one repository makes that name a scan range of its own: a page that
    ends on it must not start the next page with it again (that paged forever)."""
    i = bearer(token(bounded, INITECH))
    listed = [
        name for r in raw_pages(bounded, "/v2/_catalog?n=1", i) for name in r.json()["repositories"]
    ]
    assert listed == ["acme/a/public", "initech/app"]
