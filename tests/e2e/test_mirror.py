"""Mirrors of upstream registries (REGISTRY_MIRRORS_FILE), end to end: a real upstream
(Distribution with a robot credential, images pushed by skopeo), the stack as users run it,
skopeo and podman pulling through `mirror/<name>/…`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import skopeo
from tests.support import images
from tests.support.stack import Stack, wait_for
from tests.support.standins.auth import AuthStandin, tabbify_jwt
from tests.support.standins.upstream import TOKEN, USER, HubFront, Upstream

pytestmark = pytest.mark.e2e


def push_upstream(upstream: Upstream, layout: Path, repo: str) -> None:
    r = skopeo(
        "copy", "--dest-tls-verify=false",
        f"oci:{layout}:v1", f"docker://127.0.0.1:{upstream.port}/{repo}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("mirror")
    upstream = Upstream(base / "upstream").start()
    hub = HubFront(upstream.port).start()
    tamperer = HubFront(upstream.port).start()
    layout = base / "layout"
    image = images.oci_layout(layout, "v1", (4096, 200_000))
    push_upstream(upstream, layout, "library/alpine:3.20")
    bad_layout = base / "bad-layout"
    bad_image = images.oci_layout(bad_layout, "v1", (5000,))
    push_upstream(upstream, bad_layout, "library/tampered:1")
    tamperer.bad.update(d for d in bad_image["blobs"] if d != bad_image["digest"])
    creds = base / "hub-credentials"
    creds.write_text(f"{USER}:{TOKEN}\n")
    creds.chmod(0o600)
    mirrors_file = base / "mirrors.toml"
    mirrors_file.write_text(
        f'[[mirror]]\nname = "docker.io"\nurl = "{hub.url}"\n'
        f'credentials_file = "{creds}"\ntag_ttl = "1m"\n\n'
        f'[[mirror]]\nname = "bad.example"\nurl = "{tamperer.url}"\n'
        f'credentials_file = "{creds}"\n'
    )
    auth = AuthStandin().start()
    stack = Stack(
        base / "data", auth.url, REGISTRY_MIRRORS_FILE=str(mirrors_file), REGISTRY_WORKERS="1"
    ).start()
    yield {
        "stack": stack, "upstream": upstream, "hub": hub, "image": image, "bad": bad_image,
        "jwt": tabbify_jwt({"sub": "user-1", "network": "acme"}), "base": base,
    }  # fmt: skip
    stack.stop()
    auth.stop()
    tamperer.stop()
    hub.stop()
    upstream.stop()


def pull(stack: Stack, jwt: str, ref: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return skopeo(
        "copy", "--src-tls-verify=false", "--src-creds", f"x:{jwt}",
        f"docker://{stack.host}/{ref}", f"oci:{dest}:v1", timeout=120,
    )  # fmt: skip


def podman_pull(jwt: str, reference: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="podman") as tmp:
        storage = ["--root", f"{tmp}/root", "--runroot", f"{tmp}/run", "--storage-driver=vfs"]
        return subprocess.run(
            ["podman", *storage, "pull", "--tls-verify=false", "--creds", f"x:{jwt}", reference],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip


def token(stack: Stack, jwt: str, scope: str) -> requests.Response:
    return requests.get(
        f"{stack.url}/auth/token",
        params={"service": "tabbify-registry", "scope": scope},
        auth=("x", jwt),
        timeout=10,
    )


def bearer(stack: Stack, jwt: str, repo: str, actions: str = "pull") -> dict[str, str]:
    r = token(stack, jwt, f"repository:{repo}:{actions}")
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_skopeo_and_podman_pull_through_the_mirror_and_cached_pulls_survive_the_upstream(
    world: dict, tmp_path: Path
) -> None:
    stack, upstream, image, jwt = world["stack"], world["upstream"], world["image"], world["jwt"]
    ref = "mirror/docker.io/library/alpine:3.20"
    r = pull(stack, jwt, ref, tmp_path / "first")
    assert r.returncode == 0, r.stderr
    assert images.layout_blobs(tmp_path / "first") == image["blobs"]
    r = podman_pull(jwt, f"{stack.host}/{ref}")
    assert r.returncode == 0, r.stderr
    # Within tag_ttl the tag is served from the cache: the upstream is not asked at all.
    asked = len(world["hub"].requests)
    r = pull(stack, jwt, ref, tmp_path / "second")
    assert r.returncode == 0, r.stderr
    assert world["hub"].requests[asked:] == []
    # Stored in the mirror's own store, not the tenants' backend.
    stored = world["base"] / "data" / "mirror" / "docker.io"
    layer = next(iter(d for d in image["blobs"] if d != image["digest"]))
    wait_for(lambda: any(stored.rglob(layer.removeprefix("sha256:"))), timeout=20)
    assert not any((world["base"] / "data" / "zot-cache").rglob(layer.removeprefix("sha256:")))
    upstream.stop()
    try:
        r = pull(stack, jwt, ref, tmp_path / "offline")
        assert r.returncode == 0, r.stderr
        assert images.layout_blobs(tmp_path / "offline") == image["blobs"]
        by_digest = f"mirror/docker.io/library/alpine@{image['digest']}"
        r = skopeo(
            "inspect", "--raw", "--tls-verify=false", "--creds", f"x:{jwt}",
            f"docker://{stack.host}/{by_digest}",
        )  # fmt: skip
        assert r.returncode == 0 and images.digest(r.stdout.encode()) == image["digest"]
    finally:
        upstream.start()


def test_an_upstream_that_hangs_gets_a_bounded_503(world: dict) -> None:
    stack, hub, jwt = world["stack"], world["hub"], world["jwt"]
    repo = "mirror/docker.io/library/never"
    h = bearer(stack, jwt, repo)
    hub.hang = True
    try:
        started = time.monotonic()
        r = requests.get(f"{stack.url}/v2/{repo}/manifests/1", headers=h, timeout=60)
        assert r.status_code == 503 and r.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert time.monotonic() - started < 30
        started = time.monotonic()
        r = requests.get(
            f"{stack.url}/v2/{repo}/manifests/sha256:{'c' * 64}", headers=h, timeout=60
        )
        assert r.status_code == 503 and time.monotonic() - started < 30
    finally:
        hub.hang = False


def test_a_tampered_upstream_blob_is_refused_and_never_stored(world: dict, tmp_path: Path):
    stack, bad, jwt = world["stack"], world["bad"], world["jwt"]
    r = pull(stack, jwt, "mirror/bad.example/library/tampered:1", tmp_path / "bad")
    assert r.returncode != 0
    layer = next(d for d in bad["blobs"] if d != bad["digest"] and len(bad["blobs"][d]) > 1000)
    h = bearer(stack, jwt, "mirror/bad.example/library/tampered")
    url = f"{stack.url}/v2/mirror/bad.example/library/tampered/blobs/{layer}"
    for _ in range(2):  # the first fetch and any later one: never the whole wrong body
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            _ = requests.get(url, headers=h, timeout=30).content
    time.sleep(2)  # Distribution commits what it fetched in the background
    stored = world["base"] / "data" / "mirror" / "bad.example"
    assert not list(stored.rglob(layer.removeprefix("sha256:") + "*"))
    log = stack.log.read_text()
    assert log.count("upstream content does not match its digest") >= 2
    assert "mirror/bad.example/library/tampered" in log


def test_nobody_pushes_or_deletes_under_mirror(world: dict, tmp_path: Path) -> None:
    stack, image, jwt = world["stack"], world["image"], world["jwt"]
    layout = tmp_path / "mine"
    images.oci_layout(layout, "v1", (1000,))
    r = skopeo(
        "copy", "--dest-tls-verify=false", "--dest-creds", f"x:{jwt}",
        f"oci:{layout}:v1", f"docker://{stack.host}/mirror/docker.io/library/alpine:evil",
    )  # fmt: skip
    assert r.returncode != 0
    # No token carries push or delete there, whatever is asked.
    r = token(stack, jwt, "repository:mirror/docker.io/library/alpine:pull,push,delete")
    assert r.json()["token"] and "push" not in json.dumps(r.json().get("scope", ""))
    h = bearer(stack, jwt, "mirror/docker.io/library/alpine")
    base = f"{stack.url}/v2/mirror/docker.io/library/alpine"
    for method, url in (
        ("DELETE", f"{base}/manifests/{image['digest']}"),
        ("PUT", f"{base}/manifests/evil"),
        ("POST", f"{base}/blobs/uploads/"),
    ):
        r = requests.request(method, url, headers=h, timeout=10)
        assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED", r.text
        assert "read-only" in r.json()["errors"][0]["message"]
    # A mirror this registry does not have: 404, not the backend's repository.
    r = requests.get(
        f"{stack.url}/v2/mirror/quay.io/x/manifests/v1",
        headers=bearer(stack, jwt, "mirror/quay.io/x"),
        timeout=10,
    )
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN"


def test_a_mount_from_the_mirror_into_a_tenant_is_a_plain_upload(world: dict) -> None:
    stack, image, jwt = world["stack"], world["image"], world["jwt"]
    layer = next(d for d in image["blobs"] if d != image["digest"])
    r = requests.post(
        f"{stack.url}/v2/acme/app/blobs/uploads/",
        params={"mount": layer, "from": "mirror/docker.io/library/alpine"},
        headers=bearer(stack, jwt, "acme/app", "pull,push"),
        timeout=10,
    )
    assert r.status_code == 202, r.text


def test_a_tenant_named_mirror_cannot_log_in(world: dict) -> None:
    stack = world["stack"]
    r = token(stack, tabbify_jwt({"sub": "x", "network": "mirror"}), "repository:mirror/x:push")
    assert r.status_code == 403 and "reserved" in r.json()["errors"][0]["message"]


def test_the_upstream_credential_never_reaches_a_log_or_a_command_line(world: dict) -> None:
    stack = world["stack"]
    assert TOKEN not in stack.log.read_text(errors="replace")
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if str(world["base"]).encode() in cmdline:  # the stack's processes
                assert TOKEN.encode() not in cmdline and TOKEN.encode() not in environ
    for config in (world["base"] / "data" / "run").glob("mirror-*.json"):
        assert config.stat().st_mode & 0o777 == 0o600


def test_a_bad_mirrors_file_stops_start_up_naming_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "mirrors.toml"
    bad.write_text('[[mirror]]\nname = "docker.io"\nurl = "ftp://example.com"\n')
    stack = Stack(tmp_path / "data", None, REGISTRY_MIRRORS_FILE=str(bad))
    stack.start(wait=False)
    assert stack.proc is not None
    assert stack.proc.wait(30) != 0
    out = stack.log.read_text()
    assert f"{bad}:3:" in out and len([ln for ln in out.splitlines() if ln.strip()]) == 1


def test_a_signature_rule_on_mirror_applies(world: dict) -> None:
    """[[require_signature]] covering mirror/**: an unsigned mirrored image is refused, by tag
    and by digest (the check reads the mirror, not the tenants' backend)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    stack, image, jwt = world["stack"], world["image"], world["jwt"]
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    policy = world["base"] / "data" / "policy.toml"
    policy.write_text(
        f'[[require_signature]]\nrepositories = ["mirror/**"]\nkeys = ["""{pem}"""]\n'
    )
    repo = "mirror/docker.io/library/alpine"
    accept = {"Accept": images.OCI_MANIFEST}
    try:
        h = {**bearer(stack, jwt, repo), **accept}

        def refused(ref: str) -> bool:
            r = requests.get(f"{stack.url}/v2/{repo}/manifests/{ref}", headers=h, timeout=30)
            return r.status_code == 403 and "not signed" in r.json()["errors"][0]["message"]

        wait_for(lambda: refused("3.20"), timeout=20)
        assert refused(image["digest"])
    finally:
        policy.unlink()
    wait_for(
        lambda: (
            requests.get(f"{stack.url}/v2/{repo}/manifests/3.20", headers=h, timeout=30).status_code
            == 200
        ),
        timeout=20,
    )


def test_podman_pulls_docker_io_names_through_the_mirror_by_registries_conf(
    world: dict, tmp_path: Path
) -> None:
    """docs/mirror.md's registries.conf: `docker.io/library/alpine` goes to the mirror (this
    machine has no route to Docker Hub: only the mirror can answer)."""
    stack, jwt = world["stack"], world["jwt"]
    conf = tmp_path / "registries.conf"
    conf.write_text(
        '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n'
        f'[[registry.mirror]]\nlocation = "{stack.host}/mirror/docker.io"\ninsecure = true\n'
    )
    # What `podman login <registry>` leaves: the login is the registry's, not Docker Hub's.
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    auth = tmp_path / "auth.json"
    login = base64.b64encode(f"x:{jwt}".encode()).decode()
    auth.write_text(json.dumps({"auths": {stack.host: {"auth": login}}}))
    with tempfile.TemporaryDirectory(prefix="podman") as tmp:
        storage = ["--root", f"{tmp}/root", "--runroot", f"{tmp}/run", "--storage-driver=vfs"]
        r = subprocess.run(
            ["podman", *storage, "pull", "docker.io/library/alpine:3.20"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf),
                 "REGISTRY_AUTH_FILE": str(auth)},
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pulled = [
        line for line in stack.access_log()
        if line["repository"] == "mirror/docker.io/library/alpine" and line["status"] == 200
        and line["time"] >= started
    ]  # fmt: skip
    assert pulled


def test_anonymous_mode_everyone_on_loopback_pulls_and_nobody_writes(
    world: dict, tmp_path: Path
) -> None:
    creds = tmp_path / "hub"
    creds.write_text(f"{USER}:{TOKEN}\n")
    mirrors_file = tmp_path / "mirrors.toml"
    mirrors_file.write_text(
        f'[[mirror]]\nname = "docker.io"\nurl = "{world["hub"].url}"\n'
        f'credentials_file = "{creds}"\n'
    )
    stack = Stack(tmp_path / "data", None, REGISTRY_MIRRORS_FILE=str(mirrors_file)).start()
    try:
        r = skopeo(
            "copy", "--src-tls-verify=false",
            f"docker://{stack.host}/mirror/docker.io/library/alpine:3.20", f"oci:{tmp_path}/o:v1",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert images.layout_blobs(tmp_path / "o") == world["image"]["blobs"]
        r = requests.post(f"{stack.url}/v2/mirror/docker.io/library/alpine/blobs/uploads/")
        assert r.status_code == 403 and "read-only" in r.json()["errors"][0]["message"]
        r = requests.delete(
            f"{stack.url}/v2/mirror/docker.io/library/alpine/manifests/{world['image']['digest']}"
        )
        assert r.status_code == 403
    finally:
        stack.stop()


def test_docker_pulls_the_mirror_namespace(world: dict) -> None:
    """docs/mirror.md's Docker recipe: log in to the registry, pull mirror/docker.io/…"""
    from tests.e2e.test_docker import DOCKER, DOCKERD, Dockerd

    if not Path(DOCKERD).is_file() or not Path(DOCKER).is_file():
        pytest.fail("docker.io is not installed: scripts/setup.sh --test installs it")
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root here (it is started without rootless mode)")
    stack, jwt = world["stack"], world["jwt"]
    root = Path(tempfile.mkdtemp(prefix="tbf-dockerd-"))
    daemon = Dockerd(root, stack.host)
    try:
        why = daemon.start()
        if why:
            pytest.skip(why)
        r = daemon.docker("login", stack.host, "-u", "x", "--password-stdin", stdin=jwt)
        assert r.returncode == 0, r.stderr
        r = daemon.docker("pull", f"{stack.host}/mirror/docker.io/library/alpine:3.20")
        assert r.returncode == 0, r.stdout + r.stderr
        assert world["image"]["digest"] in r.stdout
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_blob_is_read_from_a_mirror_only_once_a_served_manifest_names_it(
    world: dict, tmp_path: Path
) -> None:
    """With Zot the mirror shares the tenants' storage and its dedupe: a digest named under
    mirror/ must come from a manifest served from that repository, never be taken on trust
    (here a layer of an upstream image whose manifest nobody pulled, and a tenant's blob)."""
    stack, jwt = world["stack"], world["jwt"]
    layout = tmp_path / "fresh"
    fresh = images.oci_layout(layout, "v1", (3000,))
    push_upstream(world["upstream"], layout, "library/fresh:1")
    layer = next(
        d for d in fresh["blobs"] if d != fresh["digest"] and len(fresh["blobs"][d]) > 1000
    )
    repo = "mirror/docker.io/library/fresh"
    h = bearer(stack, jwt, repo)
    r = requests.get(f"{stack.url}/v2/{repo}/blobs/{layer}", headers=h, timeout=30)
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    r = requests.get(
        f"{stack.url}/v2/{repo}/manifests/1",
        headers={**h, "Accept": images.OCI_MANIFEST},
        timeout=30,
    )
    assert r.status_code == 200
    r = requests.get(f"{stack.url}/v2/{repo}/blobs/{layer}", headers=h, timeout=30)
    assert r.status_code == 200 and r.content == fresh["blobs"][layer]
