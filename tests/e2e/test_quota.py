"""`[[quota]]` end to end (contract §8): sizes of confirmed uploads recorded in the ledger,
a push that would take the tenant over its quota refused (monolithic at its head, chunked
when the backend confirms it: then nothing is recorded or linked), re-pushes free, usage per
tenant in /metrics; bytes of unfinished uploads count (a PATCH that would pass the quota is
refused before it is stored, a chunked one is cut), and abandoned ones stop counting."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import skopeo_copy
from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.e2e.test_ledger_loss import wait_whole
from tests.support.images import oci_layout
from tests.support.stack import Stack, wait_for
from tests.support.standins.auth import AuthStandin, tabbify_jwt

pytestmark = pytest.mark.e2e
POLICY = """
[[quota]]
tenants = ["acme"]
bytes = "{limit}"

[[quota]]
tenants = ["initech"]
bytes = "100kB"

[[quota]]
tenants = ["hooli", "umbrella", "stark", "wayne", "kent", "gotham", "metro", "smallville"]
bytes = "1MB"
"""
MB = 1_000_000
MIN_GRANT = 64 * 1024  # the smallest reservation a streamed body makes (gateway/streamcap.py)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, auth: AuthStandin) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("quota") / "data"
    data.mkdir()
    (data / "policy.toml").write_text(POLICY.format(limit="400kB"))
    s = Stack(data, auth.url, REGISTRY_WORKERS="2").start()
    wait_whole(s)  # until then every write under a quota is 503 "rebuilding" (by design)
    yield s
    s.stop()


def metrics(stack: Stack, name: str = "usage") -> dict[str, int]:
    text = requests.get(f"http://{stack.env['REGISTRY_ADMIN_ADDR']}/metrics", timeout=5).text
    found = re.findall(rf'^tabbify_tenant_{name}_bytes\{{tenant="([^"]+)"\}} (\d+)$', text, re.M)
    return {t: int(n) for t, n in found}


def chunked_upload(
    stack: Stack, repo: str, blob: bytes, h: dict, parts: int = 2
) -> requests.Response:
    """POST, PATCHes, then the confirming PUT without a body (as containerd pushes); the
    first refusal of a PATCH, else the PUT's answer."""
    r = requests.post(f"{stack.url}/v2/{repo}/blobs/uploads/", headers=h, timeout=10)
    assert r.status_code == 202, r.text
    location, half = r.headers["Location"], len(blob) // parts
    for start, part in ((0, blob[:half]), (half, blob[half:])) if parts == 2 else ((0, blob),):
        r = requests.patch(
            stack.url + location,
            data=part,
            headers={**h, "Content-Range": f"{start}-{start + len(part) - 1}",
                     "Content-Type": "application/octet-stream"},
            timeout=30,
        )  # fmt: skip
        if r.status_code != 202:
            return r
        location = r.headers["Location"]
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    return requests.put(stack.url + location, params={"digest": digest}, headers=h, timeout=30)


