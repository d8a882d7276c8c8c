"""`tabbify-registry gc` end to end (contract §8) against the running stack (Distribution,
two gateway workers): retention decides what goes (`keep_last` by the push times the gateway
recorded, protected tags, `[[immutable]]` tags, `untagged_after`), `--dry-run` changes
nothing, a real run removes manifests and blobs, the isolation ledger forgets them, the report
counts per tenant and says which tags could not go and why; and pushes running while GC runs
are held, never refused (no 503) and never broken.

GC sweeps only blobs stored and linked more than an hour ago (gc.BLOB_GRACE): tests that
expect blobs to be collected make the storage that old first (`age_storage`), as if it had
been pushed two hours earlier."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from addons.cli import gc as gc_module
from addons.decisions import signatures
from tests.conftest import skopeo_copy
from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.e2e.test_signatures import push_signature
from tests.support import cosign
from tests.support.images import image_manifest, layout_blobs, oci_layout
from tests.support.rawhttp import Conn
from tests.support.stack import CLI, Stack
from tests.support.standins.auth import AuthStandin

pytestmark = pytest.mark.e2e
OCI = "application/vnd.oci.image.manifest.v1+json"
POLICY = """
[[retention]]
repositories = ["acme/gc/**"]
keep_last = 2
protected_tags = ["stable"]
untagged_after = "1s"

[[retention]]
repositories = ["acme/busy/**", "acme/junk/**"]
untagged_after = "1s"

[[retention]]
repositories = ["acme/keep/**"]
keep_last = 1

[[immutable]]
repositories = ["acme/keep/**"]
tags = ["v*"]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, auth: AuthStandin) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("gc") / "data"
    data.mkdir()
    (data / "policy.toml").write_text(POLICY)
    s = Stack(data, auth.url, REGISTRY_WORKERS="2").start()
    yield s
    s.stop()


