"""The real-WireGuard test harness itself: underlay namespaces, wireguard-go client nodes and the
coordinator stand-in (contract §5). Product mesh tests build on these pieces."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.netns import Host, Underlay, WgClient, netns_usable
from tests.support.standins.coordinator import PREFIX, CoordinatorStandin

_unusable = netns_usable()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(_unusable is not None, reason=_unusable or ""),
    pytest.mark.timeout(180),
]

KEY = "harness-join-key"

# Accepts one TCP connection on [addr]:port and echoes it back until the peer closes.
ECHO_SERVER = """
import socket, sys
srv = socket.socket(socket.AF_INET6)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
conn, _ = srv.accept()
while data := conn.recv(4096):
    conn.sendall(data)
"""

# One connection, kept open: each stdin line is sent and its echo printed.
ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", flush=True)
for line in sys.stdin:
    c.sendall(line.encode())
    buf = b""
    while not buf.endswith(b"\\n"):
        chunk = c.recv(4096)
        if not chunk:
            sys.exit("connection closed")
        buf += chunk
    print(buf.decode().strip(), flush=True)
"""


@pytest.fixture(scope="module")
def underlay() -> Iterator[Underlay]:
    with Underlay() as net:
        yield net


@pytest.fixture(scope="module")
def coordinator(underlay: Underlay) -> Iterator[CoordinatorStandin]:
    with CoordinatorStandin(underlay.gateway, auth_key=KEY) as standin:
        yield standin


