"""Mixed load from many tenants at once: nothing fails, nothing leaks across tenants.

One stack (auth on, Distribution backend), 4 tenants, 32 clients (threads, each with its own
session and its own login, re-authenticating on 401) for TBF_LOAD_SECONDS (default 20 s):
distinct and shared blob pushes, manifest pushes, pulls verified by sha256, and cross-tenant
reads and mounts that must never succeed. Run with -s to see the summary line.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import requests

from tests.support.images import image_manifest
from tests.support.stack import Stack
from tests.support.standins.auth import tabbify_jwt

pytestmark = pytest.mark.e2e

KIB, MIB = 1 << 10, 1 << 20
TENANTS = [f"t{k}" for k in range(4)]
CLIENTS = 32
SECONDS = float(os.environ.get("TBF_LOAD_SECONDS", "20"))
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCTETS = "application/octet-stream"
# Layers every tenant pushes (each into its own repos, as the ledger requires).
SHARED = [os.urandom(size) for size in (64 * KIB, 512 * KIB, 1 * MIB, 3 * MIB)]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Unexpected(Exception):
    """A registry answer the scenario does not allow."""


@dataclass
class Tally:
    """Shared results, updated under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    pulled: int = 0
    verified: int = 0
    cross_attempts: int = 0
    cross_successes: list[str] = field(default_factory=list)
    reauths: int = 0
    # tenant -> digests only that tenant pushed (targets for the cross-tenant attempts)
    distinct: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def op(self, kind: str, up: int = 0, down: int = 0) -> None:
        with self.lock:
            self.ops[kind] += 1
            self.bytes_up += up
            self.bytes_down += down

    def error(self, kind: str, what: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            if len(self.error_samples) < 20:
                self.error_samples.append(f"{kind}: {what}")


class Client:
    """One registry user: a tenant, its own session, its own repository."""

    def __init__(self, stack: Stack, n: int, tally: Tally) -> None:
        self.stack, self.tally = stack, tally
        self.tenant = TENANTS[n % len(TENANTS)]
        self.credential = tabbify_jwt({"sub": f"user-{n}", "network": self.tenant})
        self.repo = f"{self.tenant}/app{n}"
        self.session = requests.Session()
        self.rng = random.Random(n)
        self.token = ""
        self.blobs: dict[str, int] = {}  # digest -> size, pushed into self.repo
        self.manifests: dict[str, str] = {}  # tag -> digest of the manifest we pushed
        self.cross_done: set[str] = set()

    # --- plumbing -------------------------------------------------------------------------

    def login(self) -> None:
        r = self.session.get(
            f"{self.stack.url}/auth/token",
            params={"service": "tabbify-registry"},
            auth=("x", self.credential),
            timeout=60,
        )
        if r.status_code != 200:
            raise Unexpected(f"login {r.status_code} {r.text[:200]}")
        self.token = r.json()["token"]

    def call(self, method: str, path: str, **kw) -> requests.Response:
        """A registry request with our token; one re-auth on 401, as clients do."""
        extra = kw.pop("headers", {})
        for attempt in range(2):
            headers = {**extra, "Authorization": f"Bearer {self.token}"}
            r = self.session.request(
                method, self.stack.url + path, headers=headers, timeout=120, **kw
            )
            if r.status_code != 401 or attempt:
                return r
            with self.tally.lock:
                self.tally.reauths += 1
            self.login()
        raise AssertionError("unreachable")

    def expect(self, r: requests.Response, *statuses: int) -> requests.Response:
        if r.status_code not in statuses:
            raise Unexpected(f"{r.request.method} {r.url} -> {r.status_code} {r.text[:200]}")
        return r

    # --- operations -------------------------------------------------------------------------

    def upload(self, data: bytes) -> str:
        digest = sha256(data)
        r = self.expect(self.call("POST", f"/v2/{self.repo}/blobs/uploads/"), 202)
        location = r.headers["Location"]
        if not location.startswith(f"/v2/{self.repo}/blobs/uploads/"):
            raise Unexpected(f"upload location {location}")
        sep = "&" if "?" in location else "?"
        r = self.call(
            "PUT", f"{location}{sep}digest={digest}", data=data, headers={"Content-Type": OCTETS}
        )
        self.expect(r, 201)
        if r.headers.get("Docker-Content-Digest") != digest:
            raise Unexpected(f"stored {r.headers.get('Docker-Content-Digest')}, sent {digest}")
        self.blobs[digest] = len(data)
        return digest

    def push_distinct(self) -> None:
        data = os.urandom(self.rng.randint(64 * KIB, 4 * MIB))
        digest = self.upload(data)
        with self.tally.lock:
            self.tally.distinct.setdefault(self.tenant, []).append((self.repo, digest))
        self.tally.op("push-blob", up=len(data))

    def push_shared(self) -> None:
        data = self.rng.choice(SHARED)
        self.upload(data)
        self.tally.op("push-shared", up=len(data))

    def push_manifest(self) -> None:
        if not self.blobs:
            return self.push_distinct()
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "nonce": os.urandom(8).hex()}
        ).encode()
        self.upload(config)
        layers = self.rng.sample(sorted(self.blobs), k=min(3, len(self.blobs)))
        body = image_manifest((sha256(config), len(config)), [(d, self.blobs[d]) for d in layers])
        tag = f"v{self.rng.randint(0, 3)}"
        r = self.call(
            "PUT",
            f"/v2/{self.repo}/manifests/{tag}",
            data=body,
            headers={"Content-Type": OCI_MANIFEST},
        )
        self.expect(r, 201)
        if r.headers.get("Docker-Content-Digest") != sha256(body):
            raise Unexpected(f"manifest stored as {r.headers.get('Docker-Content-Digest')}")
        self.manifests[tag] = sha256(body)
        self.tally.op("push-manifest", up=len(body) + len(config))

    def pull_blob(self, digest: str) -> None:
        h = hashlib.sha256()
        size = 0
        with self.call("GET", f"/v2/{self.repo}/blobs/{digest}", stream=True) as r:
            self.expect(r, 200)
            for chunk in r.iter_content(256 * KIB):
                h.update(chunk)
                size += len(chunk)
        with self.tally.lock:
            self.tally.pulled += 1
        if "sha256:" + h.hexdigest() != digest or size != self.blobs[digest]:
            raise Unexpected(f"pulled {digest}: {size} bytes with another digest")
        with self.tally.lock:
            self.tally.verified += 1
        self.tally.op("pull-blob", down=size)

    def pull_some_blob(self) -> None:
        if not self.blobs:
            return self.push_distinct()
        self.pull_blob(self.rng.choice(sorted(self.blobs)))

    def pull_manifest(self) -> None:
        if not self.manifests:
            return self.push_manifest()
        tag = self.rng.choice(sorted(self.manifests))
        r = self.expect(
            self.call("GET", f"/v2/{self.repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}),
            200,
        )
        with self.tally.lock:
            self.tally.pulled += 1
        if sha256(r.content) != self.manifests[tag]:
            raise Unexpected(f"manifest {tag} came back with another digest")
        with self.tally.lock:
            self.tally.verified += 1
        self.tally.op("pull-manifest", down=len(r.content))
        manifest = json.loads(r.content)
        for d in [manifest["config"]["digest"], *(x["digest"] for x in manifest["layers"])]:
            self.pull_blob(d)

    def foreign(self) -> tuple[str, str] | None:
        """A digest only another tenant pushed, and the repository it is in."""
        with self.tally.lock:
            others = [t for t in TENANTS if t != self.tenant and self.tally.distinct.get(t)]
            if not others:
                return None
            return self.rng.choice(self.tally.distinct[self.rng.choice(others)])

    def crossed(self, what: str) -> None:
        with self.tally.lock:
            self.tally.cross_successes.append(f"{self.tenant}: {what}")

    def cross_read(self) -> None:
        target = self.foreign()
        if target is None:
            return
        repo, digest = target
        attempts = [
            ("HEAD", f"/v2/{self.repo}/blobs/{digest}", (404,)),  # by digest, own repository
            ("GET", f"/v2/{self.repo}/blobs/{digest}", (404,)),
            ("HEAD", f"/v2/{repo}/blobs/{digest}", (403,)),  # the other tenant's repository
            ("GET", f"/v2/{repo}/blobs/{digest}", (403,)),
        ]
        for method, path, allowed in attempts:
            r = self.call(method, path)
            with self.tally.lock:
                self.tally.cross_attempts += 1
            if 200 <= r.status_code < 400:
                self.crossed(f"{method} {path} -> {r.status_code}")
            else:
                self.expect(r, *allowed)
        self.cross_done.add("read")
        self.tally.op("cross-read")

    def cross_mount(self) -> None:
        target = self.foreign()
        if target is None:
            return
        repo, digest = target
        for source in (repo, self.repo):  # named honestly, and claimed as our own
            r = self.call("POST", f"/v2/{self.repo}/blobs/uploads/?mount={digest}&from={source}")
            with self.tally.lock:
                self.tally.cross_attempts += 1
            if r.status_code == 201:
                self.crossed(f"mount {digest} from {source} -> 201")
            self.expect(r, 202, 403, 404)
            if r.status_code == 202:  # a plain upload was started instead: abandon it
                self.expect(self.call("DELETE", r.headers["Location"]), 204, 404)
        r = self.call("HEAD", f"/v2/{self.repo}/blobs/{digest}")
        with self.tally.lock:
            self.tally.cross_attempts += 1
        if r.status_code != 404:
            self.crossed(f"HEAD after mount -> {r.status_code}")
        self.cross_done.add("mount")
        self.tally.op("cross-mount")

    def expire_token(self) -> None:
        """Our token goes stale (as after 300 s or a gateway restart): the next request gets
        401 and the client logs in again."""
        self.token = self.token[:-8] + ("A" if self.token[-8] != "A" else "B") * 8
        self.tally.op("token-expired")

    # --- the loop ---------------------------------------------------------------------------

    MIX = (
        ("push-blob", push_distinct, 22),
        ("push-shared", push_shared, 12),
        ("push-manifest", push_manifest, 14),
        ("pull-manifest", pull_manifest, 14),
        ("pull-blob", pull_some_blob, 22),
        ("cross-read", cross_read, 8),
        ("cross-mount", cross_mount, 8),
        ("token-expired", expire_token, 2),
    )

    def step(self, kind: str, fn) -> None:
        try:
            fn(self)
        except (Unexpected, requests.RequestException, KeyError, ValueError) as e:
            self.tally.error(kind, repr(e)[:300])

    def challenge(self) -> None:
        """As real clients start: `GET /v2/` without a token → 401 with the Bearer challenge."""
        r = self.expect(self.session.get(f"{self.stack.url}/v2/", timeout=60), 401)
        if 'realm="' not in r.headers.get("WWW-Authenticate", ""):
            raise Unexpected(f"no challenge: {r.headers}")
        self.login()

    def run(self, deadline: float) -> None:
        self.step("login", Client.challenge)
        self.step("push-shared", Client.push_shared)
        self.step("push-blob", Client.push_distinct)  # every tenant has digests to aim at
        kinds = [(k, f) for k, f, _ in self.MIX]
        weights = [w for _, _, w in self.MIX]
        while time.monotonic() < deadline:
            kind, fn = self.rng.choices(kinds, weights)[0]
            self.step(kind, fn)
        # Every client tries both cross-tenant moves at least once.
        for kind, fn in (("cross-read", Client.cross_read), ("cross-mount", Client.cross_mount)):
            if kind.removeprefix("cross-") not in self.cross_done:
                self.step(kind, fn)
        self.session.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, auth):
    s = Stack(tmp_path_factory.mktemp("load") / "data", auth.url).start()
    yield s
    s.stop()


