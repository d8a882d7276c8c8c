"""Two complete nodes on one bucket (contract §9): two `tabbify-registry run`, each with its
own data dir, gateway and backend (Distribution), sharing one SeaweedFS bucket, the S3 ledger,
the upload secret, the registry-token keys and the policy file path.

The node-killing test runs last: it takes node A down.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import skopeo_copy
from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.e2e.test_storage import s3_env
from tests.support.images import layout_blobs, oci_layout
from tests.support.stack import CLI, Stack, wait_for
from tests.support.standins.seaweed import SeaweedS3

pytestmark = pytest.mark.e2e
BUCKET = "tbf-registry"


def bucket_server(folder: Path) -> Iterator[SeaweedS3]:
    """SeaweedFS with the nodes' bucket, for a module's fixture."""
    server = SeaweedS3(folder).start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


def shared_files(folder: Path) -> Path:
    """What an operator distributes to every node (a secret store, a config map): the
    upload secret and the registry-token keys; the policy file goes here too."""
    (folder / "http-secret").write_text(os.urandom(24).hex() + "\n")
    (folder / "token-keys").write_text(os.urandom(24).hex() + "\n")
    (folder / "token-keys").chmod(0o600)
    return folder


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    yield from bucket_server(tmp_path_factory.mktemp("seaweed-nodes"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_files(tmp_path_factory.mktemp("shared"))


def node_env(s3: SeaweedS3, shared: Path, members: str) -> dict[str, str]:
    return {
        **s3_env(s3),
        "REGISTRY_WORKERS": "1",  # two nodes on two cores
        "REGISTRY_LEDGER_URL": f"s3://{BUCKET}/ledger",
        "REGISTRY_CLUSTER_MEMBERS": members,
        "REGISTRY_HTTP_SECRET_FILE": str(shared / "http-secret"),
        "REGISTRY_TOKEN_KEY_FILE": str(shared / "token-keys"),
        "REGISTRY_POLICY_FILE": str(shared / "policy.toml"),
    }


@contextlib.contextmanager
def two_nodes(
    root: Path,
    auth_url: str,
    s3: SeaweedS3,
    shared: Path,
    env_a: dict[str, str] | None = None,
    env_b: dict[str, str] | None = None,
) -> Iterator[tuple[Stack, Stack]]:
    """Nodes A and B on the bucket and the shared files (each node's own `env_*` on top),
    started side by side, stopped on the way out."""
    a, b = Stack(root / "a", auth_url), Stack(root / "b", auth_url)
    members = f"127.0.0.1:{a.backend_port},127.0.0.1:{b.backend_port}"
    for stack, own in ((a, env_a), (b, env_b)):
        stack.env.update(node_env(s3, shared, members), **(own or {}))
    a.start(wait=False)
    b.start(wait=False)
    try:
        a.wait_ready(60)
        b.wait_ready(60)
        yield a, b
    finally:
        for stack in (a, b):
            if stack.proc is not None:
                stack.stop()


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, s3: SeaweedS3, shared: Path, auth
) -> Iterator[tuple[Stack, Stack]]:
    with two_nodes(tmp_path_factory.mktemp("nodes"), auth.url, s3, shared) as both:
        yield both


def push_here_pull_there(a: Stack, b: Stack, jwt: str, tmp_path: Path) -> list[str]:
    """skopeo pushes an image through A and pulls it through B, byte-identical (manifest
    too); B's catalog, as the tenant sees it."""
    pushed = oci_layout(tmp_path / "src", "v1")
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", f"docker://{a.host}/acme/app:v1", jwt)
    assert r.returncode == 0, r.stderr
    r = skopeo_copy(f"docker://{b.host}/acme/app:v1", f"oci:{tmp_path / 'out'}:v1", jwt)
    assert r.returncode == 0, r.stderr
    assert layout_blobs(tmp_path / "out") == pushed["blobs"]
    h = bearer(token(b, jwt))
    return requests.get(f"{b.url}/v2/_catalog", headers=h, timeout=10).json()["repositories"]


def test_push_through_one_node_pull_through_the_other(nodes, acme_jwt, tmp_path):
    a, b = nodes
    # B's catalog lists what was pushed through A (the shared ledger's repository records).
    assert "acme/app" in push_here_pull_there(a, b, acme_jwt, tmp_path)


def test_isolation_holds_across_nodes(nodes, acme_jwt, globex_jwt):
    a, b = nodes
    blob = os.urandom(4096)
    digest = push_blob(a, "acme/private", blob, bearer(token(a, acme_jwt)))
    acme_b, globex_b = bearer(token(b, acme_jwt)), bearer(token(b, globex_jwt))
    # globex on B, in its own namespace, knowing the digest: as if it did not exist.
    r = requests.head(f"{b.url}/v2/globex/steal/blobs/{digest}", headers=globex_b, timeout=10)
    assert r.status_code == 404
    r = requests.post(
        f"{b.url}/v2/globex/steal/blobs/uploads/",
        params={"mount": digest, "from": "globex/x"},
        headers=globex_b,
        timeout=10,
    )
    assert r.status_code == 202  # a plain upload, not a mount
    # acme on B: known (B had never seen it: one ledger lookup in the bucket), any own repo.
    r = requests.get(f"{b.url}/v2/acme/private/blobs/{digest}", headers=acme_b, timeout=10)
    assert r.status_code == 200 and r.content == blob
    r = requests.head(f"{b.url}/v2/acme/other/blobs/{digest}", headers=acme_b, timeout=10)
    assert r.status_code in (200, 404)  # isolation lets it through; the backend answers
    assert r.headers.get("Docker-Content-Digest", digest) == digest
    # B's operator sees the lookups its ledger made in the bucket, and the ones from memory.
    admin = f"http://{b.env['REGISTRY_ADMIN_ADDR']}/metrics"
    wait_for(lambda: lookups(requests.get(admin, timeout=5).text)["hit"] >= 1, 10)
    assert lookups(requests.get(admin, timeout=5).text)["miss"] >= 2


def lookups(metrics: str) -> dict[str, int]:
    found = dict(re.findall(r'tabbify_ledger_lookups_total\{result="(\w+)"\} (\d+)', metrics))
    return {k: int(v) for k, v in found.items()} | {"hit": int(found.get("hit", 0))}


def test_a_chunked_upload_started_on_one_node_finishes_on_the_other(nodes, acme_jwt):
    """POST on A, PATCH and PUT on B with the same token (shared REGISTRY_TOKEN_KEY_FILE);
    the upload state signed with the shared http secret, the parts in the shared bucket."""
    a, b = nodes
    h = bearer(token(a, acme_jwt))  # minted by A, used on B
    parts = [os.urandom(5 << 20), os.urandom(3 << 20)]
    r = requests.post(f"{a.url}/v2/acme/chunked/blobs/uploads/", headers=h, timeout=10)
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    offset = 0
    for part in parts:
        r = requests.patch(
            b.url + location,
            data=part,
            headers={
                **h,
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(part) - 1}",
            },
            timeout=60,
        )
        assert r.status_code == 202, r.text
        location, offset = r.headers["Location"], offset + len(part)
    digest = sha256(b"".join(parts))
    r = requests.put(b.url + location, params={"digest": digest}, headers=h, timeout=60)
    assert r.status_code == 201, r.text
    # Recorded for acme by B: A finds it in the ledger, and serves it.
    r = requests.get(f"{a.url}/v2/acme/chunked/blobs/{digest}", headers=h, timeout=60)
    assert r.status_code == 200 and sha256(r.content) == digest


