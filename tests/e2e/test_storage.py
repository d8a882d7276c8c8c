"""Storage end to end: S3 on a real S3 server (SeaweedFS), and persistence across restarts."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import skopeo_copy, skopeo_round_trip
from tests.e2e.test_gateway import bearer, push_blob, token
from tests.support.images import layout_blobs, oci_layout
from tests.support.stack import Stack, wait_for
from tests.support.standins.seaweed import SeaweedS3

pytestmark = pytest.mark.e2e
BUCKET = "tbf-registry"


@pytest.fixture(scope="module")
def private_ca_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return private_ca(tmp_path_factory.mktemp("private-ca"))


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, private_ca_files) -> Iterator[SeaweedS3]:
    """SeaweedFS over plain HTTP, and over HTTPS with a certificate from a private CA."""
    _, cert, key = private_ca_files
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), tls=(cert, key)).start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


def s3_env(s3: SeaweedS3) -> dict[str, str]:
    """What an operator sets. The credentials are the SDK default chain's environment source
    (on AWS: the instance role); the rendered config carries none."""
    return {
        "REGISTRY_STORAGE": "s3",
        "REGISTRY_S3_BUCKET": BUCKET,
        "REGISTRY_S3_REGION": "us-east-1",
        "REGISTRY_S3_ENDPOINT": s3.url,
        "AWS_ACCESS_KEY_ID": "tabbify-test",
        "AWS_SECRET_ACCESS_KEY": "tabbify-test-secret",
        "AWS_EC2_METADATA_DISABLED": "true",  # never reach for an instance role off AWS
    }


def test_s3_push_pull_restart_pull(tmp_path, s3, auth, acme_jwt):
    stack = Stack(tmp_path / "data", auth.url, **s3_env(s3)).start()
    config = (tmp_path / "data" / "run" / "distribution-config.json").read_text()
    assert "tabbify-test" not in config  # no static keys in the rendered config
    pushed = oci_layout(tmp_path / "src", "v1")
    ref = f"docker://{stack.host}/acme/ons3:v1"
    big = os.urandom(1 << 20) * 200  # a 200 MiB layer
    try:
        r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", ref, acme_jwt)
        assert r.returncode == 0, r.stderr
        h = bearer(token(stack, acme_jwt))
        big_digest = push_blob(stack, "acme/ons3", big, h)
    finally:
        assert stack.stop() == 0

    keys = s3.keys(BUCKET)
    for digest in [*pushed["blobs"], big_digest]:
        hexdigest = digest.removeprefix("sha256:")
        assert any(hexdigest in k for k in keys), f"{digest} not in the bucket"

    stack.start()  # same data dir, same bucket, new process
    try:
        r = skopeo_copy(ref, f"oci:{tmp_path / 'out'}:v1", acme_jwt)
        assert r.returncode == 0, r.stderr
        assert layout_blobs(tmp_path / "out") == pushed["blobs"]
        h = bearer(token(stack, acme_jwt))
        digest = hashlib.sha256()
        with requests.get(
            f"{stack.url}/v2/acme/ons3/blobs/{big_digest}", headers=h, stream=True, timeout=120
        ) as r:
            assert r.status_code == 200
            for chunk in r.iter_content(1 << 20):
                digest.update(chunk)
        assert "sha256:" + digest.hexdigest() == big_digest
    finally:
        stack.stop()


def test_local_storage_survives_a_restart(tmp_path, auth, acme_jwt):
    stack = Stack(tmp_path / "data", auth.url).start()
    pushed = oci_layout(tmp_path / "src", "v1")
    ref = f"docker://{stack.host}/acme/kept:v1"
    try:
        r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", ref, acme_jwt)
        assert r.returncode == 0, r.stderr
    finally:
        stack.stop()
    assert (tmp_path / "data" / "zot-cache" / "docker").is_dir()  # under REGISTRY_DATA_DIR
    stack.start()
    try:
        r = skopeo_copy(ref, f"oci:{tmp_path / 'out'}:v1", acme_jwt)
        assert r.returncode == 0, r.stderr
        assert layout_blobs(tmp_path / "out") == pushed["blobs"]
    finally:
        stack.stop()


def private_ca(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, server key), all PEM."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer_key, issuer: str, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_cert = certificate("tabbify test CA", ca_key, ca_key, "tabbify test CA", ca=True)
    server_cert = certificate("127.0.0.1", server_key, ca_key, "tabbify test CA", ca=False)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.mark.parametrize("variable", ["AWS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_s3_behind_a_private_ca_works_with_the_ca_bundle(
    tmp_path, auth, acme_jwt, s3, private_ca_files, variable
):
    """An operator trusts a private CA the way S3 clients are told to (AWS_CA_BUNDLE), or
    Go's way (SSL_CERT_FILE): either alone works end to end with Distribution, whose S3
    driver panics on AWS_CA_BUNDLE itself (run hands it over as SSL_CERT_FILE)."""
    ca = private_ca_files[0]
    assert s3.https_url
    env = {**s3_env(s3), "REGISTRY_S3_ENDPOINT": s3.https_url}
    stack = Stack(tmp_path / "data", auth.url, **env, **{variable: str(ca)}).start()
    try:
        pushed = oci_layout(tmp_path / "src", "v1", layer_sizes=(4096,))
        ref = f"docker://{stack.host}/acme/private-ca:v1"
        assert skopeo_round_trip(tmp_path, ref, acme_jwt) == pushed["blobs"]
        keys = s3.keys(BUCKET)  # over plain HTTP: the blobs really went to the bucket
        assert any(d.removeprefix("sha256:") in k for d in pushed["blobs"] for k in keys)
        stack.stop()
        # and the CA is what makes it work: without it, x509 errors (500 from the backend)
        stack = Stack(tmp_path / "data2", auth.url, **env).start()
        r = stack.backend_get("/v2/acme/private-ca/tags/list", timeout=30)
        assert r.status_code == 500, r.text
        wait_for(lambda: "x509" in stack.log.read_text(), timeout=10)  # Distribution's log
    finally:
        stack.stop()