def test_quota_refuses_what_does_not_fit_and_usage_is_in_metrics(
    stack: Stack, acme_jwt: str, globex_jwt: str, tmp_path: Path
) -> None:
    a, g = bearer(token(stack, acme_jwt)), bearer(token(stack, globex_jwt))
    image = oci_layout(tmp_path / "src", "v1", layer_sizes=(4096, 300_000))
    size = sum(len(b) for b in image["blobs"].values())
    dest = f"docker://{stack.host}/acme/q/app:v1"
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", dest, acme_jwt)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: metrics(stack).get("acme") == size, timeout=20)
    text = requests.get(f"http://{stack.env['REGISTRY_ADMIN_ADDR']}/metrics", timeout=5).text
    assert 'tabbify_tenant_quota_bytes{tenant="acme"} 400000' in text

    # A monolithic upload that cannot fit: refused at its head.
    big = os.urandom(200_000)
    digest = "sha256:" + hashlib.sha256(big).hexdigest()
    r = requests.post(f"{stack.url}/v2/acme/q/app/blobs/uploads/", headers=a, timeout=10)
    r = requests.put(
        stack.url + r.headers["Location"], params={"digest": digest}, data=big,
        headers={**a, "Content-Type": "application/octet-stream"}, timeout=30,
    )  # fmt: skip
    assert r.status_code == 403 and r.json()["errors"][0]["message"].startswith("quota exceeded")

    # Chunked: refused at the chunk that would pass the quota; nothing is recorded nor linked.
    r = chunked_upload(stack, "acme/q/app", big, a)
    assert r.status_code == 403 and r.json()["errors"][0]["message"].startswith("quota exceeded")
    assert requests.head(f"{stack.url}/v2/acme/q/app/blobs/{digest}", headers=a).status_code == 404
    assert stack.backend_get(f"/v2/acme/q/app/blobs/{digest}", "HEAD").status_code == 404

    # What acme holds costs nothing again: a re-push and a copy into another repository.
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", dest, acme_jwt)
    assert r.returncode == 0, r.stderr
    r = skopeo_copy(dest, f"docker://{stack.host}/acme/q/copy:v1", acme_jwt)
    assert r.returncode == 0, r.stderr
    # A small blob still fits; another tenant has no quota.
    push_blob(stack, "acme/q/app", b"small" * 10, a)
    push_blob(stack, "globex/app", big, g)

    # The quota raised: the same push now passes.
    (stack.data_dir / "policy.toml").write_text(POLICY.format(limit="1MB"))
    wait_for(lambda: chunked_upload(stack, "acme/q/app", big, a).status_code == 201, timeout=10)
    wait_for(lambda: metrics(stack).get("acme") == size + 50 + len(big), timeout=20)
    assert metrics(stack).get("globex") == len(big)
    log = [e for e in stack.access_log() if e["decision"] == "deny:quota exceeded"]
    assert len(log) >= 2 and all(e["tenant"] == "acme" for e in log)


def test_uploads_racing_to_the_quota_cannot_overshoot_it(stack: Stack) -> None:
    """Twelve 20 kB uploads at once (one chunk each), reserved and confirmed by both workers
    at about the same time, for a tenant with 100 kB: exactly five fit, and usage ends at
    the quota."""
    h = bearer(token(stack, tabbify_jwt({"network": "initech"})))
    blobs = [os.urandom(20_000) for _ in range(12)]
    with ThreadPoolExecutor(len(blobs)) as pool:
        answers = list(pool.map(lambda b: chunked_upload(stack, "initech/app", b, h, 1), blobs))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 5 + [403] * 7, [r.text for r in answers]
    wait_for(lambda: metrics(stack).get("initech") == 100_000, timeout=20)


# --- unfinished uploads ---------------------------------------------------------------------


def start_upload(stack: Stack, repo: str, h: dict) -> str:
    r = requests.post(f"{stack.url}/v2/{repo}/blobs/uploads/", headers=h, timeout=10)
    assert r.status_code == 202, r.text
    return r.headers["Location"]


def patch(stack: Stack, location: str, data: bytes, start: int, h: dict) -> requests.Response:
    """One chunk with its Content-Range, as the distribution spec's chunked upload sends it."""
    return requests.patch(
        stack.url + location,
        data=data,
        headers={**h, "Content-Range": f"{start}-{start + len(data) - 1}",
                 "Content-Type": "application/octet-stream"},
        timeout=30,
    )  # fmt: skip


def parked(stack: Stack, repo: str) -> int:
    """Bytes the backend holds in unfinished uploads of `repo` (Distribution's `_uploads`)."""
    root = stack.data_dir / "zot-cache/docker/registry/v2/repositories" / repo / "_uploads"
    return sum(f.stat().st_size for f in root.glob("*/data"))


def denied(r: requests.Response, used: int, limit: int = MB) -> bool:
    if r.status_code != 403:
        return False
    error = r.json()["errors"][0]
    message = error["message"]
    return (
        r.status_code == 403
        and error["code"] == "DENIED"
        and message.startswith("quota exceeded")
        and f"{used} of {limit} bytes used" in message
    )


