"""The access policy (contract §7) end to end: the four stories with real clients.

One stack with a policy file: acme shares `acme/base/**` read-only with globex, acme's CI
identity may push to `acme/ci/**` only, acme's viewer may only pull, and `v*` tags under
`acme/releases/**` are immutable. Then: edits apply to tokens already issued, a bad edit keeps
the last good policy, least-privilege tokens, and the catalog follows the grants.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import skopeo, skopeo_copy
from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.support import cosign
from tests.support.images import image_manifest, layout_blobs, oci_index_layout, oci_layout
from tests.support.rawhttp import Conn
from tests.support.stack import Stack, wait_for
from tests.support.standins.auth import AuthStandin, tabbify_jwt

pytestmark = pytest.mark.e2e

POLICY = """
[[grant]]
repositories = ["acme/base/**"]
tenants = ["globex"]
actions = ["pull"]

[[restrict]]
subjects = ["ci@acme"]
repositories = ["acme/ci/**"]
actions = ["pull", "push"]

[[restrict]]
subjects = ["viewer@acme"]
actions = ["pull"]

[[immutable]]
repositories = ["acme/releases/**"]
tags = ["v*"]
"""
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CI = tabbify_jwt({"sub": "ci@acme", "network": "acme"})
VIEWER = tabbify_jwt({"sub": "viewer@acme", "network": "acme"})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, auth: AuthStandin) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("policy") / "data"
    data.mkdir()
    (data / "policy.toml").write_text(POLICY)
    s = Stack(data, auth.url).start()
    yield s
    s.stop()


def ref(stack: Stack, repo: str) -> str:
    return f"docker://{stack.host}/{repo}"


def small_manifest(stack: Stack, repo: str, h: dict[str, str]) -> bytes:
    """Push a config and a layer of a new small image; its manifest (not pushed)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(4).hex()})
    layer = b"layer " + os.urandom(64)
    push_blob(stack, repo, config.encode(), h)
    push_blob(stack, repo, layer, h)
    return image_manifest((sha256(config.encode()), len(config)), [(sha256(layer), len(layer))])


def put_manifest(
    stack: Stack, repo: str, tag: str, body: bytes, h: dict[str, str]
) -> requests.Response:
    return requests.put(
        f"{stack.url}/v2/{repo}/manifests/{tag}",
        data=body,
        headers={**h, "Content-Type": OCI_MANIFEST},
        timeout=10,
    )


def small_image(stack: Stack, repo: str, tag: str, h: dict[str, str]) -> requests.Response:
    """Push a config and a layer, then a manifest under `tag`; the manifest PUT's answer."""
    return put_manifest(stack, repo, tag, small_manifest(stack, repo, h), h)


