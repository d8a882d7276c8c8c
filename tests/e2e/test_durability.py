"""Faults an operator meets, and what a client sees during and after each.

- the ledger file deleted, or made read-only (chattr +i), while the registry runs;
- a log consumer that stops reading stdout;
- a low file-descriptor limit and a flood of idle connections;
- the backend killed in the middle of a chunked upload;
- a restart of a registry with many repositories.

Each asserts what a client sees during the fault, that the stack recovers by itself (no
manual restart), and how long that took (printed, for the README's failure-modes table).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from addons.cli import logrelay
from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.e2e.test_isolation import external_stack
from tests.e2e.test_ledger_loss import wait_whole
from tests.e2e.test_listing import push_image
from tests.support.rawhttp import Conn
from tests.support.stack import CLI, Stack, wait_for
from tests.support.standins.dedupe_registry import DedupeRegistry

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="chattr, prlimit and kill of others need root"),
]

MIB = 1 << 20


def admin(stack: Stack) -> str:
    return f"http://{stack.env['REGISTRY_ADMIN_ADDR']}"


def healthz(stack: Stack) -> dict:
    return requests.get(f"{admin(stack)}/healthz", timeout=10).json()


def exits(stack: Stack) -> str:
    """Why a gateway worker is not the one that was there: supervisord's lines, as relayed."""
    lines = [line for line in stack.log.read_text().splitlines() if "exited" in line]
    return "a gateway worker was restarted:\n" + "\n".join(lines[-10:])


def head_blob(stack: Stack, repo: str, digest: str, h: dict[str, str]) -> int:
    return requests.head(f"{stack.url}/v2/{repo}/blobs/{digest}", headers=h, timeout=10).status_code


