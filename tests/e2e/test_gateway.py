"""The whole stack (`tabbify-registry run`, Distribution backend, the gateway) with real clients."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import socket
import struct
import time
from pathlib import Path

import jwt
import pytest
import requests

from tests.conftest import skopeo, skopeo_copy, skopeo_round_trip
from tests.support.images import layout_blobs, oci_index_layout, oci_layout
from tests.support.stack import Stack, wait_for

pytestmark = pytest.mark.e2e


def token(stack: Stack, credential: str, scope: str = "") -> str:
    params = {"service": "tabbify-registry", **({"scope": scope} if scope else {})}
    r = requests.get(f"{stack.url}/auth/token", params=params, auth=("x", credential), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(stack: Stack, repo: str, blob: bytes, headers: dict[str, str]) -> str:
    """POST then PUT, as every client does; returns the digest."""
    digest = sha256(blob)
    r = requests.post(f"{stack.url}/v2/{repo}/blobs/uploads/", headers=headers, timeout=10)
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    assert location.startswith(f"/v2/{repo}/blobs/uploads/")  # relative: no backend address
    r = requests.put(
        stack.url + location,
        params={"digest": digest},
        data=blob,
        headers={**headers, "Content-Type": "application/octet-stream"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    return digest


def test_skopeo_oci_image_round_trips_byte_identical(registry, acme_jwt, tmp_path):
    pushed = oci_layout(tmp_path / "src", "v1")
    pulled = skopeo_round_trip(tmp_path, f"docker://{registry.host}/acme/demo:v1", acme_jwt)
    assert pulled[pushed["digest"]] == pushed["blobs"][pushed["digest"]]  # manifest bytes
    assert pulled == pushed["blobs"]


def test_skopeo_docker_image_round_trips(registry, acme_jwt, tmp_path):
    pushed = oci_layout(tmp_path / "src", "v1")
    ref = f"docker://{registry.host}/acme/dockerish:v2"
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", ref, acme_jwt, "--format", "v2s2")
    assert r.returncode == 0, r.stderr
    r = skopeo("inspect", "--raw", "--tls-verify=false", "--creds", f"x:{acme_jwt}", ref)
    manifest = json.loads(r.stdout)
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    r = skopeo_copy(ref, f"dir:{tmp_path / 'out'}", acme_jwt)
    assert r.returncode == 0, r.stderr
    for entry in manifest["layers"]:
        pulled = (tmp_path / "out" / entry["digest"].removeprefix("sha256:")).read_bytes()
        assert pulled == pushed["blobs"][entry["digest"]]


def test_nothing_under_another_tenant_can_be_touched(registry, acme_jwt, globex_jwt, tmp_path):
    oci_layout(tmp_path / "src", "v1")
    src = f"oci:{tmp_path / 'src'}:v1"
    r = skopeo_copy(src, f"docker://{registry.host}/acme/private:v1", acme_jwt)
    assert r.returncode == 0, r.stderr
    # globex can neither read acme's image nor write into acme's namespace.
    r = skopeo(
        "inspect",
        "--tls-verify=false",
        "--creds",
        f"x:{globex_jwt}",
        f"docker://{registry.host}/acme/private:v1",
    )
    assert r.returncode != 0
    r = skopeo_copy(src, f"docker://{registry.host}/acme/private:v2", globex_jwt)
    assert r.returncode != 0
    # acme cannot write under globex/ either.
    r = skopeo_copy(src, f"docker://{registry.host}/globex/stolen:v1", acme_jwt)
    assert r.returncode != 0
    t = token(registry, globex_jwt)
    for method, path in [
        ("GET", "/v2/acme/private/manifests/v1"),
        ("HEAD", "/v2/acme/private/manifests/v1"),
        ("GET", "/v2/acme/private/tags/list"),
        ("POST", "/v2/acme/private/blobs/uploads/"),
        ("DELETE", "/v2/acme/private/manifests/v1"),
        ("GET", "/v2/_zot/ext/search?query={}"),
        ("GET", "/v2/globex/../acme/private/manifests/v1"),
        ("GET", "/v2/globex%2f..%2facme/private/manifests/v1"),
    ]:
        r = requests.request(method, registry.url + path, headers=bearer(t), timeout=10)
        # An escaped path is malformed (400) before it is anybody's namespace (403).
        assert r.status_code == (400 if "%" in path else 403), (method, path, r.status_code)
        if method != "HEAD":
            code = "DENIED" if r.status_code == 403 else "UNSUPPORTED"
            assert r.json()["errors"][0]["code"] == code
    # globex's catalog has none of acme's names.
    r = requests.get(f"{registry.url}/v2/_catalog", headers=bearer(t), timeout=10)
    assert r.status_code == 200
    assert not [n for n in r.json()["repositories"] if not n.startswith("globex/")]
    # Nothing of globex's landed anywhere.
    r = registry.backend_get("/v2/_catalog", timeout=10)
    assert not [name for name in r.json()["repositories"] if name.startswith("globex/")]


class WasmOras:
    """oras-py pushing a WASM component as an OCI artifact with its artifactType."""

    ARTIFACT_TYPE = "application/vnd.tabbify.wasm.component.v1"

    @staticmethod
    def client(host: str, credential: str, config_dir: Path):
        """Credentials go to `config_dir`, never to the user's own ~/.docker/config.json."""
        import oras.client

        class Client(oras.client.OrasClient):
            def upload_manifest(self, manifest, container):  # type: ignore[override]
                manifest["artifactType"] = WasmOras.ARTIFACT_TYPE
                manifest["config"]["mediaType"] = "application/vnd.oci.empty.v1+json"
                return super().upload_manifest(manifest, container)

        c = Client(hostname=host, insecure=True)
        config = config_dir / "docker-config.json"
        config.write_text('{"auths": {}}')
        c.login(username="x", password=credential, hostname=host, config_path=str(config))
        return c