@pytest.fixture(scope="module")
def pair(
    underlay: Underlay, coordinator: CoordinatorStandin
) -> tuple[Host, WgClient, Host, WgClient]:
    a, b = underlay.add_host("a"), underlay.add_host("b")
    wa = WgClient(a, coordinator)
    wb = WgClient(b, coordinator)
    wa.sync()  # wa was configured before wb existed
    return a, wa, b, wb


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def readline(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s (exit {proc.poll()})"
    return proc.stdout.readline().strip()


def exchange(proc: subprocess.Popen[str], message: str) -> str:
    assert proc.stdin is not None
    proc.stdin.write(message + "\n")
    proc.stdin.flush()
    return readline(proc)


# --- the tunnel --------------------------------------------------------------------------------


def test_two_nodes_ping_each_other_over_wireguard(pair: tuple[Host, WgClient, Host, WgClient]):
    a, wa, _b, wb = pair
    assert wa.ula != wb.ula
    assert wa.peers() == {wb.public_key} and wb.peers() == {wa.public_key}
    assert wb.ping6(wa.ula)
    assert wa.ping6(wb.ula)
    # It really went through WireGuard: a completed handshake and bytes on the tunnel.
    handshakes = a.run(["wg", "show", wa.ifname, "latest-handshakes"], check=True).stdout.split()
    assert handshakes == [wb.public_key, handshakes[1]] and int(handshakes[1]) > 0
    # Only the mesh prefix is routed into the tunnel; the underlay keeps its default route.
    routes = a.run(["ip", "-6", "route", "show", "dev", wa.ifname], check=True).stdout
    assert "fd5a:1f02::/32" in routes


def test_http_over_the_tunnel(pair: tuple[Host, WgClient, Host, WgClient], tmp_path: Path):
    a, wa, b, _wb = pair
    (tmp_path / "marker.txt").write_text("over-wireguard\n")
    server = a.popen(
        [sys.executable, "-m", "http.server", "--bind", wa.ula, "8080", "-d", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        a.wait_port(wa.ula, 8080)
        got = b.run(["curl", "-sSfg", "--max-time", "10", f"http://[{wa.ula}]:8080/marker.txt"])
        assert got.returncode == 0, got.stderr
        assert got.stdout == "over-wireguard\n"
        # A host name for the ULA inside the namespace (what skopeo needs for IPv6 registries).
        b.hosts_file({"node-a.mesh.test": wa.ula})
        got = b.run(["curl", "-sSf", "--max-time", "10", "http://node-a.mesh.test:8080/marker.txt"])
        assert got.returncode == 0, got.stderr
        assert got.stdout == "over-wireguard\n"
        assert "node-a.mesh.test" not in Path("/etc/hosts").read_text()
    finally:
        server.kill()
        server.wait(5)


def test_third_node_joins_and_leaves_without_disturbing_live_connections(
    underlay: Underlay,
    coordinator: CoordinatorStandin,
    pair: tuple[Host, WgClient, Host, WgClient],
):
    a, wa, b, wb = pair
    server = a.popen([sys.executable, "-c", ECHO_SERVER, wa.ula, "9000"])
    client = None
    try:
        a.wait_port(wa.ula, 9000)
        client = b.popen(
            [sys.executable, "-c", ECHO_CLIENT, wa.ula, "9000"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert readline(client) == "connected"
        assert exchange(client, "one") == "one"

        c = underlay.add_host("c")
        wc = WgClient(c, coordinator)  # its first peer set already holds a and b
        assert wc.peers() == {wa.public_key, wb.public_key}
        assert not wa.ping6(wc.ula, count=1, timeout=0.5)  # a does not know c yet
        wa.sync()
        assert wa.peers() == {wb.public_key, wc.public_key}
        assert wc.ping6(wa.ula)
        assert wa.ping6(wc.ula)
        assert exchange(client, "two") == "two"  # same TCP connection, across the sync
        assert wb.ping6(wa.ula)

        coordinator.remove_node(wc.node_id)
        wa.sync()
        assert wa.peers() == {wb.public_key}
        assert not wc.ping6(wa.ula, count=1, timeout=0.5)
        assert exchange(client, "three") == "three"
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait(5)


# --- the coordinator stand-in, over HTTP -------------------------------------------------------


@pytest.fixture
def standin() -> Iterator[CoordinatorStandin]:
    with CoordinatorStandin("127.0.0.1", auth_key=KEY) as s:
        yield s


def join(standin: CoordinatorStandin, **body: object) -> requests.Response:
    payload = {
        "public_key": "pk",
        "tags": ["registry"],
        "hostname": "reg",
        "node_id": None,
        "ula": None,
        **body,
    }
    return requests.post(f"{standin.url}/v1/nodes", json=payload, headers=auth(), timeout=5)


def test_coordinator_requires_the_bearer(standin: CoordinatorStandin):
    url = f"{standin.url}/v1/nodes"
    body = {"public_key": "pk-a", "tags": [], "hostname": "h", "node_id": None, "ula": None}
    assert requests.post(url, json=body, timeout=5).status_code == 401
    assert requests.post(url, json=body, headers=auth("wrong"), timeout=5).status_code == 401
    basic = requests.post(url, json=body, auth=("x", KEY), timeout=5)
    assert basic.status_code == 401
    assert standin.nodes == {} and standin.joins == 0 and standin.unauthorized == 3

    node_id = join(standin, public_key="pk-a").json()["node_id"]
    peers = f"{standin.url}/v1/nodes/{node_id}/peers"
    assert requests.get(peers, timeout=5).status_code == 401
    assert requests.get(peers, headers=auth(), timeout=5).json() == {"peers": []}
    missing = requests.get(f"{standin.url}/v1/nodes/nope/peers", headers=auth(), timeout=5)
    assert missing.status_code == 404
    assert standin.joins == 1 and standin.polls == 2


def test_coordinator_join_answer_and_peers(standin: CoordinatorStandin):
    r = join(standin, public_key="pk-a")
    assert r.status_code == 200
    a = r.json()
    assert set(a) == {"node_id", "ula", "prefix", "listen_port", "peers"}
    assert a["prefix"] == PREFIX == "fd5a:1f02::/32" and a["listen_port"] == 51820
    assert a["ula"] == "fd5a:1f02:0:1::1" and a["peers"] == []
    assert standin.node(a["node_id"]).endpoint == "127.0.0.1:51820"  # source IP, port 51820

    b_id, b_ula = standin.add_node("pk-b", "10.77.0.3:51820")
    assert b_ula == "fd5a:1f02:0:2::1"
    peers_a = requests.get(
        f"{standin.url}/v1/nodes/{a['node_id']}/peers", headers=auth(), timeout=5
    ).json()["peers"]
    peer_b = {
        "public_key": "pk-b",
        "endpoint": "10.77.0.3:51820",
        "allowed_ips": ["fd5a:1f02:0:2::1/128"],
        "persistent_keepalive": 25,
    }
    peer_a = {
        "public_key": "pk-a",
        "endpoint": "127.0.0.1:51820",
        "allowed_ips": ["fd5a:1f02:0:1::1/128"],
        "persistent_keepalive": 25,
    }
    assert peers_a == [peer_b]
    assert join(standin, public_key="pk-c").json()["peers"] == [peer_a, peer_b]

    standin.set_endpoint("pk-a", "10.77.0.9:51820")  # by public key; pinned from now on
    join(standin, public_key="pk-a")
    assert standin.node(a["node_id"]).endpoint == "10.77.0.9:51820"
    standin.remove_node(b_id)
    assert [p["public_key"] for p in standin.peers_for(a["node_id"])] == ["pk-c"]


def test_coordinator_identity_is_sticky(standin: CoordinatorStandin):
    first = join(standin, public_key="pk-1").json()
    # Same node id, rotated key: same node, same ULA.
    again = join(standin, public_key="pk-1b", node_id=first["node_id"]).json()
    assert (again["node_id"], again["ula"]) == (first["node_id"], first["ula"])
    # No node id, known key: same node.
    by_key = join(standin, public_key="pk-1b").json()
    assert (by_key["node_id"], by_key["ula"]) == (first["node_id"], first["ula"])
    assert len(standin.nodes) == 1

    # A coordinator that forgot a node: its persisted id and ULA are kept when free...
    kept = join(standin, public_key="pk-2", node_id="n-old", ula="fd5a:1f02:0:77::1").json()
    assert (kept["node_id"], kept["ula"]) == ("n-old", "fd5a:1f02:0:77::1")
    # ...but a taken or out-of-prefix ULA is not handed out twice.
    taken = join(standin, public_key="pk-3", node_id="n-3", ula="fd5a:1f02:0:77::1").json()
    assert taken["node_id"] == "n-3" and taken["ula"] not in ("fd5a:1f02:0:77::1", first["ula"])
    outside = join(standin, public_key="pk-4", ula="fd00::1").json()
    assert outside["ula"].startswith("fd5a:1f02:")
    ulas = [n.ula for n in standin.nodes.values()]
    assert len(ulas) == len(set(ulas)) == 4


def test_coordinator_force_ula(standin: CoordinatorStandin):
    first = join(standin, public_key="pk-1", ula=None).json()
    standin.force_ula[first["node_id"]] = "fd5a:1f02:0:99::1"
    moved = join(standin, public_key="pk-1", node_id=first["node_id"], ula=first["ula"]).json()
    assert moved["node_id"] == first["node_id"]
    assert moved["ula"] == "fd5a:1f02:0:99::1" != first["ula"]
    assert standin.node("pk-1").ula == "fd5a:1f02:0:99::1"


def test_coordinator_down_refuses_connections_and_comes_back(standin: CoordinatorStandin):
    node_id = join(standin, public_key="pk-1").json()["node_id"]
    standin.set_down(True)
    assert standin.down
    with pytest.raises(requests.ConnectionError):
        join(standin, public_key="pk-1")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{standin.url}/v1/nodes/{node_id}/peers", headers=auth(), timeout=5)
    standin.set_down(False)
    back = join(standin, public_key="pk-1", node_id=node_id)
    assert back.status_code == 200 and back.json()["node_id"] == node_id  # state survived
    standin.fail_status = 503
    assert join(standin, public_key="pk-1").status_code == 503
    standin.fail_status = None
    assert standin.joins == 3  # refused connections are not joins; failed answers are


def test_coordinator_join_from_a_namespace(underlay: Underlay, coordinator: CoordinatorStandin):
    """A node joining through the API from the underlay gets <source ip>:51820 as endpoint."""
    d = underlay.add_host("d")
    body = json.dumps(
        {
            "public_key": "pk-ns-d",
            "tags": ["registry"],
            "hostname": "d",
            "node_id": None,
            "ula": None,
        }
    )
    got = d.run(
        [
            "curl",
            "-sSf",
            "--max-time",
            "10",
            "-H",
            f"Authorization: Bearer {KEY}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            f"{coordinator.url}/v1/nodes",
        ]
    )
    assert got.returncode == 0, got.stderr
    answer = json.loads(got.stdout)
    assert coordinator.node(answer["node_id"]).endpoint == f"{d.ip}:51820"
    coordinator.remove_node(answer["node_id"])