def test_mixed_multi_tenant_load_has_no_errors_and_no_leaks(stack):
    tally = Tally()
    clients = [Client(stack, n, tally) for n in range(CLIENTS)]
    started = time.monotonic()
    deadline = started + SECONDS
    threads = [threading.Thread(target=c.run, args=(deadline,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 120)
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "a client hangs"

    ops = sum(tally.ops.values())
    mb = (tally.bytes_up + tally.bytes_down) / 1e6
    print(
        f"\nload: {CLIENTS} clients, {len(TENANTS)} tenants, {elapsed:.1f}s: "
        f"{ops} ops ({ops / elapsed:.1f} ops/s), "
        f"up {tally.bytes_up / 1e6:.0f} MB, down {tally.bytes_down / 1e6:.0f} MB "
        f"({mb / elapsed:.1f} MB/s); by kind {dict(sorted(tally.ops.items()))}; "
        f"pulled {tally.pulled} verified {tally.verified}; "
        f"cross-tenant attempts {tally.cross_attempts} successes {len(tally.cross_successes)}; "
        f"re-auths {tally.reauths}; errors {sum(tally.errors.values())} {dict(tally.errors)}"
    )
    assert not tally.errors, tally.error_samples
    assert tally.verified == tally.pulled > 0
    assert not tally.cross_successes, tally.cross_successes
    assert all(c.cross_done == {"read", "mount"} for c in clients), "a client never crossed"
    for kind, _, _ in Client.MIX:
        assert tally.ops[kind] > 0, kind
    if tally.ops["token-expired"]:
        assert tally.reauths > 0, "stale tokens were never refused"
    # The access log kept up: one parseable line per request, none a 5xx; no gateway errors.
    log = stack.access_log()
    assert not [line for line in log if (line["status"] or 500) >= 500]
    text = stack.log.read_text(errors="replace")
    assert "Traceback" not in text and "gateway error" not in text