def test_oras_pushes_and_pulls_a_wasm_component(registry, acme_jwt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    component = tmp_path / "hello.wasm"
    component.write_bytes(b"\0asm\x0d\x00\x01\x00" + bytes(range(256)) * 40)
    c = WasmOras.client(registry.host, acme_jwt, tmp_path)
    target = f"{registry.host}/acme/components/hello:v1"
    r = c.push(target=target, files=["hello.wasm:application/wasm"], disable_path_validation=True)
    assert r.status_code == 201
    manifest = c.get_manifest(target)
    assert manifest["artifactType"] == WasmOras.ARTIFACT_TYPE
    assert manifest["layers"][0]["mediaType"] == "application/wasm"
    out = tmp_path / "out"
    files = c.pull(target=target, outdir=str(out))
    assert Path(files[0]).read_bytes() == component.read_bytes()


def test_post_token_client_gets_scoped_token(registry, acme_jwt, tmp_path):
    form = {
        "grant_type": "password",
        "client_id": "containerd-client",
        "username": "x",
        "password": acme_jwt,
        "service": "tabbify-registry",
        "scope": "repository:acme/posted:pull,push repository:globex/x:pull",
    }
    r = requests.post(f"{registry.url}/auth/token", data=form, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scope"] == "repository:acme/posted:pull,push"
    assert body["expires_in"] == 300 and "refresh_token" not in body
    assert body["token"] == body["access_token"]
    blob = b"posted blob"
    h = bearer(body["token"])
    digest = push_blob(registry, "acme/posted", blob, h)
    r = requests.get(f"{registry.url}/v2/acme/posted/blobs/{digest}", headers=h, timeout=10)
    assert r.content == blob


def test_cross_tenant_mount_degrades_to_plain_upload(registry, acme_jwt, globex_jwt):
    g = bearer(token(registry, globex_jwt))
    digest = push_blob(registry, "globex/secret", b"globex secret layer", g)
    a = bearer(token(registry, acme_jwt))
    for how in ("query", "form"):
        params = {"mount": digest, "from": "globex/secret"}
        kwargs = {"params": params} if how == "query" else {"data": params}
        r = requests.post(
            f"{registry.url}/v2/acme/thief/blobs/uploads/", headers=a, timeout=10, **kwargs
        )
        assert r.status_code == 202, (how, r.status_code, r.text)  # upload started, no mount
    r = requests.head(f"{registry.url}/v2/acme/thief/blobs/{digest}", headers=a, timeout=10)
    assert r.status_code == 404


def test_forged_tokens_are_refused(registry, acme_jwt):
    now = time.time()
    claims = {
        "iss": "tabbify-registry",
        "aud": "tabbify-registry",
        "sub": "acme",
        "iat": int(now),
        "exp": int(now) + 300,
    }
    unsigned = (
        base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        + "."
        + base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        + "."
    )
    forged = jwt.encode(claims, "guessed-secret-of-at-least-32-bytes!!", algorithm="HS256")
    expired = jwt.encode(
        {**claims, "exp": int(now) - 10}, "guessed-secret-of-at-least-32-bytes!!", algorithm="HS256"
    )
    basic = "Basic " + base64.b64encode(f"x:{acme_jwt}".encode()).decode()
    for header in (
        f"Bearer {unsigned}",
        f"Bearer {forged}",
        f"Bearer {expired}",
        f"Bearer {acme_jwt}",
        basic,
        "Bearer ",
        "Bearer a.b.c",
    ):
        r = requests.get(
            f"{registry.url}/v2/acme/demo/tags/list", headers={"Authorization": header}, timeout=10
        )
        assert r.status_code == 401, header[:20]
        assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert r.headers["WWW-Authenticate"] == (
            f'Bearer realm="{registry.url}/auth/token",service="tabbify-registry",'
            'scope="repository:acme/demo:pull"'
        )


def test_realm_ignores_host_and_forwarded_headers(registry):
    r = requests.get(
        f"{registry.url}/v2/",
        headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"},
        timeout=10,
    )
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="{registry.url}/auth/token",service="tabbify-registry"'
    )
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_outside_v2_is_404_and_backend_extras_are_unreachable(registry, acme_jwt):
    t = bearer(token(registry, acme_jwt))
    for path in ("/", "/metrics", "/livez", "/readyz", "/home", "/zot/auth/login", "/debug/vars"):
        r = requests.get(registry.url + path, headers=t, timeout=10)
        assert r.status_code == 404, path
        assert r.json()["errors"][0]["code"] == "NOT_FOUND"


def test_access_log_has_one_line_per_request_and_no_secrets(registry, acme_jwt):
    t = token(registry, acme_jwt)
    requests.get(f"{registry.url}/v2/acme/logged/tags/list", headers=bearer(t), timeout=10)
    # supervisord relays the gateway's stdout: give it a moment.
    wait_for(lambda: any(x["repository"] == "acme/logged" for x in registry.access_log()), 5)
    time.sleep(0.5)
    lines = registry.access_log()
    mine = [x for x in lines if x["repository"] == "acme/logged"]
    assert len(mine) == 1
    assert mine[0]["tenant"] == "acme" and mine[0]["decision"] == "allow"
    assert {"time", "method", "reference", "status", "bytes_in", "bytes_out", "duration_ms"} <= set(
        mine[0]
    )
    assert any(x["kind"] == "token" and x["tenant"] == "acme" for x in lines)
    text = registry.log.read_text()
    assert acme_jwt not in text and t not in text
    assert acme_jwt.split(".")[2] not in text and t.split(".")[2] not in text


def test_multi_arch_index_round_trips(registry, acme_jwt, tmp_path):
    pushed = oci_index_layout(tmp_path / "src", "multi")
    ref = f"docker://{registry.host}/acme/multi:v1"
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:multi", ref, acme_jwt, "--all")
    assert r.returncode == 0, r.stderr
    r = skopeo_copy(ref, f"oci:{tmp_path / 'out'}:multi", acme_jwt, "--all")
    assert r.returncode == 0, r.stderr
    assert layout_blobs(tmp_path / "out") == pushed["blobs"]
    # Child manifests by digest are the tenant's too.
    h = bearer(token(registry, acme_jwt))
    index = json.loads(pushed["blobs"][pushed["digest"]])
    for child in index["manifests"]:
        r = requests.get(
            f"{registry.url}/v2/acme/multi/manifests/{child['digest']}",
            headers={**h, "Accept": child["mediaType"]},
            timeout=10,
        )
        assert r.status_code == 200


def test_a_referrer_artifact_and_mounts_within_the_tenant(registry, acme_jwt, tmp_path):
    h = bearer(token(registry, acme_jwt))
    pushed = oci_layout(tmp_path / "src", "v1")
    r = skopeo_copy(
        f"oci:{tmp_path / 'src'}:v1", f"docker://{registry.host}/acme/signed:v1", acme_jwt
    )
    assert r.returncode == 0, r.stderr
    subject = pushed["digest"]
    empty = push_blob(registry, "acme/signed", b"{}", h)
    signature = push_blob(registry, "acme/signed", b"a signature", h)
    artifact = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.tabbify.signature.v1",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": empty,
                "size": 2,
            },
            "layers": [{"mediaType": "application/octet-stream", "digest": signature, "size": 11}],
            "subject": {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": subject,
                "size": len(pushed["blobs"][subject]),
            },
        }
    ).encode()
    artifact_digest = sha256(artifact)
    r = requests.put(
        f"{registry.url}/v2/acme/signed/manifests/{artifact_digest}",
        data=artifact,
        headers={**h, "Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    r = requests.get(
        f"{registry.url}/v2/acme/signed/manifests/{artifact_digest}",
        headers={**h, "Accept": "application/vnd.oci.image.manifest.v1+json"},
        timeout=10,
    )
    assert r.status_code == 200 and r.content == artifact
    # Mount a layer into another repository of the same tenant.
    layer = pushed["manifest"]["layers"][0]["digest"]
    r = requests.post(
        f"{registry.url}/v2/acme/copy/blobs/uploads/",
        params={"mount": layer, "from": "acme/signed"},
        headers=h,
        timeout=10,
    )
    assert r.status_code == 201, r.text
    r = requests.get(f"{registry.url}/v2/acme/copy/blobs/{layer}", headers=h, timeout=10)
    assert r.status_code == 200 and r.content == pushed["blobs"][layer]


def test_a_large_layer_is_pulled_byte_identical_through_the_kernel(registry, acme_jwt, tmp_path):
    """A layer's body passes unchanged, so the engine splices it (addons/engine/splice.py):
    skopeo gets the same bytes, the access log and /metrics count them."""
    pushed = oci_layout(tmp_path / "src", "v1", layer_sizes=(24 << 20,))
    ref = f"docker://{registry.host}/acme/big:v1"
    assert skopeo_round_trip(tmp_path, ref, acme_jwt) == pushed["blobs"]
    layer = max(pushed["blobs"], key=lambda d: len(pushed["blobs"][d]))
    size = len(pushed["blobs"][layer])

    def pulled() -> dict | None:
        return next(
            (
                line
                for line in registry.access_log()
                if line.get("method") == "GET" and line.get("reference") == layer
            ),
            None,
        )

    wait_for(lambda: pulled() is not None, timeout=10)
    line = pulled()
    assert line is not None and line["status"] == 200 and line["bytes_out"] == size
    assert size - (2 << 20) <= line["spliced"] < size  # the first reads take the usual path

    def spliced_total() -> int:
        text = requests.get(f"http://{registry.env['REGISTRY_ADMIN_ADDR']}/metrics", timeout=5).text
        return next(
            int(x.split()[-1]) for x in text.splitlines() if x.startswith("tabbify_spliced_bytes")
        )

    wait_for(lambda: spliced_total() >= line["spliced"], timeout=10)


@pytest.mark.alone  # it moves a few hundred MB: not beside other modules' timing tests
def test_large_pulls_at_once_and_clients_that_reset_leave_the_workers_as_they_were(
    registry, acme_jwt
):
    """Several 16 MiB pulls at once get identical bytes; pulls whose clients reset after the
    first MiB leave no descriptor behind in any worker, and the workers serve on."""
    headers = bearer(token(registry, acme_jwt, "repository:acme/many:pull,push"))
    blob = hashlib.sha256(b"many").digest() * (1 << 19)  # 16 MiB
    digest = push_blob(registry, "acme/many", blob, headers)
    url = f"{registry.url}/v2/acme/many/blobs/{digest}"
    pids = list(registry.gateway_pids().values())

    def fds() -> int:
        return sum(len(list(Path(f"/proc/{pid}/fd").iterdir())) for pid in pids)

    def pulls() -> None:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", registry.port))
            sock.sendall(
                f"GET /v2/acme/many/blobs/{digest} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {headers['Authorization']}\r\n\r\n".encode()
            )
            got = 0
            while got < 1 << 20:
                got += len(sock.recv(1 << 16))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, most of the body still to come
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda _: requests.get(url, headers=headers, timeout=60), range(4)))
        assert all(r.status_code == 200 and r.content == blob for r in got)

    pulls()  # every worker has served once: what it opens once is open
    time.sleep(1)
    baseline = fds()
    for _ in range(2):
        pulls()
    wait_for(lambda: fds() <= baseline, timeout=15)
