"""Distribution 2.8 (Debian's docker-registry) as GC has to drive it, pinned with real clients.

These tests talk to a bare backend (no gateway): they record the facts the GC integration
relies on, and check decisions/gc_plan.py and decisions/signatures.py against the real store.
- `garbage-collect --delete-untagged` deletes the children of a tagged multi-arch index and
  OCI 1.1 referrers: never pass it; delete what the plan says through the API instead.
- `DELETE /v2/<name>/manifests/<tag>` is refused (400 DIGEST_INVALID); deleting by digest
  removes the manifest and every tag pointing at it.
- `garbage-collect` under a live registry with the `inmemory` blob-descriptor cache leaves the
  registry answering HEAD 200 for deleted blobs and accepting manifests that reference them
  (a broken image); without the cache the same push is refused cleanly.
- The planner's blob set equals what `garbage-collect --dry-run` finds eligible after the
  plan's manifest deletions.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from addons.decisions import gc_plan, signatures
from tests.conftest import skopeo_copy
from tests.support import cosign
from tests.support.images import digest, image_manifest, oci_index_layout, oci_layout
from tests.support.stack import free_port, wait_for

pytestmark = pytest.mark.e2e
OCI = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}  # no REGISTRY_* overrides (FIELD-NOTES)


class Distribution:
    def __init__(self, root: Path, cache: bool) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        storage: dict = {
            "filesystem": {"rootdirectory": str(root / "storage")},
            "delete": {"enabled": True},
        }
        if cache:
            storage["cache"] = {"blobdescriptor": "inmemory"}
        self.config = root / "config.yml"
        self.config.write_text(
            json.dumps(
                {
                    "version": "0.1",
                    "log": {"level": "warn", "accesslog": {"disabled": True}},
                    "storage": storage,
                    "http": {"addr": f"127.0.0.1:{self.port}", "relativeurls": True},
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Distribution:
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(self.config)], env=ENV, stdout=log, stderr=log
        )
        wait_for(lambda: requests.get(f"{self.url}/v2/", timeout=1).status_code == 200)
        return self

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(30)

    def gc(self, *flags: str) -> tuple[set[str], set[str]]:
        """Run garbage-collect; (manifests, blobs) it deleted or, with --dry-run, would."""
        out = subprocess.run(
            ["docker-registry", "garbage-collect", str(self.config), *flags],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        manifests = {ln.split(": ")[1] for ln in out.splitlines() if ln.startswith("manifest elig")}
        blobs = {ln.split(": ")[1] for ln in out.splitlines() if ln.startswith("blob eligible")}
        return manifests, blobs

    # -- the registry API --------------------------------------------------------------------

    def push(self, layout: Path, ref: str, *extra: str) -> None:
        result = skopeo_copy(f"oci:{layout}:{ref.split(':')[-1]}", self.ref(ref), None, *extra)
        assert result.returncode == 0, result.stderr

    def ref(self, ref: str) -> str:
        return f"docker://127.0.0.1:{self.port}/{ref}"

    def put_blob(self, repo: str, data: bytes) -> str:
        d = digest(data)
        r = requests.post(f"{self.url}/v2/{repo}/blobs/uploads/", timeout=10)
        r = requests.put(f"{self.url}{r.headers['Location']}&digest={d}", data=data, timeout=10)
        assert r.status_code == 201, r.text
        return d

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str = OCI) -> int:
        headers = {"Content-Type": media_type}
        return requests.put(
            f"{self.url}/v2/{repo}/manifests/{ref}", data=body, headers=headers, timeout=10
        ).status_code

    def get_manifest(self, repo: str, ref: str) -> bytes | None:
        accept = {"Accept": f"{OCI}, {INDEX}, {cosign.DOCKER_MANIFEST}"}
        r = requests.get(f"{self.url}/v2/{repo}/manifests/{ref}", headers=accept, timeout=10)
        return r.content if r.status_code == 200 else None

    def blob(self, repo: str, d: str) -> bytes:
        r = requests.get(f"{self.url}/v2/{repo}/blobs/{d}", timeout=10)
        r.raise_for_status()
        return r.content

    def head_blob(self, repo: str, d: str) -> int:
        return requests.head(f"{self.url}/v2/{repo}/blobs/{d}", timeout=10).status_code

    def delete_manifest(self, repo: str, ref: str) -> requests.Response:
        return requests.delete(f"{self.url}/v2/{repo}/manifests/{ref}", timeout=10)

    # -- a GC snapshot, the way an integration would build one --------------------------------

    def snapshot(self, now: float) -> gc_plan.Snapshot:
        repos = {}
        catalog = requests.get(f"{self.url}/v2/_catalog", timeout=10).json()["repositories"]
        for name in catalog:
            tags = requests.get(f"{self.url}/v2/{name}/tags/list", timeout=10).json()["tags"] or []
            manifests, tag_map = {}, {}
            revisions = self.root / f"storage/docker/registry/v2/repositories/{name}"
            for link in (revisions / "_manifests/revisions/sha256").glob("*/link"):
                d = link.read_text()
                manifests[d] = gc_plan.describe_manifest(self.get_manifest(name, d), now - 7200)
            for t in tags:
                body = self.get_manifest(name, t)
                tag_map[t] = gc_plan.Tag(digest(body), now - 7200)
            repos[name] = gc_plan.Repository(tag_map, manifests)
        blobs_dir = self.root / "storage/docker/registry/v2/blobs/sha256"
        blobs = {
            "sha256:" + data.parent.name: gc_plan.Blob(data.stat().st_size, now - 7200)
            for data in blobs_dir.glob("*/*/data")
        }
        return gc_plan.Snapshot(repos, blobs)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Distribution]:
    reg = Distribution(tmp_path, cache=True).start()
    yield reg
    if reg.proc and reg.proc.poll() is None:
        reg.stop()


def test_delete_untagged_breaks_multi_arch_indexes_and_referrers(registry, tmp_path):
    index = oci_index_layout(tmp_path / "index", "multi")
    registry.push(tmp_path / "index", "acme/app:multi", "--all")
    image = oci_layout(tmp_path / "image", "v1")
    registry.push(tmp_path / "image", "acme/app:v1")
    sig = cosign.sign(cosign.Signer(), image["digest"], referrer_of={"digest": image["digest"]})
    for data in sig.blobs.values():
        registry.put_blob("acme/app", data)
    assert registry.put_manifest("acme/app", sig.digest, sig.manifest) == 201
    children = {c["digest"] for c in json.loads(index["blobs"][index["digest"]])["manifests"]}

    without_flag, _ = registry.gc("--dry-run")
    assert without_flag == set()
    would_delete, _ = registry.gc("--dry-run", "--delete-untagged")
    assert would_delete == children | {sig.digest}  # both tagged subjects lose what they need
    registry.stop()
    registry.gc("--delete-untagged")
    registry.start()
    pulled = skopeo_copy(registry.ref("acme/app:multi"), f"dir:{tmp_path / 'out'}", None, "--all")
    assert pulled.returncode != 0 and "manifest unknown" in pulled.stderr


def test_tags_cannot_be_deleted_and_digest_deletes_take_every_tag(registry, tmp_path):
    image = oci_layout(tmp_path / "image", "v1")
    registry.push(tmp_path / "image", "acme/app:v1")
    assert skopeo_copy(registry.ref("acme/app:v1"), registry.ref("acme/app:also")).returncode == 0
    r = registry.delete_manifest("acme/app", "v1")
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert registry.delete_manifest("acme/app", image["digest"]).status_code == 202
    tags = requests.get(f"{registry.url}/v2/acme/app/tags/list", timeout=10).json()["tags"]
    assert not tags
    # The manifest's blobs stay until garbage-collect; a blob DELETE only unlinks it.
    layer = image["manifest"]["layers"][0]["digest"]
    assert registry.head_blob("acme/app", layer) == 200


@pytest.mark.parametrize("cache", [True, False])
def test_collecting_under_a_live_registry(tmp_path, cache):
    """A push in flight (blobs uploaded, manifest not yet sent) while garbage-collect runs."""
    reg = Distribution(tmp_path, cache=cache).start()
    try:
        config, layer = b'{"os":"linux"}', os.urandom(4096)
        cd, ld = reg.put_blob("acme/app", config), reg.put_blob("acme/app", layer)
        _, collected = reg.gc()
        assert {cd, ld} <= collected
        body = image_manifest((cd, len(config)), [(ld, len(layer))])
        if cache:
            # The stale cache answers for the deleted blob and the manifest is accepted:
            # a tag now names an image whose layers are gone.
            assert reg.head_blob("acme/app", ld) == 200
            assert reg.put_manifest("acme/app", "v1", body) == 201
            with pytest.raises(requests.RequestException):
                reg.blob("acme/app", ld)
        else:
            assert reg.head_blob("acme/app", ld) == 404
            assert reg.put_manifest("acme/app", "v1", body) == 400  # MANIFEST_BLOB_UNKNOWN
    finally:
        reg.stop()


def test_plan_matches_distributions_own_mark(registry, tmp_path):
    """Push, plan with retention, delete what the plan says by digest, then compare."""
    signer = cosign.Signer()
    images = {}
    for tag in ("v1", "v2", "v3"):
        images[tag] = oci_layout(tmp_path / tag, tag)
        registry.push(tmp_path / tag, f"acme/app:{tag}")
    oci_index_layout(tmp_path / "multi", "multi")
    registry.push(tmp_path / "multi", "acme/app:multi", "--all")
    # globex keeps a copy of v1: its blobs are shared, so deleting acme's v1 frees none of them.
    copied = skopeo_copy(registry.ref("acme/app:v1"), registry.ref("globex/base:base"))
    assert copied.returncode == 0
    for tag in ("v1", "v3"):  # a tag-form signature of v1 (which goes) and of v3 (which stays)
        s = cosign.sign(signer, images[tag]["digest"])
        for data in s.blobs.values():
            registry.put_blob("acme/app", data)
        sig_tag = signatures.signature_tag(images[tag]["digest"])
        assert registry.put_manifest("acme/app", sig_tag, s.manifest) == 201

    now = 1_000_000.0
    snap = registry.snapshot(now)
    pushed = {"v1": 1.0, "v2": 2.0, "v3": 3.0, "multi": 4.0}
    repo = snap.repositories["acme/app"]
    tags = {t: gc_plan.Tag(v.manifest, pushed.get(t, 0.0)) for t, v in repo.tags.items()}
    snap = gc_plan.Snapshot(
        {**snap.repositories, "acme/app": gc_plan.Repository(tags, repo.manifests)}, snap.blobs
    )
    retention = {"acme/app": gc_plan.Retention(keep_last=2, protected=["v3"])}
    plan = gc_plan.plan(snap, retention, now)
    # keep_last=2 keeps multi and v2 besides protected v3: v1 and v1's signature go.
    assert {t for _, t in plan.tags} == {"v1", signatures.signature_tag(images["v1"]["digest"])}
    assert {d for _, d in plan.manifests} >= {images["v1"]["digest"]}

    v1_content = {images["v1"]["digest"], *images["v1"]["blobs"]}
    assert plan.blobs and v1_content.isdisjoint(plan.blobs)
    for name, d in plan.manifests:
        assert registry.delete_manifest(name, d).status_code == 202
    manifests, eligible = registry.gc("--dry-run")
    assert manifests == set()
    assert eligible == set(plan.blobs)
    registry.gc()
    registry.stop()
    registry.start()  # a fresh blob-descriptor cache
    for tag in ("v2", "v3", "multi"):
        out = tmp_path / f"pulled-{tag}"
        assert (
            skopeo_copy(registry.ref(f"acme/app:{tag}"), f"dir:{out}", None, "--all").returncode
            == 0
        )
    assert all(registry.head_blob("acme/app", d) == 404 for d in plan.blobs)


def test_signatures_round_trip_through_the_store(registry, tmp_path):
    """Signature manifests pushed as cosign pushes them come back byte for byte and verify;
    Distribution has no referrers API, so the OCI 1.1 form is found only by digest."""
    signer = cosign.Signer()
    image = oci_layout(tmp_path / "image", "v1")
    registry.push(tmp_path / "image", "acme/app:v1")
    subject = {
        "mediaType": OCI,
        "size": len(image["blobs"][image["digest"]]),
        "digest": image["digest"],
    }
    tag_form = cosign.sign(signer, image["digest"])
    referrer = cosign.sign(signer, image["digest"], referrer_of=subject)
    for s in (tag_form, referrer):
        for data in s.blobs.values():
            registry.put_blob("acme/app", data)
    sig_tag = signatures.signature_tag(image["digest"])
    assert registry.put_manifest("acme/app", sig_tag, tag_form.manifest) == 201
    assert registry.put_manifest("acme/app", referrer.digest, referrer.manifest) == 201
    assert registry.get_manifest("acme/app", sig_tag) == tag_form.manifest
    assert (
        requests.get(f"{registry.url}/v2/acme/app/referrers/{image['digest']}").status_code == 404
    )

    def verdict(keys, manifests=registry.get_manifest):
        return signatures.verify_subject(
            image["digest"],
            lambda ref: manifests("acme/app", ref),
            None,
            lambda d: registry.blob("acme/app", d),
            keys,
        )

    assert verdict([signer.public_pem]).signed
    assert not verdict([cosign.Signer().public_pem]).signed
    assert signatures.verify(
        image["digest"],
        registry.get_manifest("acme/app", referrer.digest),
        lambda d: registry.blob("acme/app", d),
        [signer.public_pem],
    ).signed