def held_manifest_put(stack: Stack, repo: str, tag: str, body: bytes, h: dict[str, str]) -> Conn:
    """A manifest PUT stopped after its head, once the gateway's checks have run (the 100
    Continue it sends after them has come): the body waits for `conn.send(body)`."""
    conn = Conn(stack.port)
    conn.send(
        f"PUT /v2/{repo}/manifests/{tag} HTTP/1.1\r\nHost: {stack.host}\r\n"
        f"Authorization: {h['Authorization']}\r\nContent-Type: {OCI_MANIFEST}\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    interim = conn.read_answer("PUT")
    assert interim is not None and interim.status == 100, interim
    return conn


def test_a_shared_base_image_is_pulled_and_built_on_with_layers_mounted(
    stack: Stack, acme_jwt: str, globex_jwt: str, tmp_path: Path
) -> None:
    pushed = oci_layout(tmp_path / "base", "v1", layer_sizes=(200_000, 300_000))
    r = skopeo_copy(f"oci:{tmp_path / 'base'}:v1", ref(stack, "acme/base/img:v1"), acme_jwt)
    assert r.returncode == 0, r.stderr

    # globex pulls acme's base image as it is: every blob, byte for byte.
    r = skopeo_copy(ref(stack, "acme/base/img:v1"), f"oci:{tmp_path / 'pulled'}:v1", globex_jwt)
    assert r.returncode == 0, r.stderr
    assert layout_blobs(tmp_path / "pulled").keys() >= pushed["blobs"].keys()

    # …and pushes it into its own namespace: the layers are mounted, not uploaded again.
    before = len(stack.access_log())
    r = skopeo_copy(ref(stack, "acme/base/img:v1"), ref(stack, "globex/app:v1"), globex_jwt)
    assert r.returncode == 0, r.stderr
    new = stack.access_log()[before:]
    mine = [e for e in new if e["tenant"] == "globex" and e["repository"] == "globex/app"]
    mounts = [e for e in mine if e["method"] == "POST" and e["status"] == 201]
    assert len(mounts) == 2, mine  # the two layers (500 kB), by mount
    sent = sum(e["bytes_in"] for e in mine if e["method"] in ("PATCH", "PUT"))
    assert sent < 10_000  # the config and the manifest only
    r = skopeo("inspect", "--tls-verify=false", "--creds", f"x:{globex_jwt}", "--raw",
               ref(stack, "globex/app:v1"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == pushed["manifest"]

    # Read-only: globex cannot push to or delete in acme/base, nor read elsewhere in acme.
    g = bearer(token(stack, globex_jwt))
    denied = small_image_attempt(stack, "acme/base/img", g)
    assert denied.status_code == 403
    assert "no rule grants push" in denied.json()["errors"][0]["message"]
    r = requests.get(f"{stack.url}/v2/acme/private/manifests/v1", headers=g, timeout=10)
    assert r.status_code == 403
    # A digest acme holds elsewhere is not readable through the shared repository.
    a = bearer(token(stack, acme_jwt))
    secret = push_blob(stack, "acme/private", b"acme only " + os.urandom(8), a)
    r = requests.get(f"{stack.url}/v2/acme/base/img/blobs/{secret}", headers=g, timeout=10)
    assert r.status_code == 404
    # The access log names the rule behind each grant.
    rules = {e.get("rule") for e in stack.access_log() if e["tenant"] == "globex"}
    assert any(r and r.startswith("grant ") and r.endswith("policy.toml:2") for r in rules)
    assert "owner" in rules


def test_the_ci_identity_pushes_to_its_path_only(stack: Stack) -> None:
    ci = bearer(token(stack, CI))
    assert small_image(stack, "acme/ci/app", "1", ci).status_code == 201
    r = small_image_attempt(stack, "acme/app", ci)
    assert r.status_code == 403
    assert "denied by restrict" in r.json()["errors"][0]["message"]


def small_image_attempt(stack: Stack, repo: str, h: dict[str, str]) -> requests.Response:
    return requests.post(f"{stack.url}/v2/{repo}/blobs/uploads/", headers=h, timeout=10)


def test_the_viewer_pulls_and_never_pushes(stack: Stack, acme_jwt: str, tmp_path: Path) -> None:
    oci_layout(tmp_path / "src", "v1")
    assert (
        skopeo_copy(
            f"oci:{tmp_path / 'src'}:v1", ref(stack, "acme/team/app:v1"), acme_jwt
        ).returncode
        == 0
    )
    r = skopeo_copy(ref(stack, "acme/team/app:v1"), f"oci:{tmp_path / 'out'}:v1", VIEWER)
    assert r.returncode == 0, r.stderr
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", ref(stack, "acme/team/app:v2"), VIEWER)
    assert r.returncode != 0
    # What skopeo prints names the rule (clients print the error's message, not its detail).
    rule = f"restrict {stack.data_dir / 'policy.toml'}:12"
    assert f"push on acme/team/app denied by {rule}" in r.stderr, r.stderr


def test_a_client_without_login_is_told_where_and_how_to_log_in(stack: Stack) -> None:
    r = skopeo("inspect", "--tls-verify=false", "--raw", ref(stack, "acme/team/app:v1"))
    assert r.returncode != 0
    hint = f"log in to {stack.host} with a Tabbify JWT as the password (docker login {stack.host})"
    assert hint in r.stderr, r.stderr


def test_release_tags_are_immutable_after_their_first_push(stack: Stack, acme_jwt: str) -> None:
    a = bearer(token(stack, acme_jwt))
    first = small_image(stack, "acme/releases/app", "v1.0", a)
    assert first.status_code == 201, first.text
    again = small_image(stack, "acme/releases/app", "v1.0", a)
    assert again.status_code == 403
    assert "tag is immutable" in again.json()["errors"][0]["message"]
    digest = first.headers["Docker-Content-Digest"]
    r = requests.delete(
        f"{stack.url}/v2/acme/releases/app/manifests/{digest}", headers=a, timeout=10
    )
    assert r.status_code == 403 and "tag is immutable" in r.text
    r = requests.delete(f"{stack.url}/v2/acme/releases/app/manifests/v1.0", headers=a, timeout=10)
    assert r.status_code == 403
    # A covered tag that does not exist is not "immutable": there is nothing to delete.
    for repo in ("acme/releases/app", "acme/releases/none"):
        r = requests.delete(f"{stack.url}/v2/{repo}/manifests/v9.9", headers=a, timeout=10)
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # Tags the rule does not cover move freely.
    assert small_image(stack, "acme/releases/app", "latest", a).status_code == 201
    assert small_image(stack, "acme/releases/app", "latest", a).status_code == 201
    # The tag still names the first push.
    r = requests.head(f"{stack.url}/v2/acme/releases/app/manifests/v1.0",
                      headers={**a, "Accept": OCI_MANIFEST}, timeout=10)  # fmt: skip
    assert r.headers["Docker-Content-Digest"] == digest


def delete(stack: Stack, repo: str, what: str, digest: str, h: dict[str, str]) -> requests.Response:
    return requests.delete(f"{stack.url}/v2/{repo}/{what}/{digest}", headers=h, timeout=10)


def test_what_an_immutable_index_reaches_cannot_be_deleted(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    """An index under a covered tag: its child manifests and their blobs stay, whoever asks,
    so the tag keeps naming an image that pulls whole. Something it does not reach (another,
    untagged image of the same repository) is still deleted."""
    a, repo = bearer(token(stack, acme_jwt)), "acme/releases/multi"
    index = oci_index_layout(tmp_path / "src", "v1")
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", ref(stack, f"{repo}:v1"), acme_jwt, "--all")
    assert r.returncode == 0, r.stderr
    children = json.loads(index["blobs"][index["digest"]])["manifests"]
    for child in children:
        r = delete(stack, repo, "manifests", child["digest"], a)
        assert r.status_code == 403 and "tag is immutable" in r.text, (r.status_code, r.text)
    child = json.loads(index["blobs"][children[0]["digest"]])
    for blob in [child["config"], *child["layers"]]:
        r = delete(stack, repo, "blobs", blob["digest"], a)
        assert r.status_code == 403 and "tag is immutable" in r.text, (r.status_code, r.text)
    r = delete(stack, repo, "manifests", index["digest"], a)
    assert r.status_code == 403
    pulled = skopeo_copy(ref(stack, f"{repo}:v1"), f"oci:{tmp_path / 'out'}:v1", acme_jwt, "--all")
    assert pulled.returncode == 0, pulled.stderr
    # Control: an image no covered tag reaches goes.
    other = put_manifest(stack, repo, "scratch", small_manifest(stack, repo, a), a)
    assert other.status_code == 201, other.text
    r = delete(stack, repo, "manifests", other.headers["Docker-Content-Digest"], a)
    assert r.status_code == 202, r.text


def test_the_blobs_of_an_immutable_image_cannot_be_deleted_but_its_signature_can(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    a, repo = bearer(token(stack, acme_jwt)), "acme/releases/single"
    body = small_manifest(stack, repo, a)
    pushed = put_manifest(stack, repo, "v2", body, a)
    assert pushed.status_code == 201, pushed.text
    doc = json.loads(body)
    for blob in (doc["config"], doc["layers"][0]):
        r = delete(stack, repo, "blobs", blob["digest"], a)
        assert r.status_code == 403 and "tag is immutable" in r.text, (r.status_code, r.text)
    # A signature refers to the image (`subject`); the image does not need it.
    subject = {"mediaType": OCI_MANIFEST, "digest": sha256(body), "size": len(body)}
    sig = cosign.sign(cosign.Signer(), sha256(body), referrer_of=subject)
    for data in sig.blobs.values():
        push_blob(stack, repo, data, a)
    r = put_manifest(stack, repo, sig.digest, sig.manifest, a)
    assert r.status_code == 201, r.text
    assert delete(stack, repo, "manifests", sig.digest, a).status_code == 202
    # A blob of the repository that no covered tag reaches goes.
    loose = b"loose " + os.urandom(32)
    push_blob(stack, repo, loose, a)
    assert delete(stack, repo, "blobs", sha256(loose), a).status_code == 202
    r = skopeo_copy(ref(stack, f"{repo}:v2"), f"oci:{tmp_path / 'out'}:v2", acme_jwt)
    assert r.returncode == 0, r.stderr


def test_a_delete_the_backend_cannot_check_is_refused(stack: Stack, acme_jwt: str) -> None:
    """The backend is down: whether a covered tag reaches the digest cannot be read, so the
    delete is 503 (retry), never forwarded on a guess."""
    a, repo = bearer(token(stack, acme_jwt)), "acme/releases/down"
    body = small_manifest(stack, repo, a)
    assert put_manifest(stack, repo, "v1", body, a).status_code == 201
    layer = json.loads(body)["layers"][0]["digest"]
    stack.supervisorctl("stop", "backend")
    try:
        r = delete(stack, repo, "blobs", layer, a)
        assert r.status_code == 503 and r.json()["errors"][0]["code"] == "UNAVAILABLE", r.text
        r = delete(stack, repo, "manifests", sha256(body), a)
        assert r.status_code == 503, r.text
    finally:
        stack.supervisorctl("start", "backend")
    wait_for(lambda: requests.get(f"{stack.url}/v2/", headers=a, timeout=5).status_code == 200)
    assert delete(stack, repo, "blobs", layer, a).status_code == 403


OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def nested_indexes(stack: Stack, repo: str, levels: int, h: dict[str, str]) -> list[str]:
    """An image under `levels` indexes each naming the one below, all pushed by digest; the
    digests from the image up (the last is the top index, not yet tagged)."""
    body, media = small_manifest(stack, repo, h), OCI_MANIFEST
    digests = []
    for level in range(levels + 1):
        r = requests.put(
            f"{stack.url}/v2/{repo}/manifests/{sha256(body)}",
            data=body, headers={**h, "Content-Type": media}, timeout=10,
        )  # fmt: skip
        assert r.status_code == 201, (level, r.text)
        digests.append(sha256(body))
        child = {"mediaType": media, "digest": sha256(body), "size": len(body)}
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]})
        body, media = body.encode(), OCI_INDEX
    return digests


def test_nesting_past_the_bound_refuses_deletes_rather_than_guess(
    stack: Stack, acme_jwt: str
) -> None:
    """Eight levels of indexes under a covered tag are followed; nine are not: every delete
    by digest in that repository is then refused (403, naming the bound), never allowed."""
    a = bearer(token(stack, acme_jwt))
    for levels, repo in ((8, "acme/releases/deep8"), (9, "acme/releases/deep9")):
        chain = nested_indexes(stack, repo, levels, a)
        top = requests.get(
            f"{stack.url}/v2/{repo}/manifests/{chain[-1]}",
            headers={**a, "Accept": OCI_INDEX}, timeout=10,
        ).content  # fmt: skip
        r = requests.put(
            f"{stack.url}/v2/{repo}/manifests/v1",
            data=top, headers={**a, "Content-Type": OCI_INDEX}, timeout=10,
        )  # fmt: skip
        assert r.status_code == 201, r.text
        loose = put_manifest(stack, repo, "scratch", small_manifest(stack, repo, a), a)
        assert loose.status_code == 201, loose.text
        image = delete(stack, repo, "manifests", chain[0], a)
        assert image.status_code == 403 and "tag is immutable" in image.text, image.text
        other = delete(stack, repo, "manifests", loose.headers["Docker-Content-Digest"], a)
        if levels == 8:
            assert "nested" not in image.text
            assert other.status_code == 202, other.text
        else:
            assert "nested more than 8 deep" in image.text
            assert other.status_code == 403 and "nested more than 8 deep" in other.text


def test_two_first_pushes_of_an_immutable_tag_racing_store_only_one(
    stack: Stack, acme_jwt: str
) -> None:
    """The second push arrives while the first is between its check and its store."""
    a = bearer(token(stack, acme_jwt))
    body = small_manifest(stack, "acme/releases/race", a)
    first = held_manifest_put(stack, "acme/releases/race", "v2.0", body, a)
    try:
        second = small_image(stack, "acme/releases/race", "v2.0", a)
        assert second.status_code == 403, second.text
        assert "a push of this tag is in progress" in second.json()["errors"][0]["message"]
        assert first.send(body)
        stored = first.read_answer("PUT")
        assert stored is not None and stored.status == 201, stored
    finally:
        first.close()
    r = requests.head(f"{stack.url}/v2/acme/releases/race/manifests/v2.0",
                      headers={**a, "Accept": OCI_MANIFEST}, timeout=10)  # fmt: skip
    assert r.headers["Docker-Content-Digest"] == stored.header("docker-content-digest")
    third = small_image(stack, "acme/releases/race", "v2.0", a)
    assert third.status_code == 403 and "in progress" not in third.text  # stored: immutable


def test_a_pull_only_token_cannot_push_and_the_answer_lists_what_was_granted(
    stack: Stack, acme_jwt: str, globex_jwt: str
) -> None:
    r = requests.post(
        f"{stack.url}/auth/token",
        data={
            "grant_type": "password",
            "service": "tabbify-registry",
            "username": "x",
            "password": globex_jwt,
            "scope": "repository:acme/base/img:pull,push repository:globex/app:pull "
            "repository:acme/private:pull",
        },
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "repository:acme/base/img:pull repository:globex/app:pull"

    pull_only = bearer(token(stack, acme_jwt, "repository:acme/ci/app:pull"))
    r = small_image_attempt(stack, "acme/ci/app", pull_only)
    assert r.status_code == 403
    assert "token not issued for push" in r.json()["errors"][0]["message"]
    challenge = r.headers["WWW-Authenticate"]
    assert 'scope="repository:acme/ci/app:pull,push"' in challenge
    assert 'error="insufficient_scope"' in challenge
    r = requests.get(f"{stack.url}/v2/acme/ci/app/tags/list", headers=pull_only, timeout=10)
    assert r.status_code in (200, 404)  # allowed: the token was issued for pull
    bad = requests.get(
        f"{stack.url}/auth/token",
        params={"service": "tabbify-registry", "scope": "repository:acme/app:steal"},
        auth=("x", acme_jwt),
        timeout=10,
    )
    assert bad.status_code == 400


def test_the_catalog_lists_what_the_caller_may_pull(
    stack: Stack, globex_jwt: str, acme_jwt: str
) -> None:
    a, g = bearer(token(stack, acme_jwt)), bearer(token(stack, globex_jwt))
    assert small_image(stack, "acme/base/tools", "v1", a).status_code == 201
    assert small_image(stack, "acme/hidden", "v1", a).status_code == 201
    assert small_image(stack, "globex/own", "v1", g).status_code == 201
    r = requests.get(f"{stack.url}/v2/_catalog", headers=g, timeout=10)
    names = r.json()["repositories"]
    assert "acme/base/tools" in names and "globex/own" in names
    assert all(n.startswith(("globex/", "acme/base/")) for n in names), names
    assert names == sorted(names)


def test_policy_edits_apply_to_issued_tokens_and_bad_edits_keep_the_last_good(
    stack: Stack, acme_jwt: str, globex_jwt: str
) -> None:
    a, g = bearer(token(stack, acme_jwt)), bearer(token(stack, globex_jwt))
    assert small_image(stack, "acme/base/edit", "v1", a).status_code == 201
    url = f"{stack.url}/v2/acme/base/edit/manifests/v1"
    head = {**g, "Accept": OCI_MANIFEST}
    assert requests.head(url, headers=head, timeout=10).status_code == 200
    policy = stack.data_dir / "policy.toml"
    try:
        policy.write_text(POLICY + "\n[[grant\nbroken")  # a bad edit: the last good stays
        time.sleep(3)
        assert requests.head(url, headers=head, timeout=10).status_code == 200
        assert "keeping the last good policy" in stack.log.read_text()
        started = time.monotonic()
        policy.write_text(POLICY.replace('tenants = ["globex"]', 'tenants = ["initech"]'))
        wait_for(lambda: requests.head(url, headers=head, timeout=10).status_code == 403, 10)
        assert time.monotonic() - started < 5  # with the token issued before the edit
    finally:
        policy.write_text(POLICY)
    wait_for(lambda: requests.head(url, headers=head, timeout=10).status_code == 200, 10)
