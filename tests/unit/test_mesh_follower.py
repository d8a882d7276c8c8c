"""The follower against the coordinator stand-in over HTTP on loopback, one step at a time, with
the interface calls recorded instead of run: every bad peer kind and every bad answer mode the
stand-in knows, the ULA move, and failures of the interface itself. (Real WireGuard: the
e2e tests in e2e/test_mesh_hostile.py.)"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from addons.config import settings
from mesh import follow
from mesh.bootstrap import join_request
from mesh.coordinator import Coordinator
from mesh.model import NodeState
from mesh.state import MeshDir, MeshError, public_key
from tests.support.standins.coordinator import ANSWER_MODES, BAD_PEER_KINDS, CoordinatorStandin

AUTH_KEY = "follower-test-key"


@dataclass
class FakeInterface:
    """Records what the follower asks of the interface; `refuse` makes `sync` fail."""

    synced: list[set[str]] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    connections: dict[str, int] = field(default_factory=dict)
    refuse: bool = False

    def sync(self, name: str, conf: Path, key: str, state: NodeState) -> None:
        if self.refuse:
            raise MeshError("wg syncconf: Configuration parsing error")
        self.synced.append({p.public_key for p in state.peers})

    def add_address(self, name: str, ula: str) -> None:
        self.added.append(ula)

    def remove_address(self, name: str, ula: str) -> None:
        self.removed.append(ula)

    def route(self, name: str, prefix: str, old: str | None = None) -> None:
        pass

    def connections_on(self, ula: str) -> int:
        return self.connections.get(ula, 0)


@dataclass
class Rig:
    standin: CoordinatorStandin
    follower: follow.Follower
    iface: FakeInterface
    mesh: MeshDir

    def status(self) -> dict:
        return json.loads(self.mesh.status_file.read_text())

    def saved(self) -> NodeState:
        state, _ = self.mesh.load(self.follower.public_key)
        assert state is not None
        return state

    def peer(self, n: int) -> str:
        """Register another node at the coordinator; its public key."""
        key = base64.b64encode(bytes([n]) * 32).decode()
        self.standin.add_node(key, f"10.77.0.{n}:51820")
        return key


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    iface = FakeInterface()
    for name in ("sync", "add_address", "remove_address", "route", "connections_on"):
        monkeypatch.setattr(follow.interface, name, getattr(iface, name))
    with CoordinatorStandin("127.0.0.1", auth_key=AUTH_KEY) as standin:
        env = {
            "REGISTRY_DATA_DIR": str(tmp_path),
            "REGISTRY_AUTH_URL": "http://auth.invalid",
            "MESH_COORDINATOR_URL": standin.url,
            "MESH_AUTH_KEY": AUTH_KEY,
            "MESH_POLL_SECONDS": "1",
        }
        s = settings.load(env)
        mesh = MeshDir(tmp_path)
        key = mesh.private_key()
        joined = Coordinator(standin.url, AUTH_KEY).join(join_request(public_key(key), None))
        mesh.save(joined.state)
        follower = follow.Follower(s, mesh, key, joined.state)
        follower.coordinator.deadline = 1.5  # the slow-drip mode, quickly
        rig = Rig(standin, follower, iface, mesh)
        rig.peer(2)
        assert follower.step() == 1 and follower.failures == 0
        yield rig


@pytest.mark.parametrize("kind", BAD_PEER_KINDS)
def test_a_bad_peer_entry_is_skipped_and_good_changes_still_apply(rig: Rig, kind: str):
    good = rig.iface.synced[-1]
    rig.standin.bad_peers = [kind]
    newcomer = rig.peer(3)
    assert rig.follower.step() == 1  # a usable answer: no backoff
    assert rig.iface.synced[-1] == good | {newcomer}  # the bad entry is not among them
    status = rig.status()
    assert status["state"] == "degraded" and "skipped 1 invalid peer" in status["reason"]
    assert {p.public_key for p in rig.saved().peers} == good | {newcomer}
    rig.standin.bad_peers = []
    rig.follower.step()
    assert rig.status()["state"] == "ok"


@pytest.mark.parametrize("mode", [m for m in ANSWER_MODES if m != "bad-join-ula"])
def test_a_bad_answer_changes_nothing_and_backs_off(rig: Rig, mode: str):
    applied, saved = list(rig.iface.synced), rig.saved()
    rig.standin.answer_mode = mode
    newcomer = rig.peer(3)
    delays = [rig.follower.step() for _ in range(3)]
    assert rig.iface.synced == applied and rig.saved() == saved  # nothing applied, nothing saved
    assert rig.follower.failures == 3 and delays[-1] >= 2  # backing off
    status = rig.status()
    assert status["state"] == "degraded" and status["reason"]
    rig.standin.answer_mode = None
    assert rig.follower.step() == 1 and rig.follower.failures == 0  # back to the normal period
    assert newcomer in rig.iface.synced[-1] and rig.status()["state"] == "ok"


def test_a_bad_join_answer_does_not_stop_peers_being_followed(rig: Rig):
    rig.standin.answer_mode = "bad-join-ula"
    rig.follower.joined = False  # a re-join is due
    newcomer = rig.peer(3)
    assert rig.follower.step() == 1
    assert newcomer in rig.iface.synced[-1]
    assert "re-join failed" in rig.status()["reason"] and rig.saved().ula == rig.follower.state.ula


def test_the_coordinator_down_keeps_everything(rig: Rig):
    saved = rig.saved()
    rig.standin.set_down(True)
    try:
        rig.follower.step()
        assert rig.saved() == saved and "unreachable" in rig.status()["reason"]
    finally:
        rig.standin.set_down(False)


def test_an_interface_that_refuses_keeps_the_last_applied_state(rig: Rig):
    saved = rig.saved()
    rig.iface.refuse = True
    rig.peer(3)
    rig.follower.step()
    assert rig.saved() == saved and "Configuration parsing error" in rig.status()["reason"]
    rig.iface.refuse = False
    rig.follower.step()
    assert len(rig.saved().peers) == 2


def test_an_unexpected_error_is_reported_not_fatal(rig: Rig, monkeypatch: pytest.MonkeyPatch):
    def broken(*args: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(rig.follower.coordinator, "peers", broken)
    rig.follower.step()
    assert rig.status()["reason"] == "internal error (KeyError)"


def test_a_ula_move_adds_the_new_address_and_retires_the_old_one_when_unused(rig: Rig):
    old = rig.follower.state.ula
    new = "fd5a:1f02:0:99::1"
    rig.standin.force_ula[rig.follower.state.node_id] = new
    rig.iface.connections[old] = 1  # a transfer in progress on the old address
    rig.follower.joined = False
    rig.follower.step()
    assert rig.iface.added == [new] and rig.saved().ula == new
    assert [r.ula for r in rig.saved().retiring] == [old] and rig.iface.removed == []
    rig.follower.step()
    assert rig.iface.removed == []  # still in use
    rig.iface.connections[old] = 0
    rig.follower.step()
    assert rig.iface.removed == []  # unused, but only just moved: the gateway may be re-binding
    rig.follower.retire_min_age = 0.0
    rig.follower.step()
    assert rig.iface.removed == [old] and rig.saved().retiring == ()
