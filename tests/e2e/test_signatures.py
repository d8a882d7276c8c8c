"""`[[require_signature]]` end to end (contract §8): cosign signatures made with keys the
test generates (tests/support/cosign.py, cosign's formats), pushed as cosign pushes them (raw HTTP),
images pushed and pulled with skopeo, through two gateway workers (a signature pushed through
one worker must be seen by the other at once)."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from addons.decisions import signatures
from tests.conftest import skopeo_copy
from tests.e2e.test_gateway import bearer, push_blob, token
from tests.support import cosign, images
from tests.support.images import oci_index_layout, oci_layout
from tests.support.inproc import InProcessGateway
from tests.support.stack import Stack, wait_for
from tests.support.standins.auth import AuthStandin

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


# --- what is exempt is decided on bytes, not labels ----------------------------------------------


def podman_pull(jwt: str, reference: str) -> subprocess.CompletedProcess[str]:
    """`podman pull` into a fresh storage of its own (vfs: no kernel features needed; in a
    short path: podman refuses a run directory of 50 characters or more)."""
    with tempfile.TemporaryDirectory(prefix="podman") as tmp:
        storage = ["--root", f"{tmp}/root", "--runroot", f"{tmp}/run", "--storage-driver=vfs"]
        return subprocess.run(
            ["podman", *storage, "pull", "--tls-verify=false", "--creds", f"x:{jwt}", reference],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip


def push_manifest(stack: Stack, h: dict, repo: str, tag: str, manifest: dict) -> str:
    body = json.dumps(manifest).encode()
    r = requests.put(
        f"{stack.url}/v2/{repo}/manifests/{tag}",
        data=body,
        headers={**h, "Content-Type": manifest["mediaType"]},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return images.digest(body)


def labelled_image(
    stack: Stack, h: dict, repo: str, tag: str, layer_type: str, polyglot: bool = False
) -> str:
    """A runnable image (OCI config, a tar+gzip filesystem layer) whose layer is labelled
    `layer_type`: containers/image unpacks a layer whatever its label says. `polyglot`: the
    layer is a valid cosign payload that is also a tar archive (tests/support/cosign.py)."""
    gz, raw = images.layer({"hello.txt": b"unsigned and runnable\n"})
    if polyglot:
        gz = raw = cosign.tar_polyglot(images.digest(tag.encode()))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/hello.txt"]},
            "rootfs": {"type": "layers", "diff_ids": [images.digest(raw)]},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": cosign.OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": push_blob(stack, repo, config, h),
            "size": len(config),
        },
        "layers": [
            {"mediaType": layer_type, "digest": push_blob(stack, repo, gz, h), "size": len(gz)}
        ],
    }
    return push_manifest(stack, h, repo, tag, manifest)


@pytest.mark.parametrize(
    ("layer_type", "polyglot"),
    [
        (cosign.SIMPLESIGNING, False),
        ("application/vnd.dsse.envelope.v1+json", False),
        ("text/spdx", False),
        (cosign.SIMPLESIGNING, True),  # a valid signature payload, and a tar podman unpacks
    ],
)
def test_a_runnable_image_labelled_as_a_signature_is_not_pulled(
    stack: Stack, acme_jwt: str, layer_type: str, polyglot: bool
) -> None:
    h = bearer(token(stack, acme_jwt))
    repo = f"acme/signed/labelled{'-polyglot' if polyglot else ''}"
    image = labelled_image(stack, h, repo, "v1", layer_type, polyglot)
    # Even under its own signature tag, where cosign would look for a signature.
    sig_tag = signatures.signature_tag(images.digest(b"some image" + layer_type.encode()))
    labelled_image(stack, h, repo, sig_tag, layer_type, polyglot)
    for ref in ("v1", sig_tag, image):
        at = f"{stack.host}/{repo}{'@' if ref == image else ':'}{ref}"
        pulled = podman_pull(acme_jwt, at)
        assert pulled.returncode != 0, f"podman pulled {at}: {pulled.stdout}"
        assert "not signed by a trusted key" in pulled.stderr, pulled.stderr
        assert denied(get(stack, h, repo, ref)) and denied(get(stack, h, repo, ref, "HEAD"))


# --- the gateway serves what it checked, never a name resolved again -----------------------------


def image_manifest_on_backend(stack: Stack, repo: str, tmp: Path, tag: str) -> tuple[str, bytes]:
    """An unsigned image written straight to the backend (as another node would)."""
    image = oci_layout(tmp / tag, tag, layer_sizes=(1024,))
    for d, data in image["blobs"].items():
        if d == image["digest"]:
            continue
        r = requests.post(
            f"{stack.backend_url}/v2/{repo}/blobs/uploads/", auth=stack.backend_auth, timeout=10
        )
        assert r.status_code == 202, r.text
        location = r.headers["Location"]
        if location.startswith("/"):
            location = stack.backend_url + location
        sep = "&" if "?" in location else "?"
        r = requests.put(
            f"{location}{sep}digest={d}", data=data, auth=stack.backend_auth, timeout=10
        )
        assert r.status_code == 201, r.text
    return image["digest"], image["blobs"][image["digest"]]


def put_on_backend(stack: Stack, repo: str, ref: str, body: bytes) -> None:
    r = requests.put(
        f"{stack.backend_url}/v2/{repo}/manifests/{ref}",
        data=body,
        headers={"Content-Type": cosign.OCI_MANIFEST},
        auth=stack.backend_auth,
        timeout=10,
    )
    assert r.status_code == 201, r.text


@pytest.fixture
def held(stack: Stack, tmp_path: Path) -> Iterator[tuple[InProcessGateway, list]]:
    """An in-process gateway in front of the stack's backend, whose signature check runs the
    callables in `after_check` once it has decided and before the request goes on."""
    extra = (
        f"registry_backend={stack.backend_url}",
        f"registry_policy_file={stack.data_dir / 'policy.toml'}",
        f"registry_backend_credential={stack.backend_credential_file}",  # the run's
    )
    after_check: list = []
    with InProcessGateway(stack.backend_url, ledger=tmp_path / "ledger.db", extra=extra) as gw:
        addon = gw.addon("signedonly")
        decide = addon.decide

        def decide_then_act(*args):
            verdict = decide(*args)
            while after_check:
                after_check.pop(0)()
            return verdict

        addon.decide = decide_then_act
        yield gw, after_check


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_tag_pushed_between_the_check_and_the_fetch_is_not_served(
    stack: Stack, held, tmp_path: Path, method: str
) -> None:
    gw, after_check = held
    repo = f"acme/signed/race-{method.lower()}"
    _, body = image_manifest_on_backend(stack, repo, tmp_path, "late")
    after_check.append(lambda: put_on_backend(stack, repo, "late", body))
    h = {"Authorization": f"Bearer {gw.token('acme')}", "Accept": ACCEPT}
    r = requests.request(method, f"{gw.url}/v2/{repo}/manifests/late", headers=h, timeout=20)
    assert r.status_code == 404, (r.status_code, r.headers)
    if method == "GET":
        assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # The tag exists now: asked again, it is checked, and refused.
    r = requests.request(method, f"{gw.url}/v2/{repo}/manifests/late", headers=h, timeout=20)
    assert r.status_code == 403


def test_a_tag_moved_after_the_check_serves_what_was_checked(
    stack: Stack, held, acme_jwt: str, tmp_path: Path
) -> None:
    gw, after_check = held
    repo = "acme/signed/race-moved"
    signed, signed_body = image_manifest_on_backend(stack, repo, tmp_path, "signed")
    put_on_backend(stack, repo, "v1", signed_body)
    sig = cosign.sign(SIGNER, signed)
    h = bearer(token(stack, acme_jwt))
    push_signature(stack, h, repo, signed, sig)
    unsigned, unsigned_body = image_manifest_on_backend(stack, repo, tmp_path, "unsigned")
    after_check.append(lambda: put_on_backend(stack, repo, "v1", unsigned_body))
    h = {"Authorization": f"Bearer {gw.token('acme')}", "Accept": ACCEPT}
    r = requests.get(f"{gw.url}/v2/{repo}/manifests/v1", headers=h, timeout=20)
    assert r.status_code == 200 and r.content == signed_body
    assert r.headers["docker-content-digest"] == signed != unsigned


def test_an_answer_naming_another_digest_than_the_checked_one_is_cut_off(
    tmp_path: Path,
) -> None:
    """Held to content addressing: a backend that answers a checked digest with another
    manifest (here a scripted one) gets nothing through."""
    sig = cosign.sign(SIGNER, images.digest(b"an image"))  # exempt: readable unsigned
    served = {"digest": sig.digest}

    class Lying(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            blob = path.rsplit("/blobs/", 1)[-1] if "/blobs/" in path else None
            body = sig.blobs.get(blob, b"") if blob else sig.manifest
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", cosign.OCI_MANIFEST)
            self.send_header("Docker-Content-Digest", served["digest"])
            self.end_headers()
            self.wfile.write(body)

    backend = ThreadingHTTPServer(("127.0.0.1", 0), Lying)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{backend.server_address[1]}"
    (tmp_path / "cosign.pub").write_text(SIGNER.public_pem)
    (tmp_path / "policy.toml").write_text(POLICY)
    extra = (f"registry_backend={url}", f"registry_policy_file={tmp_path / 'policy.toml'}")
    try:
        with InProcessGateway(url, ledger=tmp_path / "ledger.db", extra=extra) as gw:
            h = {"Authorization": f"Bearer {gw.token('acme')}", "Accept": ACCEPT}
            manifest = f"{gw.url}/v2/acme/signed/lying/manifests/v1"
            r = requests.get(manifest, headers=h, timeout=10)
            assert r.status_code == 200 and r.content == sig.manifest  # honest: served
            served["digest"] = images.digest(b"something else")
            with pytest.raises(requests.ConnectionError):  # no status line, nothing
                requests.get(manifest, headers=h, timeout=10)
    finally:
        backend.shutdown()


def test_what_stays_readable_unsigned_cannot_be_run(stack: Stack, acme_jwt: str) -> None:
    """The other half of the rule: the gateway serves a cosign signature and an attestation
    unsigned (cosign reads them), and podman, which would unpack any layer of a manifest with
    an image config, cannot make an image of them (their bytes are no archive)."""
    h = bearer(token(stack, acme_jwt))
    repo = "acme/signed/attachments"
    subject, other = images.digest(b"an image"), images.digest(b"another image")
    envelope = cosign.go_json({"payloadType": "application/vnd.in-toto+json", "payload": "e30=",
                               "signatures": [{"sig": "MEUCIQ==", "pad": " " * 600}]})  # fmt: skip
    layer = {"mediaType": "application/vnd.dsse.envelope.v1+json", "size": len(envelope),
             "digest": images.digest(envelope)}  # fmt: skip
    attestation = json.loads(cosign.sign(SIGNER, other).manifest) | {"layers": [layer]}
    attached = cosign.Signature(
        cosign.go_json(attestation),
        {**cosign.sign(SIGNER, other).blobs, layer["digest"]: envelope},
        cosign.OCI_MANIFEST,
    )
    for digest_, sig in ((subject, cosign.sign(SIGNER, subject)), (other, attached)):
        push_signature(stack, h, repo, digest_, sig)
        tag = signatures.signature_tag(digest_)
        assert get(stack, h, repo, tag).status_code == 200  # cosign reads it
        pulled = podman_pull(acme_jwt, f"{stack.host}/{repo}:{tag}")
        assert pulled.returncode != 0
        assert "ApplyLayer" in pulled.stderr and "not signed" not in pulled.stderr, pulled.stderr


def test_without_a_backend_to_check_with_nothing_covered_is_served(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    """A gateway whose signature check has no backend address answers 503, never the
    manifest unchecked."""
    repo = "acme/signed/nobackend"
    push_image(stack, acme_jwt, tmp_path, repo, "v1")
    extra = (f"registry_policy_file={stack.data_dir / 'policy.toml'}",)
    with InProcessGateway(stack.backend_url, ledger=tmp_path / "ledger.db", extra=extra) as gw:
        h = {"Authorization": f"Bearer {gw.token('acme')}", "Accept": ACCEPT}
        for method in ("GET", "HEAD"):
            r = requests.request(method, f"{gw.url}/v2/{repo}/manifests/v1", headers=h, timeout=10)
            assert r.status_code == 503, r.status_code