def test_unfinished_uploads_count_against_the_quota(stack: Stack) -> None:
    """Under 1 MB: chunks parked in uploads never finished count; the PATCH that would pass
    the quota is refused before it is stored; cancelling and finishing release correctly."""
    h = bearer(token(stack, tabbify_jwt({"network": "hooli"})))
    repo = "hooli/app"
    blobs = [os.urandom(400_000), os.urandom(400_000), os.urandom(600_000)]
    u1, u2, u3 = (start_upload(stack, repo, h) for _ in range(3))
    r = patch(stack, u1, blobs[0], 0, h)
    assert r.status_code == 202, r.text
    u1 = r.headers["Location"]
    r = patch(stack, u2, blobs[1], 0, h)
    assert r.status_code == 202, r.text
    # A stale upload state (the POST's): Distribution answers 404 BLOB_UPLOAD_INVALID, and
    # the upload lives on: it still counts.
    stale = u2
    u2 = r.headers["Location"]
    assert requests.delete(stack.url + stale, headers=h, timeout=10).status_code == 404

    # 800 kB parked: 300 kB more would pass 1 MB, refused before the backend stores a byte.
    r = patch(stack, u3, blobs[2][:300_000], 0, h)
    assert denied(r, 800_000), r.text
    assert "300000 more do not fit" in r.json()["errors"][0]["message"]
    assert parked(stack, repo) == 800_000
    wait_for(lambda: metrics(stack, "uploading").get("hooli") == 800_000, timeout=20)
    r = patch(stack, u3, blobs[2][:200_000], 0, h)  # exactly the quota fits
    assert r.status_code == 202, r.text
    u3 = r.headers["Location"]
    # Full with unfinished uploads: a manifest's own bytes do not fit either.
    index_type = "application/vnd.oci.image.index.v1+json"
    index = json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": []}).encode()
    r = requests.put(
        f"{stack.url}/v2/{repo}/manifests/empty", data=index, timeout=10,
        headers={**h, "Content-Type": index_type},
    )  # fmt: skip
    assert r.status_code == 403 and "quota exceeded" in r.text, r.text

    # Cancelled: its 400 kB no longer count.
    r = requests.delete(stack.url + u2, headers=h, timeout=10)
    assert r.status_code == 204, r.text
    r = patch(stack, u3, blobs[2][200_000:], 200_000, h)
    assert r.status_code == 202, r.text
    u3 = r.headers["Location"]

    # Finished: its bytes become the blob's, counted once (1 MB in all, nothing more fits).
    r = requests.put(stack.url + u1, params={"digest": sha256(blobs[0])}, headers=h, timeout=30)
    assert r.status_code == 201, r.text
    late = start_upload(stack, repo, h)
    assert denied(patch(stack, late, b"x", 0, h), MB)
    requests.delete(stack.url + late, headers=h, timeout=10)
    r = requests.put(stack.url + u3, params={"digest": sha256(blobs[2])}, headers=h, timeout=30)
    assert r.status_code == 201, r.text
    wait_for(lambda: metrics(stack).get("hooli") == MB, timeout=20)
    # Full, yet a re-push of what it holds is never refused (its bytes count in flight).
    push_blob(stack, repo, blobs[0], h)
    log = [e for e in stack.access_log() if e["tenant"] == "hooli"]
    assert sum(e["decision"] == "deny:quota exceeded" for e in log) == 3


def test_a_chunked_patch_past_the_quota_is_cut(stack: Stack) -> None:
    """A body without a length streams while it fits and is cut once it passes the quota;
    what it sent counts, so the next chunk is refused."""
    h = bearer(token(stack, tabbify_jwt({"network": "umbrella"})))
    repo = "umbrella/app"

    def chunked(data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 64 * 1024):
            yield data[i : i + 64 * 1024]

    fits = start_upload(stack, repo, h)
    body = {**h, "Content-Type": "application/octet-stream"}
    r = requests.patch(stack.url + fits, data=chunked(os.urandom(300_000)), headers=body)
    assert r.status_code == 202, r.text  # streamed bodies still pass under a quota

    big = start_upload(stack, repo, h)
    try:
        r = requests.patch(
            stack.url + big, data=chunked(os.urandom(3_000_000)), headers=body, timeout=30
        )
        assert r.status_code == 403 and "quota exceeded" in r.text, r.text  # read before the cut
    except requests.ConnectionError:
        pass  # cut while sending
    # It may run past what is left by one grant (64 kB here) while the ledger answers.
    wait_for(lambda: parked(stack, repo) >= 300_000, timeout=10)
    assert parked(stack, repo) <= MB + MIN_GRANT

    def cut() -> list[dict]:
        return [
            e
            for e in stack.access_log()
            if e["tenant"] == "umbrella" and e["decision"] == "deny:quota exceeded"
        ]

    wait_for(cut, timeout=10)  # the line of a cut request is written when it ends
    assert cut()[0]["method"] == "PATCH" and cut()[0]["bytes_in"] <= MB - 300_000 + MIN_GRANT
    # What it sent (at least its first grant, 250 kB) counts: the backend may have stored
    # it. 500 kB more do not fit.
    r = patch(stack, start_upload(stack, repo, h), os.urandom(500_000), 0, h)
    assert r.status_code == 403 and "quota exceeded" in r.json()["errors"][0]["message"]


