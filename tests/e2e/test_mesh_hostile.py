"""A coordinator that says something wrong, on real WireGuard: network namespaces,
wireguard-go, `tabbify-registry run` in its own namespace, a client node in another, the
coordinator stand-in told to misbehave in each way it knows.

Whatever the coordinator answers, the registry stays reachable to its good peers over the
tunnel, its follower keeps running, /healthz says `degraded` with the reason, and good changes
(a peer added meanwhile) arrive within MESH_POLL_SECONDS when the answer is usable, and once the
coordinator is usable again otherwise. A restart comes up on the persisted identity and the last
applied peer set; a ULA move is followed by the gateway without a restart, while an upload in
progress on the old address completes.

Run with `-s` to see how long each pick-up took.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from addons.gateway.meshaddress import CHECK_EVERY
from mesh.follow import REJOIN_EVERY
from tests.e2e.test_mesh import Mesh, curl
from tests.support.netns import Underlay, _ns_pids, netns_usable, poll, sh
from tests.support.standins.auth import tabbify_jwt
from tests.support.standins.coordinator import ANSWER_MODES, BAD_PEER_KINDS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(netns_usable() is not None, reason=str(netns_usable())),
]
POLL = 1  # MESH_POLL_SECONDS of the registry under test (tests/e2e/test_mesh.MeshRegistry)
BACKOFF_CAP = 10 * POLL
FETCH_DEADLINE = 10
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with Underlay() as net:
        m = Mesh(net, tmp_path_factory.mktemp("hostile"))
        try:
            yield m
        finally:
            m.close()
            if TIMINGS:
                print("\nmesh pick-up times (s):")
                for what, seconds in TIMINGS.items():
                    print(f"  {what:45s} {seconds:5.1f}")


# --- what the tests look at ----------------------------------------------------------------------


def process(m: Mesh, marker: bytes) -> int | None:
    """The pid of the process in the registry's namespace whose command line has `marker`."""
    for pid in _ns_pids(m.reg_host.ns):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def status(m: Mesh) -> dict:
    return json.loads((m.registry.data_dir / "mesh" / "status.json").read_text())


def healthz(m: Mesh) -> tuple[int, dict]:
    r = m.reg_host.run(
        ["curl", "-s", "-m", "5", "-w", "\n%{http_code}", "http://127.0.0.1:5002/healthz"]
    )
    body, _, code = r.stdout.rpartition("\n")
    return int(code), json.loads(body)


def reachable(m: Mesh, ula: str | None = None) -> bool:
    r = curl(m.client_host, f"http://[{ula or m.ula}]:5000/v2/")
    return bool(r.stdout) and " 401 " in r.stdout.splitlines()[0]


def new_peer(m: Mesh, n: int) -> tuple[str, str]:
    """A node registered at the coordinator only (its key is real): (node id, public key)."""
    private = sh(["wg", "genkey"]).stdout.strip()
    public = sh(["wg", "pubkey"], input=private + "\n").stdout.strip()
    node_id, _ = m.coordinator.add_node(public, f"10.77.{m.net.k}.{200 + n}:51820")
    return node_id, public


def allowed_ips(m: Mesh) -> dict[str, str]:
    out = m.reg_host.run(["wg", "show", m.registry.ifname, "allowed-ips"]).stdout
    return {line.split("\t")[0]: line.split("\t")[1] for line in out.splitlines() if "\t" in line}


def wait_ok(m: Mesh, timeout: float) -> None:
    poll(lambda: status(m)["state"] == "ok", timeout, 0.1)


# --- a malformed peer entry next to good ones ----------------------------------------------------


@pytest.mark.parametrize("kind", BAD_PEER_KINDS)
def test_a_malformed_peer_is_skipped_and_a_good_one_added_meanwhile_arrives(mesh: Mesh, kind: str):
    follower = process(mesh, b"mesh.follow")
    before = mesh.registry_peers()
    client_ips = allowed_ips(mesh)[mesh.client.public_key]
    mesh.coordinator.bad_peers = [kind]
    node_id, newcomer = new_peer(mesh, 1)
    started = time.monotonic()
    try:
        poll(lambda: newcomer in mesh.registry_peers(), POLL + 5, 0.05)
        TIMINGS[f"good peer beside bad entry: {kind}"] = time.monotonic() - started
        assert mesh.registry_peers() == before | {newcomer}  # the bad entry is not configured
        assert allowed_ips(mesh)[mesh.client.public_key] == client_ips  # nor did it move routes
        assert reachable(mesh)
        poll(lambda: status(mesh)["state"] == "degraded", 5, 0.1)
        code, health = healthz(mesh)
        assert code == 200 and health["status"] == "degraded" and health["mesh"] == "degraded"
        assert "skipped 1 invalid peer" in health["mesh_reason"]
        assert "mesh: skipped peer #" in mesh.registry.log.read_text()
        assert process(mesh, b"mesh.follow") == follower  # never restarted
    finally:
        mesh.coordinator.bad_peers = []
        mesh.coordinator.remove_node(node_id)
    poll(lambda: newcomer not in mesh.registry_peers(), POLL + 5, 0.05)
    wait_ok(mesh, POLL + 5)