def try_push(stack: Stack, repo: str, blob: bytes, h: dict[str, str]) -> int:
    """One push attempt: the status of its final PUT (or of the POST when that fails)."""
    r = requests.post(f"{stack.url}/v2/{repo}/blobs/uploads/", headers=h, timeout=10)
    if r.status_code != 202:
        return r.status_code
    r = requests.put(
        stack.url + r.headers["Location"],
        params={"digest": sha256(blob)},
        data=blob,
        headers={**h, "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    return r.status_code


@pytest.fixture
def stack(tmp_path: Path, auth) -> Iterator[Stack]:
    s = Stack(tmp_path / "data", auth.url).start()
    yield s
    s.stop()


# --- the ledger file in trouble ---------------------------------------------------------------


def test_a_deleted_ledger_loses_nothing_confirmed(stack, acme_jwt):
    h = bearer(token(stack, acme_jwt))
    before = [push_blob(stack, "acme/deleted", os.urandom(1000), h) for _ in range(4)]
    ledger = stack.data_dir / "ledger" / "ledger.db"
    ledger.unlink()
    started = time.monotonic()
    after = [push_blob(stack, "acme/deleted", os.urandom(1000), h) for _ in range(4)]
    assert ledger.exists(), "a write went into the unlinked file"
    # Every worker notices within its next check and puts back what it knows.
    wait_for(lambda: healthz(stack)["ledger"] == "ok", 15)
    time.sleep(6)
    print(f"ledger deleted: recreated and refilled in < {time.monotonic() - started:.1f} s")
    assert stack.stop() == 0
    stack.start()
    h = bearer(token(stack, acme_jwt))
    for digest in before + after:  # blob-only pushes: only the ledger knows they are acme's
        assert head_blob(stack, "acme/deleted", digest, h) == 200, digest


def test_a_read_only_ledger_is_refused_cleanly_and_recovers_by_itself(stack, acme_jwt):
    h = bearer(token(stack, acme_jwt))
    kept = push_blob(stack, "acme/ro", os.urandom(1000), h)
    pids = stack.gateway_pids()
    ledger = stack.data_dir / "ledger" / "ledger.db"
    subprocess.run(["chattr", "+i", str(ledger)], check=True)
    try:
        statuses = {try_push(stack, "acme/ro", os.urandom(1000), h) for _ in range(6)}
        assert 201 not in statuses and statuses <= {503}, statuses
        # Reads of what a worker holds in memory go on; a miss is 503 (the failed write left a
        # hot journal that SQLite must roll back before anyone reads the file): never a 404.
        assert {head_blob(stack, "acme/ro", kept, h) for _ in range(6)} <= {200, 503}
        wait_for(lambda: healthz(stack)["ledger"] == "down", 10)
        r = requests.get(f"{admin(stack)}/healthz", timeout=10)
        assert r.status_code == 503 and r.json().get("ledger_reason")
        assert stack.gateway_pids() == pids, exits(stack)
    finally:
        subprocess.run(["chattr", "-i", str(ledger)], check=True)
    started = time.monotonic()
    blob = os.urandom(1000)
    wait_for(lambda: try_push(stack, "acme/ro", blob, h) == 201, 20)
    wait_for(lambda: healthz(stack)["ledger"] == "ok", 15)
    print(f"read-only ledger: pushes confirmed again {time.monotonic() - started:.1f} s after")
    assert head_blob(stack, "acme/ro", sha256(blob), h) == 200
    assert stack.gateway_pids() == pids, exits(stack)


# --- a log consumer that stops reading --------------------------------------------------------


def pipelined(port: int, request: bytes, n: int, connections: int = 4) -> dict[int, int]:
    """Send `request` n times, pipelined over a few connections; count the statuses."""
    counts: dict[int, int] = {}
    lock = threading.Lock()

    def one(share: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            writer = threading.Thread(target=sock.sendall, args=(request * share,))
            writer.start()
            reader, seen = sock.makefile("rb"), 0
            while seen < share:
                status = int(reader.readline().split()[1])
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)
                seen += 1
                with lock:
                    counts[status] = counts.get(status, 0) + 1
            writer.join()

    shares = [n // connections + (i < n % connections) for i in range(connections)]
    threads = [threading.Thread(target=one, args=(share,)) for share in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def test_a_log_reader_that_stalls_never_freezes_the_registry(tmp_path, auth):
    stack = Stack(tmp_path / "data", auth.url)
    stack.data_dir.mkdir(parents=True)
    with open(stack.log, "ab") as log:
        stack.proc = subprocess.Popen(
            [CLI, "run"], env=stack.env, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True,
        )  # fmt: skip
    try:
        stack.wait_ready()
        session = requests.Session()
        started = time.monotonic()
        # Past the relay's bounded queue (MAX_QUEUED lines) and a pipe's 64 KiB: pipelined
        # on a few connections, so it takes seconds.
        n = logrelay.MAX_QUEUED + 4000
        statuses = pipelined(stack.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", n)
        assert statuses == {401: n}
        print(f"{n} requests with stdout unread: {time.monotonic() - started:.1f} s")
        # Healthy once the burst is served (a worker busy with it on a loaded machine may be
        # late to publish its state for a moment; a frozen registry never comes back).
        wait_for(lambda: healthz(stack)["status"] == "ok", timeout=15)

        def dropped() -> int:
            text = requests.get(f"{admin(stack)}/metrics", timeout=5).text
            line = [x for x in text.splitlines() if 'dropped_total{where="stdout"}' in x]
            return int(line[0].split()[-1]) if line else 0

        wait_for(lambda: dropped() > 0, 10)
        # The reader comes back: lines flow again, and one warning says how many were lost.
        out = stack.proc.stdout
        assert out is not None
        threading.Thread(
            target=lambda: all(iter(lambda: out.read(1 << 16), b"")), daemon=True
        ).start()
        session.get(f"{stack.url}/v2/", timeout=5)
        wait_for(lambda: "lines dropped while nobody was reading" in stack.log.read_text(), 10)
    finally:
        stack.stop()


# --- descriptors ------------------------------------------------------------------------------


def test_at_a_low_descriptor_limit_new_clients_and_healthz_still_answer(tmp_path, auth):
    stack = Stack(tmp_path / "data", auth.url, REGISTRY_WORKERS="1", REGISTRY_HEADER_TIMEOUT="3")
    stack.data_dir.mkdir(parents=True)
    with open(stack.log, "ab") as log:
        stack.proc = subprocess.Popen(
            ["prlimit", "--nofile=256:256", CLI, "run"], env=stack.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    held: list[Conn] = []
    try:
        stack.wait_ready()
        # 400 idle connections against a cap of (256 - 64) / 2 = 96: beyond it, a short 503.
        refused = 0
        for _ in range(400):
            try:
                held.append(Conn(stack.port, timeout=5))
            except OSError:
                refused += 1
        time.sleep(0.5)
        started = time.monotonic()
        # /healthz answers at once. It may say 503 while descriptors are short: the ledger's
        # health check writes a record, and SQLite cannot open its journal then (truthful).
        health = requests.get(f"{admin(stack)}/healthz", timeout=5)
        assert health.status_code in (200, 503), health.text
        assert health.json()["gateway"] == "ok" and health.json()["backend"] == "ok", health.text
        r = requests.get(f"{stack.url}/v2/", timeout=5)
        assert r.status_code in (401, 503)
        if r.status_code == 503:
            assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        # The idle ones are closed at the head deadline: new clients get in again.
        wait_for(lambda: requests.get(f"{stack.url}/v2/", timeout=5).status_code == 401, 15)
        wait_for(lambda: requests.get(f"{admin(stack)}/healthz", timeout=5).status_code == 200, 15)
        print(f"descriptor limit 256, 400 idle connections: served again after "
              f"{time.monotonic() - started:.1f} s")  # fmt: skip
        log = stack.log.read_text()
        assert log.count("Traceback") == 0
        assert log.count("accepting connections fails") <= 3  # one line per 10 s at most
    finally:
        for conn in held:
            conn.close()
        stack.stop()


# --- uploads across a backend restart -----------------------------------------------------------


def test_a_chunked_upload_resumes_after_the_backend_is_killed(stack, acme_jwt):
    h = bearer(token(stack, acme_jwt))
    blob = os.urandom(3 * MIB)
    r = requests.post(f"{stack.url}/v2/acme/resume/blobs/uploads/", headers=h, timeout=10)
    assert r.status_code == 202
    location = r.headers["Location"]
    r = requests.patch(
        stack.url + location,
        data=blob[: 2 * MIB],
        headers={**h, "Content-Type": "application/octet-stream",
                 "Content-Range": f"0-{2 * MIB - 1}"},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    backend = int(stack.supervisorctl("pid", "backend").strip())
    os.kill(backend, signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: stack.supervisorctl("pid", "backend").strip() not in ("0", str(backend)), 30)
    wait_for(lambda: stack.backend_get("/v2/", timeout=2).status_code == 200, 30)
    print(f"backend killed mid-upload: back in {time.monotonic() - started:.1f} s")
    # The same upload goes on where it was: its state is signed with the kept secret.
    r = requests.patch(
        stack.url + location,
        data=blob[2 * MIB :],
        headers={**h, "Content-Type": "application/octet-stream",
                 "Content-Range": f"{2 * MIB}-{len(blob) - 1}"},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 202, r.text
    r = requests.put(
        stack.url + r.headers["Location"], params={"digest": sha256(blob)}, headers=h, timeout=30
    )
    assert r.status_code == 201, r.text
    r = requests.get(f"{stack.url}/v2/acme/resume/blobs/{sha256(blob)}", headers=h, timeout=30)
    assert r.status_code == 200 and r.content == blob


# --- restarts of a large registry -------------------------------------------------------------


def test_a_restart_walks_only_what_the_ledger_has_not_seen(tmp_path, auth, acme_jwt):
    backend = DedupeRegistry().start()
    try:
        first = external_stack(tmp_path / "data", auth, backend).start()
        # Its start-up walk done first: a walk that meets a repository half pushed (no tag
        # yet) leaves it for later, and the restart would walk it (on a loaded machine).
        wait_whole(first)
        h = bearer(token(first, acme_jwt))
        for i in range(60):
            push_image(first, f"acme/many/r{i:02d}", ["v1"], h)
        assert first.stop() == 0
        # One more repository appears in the backend behind the gateway's back.
        config, layer = b'{"a": 1}', b"legacy layer"
        for blob in (config, layer):
            backend.blobs[sha256(blob)] = blob
        legacy = json.dumps(
            {"schemaVersion": 2, "config": {"digest": sha256(config), "size": len(config)},
             "layers": [{"digest": sha256(layer), "size": len(layer)}]}
        ).encode()  # fmt: skip
        backend.store("acme/legacy", "v1", "application/vnd.oci.image.manifest.v1+json", legacy)

        mark = len(backend.requests)
        again = external_stack(tmp_path / "data", auth, backend).start()
        try:  # a failure leaves no stack behind
            h = bearer(token(again, acme_jwt))
            wait_for(lambda: head_blob(again, "acme/legacy", sha256(layer), h) == 200, 20)
            walked = [s for s in backend.requests[mark:] if "/tags/list" in s.path]
            print(f"restart with 61 repositories: {len(walked)} tag lists read")
            # Only the repository it had not seen: the others were walked before (or pushed
            # through the gateway), whatever their number.
            assert {s.path for s in walked} <= {"/v2/acme/legacy/tags/list"}, walked
        finally:
            again.stop()
    finally:
        backend.stop()
