"""Faults under real traffic: a backend killed mid-push, a gateway killed mid-pull, a full disk.

Each test runs its own stack (auth on, Distribution backend) and checks what a client sees
(a clean OCI error or a connection error: never a 2xx, never a hang, never truncated data),
that supervisord brings the killed program back, and that a retry gives byte-identical data.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import select
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.bench.throughput import Body
from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.support.stack import Stack, wait_for

pytestmark = pytest.mark.e2e

MIB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


# --- helpers ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a client saw: an HTTP answer, or the connection failing under it."""

    status: int | None = None
    body: bytes = b""
    error: BaseException | None = None
    sent: int = 0


def streamed_put(
    stack: Stack,
    path: str,
    body: Body,
    headers: dict[str, str],
    *,
    pause_after: int | None = None,
    resume: threading.Event | None = None,
    paused: threading.Event | None = None,
    timeout: float = 60.0,
) -> Outcome:
    """PUT `body` on a raw socket, 1 MiB at a time, reading an early answer as soon as one
    arrives. With `pause_after`, stop sending after that many bytes, set `paused` and wait
    for `resume`: the fault is injected while the request is in flight."""
    out = Outcome()
    head = [f"PUT {path} HTTP/1.1", f"Host: {stack.host}", f"Content-Length: {body.size}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=timeout)
    try:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            while chunk := body.read(MIB):
                if select.select([sock], [], [], 0)[0]:
                    break  # the gateway answered early: stop sending, read it
                sock.sendall(chunk)
                out.sent += len(chunk)
                if pause_after is not None and out.sent >= pause_after and not paused.is_set():
                    paused.set()
                    if not resume.wait(timeout):
                        raise TimeoutError("the fault was never injected")
        except OSError as e:  # reset / broken pipe: the answer may still be readable
            out.error = e
        try:
            response = http.client.HTTPResponse(sock)
            response.begin()
            out.status, out.body = response.status, response.read()
            out.error = None
        except (OSError, http.client.HTTPException) as e:
            out.error = out.error or e
    finally:
        sock.close()
    return out


def start_upload(stack: Stack, repo: str, headers: dict[str, str]) -> str:
    r = requests.post(f"{stack.url}/v2/{repo}/blobs/uploads/", headers=headers, timeout=30)
    assert r.status_code == 202, r.text
    return r.headers["Location"]


def with_digest(location: str, digest: str) -> str:
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def push_body(stack: Stack, repo: str, body: Body, headers: dict[str, str]) -> Outcome:
    location = start_upload(stack, repo, headers)
    return streamed_put(
        stack,
        with_digest(location, body.digest()),
        body,
        {**headers, "Content-Type": "application/octet-stream"},
        timeout=120,
    )


def pull_digest(stack: Stack, repo: str, digest: str, headers: dict[str, str]) -> str:
    """GET a blob streamed; the sha256 of what came back."""
    h = hashlib.sha256()
    with requests.get(
        f"{stack.url}/v2/{repo}/blobs/{digest}", headers=headers, stream=True, timeout=120
    ) as r:
        assert r.status_code == 200, r.text
        for chunk in r.iter_content(MIB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def program_pid(stack: Stack, program: str) -> int:
    out = stack.supervisorctl("pid", program).strip()
    return int(out) if out.isdigit() else 0


def wait_restarted(stack: Stack, program: str, old_pid: int, timeout: float = 45) -> int:
    """supervisord brought `program` back: RUNNING (past startsecs) with a new pid."""

    def back() -> bool:
        status = stack.supervisorctl("status", program)
        return "RUNNING" in status and program_pid(stack, program) not in (0, old_pid)

    wait_for(back, timeout, interval=0.3)
    return program_pid(stack, program)


def assert_clean_failure(out: Outcome, what: str) -> None:
    """Never a 2xx; an HTTP answer is a 5xx (or 4xx) with an OCI JSON body, not HTML."""
    if out.status is None:
        assert out.error is not None, f"{what}: neither an answer nor an error"
        return
    assert out.status >= 400, f"{what}: {out.status} {out.body[:300]!r}"
    assert b"<html" not in out.body.lower(), out.body[:300]
    assert json.loads(out.body)["errors"][0]["code"], out.body[:300]


def oci_image(stack: Stack, repo: str, tag: str, headers: dict[str, str]) -> dict[str, bytes]:
    """Push a small complete image (config, one layer, manifest); its blobs by digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(8).hex()})
    config_bytes, layer = config.encode(), os.urandom(300_000)
    for blob in (config_bytes, layer):
        push_blob(stack, repo, blob, headers)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config_bytes),
                "size": len(config_bytes),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    r = requests.put(
        f"{stack.url}/v2/{repo}/manifests/{tag}",
        data=manifest,
        headers={**headers, "Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return {sha256(config_bytes): config_bytes, sha256(layer): layer, "manifest": manifest}


def assert_image_pulls(stack: Stack, repo: str, tag: str, image: dict[str, bytes], h) -> None:
    r = requests.get(
        f"{stack.url}/v2/{repo}/manifests/{tag}",
        headers={**h, "Accept": OCI_MANIFEST},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.content == image["manifest"]
    for digest, data in image.items():
        if digest != "manifest":
            r = requests.get(f"{stack.url}/v2/{repo}/blobs/{digest}", headers=h, timeout=30)
            assert r.status_code == 200, r.text
            assert r.content == data


@pytest.fixture
def stack(tmp_path: Path, auth) -> Iterator[Stack]:
    s = Stack(tmp_path / "data", auth.url).start()
    try:
        yield s
    finally:
        s.stop()


# --- tests --------------------------------------------------------------------------------


def test_backend_killed_mid_push_fails_cleanly_and_the_retry_succeeds(stack, acme_jwt):
    h = bearer(token(stack, acme_jwt))
    repo = "acme/killed-push"
    body = Body(512 * MIB, b"killed-push")
    digest = body.digest()
    location = start_upload(stack, repo, h)
    paused, resume = threading.Event(), threading.Event()
    result: list[Outcome] = []

    def send() -> None:
        result.append(
            streamed_put(
                stack,
                with_digest(location, digest),
                body,
                {**h, "Content-Type": "application/octet-stream"},
                pause_after=64 * MIB,
                paused=paused,
                resume=resume,
                timeout=60,
            )
        )

    sender = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    sender.start()
    assert paused.wait(60), f"the upload never got going: {result}"
    old = program_pid(stack, "backend")
    assert old
    os.kill(old, 9)
    resume.set()
    sender.join(90)
    assert not sender.is_alive(), "the client hangs after the backend died"
    out = result[0]
    print(
        f"backend killed after {out.sent / MIB:.0f} MiB sent: status={out.status} "
        f"error={out.error!r} in {time.monotonic() - started:.1f}s"
    )
    assert out.sent < body.size, "the kill came after the whole body was sent"
    assert_clean_failure(out, "push while the backend died")
    if out.status is not None:
        assert out.status in (502, 503), out.status

    wait_restarted(stack, "backend", old)
    stack.wait_ready()
    # The half-written blob is never served: the gateway has no record, the backend never
    # completed it.
    r = requests.head(f"{stack.url}/v2/{repo}/blobs/{digest}", headers=h, timeout=10)
    assert r.status_code == 404
    r = requests.get(f"{stack.url}/v2/{repo}/blobs/{digest}", headers=h, timeout=10)
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    r = stack.backend_get(f"/v2/{repo}/blobs/{digest}", "HEAD", timeout=10)
    assert r.status_code == 404

    # A new upload session of the same blob succeeds and pulls back byte-identical.
    body.left = body.size  # the same bytes again, from the start
    retry = push_body(stack, repo, body, h)
    assert retry.status == 201, (retry.status, retry.body[:300], retry.error)
    assert pull_digest(stack, repo, digest, h) == digest


def test_gateway_killed_mid_pull_is_a_short_read_and_the_retry_reauths(stack, acme_jwt):
    h = bearer(token(stack, acme_jwt))
    repo = "acme/killed-pull"
    body = Body(256 * MIB, b"killed-pull")
    digest = body.digest()
    pushed = push_body(stack, repo, body, h)
    assert pushed.status == 201, (pushed.status, pushed.body[:300], pushed.error)

    old = stack.gateway_pids()
    assert len(old) == stack.workers
    killed, received, failure = False, 0, None
    h_sum = hashlib.sha256()
    with requests.get(
        f"{stack.url}/v2/{repo}/blobs/{digest}", headers=h, stream=True, timeout=30
    ) as r:
        assert r.status_code == 200
        length = int(r.headers["Content-Length"])
        assert length == 256 * MIB
        try:
            for chunk in r.iter_content(MIB):
                received += len(chunk)
                h_sum.update(chunk)
                if received >= 16 * MIB and not killed:
                    for pid in old.values():  # whichever worker serves this pull
                        os.kill(pid, 9)
                    killed = True
        except (requests.RequestException, OSError) as e:
            failure = e
    print(f"gateway killed mid-pull: {received / MIB:.1f} of {length / MIB:.0f} MiB, {failure!r}")
    assert received < length, "the kill came after the whole blob was read"
    assert failure is not None, "a truncated pull was not reported to the client"
    assert "sha256:" + h_sum.hexdigest() != digest

    for name, pid in old.items():
        wait_restarted(stack, f"gateway:{name}", pid)
    stack.wait_ready()
    # New processes, the same run and key: the client's token still works, and the retry
    # gets the whole blob.
    assert pull_digest(stack, repo, digest, h) == digest


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@needs_root
def test_disk_full_is_a_clean_error_and_the_registry_recovers(tmp_path, auth, acme_jwt):
    with tmpfs(tmp_path / "data", "64m") as data:
        stack = Stack(data, auth.url).start()
        try:
            h = bearer(token(stack, acme_jwt))
            repo = "acme/full"
            image = oci_image(stack, repo, "v1", h)

            # Fill the disk but a few MiB, then push 4 MiB blobs until the backend gives up.
            filler = data / "filler"
            subprocess.run(
                ["fallocate", "-l", str(free_bytes(data) - 6 * MIB), str(filler)], check=True
            )
            confirmed: dict[str, bytes] = {}
            failures: list[Outcome] = []
            for i in range(8):
                blob = os.urandom(4 * MIB)
                started = time.monotonic()
                location = start_upload(stack, repo, h)
                r_out = Outcome()
                try:
                    r = requests.put(
                        stack.url + location,
                        params={"digest": sha256(blob)},
                        data=blob,
                        headers={**h, "Content-Type": "application/octet-stream"},
                        timeout=60,
                    )
                    r_out.status, r_out.body = r.status_code, r.content
                except requests.ConnectionError as e:
                    r_out.error = e
                assert time.monotonic() - started < 60
                print(f"push {i} with {free_bytes(data) / MIB:.1f} MiB free: {r_out.status}")
                if r_out.status == 201:
                    confirmed[sha256(blob)] = blob
                    continue
                print(f"full-disk answer: {r_out.status} {r_out.body[:400]!r} {r_out.error!r}")
                failures.append(r_out)
                break
            assert failures, "the disk never filled up"
            assert_clean_failure(failures[0], "push on a full disk")

            # The gateway stays up and keeps answering; the token flow still works.
            assert requests.get(f"{stack.url}/v2/", timeout=10).status_code == 401
            h = bearer(token(stack, acme_jwt))
            assert requests.get(f"{stack.url}/v2/", headers=h, timeout=10).status_code == 200

            # Space comes back: a new blob pushes and pulls back byte-identical, and nothing
            # confirmed earlier was lost.
            filler.unlink()
            blob = os.urandom(2 * MIB)
            digest = push_blob(stack, repo, blob, h)
            r = requests.get(f"{stack.url}/v2/{repo}/blobs/{digest}", headers=h, timeout=30)
            assert r.status_code == 200 and r.content == blob
            assert_image_pulls(stack, repo, "v1", image, h)
            for digest, data_bytes in confirmed.items():
                r = requests.get(f"{stack.url}/v2/{repo}/blobs/{digest}", headers=h, timeout=30)
                assert r.status_code == 200, f"confirmed push {digest} lost: {r.text}"
                assert r.content == data_bytes

            # Neither the access log nor the ledger is corrupt.
            assert stack.access_log()  # every line parses as JSON
            ledger = data / "ledger" / "ledger.db"
            with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
                assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            stack.stop()


def retry_push(stack: Stack, repo: str, blob: bytes, h: dict[str, str]) -> str | None:
    """One push attempt: the digest once it is confirmed, None while it is refused."""
    location = start_upload(stack, repo, h)
    r = requests.put(
        stack.url + with_digest(location, sha256(blob)),
        data=blob,
        headers={**h, "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    return r.headers.get("Docker-Content-Digest") if r.status_code == 201 else None


@needs_root
def test_a_push_the_ledger_cannot_record_is_never_confirmed(tmp_path, auth, acme_jwt):
    """The ledger's disk is full while the backend's is not (S3 storage, or a local disk that
    fills up between the blob and its record): a push the gateway could not record must not
    be answered 201, or the client believes in a blob its tenant can never see again."""
    data = tmp_path / "data"
    with tmpfs(data / "ledger", "1m") as ledger_dir:
        stack = Stack(data, auth.url).start()
        try:
            h = bearer(token(stack, acme_jwt))
            repo = "acme/ledger-full"
            image = oci_image(stack, repo, "v1", h)  # recorded while there is room
            filler = ledger_dir / "filler"
            subprocess.run(
                ["fallocate", "-l", str(free_bytes(ledger_dir)), str(filler)], check=True
            )

            lost = []
            blob = os.urandom(100_000)
            location = start_upload(stack, repo, h)
            r = requests.put(
                stack.url + with_digest(location, sha256(blob)),
                data=blob,
                headers={**h, "Content-Type": "application/octet-stream"},
                timeout=30,
            )
            if r.status_code == 201:
                seen = requests.head(
                    f"{stack.url}/v2/{repo}/blobs/{sha256(blob)}", headers=h, timeout=10
                )
                if seen.status_code != 200:
                    lost.append(f"blob push answered 201, then HEAD {seen.status_code}")
            else:
                assert_clean_failure(Outcome(r.status_code, r.content), "unrecorded blob push")
            manifest = image["manifest"].replace(b'"schemaVersion": 2', b'"schemaVersion":  2')
            r = requests.put(
                f"{stack.url}/v2/{repo}/manifests/v2",
                data=manifest,
                headers={**h, "Content-Type": OCI_MANIFEST},
                timeout=30,
            )
            if r.status_code == 201:
                seen = requests.get(
                    f"{stack.url}/v2/{repo}/manifests/{sha256(manifest)}",
                    headers={**h, "Accept": OCI_MANIFEST},
                    timeout=10,
                )
                if seen.status_code != 200:
                    lost.append(
                        f"manifest push answered 201, then GET by digest {seen.status_code}"
                    )
            else:
                assert_clean_failure(Outcome(r.status_code, r.content), "unrecorded manifest push")
            # The gateway keeps serving what it did record.
            assert_image_pulls(stack, repo, "v1", image, h)

            # Room again: within a second (the ledger reopens itself at most once a second)
            # the same blob pushed again is recorded and pulls back, with no restart.
            filler.unlink()
            wait_for(lambda: retry_push(stack, repo, blob, h) == sha256(blob), 10)
            r = requests.get(f"{stack.url}/v2/{repo}/blobs/{sha256(blob)}", headers=h, timeout=30)
            assert r.status_code == 200 and r.content == blob
            assert not lost, lost
        finally:
            stack.stop()