# --- answers that are unusable as a whole --------------------------------------------------------


@pytest.mark.parametrize("mode", ANSWER_MODES)
def test_a_bad_answer_never_changes_the_peer_set_nor_stops_the_node(mesh: Mesh, mode: str):
    follower = process(mesh, b"mesh.follow")
    before = mesh.registry_peers()
    mesh.coordinator.answer_mode = mode
    node_id, newcomer = new_peer(mesh, 2)
    try:
        # A join answer is only asked for every REJOIN_EVERY polls; slow answers take the deadline.
        timeout = REJOIN_EVERY * POLL + FETCH_DEADLINE + 5
        poll(lambda: status(mesh)["state"] == "degraded", timeout, 0.1)
        code, health = healthz(mesh)
        assert code == 200 and health["mesh"] == "degraded" and health["mesh_reason"]
        if mode == "bad-join-ula":  # the peer list itself is fine: it is still followed
            poll(lambda: newcomer in mesh.registry_peers(), POLL + 5, 0.05)
        else:
            time.sleep(2 * POLL)
            assert mesh.registry_peers() == before
        assert reachable(mesh)
        assert process(mesh, b"mesh.follow") == follower
    finally:
        mesh.coordinator.answer_mode = None
    started = time.monotonic()
    # Back within the longest backoff (plus an attempt that may still be waiting on a slow drip).
    poll(lambda: newcomer in mesh.registry_peers(), BACKOFF_CAP + FETCH_DEADLINE + 5, 0.05)
    wait_ok(mesh, BACKOFF_CAP + FETCH_DEADLINE + 5)
    TIMINGS[f"recovery after bad answer: {mode}"] = time.monotonic() - started
    mesh.coordinator.remove_node(node_id)
    poll(lambda: newcomer not in mesh.registry_peers(), POLL + 5, 0.05)


# --- restarts ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["non-json", "bad-join-ula", "5xx", "huge", "bad-peers"])
def test_a_restart_with_a_misbehaving_coordinator_comes_up_on_the_last_good_state(
    mesh: Mesh, mode: str
):
    peers = mesh.registry_peers()
    mesh.registry.stop()
    mesh.registry.kill_interface()
    if mode == "bad-peers":
        mesh.coordinator.bad_peers = list(BAD_PEER_KINDS)
    else:
        mesh.coordinator.answer_mode = mode
    try:
        assert mesh.registry.start() == mesh.ula
        assert mesh.registry_peers() == peers
        poll(lambda: reachable(mesh), 15, 0.2)
        assert status(mesh)["state"] == "degraded"
        if mode != "bad-peers":
            assert "persisted ULA" in mesh.registry.log.read_text()
    finally:
        mesh.coordinator.answer_mode = None
        mesh.coordinator.bad_peers = []
    wait_ok(mesh, BACKOFF_CAP + 5)


def test_an_old_state_json_with_an_invalid_peer_does_not_keep_the_node_down(mesh: Mesh):
    """A state.json written by a version that checked less, and the coordinator unreachable."""
    state_file = mesh.registry.data_dir / "mesh" / "state.json"
    mesh.registry.stop()
    mesh.registry.kill_interface()
    state = json.loads(state_file.read_text())
    bad = {"public_key": "not-a-key", "endpoint": "10.0.0.1:1", "allowed_ips": []}
    state["peers"].insert(0, bad)
    state_file.write_text(json.dumps(state))
    mesh.coordinator.set_down(True)
    try:
        assert mesh.registry.start() == mesh.ula
        poll(lambda: reachable(mesh), 15, 0.2)
        assert "persisted peer #0 (key 'not-a-ke…')" in mesh.registry.log.read_text()
        assert "not-a-key" not in state_file.read_text()  # what was applied is what is saved
    finally:
        mesh.coordinator.set_down(False)
    wait_ok(mesh, BACKOFF_CAP + 5)


# --- the coordinator moves the node (last: the node keeps its new address) -------------------

