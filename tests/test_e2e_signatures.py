"""`[[require_signature]]` end to end (CONTRACTS §8): cosign signatures made with keys the
test generates (tests/cosign.py, cosign's formats), pushed as cosign pushes them (raw HTTP),
images pushed and pulled with skopeo, through two gateway workers (a signature pushed through
one worker must be seen by the other at once)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from addons import signatures
from tests import cosign
from tests.conftest import skopeo_copy
from tests.images import oci_index_layout, oci_layout
from tests.stack import Stack, wait_for
from tests.standins.auth import AuthStandin
from tests.test_e2e_gateway import bearer, push_blob, token

pytestmark = pytest.mark.e2e
SIGNER = cosign.Signer()
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
POLICY = """
[[require_signature]]
repositories = ["acme/signed/**"]
keys = ["cosign.pub"]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, auth: AuthStandin) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("signed") / "data"
    data.mkdir()
    (data / "cosign.pub").write_text(SIGNER.public_pem)
    (data / "policy.toml").write_text(POLICY)
    s = Stack(data, auth.url, REGISTRY_WORKERS="2").start()
    yield s
    s.stop()


def push_image(stack: Stack, jwt: str, tmp: Path, repo: str, tag: str) -> dict:
    image = oci_layout(tmp / f"{tag}-src", tag, layer_sizes=(2048,))
    r = skopeo_copy(f"oci:{tmp / f'{tag}-src'}:{tag}", f"docker://{stack.host}/{repo}:{tag}", jwt)
    assert r.returncode == 0, r.stderr
    return image


def push_signature(stack: Stack, h: dict, repo: str, subject: str, sig: cosign.Signature) -> None:
    for data in sig.blobs.values():
        push_blob(stack, repo, data, h)
    r = requests.put(
        f"{stack.url}/v2/{repo}/manifests/{signatures.signature_tag(subject)}",
        data=sig.manifest,
        headers={**h, "Content-Type": sig.media_type},
        timeout=10,
    )
    assert r.status_code == 201, r.text


def get(stack: Stack, h: dict, repo: str, ref: str, method: str = "GET") -> requests.Response:
    # A new connection each time: the kernel spreads them over both workers.
    return requests.request(
        method,
        f"{stack.url}/v2/{repo}/manifests/{ref}",
        headers={**h, "Accept": ACCEPT, "Connection": "close"},
        timeout=10,
    )


def denied(r: requests.Response) -> bool:
    if r.status_code != 403:
        return False
    return r.request.method == "HEAD" or "not signed by a trusted key" in r.text


