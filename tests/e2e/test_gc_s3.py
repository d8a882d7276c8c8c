"""GC's sweep on S3 storage (SeaweedFS) under a running stack: the blob ages come from the
bucket's LastModified (the blob's data and every repository link to it), and a swept blob
loses every key under its prefix, as Distribution's own sweep removes it. Run in-process with
a short grace (S3 objects cannot be made old)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from addons.cli import gc
from addons.config.settings import load
from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.e2e.test_storage import BUCKET, s3_env
from tests.support.images import image_manifest
from tests.support.stack import Stack
from tests.support.standins.seaweed import SeaweedS3

pytestmark = pytest.mark.e2e
OCI = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed-gc")).start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


def blob_keys(s3: SeaweedS3, digest: str) -> list[str]:
    h = digest.removeprefix("sha256:")
    return [k for k in s3.keys(BUCKET) if f"/blobs/sha256/{h[:2]}/{h}/" in k]


def test_the_sweep_on_s3_spares_young_and_relinked_blobs(
    tmp_path: Path, s3: SeaweedS3, auth, acme_jwt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = s3_env(s3)
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)  # the SDK default chain, for the in-process GC
    stack = Stack(tmp_path / "data", auth.url, **env).start()
    try:
        h = bearer(token(stack, acme_jwt))
        garbage, relinked = os.urandom(5000), os.urandom(5000)
        for blob in (garbage, relinked):  # stored, never referenced
            push_blob(stack, "acme/s3gc/earlier", blob, h)
        assert blob_keys(s3, sha256(garbage)) and blob_keys(s3, sha256(relinked))
        stored = time.time()
        time.sleep(10)  # a gap between the old blobs and the push below
        config = json.dumps({"os": "linux", "n": os.urandom(8).hex()}).encode()
        fresh = os.urandom(5000)
        for blob in (config, fresh, relinked):  # a push: its blobs first...
            push_blob(stack, "acme/s3gc/app", blob, h)
        # A grace just under the old blobs' age: they are past it at the sweep, and the push's
        # blobs, ten seconds younger, stay inside it unless the collection itself takes ~10 s
        # (a fixed grace made this depend on how fast a loaded machine pushes).
        monkeypatch.setattr(gc, "BLOB_GRACE", time.time() - stored - 0.5)
        report = gc.run_once(load(stack.env), dry_run=False)
        assert report["collected"]["blobs"] == 1 and report["kept_young_blobs"] >= 3, report
        assert blob_keys(s3, sha256(garbage)) == []  # its whole prefix
        body = image_manifest(
            (sha256(config), len(config)),
            [(sha256(fresh), len(fresh)), (sha256(relinked), len(relinked))],
        )
        r = requests.put(  # ... its manifest after the collection
            f"{stack.url}/v2/acme/s3gc/app/manifests/v1",
            data=body,
            headers={**h, "Content-Type": OCI},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        for blob in (config, fresh, relinked):
            r = requests.get(f"{stack.url}/v2/acme/s3gc/app/blobs/{sha256(blob)}", headers=h)
            assert r.status_code == 200 and r.content == blob
        r = requests.head(f"{stack.url}/v2/acme/s3gc/earlier/blobs/{sha256(garbage)}", headers=h)
        assert r.status_code == 404
    finally:
        assert stack.stop() == 0
