"""The gateway follows the node's ULA in state.json: `mode` re-bound, realm renamed, nothing
else touched; explicit settings never followed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mitmproxy.addonmanager import Loader
from mitmproxy.test import taddons

from addons.gateway.meshaddress import MeshAddress, read_ula, realm_for, rebind

OLD, NEW = "fd5a:1f02:0:1::1", "fd5a:1f02:0:9::1"
UPSTREAM = "http://127.0.0.1:5001"
MODE = f"reverse:{UPSTREAM}@{OLD}:5000"


class Realm:
    """Stands for RegistryAccess, which owns `registry_realm`."""

    def load(self, loader: Loader) -> None:
        loader.add_option("registry_realm", str, "", "")


def write_state(path: Path, ula: str, **extra: object) -> None:
    data = {"node_id": "n", "ula": ula, "prefix": "fd5a:1f02::/32", "listen_port": 51820}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**data, **extra}))
    os.replace(tmp, path)  # as the follower writes it: a new inode


def test_rebind_moves_only_the_mode_on_the_old_address():
    other = f"reverse:{UPSTREAM}@127.0.0.1:6000"
    assert rebind([MODE, other], OLD, NEW) == [f"reverse:{UPSTREAM}@{NEW}:5000", other]
    assert rebind([MODE], "fd5a:1f02:0:1:0:0:0:1", NEW)[0].endswith(f"@{NEW}:5000")  # any spelling
    assert realm_for(NEW, 5000) == f"http://[{NEW}]:5000/auth/token"


def test_read_ula_checks_what_it_reads(tmp_path):
    path = tmp_path / "state.json"
    write_state(path, NEW)
    assert read_ula(path) == NEW
    for bad in ("2001:db8::1", "fd00::1", "garbage", None):
        write_state(path, bad)  # type: ignore[arg-type]
        assert read_ula(path) is None
    path.write_text("[")
    assert read_ula(path) is None
    assert read_ula(tmp_path / "missing.json") is None


def test_a_restarted_gateway_binds_the_current_ula_not_the_one_on_its_command_line(tmp_path):
    path = tmp_path / "state.json"
    write_state(path, NEW)
    addon = MeshAddress()
    with taddons.context(addon, Realm()) as tctx:
        tctx.configure(addon, mode=[MODE], registry_realm=realm_for(OLD, 5000))
        tctx.configure(addon, registry_mesh_state=str(path), registry_mesh_realm=True)
        assert tctx.options.mode == [f"reverse:{UPSTREAM}@{NEW}:5000"]
        assert tctx.options.registry_realm == realm_for(NEW, 5000)
        assert addon.ula == NEW


def test_a_move_while_running_updates_mode_and_realm_once(tmp_path):
    path = tmp_path / "state.json"
    write_state(path, OLD)
    addon = MeshAddress()
    with taddons.context(addon, Realm()) as tctx:
        tctx.configure(addon, mode=[MODE], registry_realm=realm_for(OLD, 5000))
        tctx.configure(addon, registry_mesh_state=str(path), registry_mesh_realm=True)
        assert tctx.options.mode == [MODE] and not addon.check()  # nothing changed
        write_state(path, NEW, peers=[])
        assert addon.check()
        assert tctx.options.mode == [f"reverse:{UPSTREAM}@{NEW}:5000"]
        assert tctx.options.registry_realm == realm_for(NEW, 5000)
        write_state(path, NEW, peers=[{"x": 1}])  # same ULA, other peers: no re-bind
        assert not addon.check()
        write_state(path, "not an address")  # a broken file: stay where we are
        assert not addon.check() and addon.ula == NEW


@pytest.mark.parametrize("follow_realm", [False, True])
def test_an_explicit_external_url_keeps_its_realm(tmp_path, follow_realm):
    path = tmp_path / "state.json"
    write_state(path, NEW)
    addon = MeshAddress()
    explicit = "https://registry.example/auth/token"
    with taddons.context(addon, Realm()) as tctx:
        tctx.configure(addon, mode=[MODE], registry_realm=explicit)
        tctx.configure(addon, registry_mesh_state=str(path), registry_mesh_realm=follow_realm)
        assert tctx.options.mode == [f"reverse:{UPSTREAM}@{NEW}:5000"]
        assert (tctx.options.registry_realm == explicit) is not follow_realm


def test_without_a_state_file_option_nothing_is_followed(tmp_path):
    path = tmp_path / "state.json"
    write_state(path, NEW)
    addon = MeshAddress()
    with taddons.context(addon, Realm()) as tctx:
        tctx.configure(addon, mode=[MODE], registry_mesh_state="")
        assert not addon.check() and tctx.options.mode == [MODE]