def gc(stack: Stack, *args: str) -> dict:
    out = subprocess.run(
        [CLI, "gc", *args], env=stack.env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def age_storage(stack: Stack, seconds: float = 7200) -> None:
    """Everything stored so far as if written `seconds` ago (blob data and repository links):
    the blob grace (one hour) is then over for it."""
    then = time.time() - seconds
    for top, _, files in os.walk(stack.data_dir / "zot-cache"):
        for name in files:
            os.utime(os.path.join(top, name), (then, then))


def push(stack: Stack, jwt: str, tmp: Path, ref: str, size: int = 20_000) -> dict:
    name = ref.replace("/", "_").replace(":", "_")
    image = oci_layout(tmp / name, "x", layer_sizes=(size,))
    r = skopeo_copy(f"oci:{tmp / name}:x", f"docker://{stack.host}/{ref}", jwt)
    assert r.returncode == 0, r.stderr
    return image


def pulls_completely(stack: Stack, jwt: str, ref: str, image: dict, out: Path) -> bool:
    r = skopeo_copy(f"docker://{stack.host}/{ref}", f"oci:{out}:x", jwt)
    return r.returncode == 0 and layout_blobs(out).items() >= image["blobs"].items()


def test_retention_dry_run_then_collection(stack: Stack, acme_jwt: str, tmp_path: Path) -> None:
    h = {**bearer(token(stack, acme_jwt)), "Accept": OCI}
    repo = "acme/gc/app"
    images = {tag: push(stack, acme_jwt, tmp_path, f"{repo}:{tag}") for tag in ("v1", "v2", "v3")}
    images["stable"] = push(stack, acme_jwt, tmp_path, f"{repo}:stable")
    old_moving = push(stack, acme_jwt, tmp_path / "a", f"{repo}:moving")
    images["moving"] = push(stack, acme_jwt, tmp_path / "b", f"{repo}:moving")
    signer = cosign.Signer()
    for tag in ("v1", "v3"):
        d = images[tag]["digest"]
        push_signature(stack, h, repo, d, cosign.sign(signer, d))
    time.sleep(1.5)  # untagged_after = 1s

    plan = gc(stack, "--dry-run")
    sig = {t: signatures.signature_tag(images[t]["digest"]) for t in ("v1", "v3")}
    planned_tags = {t["tag"] for t in plan["tags"] if t["repository"] == repo}
    # keep_last = 2 keeps the two newest ordinary tags (moving, v3); stable is protected.
    assert planned_tags == {"v1", "v2", sig["v1"]}
    planned = {m["digest"] for m in plan["manifests"] if m["repository"] == repo}
    goes = {images["v1"]["digest"], images["v2"]["digest"], old_moving["digest"]}
    assert goes <= planned
    assert not planned & {images[t]["digest"] for t in ("v3", "stable", "moving")}
    assert plan["dry_run"] and plan["tenants"]["acme"]["manifests"] >= 4
    assert requests.get(f"{stack.url}/v2/{repo}/manifests/v1", headers=h).status_code == 200

    age_storage(stack)
    report = gc(stack)
    assert not report["dry_run"]
    acme = report["tenants"]["acme"]
    assert acme["manifests"] >= 4 and acme["blobs"] > 0 and acme["bytes"] > 20_000
    assert report["collected"]["blobs"] > 0 and report["freeze_seconds"] < 60
    assert Path(report["report_file"]).exists()

    for tag in ("v1", "v2"):
        r = requests.get(f"{stack.url}/v2/{repo}/manifests/{tag}", headers=h)
        assert r.status_code == 404
    gone_layer = images["v1"]["manifest"]["layers"][0]["digest"]
    assert stack.backend_get(f"/v2/{repo}/blobs/{gone_layer}", "HEAD").status_code == 404
    assert requests.head(f"{stack.url}/v2/{repo}/blobs/{gone_layer}", headers=h).status_code == 404
    r = requests.get(f"{stack.url}/v2/{repo}/manifests/{old_moving['digest']}", headers=h)
    assert r.status_code == 404
    for tag in ("v3", "stable", "moving"):
        out = tmp_path / f"pulled-{tag}"
        assert pulls_completely(stack, acme_jwt, f"{repo}:{tag}", images[tag], out), tag
    assert requests.get(f"{stack.url}/v2/{repo}/manifests/{sig['v3']}", headers=h).ok
    # Nothing more to do: a second run plans nothing for this repository.
    again = gc(stack, "--dry-run")
    assert not [m for m in again["manifests"] if m["repository"] == repo]


def test_pushes_during_gc_are_held_never_refused_nor_broken(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    """skopeo and raw-HTTP pushes in loops (blobs first, the manifest a moment later, as a
    slow client does) while GC runs again and again on old garbage and garbage made meanwhile:
    no request is answered 503, every push succeeds, every pushed image pulls completely."""
    for i in range(3):  # old garbage: a tag pushed over and over, two hours ago
        push(stack, acme_jwt, tmp_path / f"old-{i}", "acme/junk/app:latest")
    age_storage(stack)
    before = len(stack.access_log())
    stop = threading.Event()
    pushed: list[tuple[str, dict]] = []  # (reference, image) of every push that succeeded
    failures: list[str] = []
    statuses: list[int] = []  # every answer the raw client got

    def skopeo_loop(name: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            ref = f"acme/busy/{name}:t{i}"
            src = tmp_path / f"{name}-{i}"
            image = oci_layout(src, "x", layer_sizes=(30_000,))
            r = skopeo_copy(f"oci:{src}:x", f"docker://{stack.host}/{ref}", acme_jwt)
            if r.returncode == 0:
                pushed.append((ref, image))
            else:
                failures.append(r.stderr[-300:])

    def raw_loop() -> None:
        h = bearer(token(stack, acme_jwt))
        i = 0
        while not stop.is_set():
            i += 1
            config = json.dumps({"os": "linux", "n": os.urandom(8).hex()}).encode()
            layer = os.urandom(10_000)
            body = image_manifest((sha256(config), len(config)), [(sha256(layer), len(layer))])
            try:
                for blob in (config, layer):
                    r = requests.post(
                        f"{stack.url}/v2/acme/busy/raw/blobs/uploads/", headers=h, timeout=60
                    )
                    statuses.append(r.status_code)
                    r = requests.put(
                        stack.url + r.headers["Location"],
                        params={"digest": sha256(blob)},
                        data=blob,
                        headers={**h, "Content-Type": "application/octet-stream"},
                        timeout=200,
                    )
                    statuses.append(r.status_code)
                time.sleep(0.5)
                r = requests.put(
                    f"{stack.url}/v2/acme/busy/raw/manifests/r{i}",
                    data=body,
                    headers={**h, "Content-Type": OCI},
                    timeout=200,
                )
                statuses.append(r.status_code)
            except (KeyError, requests.RequestException) as e:
                failures.append(str(e)[:300])
                continue
            if r.status_code == 201:
                image = {"digest": sha256(body), "blobs": {sha256(config): config}}
                image["blobs"][sha256(layer)] = layer
                image["blobs"][sha256(body)] = body
                pushed.append((f"acme/busy/raw:r{i}", image))
            else:
                failures.append(f"{r.status_code} {r.text[:200]}")

    def junk_loop() -> None:  # a tag pushed over and over: untagged garbage for every run
        i = 0
        while not stop.is_set():
            i += 1
            src = tmp_path / f"junk-{i}"
            oci_layout(src, "x", layer_sizes=(15_000,))
            r = skopeo_copy(f"oci:{src}:x", f"docker://{stack.host}/acme/junk/app:latest", acme_jwt)
            if r.returncode != 0:
                failures.append(r.stderr[-300:])

    threads = [
        threading.Thread(target=skopeo_loop, args=("a",)),
        threading.Thread(target=raw_loop),
        threading.Thread(target=junk_loop),
    ]
    for t in threads:
        t.start()
    reports = []
    try:
        time.sleep(3)
        for _ in range(3):
            reports.append(gc(stack))
            time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    assert sum(r["collected"]["blobs"] for r in reports) > 0, reports
    assert not failures, failures
    assert len(pushed) >= 5
    assert statuses and 503 not in statuses
    lines = stack.access_log()[before:]
    assert not [ln for ln in lines if ln["status"] == 503], "a write was refused during GC"
    # The collections overlapped the pushes: some writes waited for a freeze to end.
    assert any("held" in str(ln.get("decision")) for ln in lines), "no write met a freeze"
    broken = []
    for n, (ref, image) in enumerate(pushed):
        repo = ref.partition(":")[0]
        if repo == "acme/busy/raw":
            h = bearer(token(stack, acme_jwt))
            for d, data in image["blobs"].items():
                kind = "manifests" if d == image["digest"] else "blobs"
                r = requests.get(f"{stack.url}/v2/{repo}/{kind}/{d}", headers={**h, "Accept": OCI})
                if r.status_code != 200 or r.content != data:
                    broken.append(f"{ref} {kind} {d}: {r.status_code}")
        elif not pulls_completely(stack, acme_jwt, ref, image, tmp_path / f"check-{n}"):
            broken.append(ref)
    assert not broken, broken


def test_blobs_uploaded_before_a_collection_serve_a_manifest_pushed_after_it(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    """A docker push uploads its layers first and its manifest last: GC between the two must
    not sweep the layers, neither fresh ones nor ones whose data was stored long ago (garbage
    then) that the push uploaded again, which Distribution only links, not rewrites."""
    h = bearer(token(stack, acme_jwt))
    repo = "acme/slow/app"
    old_layer = os.urandom(20_000)
    push_blob(stack, "acme/slow/earlier", old_layer, h)  # stored, never referenced: garbage
    age_storage(stack)
    config = json.dumps({"os": "linux", "n": os.urandom(8).hex()}).encode()
    fresh_layer = os.urandom(20_000)
    for blob in (config, fresh_layer, old_layer):  # the push: its blobs first...
        push_blob(stack, repo, blob, h)
    report = gc(stack)
    layers = [(sha256(fresh_layer), len(fresh_layer)), (sha256(old_layer), len(old_layer))]
    body = image_manifest((sha256(config), len(config)), layers)
    r = requests.put(  # ... its manifest after the collection
        f"{stack.url}/v2/{repo}/manifests/v1",
        data=body,
        headers={**h, "Content-Type": OCI},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    for blob in (config, fresh_layer, old_layer):
        r = requests.get(f"{stack.url}/v2/{repo}/blobs/{sha256(blob)}", headers=h, timeout=30)
        assert r.status_code == 200 and r.content == blob
    assert report["kept_young_blobs"] >= 3, report


def test_a_stalled_upload_keeps_neither_the_collector_nor_another_tenant_waiting(
    stack: Stack, acme_jwt: str, globex_jwt: str, tmp_path: Path
) -> None:
    """A monolithic upload PUT (`?digest=`), admitted just before a collection, whose body
    stalls half way: GC runs to completion at once (nothing abandoned), another tenant's
    manifest PUT during that GC answers quickly, and the blob the stalled PUT names stays
    although it was stored long ago and no manifest references it; once the body ends the
    upload is 201 and a manifest referencing the blob pushes and pulls intact."""
    h = bearer(token(stack, acme_jwt))
    g = bearer(token(stack, globex_jwt))
    repo = "acme/stall/app"
    layer = os.urandom(300_000)
    push_blob(stack, "acme/stall/earlier", layer, h)  # stored, never referenced: garbage
    garbage = os.urandom(10_000)
    push_blob(stack, "acme/stall/earlier", garbage, h)
    age_storage(stack)
    config = json.dumps({"os": "linux", "n": os.urandom(8).hex()}).encode()
    push_blob(stack, repo, config, h)
    other_config = json.dumps({"os": "linux", "n": os.urandom(8).hex()}).encode()
    other_layer = os.urandom(10_000)
    for blob in (other_config, other_layer):  # globex pushes its blobs before the GC...
        push_blob(stack, "globex/other/app", blob, g)
    other = image_manifest(
        (sha256(other_config), len(other_config)), [(sha256(other_layer), len(other_layer))]
    )

    r = requests.post(f"{stack.url}/v2/{repo}/blobs/uploads/", headers=h, timeout=30)
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    target = f"{location}{'&' if '?' in location else '?'}digest={sha256(layer)}"
    slow = Conn(stack.port, timeout=120)
    head = (
        f"PUT {target} HTTP/1.1\r\nHost: {stack.host}\r\n"
        f"Authorization: {h['Authorization']}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(layer)}\r\n\r\n"
    )
    half = len(layer) // 2
    assert slow.send(head.encode() + layer[:half])  # ... and stalls
    time.sleep(1.5)  # admitted by the gateway before the collection begins

    marker = stack.data_dir / "run" / "workers" / "freeze.json"
    ran: dict = {}

    def collect() -> None:
        started = time.monotonic()
        out = subprocess.run(
            [CLI, "gc"], env=stack.env, capture_output=True, text=True, timeout=300
        )
        ran.update(out=out, seconds=time.monotonic() - started)

    collector = threading.Thread(target=collect)
    collector.start()
    while not marker.exists() and collector.is_alive():
        time.sleep(0.02)
    assert collector.is_alive(), "the collection ended before its freeze was seen"
    started = time.monotonic()
    r = requests.put(  # ... and its manifest while the collection holds manifest writes
        f"{stack.url}/v2/globex/other/app/manifests/v1",
        data=other,
        headers={**g, "Content-Type": OCI},
        timeout=120,
    )
    other_seconds = time.monotonic() - started
    collector.join(300)
    out = ran["out"]
    assert out.returncode == 0, out.stderr  # before: abandoned after 30 s, nothing removed
    assert ran["seconds"] < 20, ran["seconds"]
    assert r.status_code == 201 and other_seconds < 10, (r.status_code, other_seconds)
    report = json.loads(out.stdout)
    assert report["protected_in_flight"]["digests"] >= 1, report
    assert report["collected"]["blobs"] >= 1, report  # the rest of the garbage went
    r = requests.get(f"{stack.url}/v2/acme/stall/earlier/blobs/{sha256(garbage)}", headers=h)
    assert r.status_code == 404
    hexpart = sha256(layer).removeprefix("sha256:")
    data = stack.data_dir / "zot-cache" / gc_module.V2 / "blobs/sha256" / hexpart[:2] / hexpart
    assert (data / "data").read_bytes() == layer  # not swept: the stalled PUT names it

    assert slow.send(layer[half:])
    answer = slow.read_answer("PUT")
    assert answer is not None and answer.status == 201, answer
    body = image_manifest((sha256(config), len(config)), [(sha256(layer), len(layer))])
    r = requests.put(
        f"{stack.url}/v2/{repo}/manifests/v1",
        data=body,
        headers={**h, "Content-Type": OCI},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    r = requests.get(f"{stack.url}/v2/{repo}/manifests/v1", headers={**h, "Accept": OCI})
    assert r.status_code == 200 and r.content == body
    for blob in (config, layer):
        r = requests.get(f"{stack.url}/v2/{repo}/blobs/{sha256(blob)}", headers=h, timeout=30)
        assert r.status_code == 200 and r.content == blob
    r = requests.get(f"{stack.url}/v2/globex/other/app/manifests/v1", headers={**g, "Accept": OCI})
    assert r.status_code == 200 and r.content == other


def test_a_manifest_body_dripping_across_a_collection_is_held_not_waited_for(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    """A manifest PUT whose headers came before a collection and whose body drips: it has
    reached nothing, so GC does not wait for it; it completes after the freeze, intact."""
    h = bearer(token(stack, acme_jwt))
    repo = "acme/drip/app"
    config = json.dumps({"os": "linux", "n": os.urandom(8).hex()}).encode()
    layer = os.urandom(10_000)
    for blob in (config, layer):
        push_blob(stack, repo, blob, h)
    body = image_manifest((sha256(config), len(config)), [(sha256(layer), len(layer))])
    slow = Conn(stack.port, timeout=120)
    head = (
        f"PUT /v2/{repo}/manifests/v1 HTTP/1.1\r\nHost: {stack.host}\r\n"
        f"Authorization: {h['Authorization']}\r\nContent-Type: {OCI}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    assert slow.send(head.encode() + body[:100])
    time.sleep(1.5)
    started = time.monotonic()
    out = subprocess.run([CLI, "gc"], env=stack.env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr  # before: abandoned after 30 s
    assert took < 20, took
    assert slow.send(body[100:])
    answer = slow.read_answer("PUT")
    assert answer is not None and answer.status == 201, answer
    r = requests.get(f"{stack.url}/v2/{repo}/manifests/v1", headers={**h, "Accept": OCI})
    assert r.status_code == 200 and r.content == body


def test_keep_last_removes_tags_with_their_manifests_and_says_what_it_could_not(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    """keep_last = 1 on Distribution: single-named tags go (with their manifest); a tag on the
    same manifest as the kept tag cannot go alone and the report says so; an immutable tag
    and what it reaches stay."""
    h = {**bearer(token(stack, acme_jwt)), "Accept": OCI}
    one = {t: push(stack, acme_jwt, tmp_path / "one", f"acme/keep/one:{t}") for t in "abc"}
    shared = push(stack, acme_jwt, tmp_path / "shared", "acme/keep/shared:first")
    push(stack, acme_jwt, tmp_path / "mid", "acme/keep/shared:mid")
    r = skopeo_copy(
        f"oci:{tmp_path / 'shared' / 'acme_keep_shared_first'}:x",
        f"docker://{stack.host}/acme/keep/shared:last",
        acme_jwt,
    )
    assert r.returncode == 0, r.stderr
    imm = push(stack, acme_jwt, tmp_path / "imm", "acme/keep/imm:v1")
    push(stack, acme_jwt, tmp_path / "imm1", "acme/keep/imm:x1")
    push(stack, acme_jwt, tmp_path / "imm2", "acme/keep/imm:x2")

    report = gc(stack)
    for repo, tag in [("acme/keep/one", "a"), ("acme/keep/one", "b"), ("acme/keep/imm", "x1")]:
        r = requests.get(f"{stack.url}/v2/{repo}/manifests/{tag}", headers=h)
        assert r.status_code == 404, (repo, tag)
    assert pulls_completely(stack, acme_jwt, "acme/keep/one:c", one["c"], tmp_path / "pc")
    assert pulls_completely(stack, acme_jwt, "acme/keep/imm:v1", imm, tmp_path / "pimm")
    removed = {(t["repository"], t["tag"]) for t in report["tags"]}
    assert {("acme/keep/one", "a"), ("acme/keep/one", "b")} <= removed
    assert {("acme/keep/shared", "mid"), ("acme/keep/imm", "x1")} <= removed
    assert not {("acme/keep/one", "c"), ("acme/keep/imm", "v1")} & removed
    not_removed = {(t["repository"], t["tag"]): t["reason"] for t in report["tags_not_removed"]}
    reason = not_removed[("acme/keep/shared", "first")]
    assert "also tagged last" in reason and "cannot be removed alone" in reason
    assert ("acme/keep/shared", "first") not in removed
    for tag in ("first", "last"):
        assert pulls_completely(
            stack, acme_jwt, f"acme/keep/shared:{tag}", shared, tmp_path / f"ps-{tag}"
        )


def test_the_freeze_holds_manifest_writes_on_every_worker_and_lets_the_rest_through(
    stack: Stack, acme_jwt: str, tmp_path: Path
) -> None:
    from addons.cli.gc import Freeze, live_workers

    h = {**bearer(token(stack, acme_jwt)), "Accept": OCI}
    image = push(stack, acme_jwt, tmp_path, "acme/frozen/app:v1")
    state_dir = stack.data_dir / "run" / "workers"
    body = image["blobs"][image["digest"]]
    answers: list[tuple[int, float]] = []

    def put_manifest(tag: str) -> None:
        started = time.monotonic()
        r = requests.put(
            f"{stack.url}/v2/acme/frozen/app/manifests/{tag}",
            data=body,
            headers={**h, "Content-Type": OCI, "Connection": "close"},
            timeout=60,
        )
        answers.append((r.status_code, time.monotonic() - started))

    with Freeze(state_dir, wait=10) as frozen:
        workers = live_workers(state_dir, time.time())
        assert len(workers) == 2
        assert all(
            w["freeze"] == {"seen": frozen.id, "in_flight": 0, "links": [], "deleting": []}
            for w in workers.values()
        )
        puts = [threading.Thread(target=put_manifest, args=(f"held{i}",)) for i in range(4)]
        for t in puts:  # new connections: both workers
            t.start()
        for _ in range(4):
            r = requests.post(
                f"{stack.url}/v2/acme/frozen/app/blobs/uploads/",
                headers={**h, "Connection": "close"},
            )
            assert r.status_code == 202  # an upload starts: not held
            r = requests.get(f"{stack.url}/v2/acme/frozen/app/manifests/v1", headers=h)
            assert r.status_code == 200 and r.headers["docker-content-digest"] == image["digest"]
        time.sleep(1.5)
        assert answers == []  # the manifest PUTs wait
    for t in puts:
        t.join(60)
    assert [status for status, _ in answers] == [201] * 4
    assert all(waited >= 1.5 for _, waited in answers)
    assert not (state_dir / "freeze.json").exists()
    r = requests.get(f"{stack.url}/v2/acme/frozen/app/manifests/held0", headers=h)
    assert r.status_code == 200
