"""Storage end to end: S3 on a real S3 server (SeaweedFS), and persistence across restarts."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import skopeo_copy
from tests.images import layout_blobs, oci_layout
from tests.stack import Stack
from tests.standins.seaweed import SeaweedS3
from tests.test_e2e_gateway import bearer, push_blob, token

pytestmark = pytest.mark.e2e
BUCKET = "tbf-registry"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
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