def test_concurrent_chunked_uploads_cannot_park_a_multiple_of_the_quota(stack: Stack) -> None:
    """Eight chunked PATCHes of 500 kB at once under 1 MB, through both workers: they reserve
    as they stream and a body's end waits for the ledger's answer, so what the backend holds
    never passes the quota (1.0-1.4 MB when an end racing the answer went on; unbounded
    before bodies reserved as they stream)."""
    h = bearer(token(stack, tabbify_jwt({"network": "wayne"})))
    body = {**h, "Content-Type": "application/octet-stream"}
    blob = os.urandom(500_000)

    def one(_: int) -> int | None:
        location = start_upload(stack, "wayne/app", h)
        chunks = (blob[i : i + 32 * 1024] for i in range(0, len(blob), 32 * 1024))
        try:
            return requests.patch(stack.url + location, data=chunks, headers=body).status_code
        except requests.ConnectionError:
            return None  # cut

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(8)))
    # 4 MB asked for, 1 MB allowed: the first ones hold a quarter of what was left each, no
    # chunk past that is stored, and they are cut (or answered 403 when they wait for it).
    assert set(codes) <= {202, 403, None}, codes
    held = parked(stack, "wayne/app")
    print(f"8 x 500 kB chunked at once under 1 MB: {held} bytes parked, answers {codes}")
    assert held <= MB
    wait_for(lambda: metrics(stack, "uploading").get("wayne", 0) >= held, timeout=20)