UPLOAD = textwrap.dedent(
    """
    import base64, hashlib, http.client, json, os, sys, time
    host, jwt, go, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    c = http.client.HTTPConnection(host, 5000, timeout=120)
    basic = base64.b64encode(f"x:{jwt}".encode()).decode()
    scope = "repository:acme/moving:push,pull"
    c.request("GET", f"/auth/token?service=tabbify-registry&scope={scope}",
              headers={"Authorization": "Basic " + basic})
    r = c.getresponse(); token = json.loads(r.read())["token"]
    auth = {"Authorization": "Bearer " + token}
    c.request("POST", "/v2/acme/moving/blobs/uploads/", headers={**auth, "Content-Length": "0"})
    r = c.getresponse(); r.read(); assert r.status == 202, r.status
    location = r.getheader("Location")
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    def body():
        yield data[: size // 2]
        print("half", flush=True)
        while not os.path.exists(go):
            time.sleep(0.05)
        yield data[size // 2 :]
    sep = "&" if "?" in location else "?"
    headers = {**auth, "Content-Length": str(size), "Content-Type": "application/octet-stream"}
    c.request("PUT", f"{location}{sep}digest={digest}", body=body(), headers=headers)
    r = c.getresponse(); r.read()
    print("done", r.status, flush=True)
    """
)


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s (exit {proc.poll()})"
    return proc.stdout.readline().strip()


def test_a_ula_move_is_followed_without_a_restart_and_an_upload_in_flight_completes(
    mesh: Mesh, tmp_path: Path
):
    old, new = mesh.ula, "fd5a:1f02:0:99::1"
    gateway, follower = process(mesh, b"addons.gateway.chain"), process(mesh, b"mesh.follow")
    wg = mesh.reg_host.run(["wg", "show", mesh.registry.ifname, "public-key"], check=True)
    registry_key = wg.stdout.strip()
    jwt = tabbify_jwt({"network": "acme"})
    go = tmp_path / "go"
    upload = mesh.client_host.popen(
        [sys.executable, "-c", UPLOAD, old, jwt, str(go), str(8 << 20)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert readline(upload, 30) == "half"  # half the blob is through, the rest waits for `go`

    # The client routes both addresses to the registry while it moves (what a coordinator that
    # announces a move hands its peers), then the coordinator moves the node.
    both = f"{old}/128,{new}/128"
    mesh.client_host.run(
        ["wg", "set", mesh.client.ifname, "peer", registry_key, "allowed-ips", both], check=True
    )
    node_id = json.loads((mesh.registry.data_dir / "mesh" / "state.json").read_text())["node_id"]
    mesh.coordinator.force_ula[node_id] = new
    started = time.monotonic()
    mesh.reg_host.wait_port(new, 5000, timeout=REJOIN_EVERY * POLL + 15)
    TIMINGS["ULA move: listening on the new address"] = time.monotonic() - started
    # Each worker re-binds on its own state.json check (once a second): the last one within
    # CHECK_EVERY (+ slack for a loaded machine) of the first.
    poll(lambda: not mesh.reg_host.listeners(old, 5000), CHECK_EVERY + 5, 0.05)
    TIMINGS["ULA move: every worker off the old address"] = time.monotonic() - started

    # The new address: the challenge names it, and a token fetched from it works there.
    r = curl(mesh.client_host, f"http://[{new}]:5000/v2/")
    assert (
        " 401 " in r.stdout.splitlines()[0]
        and f'realm="http://[{new}]:5000/auth/token"' in r.stdout
    )
    got = mesh.client_host.run(
        [
            "curl",
            "-sSf",
            "-m",
            "10",
            "-u",
            f"x:{jwt}",
            f"http://[{new}]:5000/auth/token?service=tabbify-registry",
        ]
    )
    assert got.returncode == 0, got.stderr
    token = json.loads(got.stdout)["token"]
    r = curl(mesh.client_host, f"http://[{new}]:5000/v2/", "-H", f"Authorization: Bearer {token}")
    assert " 200 " in r.stdout.splitlines()[0]
    assert curl(mesh.client_host, f"http://[{old}]:5000/v2/").returncode != 0  # no new connections

    # The upload that started on the old address completes there.
    assert (
        f"{old}/128" in mesh.reg_host.run(["ip", "-6", "addr", "show", mesh.registry.ifname]).stdout
    )
    go.touch()
    assert readline(upload, 60) == "done 201"
    upload.wait(10)

    # Then the old address goes (nothing uses it), and nothing was restarted.
    poll(
        lambda: (
            f"{old}/128"
            not in mesh.reg_host.run(["ip", "-6", "addr", "show", mesh.registry.ifname]).stdout
        ),
        3 * POLL + 5,
        0.1,
    )
    assert process(mesh, b"addons.gateway.chain") == gateway
    assert process(mesh, b"mesh.follow") == follower
    code, health = healthz(mesh)
    assert code == 200 and health["mesh"] == "ok" and status(mesh)["ula"] == new
    assert "the coordinator moved this node" in mesh.registry.log.read_text()
