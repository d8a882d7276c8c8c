"""The registry on a real WireGuard mesh: network namespaces on a bridge, wireguard-go in each,
the coordinator stand-in in the root namespace, `tabbify-registry run` in its own namespace and
clients (skopeo, curl, Python) in others, talking to it only through the tunnel."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import layout_blobs, oci_layout
from tests.support.netns import Host, Underlay, WgClient, netns_usable, poll
from tests.support.stack import CLI, free_port
from tests.support.standins.auth import AuthStandin, tabbify_jwt
from tests.support.standins.coordinator import DEFAULT_AUTH_KEY, CoordinatorStandin

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(netns_usable() is not None, reason=str(netns_usable())),
]
REG_NAME = "reg.mesh"  # skopeo (containers/image) refuses IPv6 literals in references


class MeshRegistry:
    """`tabbify-registry run` inside a namespace, with a mesh coordinator configured."""

    def __init__(self, host: Host, env: dict[str, str], data_dir: Path) -> None:
        self.host, self.data_dir = host, data_dir
        self.ifname = f"tbr{host.underlay.k}"
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": "/root",
            "REGISTRY_DATA_DIR": str(data_dir),
            "REGISTRY_BACKEND": "distribution",
            "MESH_INTERFACE": self.ifname,
            "MESH_POLL_SECONDS": "1",
            "MESH_AUTH_KEY": DEFAULT_AUTH_KEY,
            **env,
        }
        self.log = data_dir.parent / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        with open(self.log, "ab") as log:
            self.proc = self.host.popen(
                [CLI, "run"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        state = self.data_dir / "mesh" / "state.json"
        poll(lambda: state.exists() or self.proc.poll() is not None, 30)
        assert self.proc.poll() is None, self.log.read_text()
        ula = json.loads(state.read_text())["ula"]
        self.host.wait_port(ula, 5000, timeout=30)
        return ula

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)

    def kill_interface(self) -> None:
        """What a container restart does to the network: the interface and its daemon go."""
        self.host.run(["pkill", "-f", f"wireguard-go {self.ifname}"])
        poll(lambda: self.host.run(["ip", "link", "show", self.ifname]).returncode != 0, 10)


class Mesh:
    def __init__(self, net: Underlay, tmp: Path) -> None:
        self.net = net
        self.coordinator = CoordinatorStandin(net.gateway).start()
        self.auth = AuthStandin(host=net.gateway).start()
        self.reg_host = net.add_host("reg")
        self.registry = MeshRegistry(
            self.reg_host,
            {"MESH_COORDINATOR_URL": self.coordinator.url, "REGISTRY_AUTH_URL": self.auth.url},
            tmp / "data",
        )
        self.ula = self.registry.start()
        self.client_host = net.add_host("cli")
        self.client = WgClient(self.client_host, self.coordinator)
        self.client_host.hosts_file({REG_NAME: self.ula})
        poll(lambda: self.client.public_key in self.registry_peers(), 15)

    def registry_peers(self) -> set[str]:
        out = self.reg_host.run(["wg", "show", self.registry.ifname, "peers"]).stdout
        return set(out.split())

    def close(self) -> None:
        if self.registry.proc and self.registry.proc.poll() is None:
            self.registry.stop()
        self.auth.stop()
        self.coordinator.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with Underlay() as net:
        m = Mesh(net, tmp_path_factory.mktemp("mesh"))
        try:
            yield m
        finally:
            m.close()


def curl(host: Host, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run(["curl", "-sS", "-m", "10", "-D", "-", "-o", "/dev/null", *args, url])


def skopeo(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run(["skopeo", "--insecure-policy", *args], timeout=300)


def test_token_login_and_skopeo_push_pull_over_the_tunnel(mesh, tmp_path):
    r = curl(mesh.client_host, f"http://[{mesh.ula}]:5000/v2/")
    assert " 401 " in r.stdout.splitlines()[0], r.stdout + r.stderr
    assert f'realm="http://[{mesh.ula}]:5000/auth/token"' in r.stdout
    jwt = tabbify_jwt({"network": "acme"})
    pushed = oci_layout(tmp_path / "src", "v1", layer_sizes=(4096, 2_000_000))
    ref = f"docker://{REG_NAME}:5000/acme/over-wg:v1"
    r = skopeo(
        mesh.client_host,
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"x:{jwt}",
        f"oci:{tmp_path / 'src'}:v1",
        ref,
    )
    assert r.returncode == 0, r.stderr
    r = skopeo(
        mesh.client_host,
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        f"x:{jwt}",
        ref,
        f"oci:{tmp_path / 'out'}:v1",
    )
    assert r.returncode == 0, r.stderr
    assert layout_blobs(tmp_path / "out") == pushed["blobs"]


def test_the_registry_answers_only_on_its_ula(mesh):
    underlay = curl(mesh.client_host, f"http://{mesh.reg_host.ip}:5000/v2/")
    assert underlay.returncode != 0  # connection refused: nothing listens on the underlay
    inside = curl(mesh.reg_host, "http://127.0.0.1:5000/v2/")
    assert inside.returncode != 0  # nor on loopback
    backend = curl(mesh.client_host, f"http://[{mesh.ula}]:5001/v2/")
    assert backend.returncode != 0  # the backend stays on the registry's loopback
    listening = mesh.reg_host.run(["ss", "-Hltn"]).stdout
    assert f"[{mesh.ula}]:5000" in listening and "127.0.0.1:5001" in listening
    assert "0.0.0.0:5000" not in listening and "*:5000" not in listening


HOLD_CONNECTION = textwrap.dedent(
    """
    import http.client, os, sys, time
    conn = http.client.HTTPConnection(sys.argv[1], 5000, timeout=10)
    conn.request("GET", "/v2/"); first = conn.getresponse(); first.read()
    port = conn.sock.getsockname()[1]
    print("first", first.status, flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.1)
    conn.request("GET", "/v2/"); second = conn.getresponse(); second.read()
    print("second", second.status, port == conn.sock.getsockname()[1], flush=True)
    """
)


def test_a_peer_added_at_the_coordinator_joins_while_live_connections_stay(mesh, tmp_path):
    go = tmp_path / "go"
    holder = mesh.client_host.popen(
        [sys.executable, "-c", HOLD_CONNECTION, REG_NAME, str(go)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().split() == ["first", "401"]

    newcomer_host = mesh.net.add_host("new")
    newcomer = WgClient(newcomer_host, mesh.coordinator)  # registered at the coordinator only
    poll(lambda: newcomer.public_key in mesh.registry_peers(), 15)  # the follower applied it
    r = curl(newcomer_host, f"http://[{mesh.ula}]:5000/v2/")
    assert " 401 " in r.stdout.splitlines()[0], r.stderr

    go.touch()
    assert holder.stdout.readline().split() == ["second", "401", "True"]  # same connection
    holder.wait(10)


def test_a_restart_keeps_key_node_and_ula(mesh):
    mesh_dir = mesh.registry.data_dir / "mesh"
    key_before = (mesh_dir / "private.key").read_text()
    node_before = json.loads((mesh_dir / "state.json").read_text())["node_id"]
    nodes_before = len(mesh.coordinator.nodes)
    mesh.registry.stop()
    mesh.registry.kill_interface()
    assert mesh.registry.start() == mesh.ula
    assert (mesh_dir / "private.key").read_text() == key_before
    assert json.loads((mesh_dir / "state.json").read_text())["node_id"] == node_before
    assert len(mesh.coordinator.nodes) == nodes_before  # re-joined, not a new node
    assert (mesh_dir / "private.key").stat().st_mode & 0o777 == 0o600
    assert key_before.strip() not in mesh.registry.log.read_text()  # never logged
    poll(lambda: " 401 " in curl(mesh.client_host, f"http://[{mesh.ula}]:5000/v2/").stdout, 15)


def test_coordinator_down_at_restart_comes_up_on_persisted_state(mesh):
    mesh.registry.stop()
    mesh.registry.kill_interface()
    mesh.coordinator.set_down(True)
    try:
        assert mesh.registry.start() == mesh.ula
        assert "persisted ULA" in mesh.registry.log.read_text()
        # Peers came from the persisted set: the client still reaches the registry.
        poll(lambda: " 401 " in curl(mesh.client_host, f"http://[{mesh.ula}]:5000/v2/").stdout, 15)
        joins = mesh.coordinator.joins
    finally:
        mesh.coordinator.set_down(False)
    poll(lambda: mesh.coordinator.joins > joins, 15)  # the follower kept retrying


def test_first_boot_without_a_coordinator_fails_with_one_line(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        "REGISTRY_DATA_DIR": str(tmp_path),
        "MESH_COORDINATOR_URL": f"http://127.0.0.1:{free_port()}",
    }
    r = subprocess.run([CLI, "run"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "MESH_COORDINATOR_URL" in lines[0] and "identity" in lines[0]


def test_no_tun_device_is_one_clear_line(tmp_path):
    with Underlay() as net:
        coordinator = CoordinatorStandin(net.gateway).start()
        try:
            host = net.add_host("notun")
            env = {
                "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
                "REGISTRY_DATA_DIR": str(tmp_path),
                "MESH_COORDINATOR_URL": coordinator.url,
                "MESH_AUTH_KEY": DEFAULT_AUTH_KEY,
                "MESH_INTERFACE": f"tbn{net.k}",
            }
            # A private mount namespace where /dev/net is empty: no TUN device.
            r = host.run(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    f'mount -t tmpfs none /dev/net && exec "{CLI}" mesh up',
                ],
                env=env,
                timeout=60,
            )
        finally:
            coordinator.stop()
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "/dev/net/tun" in lines[0], r.stderr
    assert r.stdout == ""


def test_mesh_up_prints_the_ula(tmp_path):
    with Underlay() as net:
        coordinator = CoordinatorStandin(net.gateway).start()
        try:
            host = net.add_host("up")
            env = {
                "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
                "REGISTRY_DATA_DIR": str(tmp_path),
                "MESH_COORDINATOR_URL": coordinator.url,
                "MESH_AUTH_KEY": DEFAULT_AUTH_KEY,
                "MESH_INTERFACE": f"tbu{net.k}",
            }
            r = host.run([CLI, "mesh", "up"], env=env, timeout=60)
            assert r.returncode == 0, r.stderr
            ula = r.stdout.strip()
            assert ula == json.loads((tmp_path / "mesh" / "state.json").read_text())["ula"]
            addrs = host.run(["ip", "-6", "addr", "show", "dev", f"tbu{net.k}"]).stdout
            assert f"{ula}/128" in addrs
            # Again on the same interface, which still carries a mesh address from before a
            # move (and one outside the mesh, not ours to touch): the stale ULA goes.
            for extra in ("fd5a:1f02:0:77::1/128", "fd00:99::1/128"):
                host.run(["ip", "-6", "addr", "add", extra, "dev", f"tbu{net.k}", "nodad"])
            again = host.run([CLI, "mesh", "up"], env=env, timeout=60)
            assert again.returncode == 0 and again.stdout.strip() == ula, again.stderr
            addrs = host.run(["ip", "-6", "addr", "show", "dev", f"tbu{net.k}"]).stdout
            assert f"{ula}/128" in addrs and "fd00:99::1/128" in addrs
            assert "fd5a:1f02:0:77::1" not in addrs
            status = json.loads((tmp_path / "mesh" / "status.json").read_text())
            assert status["state"] == "ok" and status["ula"] == ula
        finally:
            coordinator.stop()