def test_concurrent_chunked_uploads_that_fit_all_pass(stack: Stack) -> None:
    """Reserving ahead never starves uploads that fit together: two 450 kB layers streamed at
    once under 1 MB (as Docker pushes layers) both complete."""
    h = bearer(token(stack, tabbify_jwt({"network": "kent"})))
    blobs = [os.urandom(450_000) for _ in range(2)]

    def one(blob: bytes) -> int:
        location = start_upload(stack, "kent/app", h)
        chunks = (blob[i : i + 32 * 1024] for i in range(0, len(blob), 32 * 1024))
        r = requests.patch(
            stack.url + location, data=chunks,
            headers={**h, "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        assert r.status_code == 202, r.text
        r = requests.put(stack.url + r.headers["Location"], params={"digest": sha256(blob)},
                         headers=h)  # fmt: skip
        return r.status_code

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(one, blobs)) == [201, 201]
    wait_for(lambda: metrics(stack).get("kent") == 900_000, timeout=20)


class PausedStream:
    """A chunked PATCH sent by hand, so that a test can stop it mid-body (as a slow link
    does) while it holds what the gateway reserved for it."""

    def __init__(self, stack: Stack, location: str, h: dict) -> None:
        self.sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
        head = [
            f"PATCH {location} HTTP/1.1",
            "Host: registry",
            "Transfer-Encoding: chunked",
            "Content-Type: application/octet-stream",
            *(f"{k}: {v}" for k, v in h.items()),
        ]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def end(self) -> int:
        self.sock.sendall(b"0\r\n\r\n")
        status = int(self.sock.makefile("rb").readline().split()[1])
        self.sock.close()
        return status


def holding_room(stack: Stack, repo: str, h: dict) -> PausedStream:
    """A streamed upload paused after its first 32 kB, holding the room it reserved ahead
    (a quarter of the quota: reserved before its first chunk goes on)."""
    b = PausedStream(stack, start_upload(stack, repo, h), h)
    b.send(os.urandom(32 * 1024))
    time.sleep(0.5)
    return b


def streamed_patch(stack: Stack, location: str, blob: bytes, h: dict, out: list) -> None:
    chunks = (blob[i : i + 32 * 1024] for i in range(0, len(blob), 32 * 1024))
    body = {**h, "Content-Type": "application/octet-stream"}
    try:
        out.append(requests.patch(stack.url + location, data=chunks, headers=body).status_code)
    except requests.ConnectionError:
        out.append(None)  # cut


def test_a_streamed_body_ending_while_others_hold_room_waits_for_it(stack: Stack) -> None:
    """Under 1 MB, a streamed upload B (100 kB in all) has sent its first 32 kB and holds the
    250 kB it reserved ahead; A streams 800 kB, which fits only once B gives back what it does
    not use. A's end waits for that instead of being cut, and both pass."""
    h = bearer(token(stack, tabbify_jwt({"network": "gotham"})))
    b = holding_room(stack, "gotham/app", h)
    out: list = []
    location = start_upload(stack, "gotham/app", h)
    a = threading.Thread(target=streamed_patch, args=(stack, location, os.urandom(800_000), h, out))
    a.start()
    a.join(1.5)
    assert a.is_alive() and not out, f"A was answered while B held room: {out}"
    b.send(os.urandom(100_000 - 32 * 1024))
    assert b.end() == 202
    a.join(10)
    assert out == [202]
    assert parked(stack, "gotham/app") == 900_000


def test_a_streamed_body_waits_for_others_room_a_bounded_time(stack: Stack) -> None:
    """When the room others hold does not come back, the body that does not fit is cut after
    the wait (streamcap.WAIT_OTHERS, 5 s), not held open for as long as the others last; what
    went on stays within the quota."""
    h = bearer(token(stack, tabbify_jwt({"network": "metro"})))
    b = holding_room(stack, "metro/app", h)
    out: list = []
    started = time.monotonic()
    streamed_patch(stack, start_upload(stack, "metro/app", h), os.urandom(800_000), h, out)
    waited = time.monotonic() - started
    assert out in ([403], [None]) and 5 <= waited < 15, (out, waited)
    assert parked(stack, "metro/app") <= MB
    b.send(os.urandom(1000))
    assert b.end() == 202


def test_a_body_that_keeps_coming_while_it_waits_is_cut_at_once(stack: Stack) -> None:
    """Waiting for others' room holds at most one read's worth of the body (WAIT_HOLD): a
    client that keeps sending meanwhile is cut then, not after the whole wait."""
    h = bearer(token(stack, tabbify_jwt({"network": "smallville"})))
    b = holding_room(stack, "smallville/app", h)
    out: list = []
    started = time.monotonic()
    streamed_patch(stack, start_upload(stack, "smallville/app", h), os.urandom(4 * MB), h, out)
    assert out in ([403], [None]) and time.monotonic() - started < 4, out
    assert parked(stack, "smallville/app") <= MB
    b.send(os.urandom(1000))
    assert b.end() == 202


def test_unfinished_uploads_are_bounded_per_tenant(stack: Stack) -> None:
    h = bearer(token(stack, tabbify_jwt({"network": "stark"})))
    for _ in range(64):
        start_upload(stack, "stark/app", h)
    r = requests.post(f"{stack.url}/v2/stark/app/blobs/uploads/", headers=h, timeout=10)
    assert r.status_code == 429 and r.json()["errors"][0]["code"] == "TOOMANYREQUESTS", r.text
    assert "unfinished uploads" in r.json()["errors"][0]["message"]
    # Another tenant is not held up.
    g = bearer(token(stack, tabbify_jwt({"network": "umbrella"})))
    requests.delete(stack.url + start_upload(stack, "umbrella/other", g), headers=g, timeout=10)


def test_abandoned_uploads_stop_counting_after_the_upload_age(
    tmp_path: Path, auth: AuthStandin
) -> None:
    """REGISTRY_UPLOAD_MAX_AGE: the backend purges an unfinished upload after it (rendered
    config, tests/unit/test_backend_config.py; Distribution's first purge comes up to an hour
    after start, too late for a test), and the gateway stops counting it then."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "policy.toml").write_text(POLICY.format(limit="400kB"))
    s = Stack(data, auth.url, REGISTRY_WORKERS="1", REGISTRY_UPLOAD_MAX_AGE="10s").start()
    try:
        wait_whole(s)
        h = bearer(token(s, tabbify_jwt({"network": "hooli"})))
        assert patch(s, start_upload(s, "hooli/app", h), os.urandom(900_000), 0, h).ok
        again = start_upload(s, "hooli/app", h)
        chunk = os.urandom(200_000)
        assert denied(patch(s, again, chunk, 0, h), 900_000)
        time.sleep(11)  # abandoned: the 900 kB no longer count (nor, soon, exist)
        r = patch(s, again, chunk, 0, h)
        assert r.status_code == 202, r.text
    finally:
        s.stop()
