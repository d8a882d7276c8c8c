"""Mesh pure parts: every rule an answer of the coordinator must pass (one test per rule), the
peer set judged entry by entry, persisted state checked again on load, atomic private writes,
and the follower's decisions (backoff, ULA moves, retiring the old address, health)."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import stat
import struct
import sys

import pytest

from mesh import interface, validate
from mesh.follow import BACKOFF_FACTOR, backoff_delay, plan_move, retire_due
from mesh.model import NodeState, Peer, Retiring
from mesh.state import MeshDir, MeshError, public_key
from mesh.status import health, next_status
from mesh.validate import Context, Invalid

KEY = base64.b64encode(bytes(range(1, 33))).decode()
KEY2 = base64.b64encode(bytes(range(2, 34))).decode()
OWN = base64.b64encode(bytes(range(3, 35))).decode()
PREFIX = ipaddress.IPv6Network("fd5a:1f02::/32")
ULA = "fd5a:1f02:0:1::1"
CTX = Context(OWN, PREFIX, (ipaddress.IPv6Address(ULA),))
PEER = {
    "public_key": KEY,
    "endpoint": "10.77.0.3:51820",
    "allowed_ips": ["fd5a:1f02:0:2::1/128"],
    "persistent_keepalive": 25,
}
GOOD = {
    "node_id": "n-1",
    "ula": ULA,
    "prefix": "fd5a:1f02::/32",
    "listen_port": 51820,
    "peers": [PEER],
}


def refused(rule, *args, match: str | None = None):
    with pytest.raises(Invalid, match=match):
        rule(*args)


# --- public_key --------------------------------------------------------------------------------


def test_key_canonical_32_bytes_is_accepted():
    assert validate.wg_key(KEY) == KEY and len(KEY) == 44 and KEY.endswith("=")


@pytest.mark.parametrize("value", [None, 7, b"bytes", ["k"]])
def test_key_must_be_a_string(value):
    refused(validate.wg_key, value, match="not a string")


@pytest.mark.parametrize(
    "value",
    [
        "short",
        "not base64 at all!!",
        KEY + "\n",  # a newline would end the config line
        KEY[:-1] + " ",
        KEY.replace("=", ""),  # unpadded
        base64.urlsafe_b64encode(b"\xfb" * 32).decode(),  # URL-safe alphabet
    ],
)
def test_key_must_be_standard_base64(value):
    refused(validate.wg_key, value)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_must_decode_to_32_bytes(size):
    refused(validate.wg_key, base64.b64encode(b"\x01" * size).decode(), match=f"{size} bytes")


def test_key_must_be_canonical_base64():
    # Same 32 bytes, but the unused low bits of the last character are set: it decodes, yet
    # is not the encoding WireGuard produces (and `wg` refuses it).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(KEY[42])
    noncanonical = KEY[:42] + alphabet[last | 1] + "="
    assert base64.b64decode(noncanonical) == base64.b64decode(KEY)
    refused(validate.wg_key, noncanonical, match="canonical")


def test_key_must_not_be_all_zero():
    refused(validate.wg_key, base64.b64encode(bytes(32)).decode(), match="all-zero")


def test_key_must_not_be_our_own():
    assert validate.not_own_key(KEY, CTX) == KEY
    refused(validate.not_own_key, OWN, CTX, match="own key")


# --- endpoint ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "normalised"),
    [
        (None, None),
        ("10.77.0.3:51820", "10.77.0.3:51820"),
        ("[FD00::2]:51820", "[fd00::2]:51820"),
        ("[2001:db8::1]:1", "[2001:db8::1]:1"),
        ("node-1.mesh.example:51820", "node-1.mesh.example:51820"),
    ],
)
def test_endpoint_host_port_is_accepted_and_normalised(value, normalised):
    assert validate.endpoint(value, PREFIX) == normalised


@pytest.mark.parametrize(
    "value",
    [
        "10.0.0.1",  # no port
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:+1",
        "10.0.0.1:\uff15\uff11",  # non-ASCII (fullwidth) digits
        "10.0.0.1:051820",
        "fd00::2:51820",  # IPv6 without brackets
        "[fd00::zz]:1",
        "[fe80::1%eth0]:51820",  # an interface scope of *our* machine
        "a b:1",
        "-bad-.example:1",
        "300.1.1.1:1",  # a mistyped IPv4 address, not a name
        "01.2.3.4:1",
        "0.0.0.0:51820",
        "[::]:51820",
        "224.0.0.1:51820",
        "x" * 300 + ":1",
        7,
        ["10.0.0.1:1"],
    ],
)
def test_endpoint_must_be_host_port(value):
    refused(validate.endpoint, value, PREFIX)


def test_endpoint_must_not_be_inside_the_mesh():
    refused(validate.endpoint, "[fd5a:1f02:0:9::1]:51820", PREFIX, match="inside the mesh")


# --- allowed IPs -------------------------------------------------------------------------------


def test_allowed_ips_inside_the_prefix_are_accepted_masked_and_deduplicated():
    got = validate.allowed_ips(
        ["fd5a:1f02:0:2::1/128", "fd5a:1f02:0:3::1/64", "fd5a:1f02:0:2::1"], CTX
    )
    assert got == ("fd5a:1f02:0:2::1/128", "fd5a:1f02:0:3::/64")
    assert validate.allowed_ips(None, CTX) == () and validate.allowed_ips([], CTX) == ()


@pytest.mark.parametrize("value", ["::/0", "0.0.0.0/0"])
def test_allowed_ips_never_the_default_route(value):
    refused(validate.allowed_ips, [value], CTX, match="default route")


@pytest.mark.parametrize("value", ["fd00::/64", "2001:db8::1/128", "10.0.0.0/8", "fd5a::/16"])
def test_allowed_ips_must_be_inside_the_mesh_prefix(value):
    refused(validate.allowed_ips, [value], CTX, match="outside the mesh prefix")


@pytest.mark.parametrize("value", [f"{ULA}/128", "fd5a:1f02:0:1::/64", "fd5a:1f02::/32"])
def test_allowed_ips_never_cover_our_own_address(value):
    refused(validate.allowed_ips, [value], CTX, match="own address")


def test_allowed_ips_never_cover_an_address_we_are_moving_away_from():
    old = ipaddress.IPv6Address("fd5a:1f02:0:7::1")
    ctx = Context(OWN, PREFIX, (ipaddress.IPv6Address(ULA), old))
    refused(validate.allowed_ips, ["fd5a:1f02:0:7::1/128"], ctx, match="own address")


@pytest.mark.parametrize(
    "value",
    ["fd5a:1f02:0:2::1/128", [7], ["fd5a::1/129"], ["garbage"], ["fd5a:1f02::1%eth0/128"]],
)
def test_allowed_ips_must_be_a_list_of_networks(value):
    refused(validate.allowed_ips, value, CTX)


def test_allowed_ips_are_bounded():
    many = [f"fd5a:1f02:0:{i:x}::1/128" for i in range(2, 2 + validate.MAX_ALLOWED_IPS + 1)]
    refused(validate.allowed_ips, many, CTX, match="entries")


# --- keepalive, node id, ports, prefix, ULA ----------------------------------------------------


@pytest.mark.parametrize("value", [None, 0, 25, 65535])
def test_keepalive_in_range_is_accepted(value):
    assert validate.keepalive(value) == value


@pytest.mark.parametrize("value", [-1, 65536, True, "25", 2.5])
def test_keepalive_out_of_range_is_refused(value):
    refused(validate.keepalive, value, match="persistent_keepalive")


@pytest.mark.parametrize("value", ["../../etc", "..", "", 7, None, "a" * 129, "a/b", "a b"])
def test_node_id_is_a_short_safe_token(value):
    refused(validate.node_id, value)


@pytest.mark.parametrize("value", [0, 65536, -1, "51820", True, None, 1.5])
def test_listen_port_in_range(value):
    refused(validate.port, value, "listen_port")
    assert validate.port(51820, "listen_port") == 51820


@pytest.mark.parametrize(
    "value", ["garbage", None, "2001:db8::/32", "::/0", "fd5a:1f02::1/32", "fd5a::/124", "10/8"]
)
def test_prefix_is_a_ula_network(value):
    refused(validate.mesh_prefix, value)


@pytest.mark.parametrize(
    "value", ["2001:db8::1", "fd00::1", "fd5a:1f02::", "not an address", None, "fd5a:1f02::1%x"]
)
def test_ula_is_a_node_address_inside_the_prefix(value):
    refused(validate.node_ula, value, PREFIX)


# --- the peer set, entry by entry --------------------------------------------------------------


def test_a_peer_that_is_not_an_object_is_refused():
    refused(validate.peer, ["not", "an", "object"], CTX, match="not a JSON object")


def test_each_peer_is_judged_on_its_own():
    bad = [
        {**PEER, "public_key": "short"},
        {**PEER, "public_key": KEY2, "endpoint": "nope"},
        {**PEER, "public_key": KEY2, "allowed_ips": ["::/0"]},
        {**PEER, "public_key": OWN, "allowed_ips": ["fd5a:1f02:0:8::1/128"]},
        {**PEER, "public_key": KEY2, "persistent_keepalive": 10**6},
        None,
    ]
    good2 = {**PEER, "public_key": KEY2, "allowed_ips": ["fd5a:1f02:0:9::1/128"]}
    result = validate.peer_set([bad[0], PEER, *bad[1:], good2], CTX)
    assert [p.public_key for p in result.peers] == [KEY, KEY2]
    assert [s.label.split(" ")[1] for s in result.skipped] == ["#0", "#2", "#3", "#4", "#5", "#6"]
    assert all(s.reason for s in result.skipped)


def test_a_repeated_key_keeps_the_first_entry():
    twin = {**PEER, "endpoint": "10.9.9.9:1", "allowed_ips": ["fd5a:1f02:0:5::1/128"]}
    result = validate.peer_set([PEER, twin], CTX)
    assert result.peers == (Peer(KEY, "10.77.0.3:51820", ("fd5a:1f02:0:2::1/128",), 25),)
    assert "repeats peer #0" in result.skipped[0].reason


def test_an_allowed_ip_claimed_twice_stays_with_the_first_peer():
    thief = {**PEER, "public_key": KEY2, "allowed_ips": ["fd5a:1f02:0:2::/64"]}
    result = validate.peer_set([PEER, thief], CTX)
    assert [p.public_key for p in result.peers] == [KEY]
    assert "overlaps those of peer #0" in result.skipped[0].reason
    # Disjoint ranges, in any order, are all kept.
    a = {**PEER, "public_key": KEY2, "allowed_ips": ["fd5a:1f02:0:3::/64"]}
    assert len(validate.peer_set([a, PEER], CTX).peers) == 2


def test_log_labels_never_carry_a_whole_key_or_raw_control_characters():
    result = validate.peer_set(
        [{**PEER, "public_key": "A\nB" * 30}, {**PEER, "public_key": KEY}], CTX
    )
    line = str(result.skipped[0])
    assert "\n" not in line and len(line) < 200
    assert KEY not in str(validate.peer_set([{**PEER, "endpoint": 5}], CTX).skipped[0])


def test_a_list_with_peers_none_of_them_valid_is_unusable():
    assert validate.usable_peer_set([], CTX).peers == ()  # a mesh without other members: fine
    refused(validate.usable_peer_set, [{**PEER, "public_key": "x"}], CTX, match="none of the 1")
    refused(validate.usable_peer_set, [1, 2, 3], CTX, match="none of the 3")


def test_the_peer_list_is_bounded():
    refused(validate.peer_set, [PEER] * (validate.MAX_PEERS + 1), CTX, match="entries")


@pytest.mark.parametrize(
    "data", [[PEER], None, "peers", {"peers": None}, {"peers": {"a": PEER}}, {"nodes": []}]
)
def test_a_peers_answer_of_the_wrong_shape_is_unusable(data):
    refused(validate.peers_answer, data, CTX)


# --- the join answer ---------------------------------------------------------------------------


def test_a_good_join_answer_parses():
    state, skipped = validate.join_answer(GOOD, OWN)
    assert state.ula == ULA and state.listen_port == 51820 and skipped == ()
    assert state.peers == (Peer(KEY, "10.77.0.3:51820", ("fd5a:1f02:0:2::1/128",), 25),)


@pytest.mark.parametrize(
    "change",
    [
        {"node_id": "../../etc"},
        {"ula": "2001:db8::1"},  # not a ULA
        {"ula": "fd00::1"},  # outside the prefix
        {"ula": "not an address"},
        {"prefix": "garbage"},
        {"prefix": "::/0"},
        {"listen_port": 0},
        {"listen_port": "51820"},
        {"peers": "none"},
        {"peers": [{"public_key": "short"}]},  # listed, none valid
    ],
)
def test_a_bad_join_answer_is_invalid(change):
    refused(validate.join_answer, {**GOOD, **change}, OWN)


@pytest.mark.parametrize("data", [None, [], "x", 3])
def test_a_join_answer_that_is_not_an_object_is_invalid(data):
    refused(validate.join_answer, data, OWN, match="not a JSON object")


def test_bad_peers_in_a_join_answer_are_skipped_not_fatal():
    covering = {**PEER, "public_key": KEY2, "allowed_ips": ["fd5a:1f02:0:1::/64"]}
    state, skipped = validate.join_answer({**GOOD, "peers": [PEER, covering]}, OWN)
    assert [p.public_key for p in state.peers] == [KEY]
    assert len(skipped) == 1 and "own address" in skipped[0].reason
    # A peer may not cover an address we are still retiring either.
    moving = {**PEER, "public_key": KEY2, "allowed_ips": ["fd5a:1f02:0:7::1/128"]}
    state, skipped = validate.join_answer(
        {**GOOD, "peers": [PEER, moving]}, OWN, also_own=("fd5a:1f02:0:7::1",)
    )
    assert len(state.peers) == 1 and len(skipped) == 1


# --- persisted state ---------------------------------------------------------------------------


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
    state, _ = validate.join_answer(GOOD, OWN)
    state = NodeState(*state.__dict__.values())
    moved = plan_move(state, NodeState("n-1", "fd5a:1f02:0:4::1", str(PREFIX), 51820), 10.0, 5)
    for s in (state, moved):
        mesh.save(s)
        mesh.save(s)
        assert MeshDir(tmp_path).load(OWN) == (s, ())
    assert sorted(p.name for p in mesh.path.iterdir()) == ["private.key", "state.json"]
    assert private not in mesh.state_file.read_text()  # key material stays in private.key


def test_an_old_state_with_a_bad_peer_loads_without_it(tmp_path):
    """A state.json saved by a version that checked less cannot keep the interface down."""
    mesh = MeshDir(tmp_path)
    mesh.path.mkdir()
    bad = {"public_key": "not-a-key", "endpoint": None, "allowed_ips": []}
    own = {**PEER, "public_key": OWN, "allowed_ips": ["fd5a:1f02:0:6::1/128"]}
    mesh.state_file.write_text(json.dumps({**GOOD, "peers": [bad, PEER, own]}))
    state, dropped = mesh.load(OWN)
    assert state is not None and [p.public_key for p in state.peers] == [KEY]
    assert len(dropped) == 2 and "peer #0" in dropped[0] and "own key" in dropped[1]


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({**GOOD, "ula": "2001:db8::1"})])
def test_unreadable_state_is_a_mesh_error(tmp_path, text):
    mesh = MeshDir(tmp_path)
    mesh.path.mkdir()
    mesh.state_file.write_text(text)
    with pytest.raises(MeshError, match="remove it to re-join"):
        mesh.load(OWN)


# --- the WireGuard config ----------------------------------------------------------------------


def test_wg_config_has_the_key_port_and_peers():
    state = NodeState(
        "n-1",
        ULA,
        "fd5a:1f02::/32",
        51820,
        (Peer(KEY, "10.77.0.3:51820", ("fd5a:1f02:0:2::1/128",), 25),),
    )
    text = interface.render(OWN, state)
    assert "[Interface]" in text and f"PrivateKey = {OWN}" in text and "ListenPort = 51820" in text
    assert "[Peer]" in text and "Endpoint = 10.77.0.3:51820" in text
    assert "AllowedIPs = fd5a:1f02:0:2::1/128" in text and "PersistentKeepalive = 25" in text
    assert "Address" not in text  # wg syncconf format, not wg-quick


def test_wg_config_carries_resolved_endpoints_only():
    state = NodeState(
        "n-1",
        ULA,
        str(PREFIX),
        51820,
        (Peer(KEY, "peer.example:51820", ("fd5a:1f02:0:2::1/128",)),),
    )
    assert "Endpoint = 10.1.2.3:51820" in interface.render(OWN, state, lambda e: "10.1.2.3:51820")
    assert "Endpoint" not in interface.render(OWN, state, lambda e: None)  # unresolved: left out
    assert interface.resolve_endpoint("[fd00::1]:5", str(PREFIX)) == "[fd00::1]:5"
    assert interface.resolve_endpoint("localhost:5", str(PREFIX)) in ("127.0.0.1:5", "[::1]:5")


def _tcp6_line(addr: str, port: int, state: str) -> str:
    raw = ipaddress.IPv6Address(addr).packed
    words = [raw[i : i + 4] for i in range(0, 16, 4)]
    if sys.byteorder == "little":
        words = [w[::-1] for w in words]
    hexaddr = "".join(w.hex().upper() for w in words)
    return f"   0: {hexaddr}:{port:04X} {'0' * 32}:0000 {state} 00000000:00000000 00:00000000"


def test_connections_on_an_address_are_counted_from_proc_net_tcp6():
    text = "\n".join(
        [
            "  sl  local_address                         remote_address  st ...",
            _tcp6_line(ULA, 5000, "0A"),  # listening: not a connection
            _tcp6_line(ULA, 5000, "01"),  # established
            _tcp6_line(ULA, 5000, "08"),  # close-wait: still open
            _tcp6_line(ULA, 5000, "06"),  # time-wait: done
            _tcp6_line("fd5a:1f02:0:2::1", 5000, "01"),
        ]
    )
    assert interface.count_connections(text, ULA) == 2
    assert interface.count_connections(text, "fd5a:1f02:0:9::1") == 0
    assert struct.calcsize("I") == 4  # the /proc format's word size


# --- the follower's decisions ------------------------------------------------------------------


def test_backoff_is_the_period_after_success_and_grows_to_a_cap_with_jitter():
    assert backoff_delay(0, 30, 0.9) == 30
    assert backoff_delay(1, 30, 0.0) == 30 and backoff_delay(1, 30, 0.999) < 60
    assert backoff_delay(2, 30, 0.0) >= 60 and backoff_delay(2, 30, 0.999) < 120
    cap = 30 * BACKOFF_FACTOR
    assert all(cap / 2 <= backoff_delay(n, 30, r) <= cap for n in (5, 50, 10**6) for r in (0, 0.5))
    assert backoff_delay(1, 1, 0.0) >= 1  # never faster than the poll period


def test_a_ula_move_retires_the_old_address_and_a_move_back_cancels_it():
    a = NodeState("n-1", ULA, str(PREFIX), 51820)
    assert plan_move(a, a, 100.0, 900).retiring == ()
    b = plan_move(a, NodeState("n-1", "fd5a:1f02:0:4::1", str(PREFIX), 51820), 100.0, 900)
    assert b.ula == "fd5a:1f02:0:4::1" and b.retiring == (Retiring(ULA, 100.0, 1000.0),)
    back = plan_move(b, NodeState("n-1", ULA, str(PREFIX), 51820), 200.0, 900)
    assert back.ula == ULA and back.retiring == (Retiring("fd5a:1f02:0:4::1", 200.0, 1100.0),)


def test_an_old_address_goes_when_unused_or_when_its_time_is_up():
    old = (Retiring("fd5a:1f02:0:4::1", 0.0, 1000.0), Retiring("fd5a:1f02:0:5::1", 0.0, 1000.0))
    busy = {"fd5a:1f02:0:4::1": 1, "fd5a:1f02:0:5::1": 0}
    keep, done = retire_due(old, 500.0, lambda ula: busy[ula])
    assert keep == (old[0],) and done == (old[1],)
    keep, done = retire_due(old, 1000.0, lambda ula: 5)
    assert keep == () and done == old


def test_an_old_address_stays_a_few_seconds_even_unused():
    """The gateway re-binds within a second of the move: a connection it accepted on the old
    address meanwhile keeps its address."""
    fresh = (Retiring("fd5a:1f02:0:4::1", 100.0, 1000.0),)
    assert retire_due(fresh, 102.0, lambda ula: 0, min_age=5) == (fresh, ())
    assert retire_due(fresh, 105.0, lambda ula: 0, min_age=5) == ((), fresh)


# --- health ------------------------------------------------------------------------------------


def test_status_since_stays_while_state_and_reason_stay():
    first = next_status(None, "degraded", "coordinator answered 503", ULA, 100.0, 140.0)
    again = next_status(first, "degraded", "coordinator answered 503", ULA, 110.0, 150.0)
    other = next_status(again, "degraded", "coordinator unreachable", ULA, 120.0, 160.0)
    assert first["since"] == again["since"] == 100.0 and other["since"] == 120.0
    assert len(next_status(None, "degraded", "x" * 5000, ULA, 1, 2)["reason"]) <= 300


def test_health_names_the_mesh_state_and_why():
    ok = {"state": "ok", "next_check_by": 200.0, "checked": 100.0}
    degraded = {**ok, "state": "degraded", "reason": "coordinator answered 502"}
    assert health("", True, None, 150.0) == ("absent", None)
    assert health("tbf0", False, ok, 150.0) == ("down", "interface tbf0 is not up")
    assert health("tbf0", True, ok, 150.0) == ("ok", None)
    assert health("tbf0", True, degraded, 150.0) == ("degraded", "coordinator answered 502")
    assert health("tbf0", True, None, 150.0)[0] == "degraded"
    stale = health("tbf0", True, ok, 250.0)
    assert stale[0] == "degraded" and "has not reported since" in stale[1]
    assert health("tbf0", True, None, 150.0, followed=False) == ("ok", None)