def test_unsigned_is_refused_and_a_signature_opens_it_on_every_worker(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    h = bearer(token(stack, acme_jwt))
    repo = "acme/signed/app"
    image = push_image(stack, acme_jwt, tmp_path, repo, "v1")
    for _ in range(6):  # by tag and by digest, GET and HEAD, on both workers
        assert denied(get(stack, h, repo, "v1"))
        assert denied(get(stack, h, repo, image["digest"], "HEAD"))
    pulled = skopeo_copy(f"docker://{stack.host}/{repo}:v1", f"dir:{tmp_path / 'no'}", acme_jwt)
    assert pulled.returncode != 0 and "not signed by a trusted key" in pulled.stderr

    push_signature(stack, h, repo, image["digest"], cosign.sign(SIGNER, image["digest"]))
    for _ in range(6):  # no worker keeps its cached "not signed"
        r = get(stack, h, repo, "v1")
        assert r.status_code == 200 and r.headers["docker-content-digest"] == image["digest"]
        assert get(stack, h, repo, image["digest"], "HEAD").status_code == 200
    pulled = skopeo_copy(f"docker://{stack.host}/{repo}:v1", f"dir:{tmp_path / 'ok'}", acme_jwt)
    assert pulled.returncode == 0, pulled.stderr
    # The signature itself stays readable (cosign verify reads it).
    sig = get(stack, h, repo, signatures.signature_tag(image["digest"]))
    assert sig.status_code == 200
    # The access log names the refusal.
    decisions = {e["decision"] for e in stack.access_log() if e["repository"] == repo}
    assert "deny:not signed" in decisions


@pytest.mark.parametrize("forgery", ["tampered", "wrong-key", "other-digest"])
def test_forged_signatures_are_refused(
    stack: Stack, acme_jwt: str, tmp_path: Path, forgery: str
) -> None:
    h = bearer(token(stack, acme_jwt))
    repo = f"acme/signed/{forgery}"
    image = push_image(stack, acme_jwt, tmp_path, repo, "v1")
    if forgery == "tampered":  # signed payload, then one byte of the claim changed
        payload = cosign.payload(image["digest"])
        signature = SIGNER.sign(payload)
        forged = payload.replace(b"cosign container", b"cosign Container")
        sig = cosign.signature_manifest([(forged, cosign.layer(forged, signature))])
    elif forgery == "wrong-key":
        sig = cosign.sign(cosign.Signer(), image["digest"])
    else:  # a valid signature, of another image, placed under this image's tag
        other = push_image(stack, acme_jwt, tmp_path, repo, "other")
        sig = cosign.sign(SIGNER, other["digest"])
    push_signature(stack, h, repo, image["digest"], sig)
    r = get(stack, h, repo, "v1")
    assert denied(r), r.text
    reason = r.json()["errors"][0]["detail"]
    expected = {
        "tampered": "not signed by a trusted key",
        "wrong-key": "not signed by a trusted key",
        "other-digest": "signature is for another digest",
    }[forgery]
    assert expected in reason


def test_a_multi_arch_index_is_pulled_when_its_digest_is_signed(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    h = bearer(token(stack, acme_jwt))
    repo = "acme/signed/multi"
    index = oci_index_layout(tmp_path / "src", "v1")
    dest = f"docker://{stack.host}/{repo}:v1"
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", dest, acme_jwt, "--all")
    assert r.returncode == 0, r.stderr
    children = [m["digest"] for m in json.loads(index["blobs"][index["digest"]])["manifests"]]
    assert denied(get(stack, h, repo, "v1"))
    assert all(denied(get(stack, h, repo, c)) for c in children)

    push_signature(stack, h, repo, index["digest"], cosign.sign(SIGNER, index["digest"]))
    pulled = skopeo_copy(dest, f"oci:{tmp_path / 'out'}:v1", acme_jwt, "--all")
    assert pulled.returncode == 0, pulled.stderr
    # A child asked for on its own, on either worker, is served as part of the signed index.
    for _ in range(4):
        assert all(get(stack, h, repo, c).status_code == 200 for c in children)


def test_a_policy_edit_adding_the_rule_takes_effect(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    h = bearer(token(stack, acme_jwt))
    repo = "acme/later/app"
    push_image(stack, acme_jwt, tmp_path, repo, "v1")
    assert get(stack, h, repo, "v1").status_code == 200
    policy = stack.data_dir / "policy.toml"
    policy.write_text(POLICY + POLICY.replace("acme/signed/**", "acme/later/**"))
    started = time.monotonic()
    wait_for(lambda: all(denied(get(stack, h, repo, "v1")) for _ in range(4)), timeout=10)
    assert time.monotonic() - started < 6
    policy.write_text(POLICY)
    wait_for(lambda: all(get(stack, h, repo, "v1").status_code == 200 for _ in range(4)))


def test_fails_closed_when_the_backend_cannot_answer(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    h = bearer(token(stack, acme_jwt))
    repo = "acme/signed/down"
    push_image(stack, acme_jwt, tmp_path, repo, "v1")
    assert "stopped" in stack.supervisorctl("stop", "backend")
    try:
        r = get(stack, h, repo, "v1")
        assert r.status_code == 503 and r.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert "cannot check signatures now" in r.json()["errors"][0]["message"]
    finally:
        assert "started" in stack.supervisorctl("start", "backend")
    wait_for(lambda: denied(get(stack, h, repo, "v1")))
