"""Mesh pure parts: coordinator answers are validated, identity writes are atomic and private."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from mesh import interface
from mesh.coordinator import parse_join, parse_peers
from mesh.state import MeshDir, MeshError, NodeState, Peer, public_key

KEY = base64.b64encode(bytes(range(32))).decode()
GOOD = {
    "node_id": "n-1",
    "ula": "fd5a:1f02:0:1::1",
    "prefix": "fd5a:1f02::/32",
    "listen_port": 51820,
    "peers": [
        {
            "public_key": KEY,
            "endpoint": "10.77.0.3:51820",
            "allowed_ips": ["fd5a:1f02:0:2::1/128"],
            "persistent_keepalive": 25,
        }
    ],
}


def test_a_good_join_answer_parses():
    state = parse_join(GOOD)
    assert state.ula == "fd5a:1f02:0:1::1" and state.listen_port == 51820
    assert state.peers == (Peer(KEY, "10.77.0.3:51820", ("fd5a:1f02:0:2::1/128",), 25),)


@pytest.mark.parametrize(
    "change",
    [
        {"node_id": "../../etc"},
        {"node_id": ""},
        {"node_id": 7},
        {"ula": "2001:db8::1"},  # not a ULA
        {"ula": "fd00::1"},  # outside the prefix
        {"ula": "not an address"},
        {"prefix": "garbage"},
        {"listen_port": 0},
        {"listen_port": "51820"},
        {"peers": "none"},
        {"peers": [{"public_key": "short", "allowed_ips": []}]},
        {"peers": [{"public_key": KEY, "allowed_ips": ["fd5a::1/129"]}]},
        {"peers": [{"public_key": KEY, "allowed_ips": [], "endpoint": "10.0.0.1"}]},
        {"peers": [{"public_key": KEY, "allowed_ips": [], "endpoint": "h:99999"}]},
        {"peers": [{"public_key": KEY, "allowed_ips": [], "endpoint": "a b:1"}]},
        {"peers": [{"public_key": KEY, "allowed_ips": [], "persistent_keepalive": -1}]},
        {"peers": [["not", "an", "object"]]},
    ],
)
def test_a_bad_join_answer_is_a_mesh_error(change):
    with pytest.raises(MeshError):
        parse_join({**GOOD, **change})


def test_peers_accept_ipv6_and_missing_endpoints():
    peers = parse_peers(
        [
            {"public_key": KEY, "endpoint": "[fd00::2]:51820", "allowed_ips": []},
            {"public_key": KEY, "allowed_ips": ["fd5a:1f02:0:3::1/128"]},
        ]
    )
    assert peers[0].endpoint == "[fd00::2]:51820" and peers[1].endpoint is None


def test_key_is_created_once_with_mode_0600(tmp_path):
    mesh = MeshDir(tmp_path)
    key = mesh.private_key()
    assert stat.S_IMODE(os.stat(mesh.key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(mesh.path).st_mode) == 0o700
    assert MeshDir(tmp_path).private_key() == key
    assert len(base64.b64decode(public_key(key))) == 32


def test_a_corrupt_key_is_refused_not_replaced(tmp_path):
    mesh = MeshDir(tmp_path)
    mesh.path.mkdir()
    mesh.key_file.write_text("garbage\n")
    with pytest.raises(MeshError):
        mesh.private_key()
    assert mesh.key_file.read_text() == "garbage\n"


def test_state_round_trips_and_writes_leave_no_temp_files(tmp_path):
    mesh = MeshDir(tmp_path)
    private = mesh.private_key()
    state = parse_join(GOOD)
    mesh.save(state)
    mesh.save(state)
    assert MeshDir(tmp_path).load() == state
    assert sorted(p.name for p in mesh.path.iterdir()) == ["private.key", "state.json"]
    assert private not in mesh.state_file.read_text()  # key material stays in private.key


def test_unreadable_state_is_a_mesh_error(tmp_path):
    mesh = MeshDir(tmp_path)
    mesh.path.mkdir()
    mesh.state_file.write_text("{not json")
    with pytest.raises(MeshError):
        mesh.load()


def test_wg_config_has_the_key_port_and_peers():
    state = NodeState(
        "n-1",
        "fd5a:1f02:0:1::1",
        "fd5a:1f02::/32",
        51820,
        (Peer(KEY, "10.77.0.3:51820", ("fd5a:1f02:0:2::1/128",), 25),),
    )
    text = interface.render(KEY, state)
    assert "[Interface]" in text and f"PrivateKey = {KEY}" in text and "ListenPort = 51820" in text
    assert "[Peer]" in text and "Endpoint = 10.77.0.3:51820" in text
    assert "AllowedIPs = fd5a:1f02:0:2::1/128" in text and "PersistentKeepalive = 25" in text
    assert "Address" not in text  # wg syncconf format, not wg-quick