def test_a_token_of_a_node_on_another_key_is_challenged(nodes, acme_jwt):
    """What a client moving between nodes without shared keys meets: 401 and the challenge
    naming the node's own realm, then a fresh login on that node works."""
    a, _ = nodes
    forged = token(a, acme_jwt)[:-4] + "AAAA"  # as a token signed with another node's key
    r = requests.get(f"{a.url}/v2/", headers=bearer(forged), timeout=10)
    assert r.status_code == 401
    assert f'realm="http://{a.host}/auth/token"' in r.headers["WWW-Authenticate"]


def test_a_policy_change_reaches_both_nodes(nodes, acme_jwt, globex_jwt, tmp_path):
    """One REGISTRY_POLICY_FILE every node sees: an edit is in force on both within seconds,
    for tokens issued before it. A broken file there refuses the start of either node."""
    a, b = nodes
    assert a.env["REGISTRY_POLICY_FILE"] == b.env["REGISTRY_POLICY_FILE"]
    policy = Path(b.env["REGISTRY_POLICY_FILE"])
    push_blob(a, "acme/base/img", b"shared base " + os.urandom(8), bearer(token(a, acme_jwt)))
    tags = {s: f"{s.url}/v2/acme/base/img/tags/list" for s in (a, b)}
    globex = {s: bearer(token(s, globex_jwt)) for s in (a, b)}
    for s in (a, b):
        assert requests.get(tags[s], headers=globex[s], timeout=10).status_code == 403
    policy.write_text(
        '[[grant]]\nrepositories = ["acme/base/**"]\ntenants = ["globex"]\nactions = ["pull"]\n'
    )
    try:
        for s in (a, b):  # the same tokens, now allowed (no manifest yet: 404 from the backend)
            wait_for(lambda s=s: requests.get(tags[s], headers=globex[s], timeout=10).status_code
                     in (200, 404), 10)  # fmt: skip
        policy.write_text("[[grant\nbroken = \n")
        for stack in (a, b):
            env = {**stack.env, "REGISTRY_DATA_DIR": str(tmp_path / stack.data_dir.name)}
            r = subprocess.run([CLI, "run"], env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and str(policy) in r.stderr, r.stderr
        # The running nodes keep the last good policy.
        for s in (a, b):
            assert requests.get(tags[s], headers=globex[s], timeout=10).status_code in (200, 404)
    finally:
        policy.unlink()
    for s in (a, b):  # no file: the owner rule alone again
        wait_for(lambda s=s: requests.get(tags[s], headers=globex[s], timeout=10).status_code
                 == 403, 10)  # fmt: skip


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (supervisord puts each program in a process group of
    its own, so a process-group kill would leave the gateway and backend running)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def kill_node(stack: Stack) -> None:
    """The node lost at once: every process of it killed in the same instant."""
    assert stack.proc is not None
    for pid in descendants(stack.proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stack.proc.wait()


def test_node_lost_mid_transfer_pull_retried_and_upload_resumed_on_the_other_node(nodes, acme_jwt):
    a, b = nodes
    blob = os.urandom(64 << 20)
    h = bearer(token(a, acme_jwt))
    digest = push_blob(a, "acme/big", blob, h)
    # An upload with its first chunk acknowledged by A, to be finished after A is gone.
    first, second = os.urandom(6 << 20), os.urandom(1 << 20)
    r = requests.post(f"{a.url}/v2/acme/resumed/blobs/uploads/", headers=h, timeout=10)
    assert r.status_code == 202, r.text
    r = requests.patch(
        a.url + r.headers["Location"],
        data=first,
        headers={**h, "Content-Type": "application/octet-stream"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    upload = r.headers["Location"]
    received, failed = 0, False
    with requests.get(
        f"{a.url}/v2/acme/big/blobs/{digest}", headers=h, stream=True, timeout=30
    ) as r:
        assert r.status_code == 200
        try:
            for chunk in r.iter_content(1 << 20):
                received += len(chunk)
                if received >= 4 << 20 and a.proc and a.proc.poll() is None:
                    kill_node(a)
        except requests.RequestException:
            failed = True
    assert failed and 0 < received < len(blob), f"{received} bytes after node A died"
    # The client's retry against B, with the same login (the token works on every node).
    start = time.monotonic()
    r = requests.get(f"{b.url}/v2/acme/big/blobs/{digest}", headers=h, timeout=120)
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == digest.removeprefix("sha256:")
    assert time.monotonic() - start < 60
    # The upload resumes on B from the last offset A acknowledged.
    r = requests.patch(
        b.url + upload,
        data=second,
        headers={
            **h,
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{len(first)}-{len(first) + len(second) - 1}",
        },
        timeout=60,
    )
    assert r.status_code == 202, r.text
    whole = sha256(first + second)
    r = requests.put(b.url + r.headers["Location"], params={"digest": whole}, headers=h, timeout=60)
    assert r.status_code == 201, r.text
