"""tabbify_registry/gc.py without a backend: retention from the policy, the freeze protocol,
descriptor sizes, and what `gc` says with Zot."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from addons import freeze, gc_plan
from addons.policy import parse
from addons.runstate import write_json
from tabbify_registry import gc
from tabbify_registry.settings import load

POLICY = """
[[retention]]
repositories = ["acme/**"]
keep_last = 1
protected_tags = ["stable"]
untagged_after = "2h"
"""


def test_retention_keeps_tags_of_unknown_push_time_and_protected_ones():
    rules = gc.retention_for(parse(POLICY, "p.toml"), {"acme/app": {"old"}})
    r = rules("acme/app")
    assert r.keep_last == 1 and r.untagged_after == 7200
    assert r.is_protected("stable") and r.is_protected("old") and not r.is_protected("v1")
    default = rules("globex/app")  # no rule: every tag stays, untagged after 1 h
    assert default.keep_last is None and default.untagged_after == gc_plan.DEFAULT_GRACE
    assert not default.is_protected("v1")


def test_retention_never_takes_an_immutable_tag():
    policy = parse(POLICY + '[[immutable]]\nrepositories = ["acme/**"]\ntags = ["v*"]\n', "p.toml")
    r = gc.retention_for(policy, {})("acme/app")
    assert r.is_protected("v1") and not r.is_protected("dev")


def test_descriptor_sizes():
    body = json.dumps(
        {
            "config": {"digest": "sha256:" + "a" * 64, "size": 10},
            "layers": [{"digest": "sha256:" + "b" * 64, "size": 20}, {"digest": 3}],
            "manifests": [{"digest": "sha256:" + "c" * 64, "size": -1}],
        }
    ).encode()
    assert gc.descriptor_sizes(body) == {"sha256:" + "a" * 64: 10, "sha256:" + "b" * 64: 20}
    assert gc.descriptor_sizes(b"not json") == {}


def write_worker(directory: Path, n: int, seen: str | None, in_flight: int) -> None:
    state = {"time": time.time(), "freeze": {"seen": seen, "in_flight": in_flight}}
    write_json(directory / f"worker-{n}.json", state)  # atomic, as workers publish it


def test_the_freeze_waits_for_every_worker_and_is_always_lifted(tmp_path):
    write_worker(tmp_path, 0, None, 0)
    write_worker(tmp_path, 1, None, 0)
    (tmp_path / "worker-9.json").write_text(json.dumps({"time": 0}))  # long gone: not waited for
    f = gc.Freeze(tmp_path, wait=5)

    def workers_follow() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            marker = freeze.read_marker(tmp_path / freeze.MARKER)
            if marker:
                write_worker(tmp_path, 0, marker["id"], 0)
                write_worker(tmp_path, 1, marker["id"], 1)  # a write still in flight…
                time.sleep(0.5)
                write_worker(tmp_path, 1, marker["id"], 0)  # …then done
                return
            time.sleep(0.05)

    t = threading.Thread(target=workers_follow)
    t.start()
    started = time.monotonic()
    with f:
        assert time.monotonic() - started >= 0.4
        assert freeze.read_marker(tmp_path / freeze.MARKER)["id"] == f.id
    t.join()
    assert not (tmp_path / freeze.MARKER).exists()


def test_the_freeze_gives_up_on_writes_that_do_not_end(tmp_path):
    f = gc.Freeze(tmp_path, wait=0.5)
    write_worker(tmp_path, 0, "someone-else", 0)
    with pytest.raises(gc.GcError, match="nothing was removed"), f:
        pass
    assert not (tmp_path / freeze.MARKER).exists()


def test_a_marker_expires_by_itself(tmp_path):
    path = tmp_path / freeze.MARKER
    path.write_text(json.dumps({"id": "x", "until": time.time() - 1}))
    assert freeze.read_marker(path) is None
    path.write_text(json.dumps({"id": "x", "until": time.time() + 60}))
    assert freeze.read_marker(path)["id"] == "x"
    path.write_text("garbage")
    assert freeze.read_marker(path) is None


def test_with_zot_gc_is_zots_own(tmp_path):
    (tmp_path / "policy.toml").write_text(POLICY)
    env = {"REGISTRY_DATA_DIR": str(tmp_path), "REGISTRY_BACKEND": "zot",
           "REGISTRY_AUTH_URL": "http://127.0.0.1:1", "REGISTRY_GC_INTERVAL": "12h"}  # fmt: skip
    report = gc.run_once(load(env), dry_run=False)
    assert report["backend"] == "zot" and "nothing was triggered" in report["message"]
    settings = report["settings"]
    assert settings["gc"] is True and settings["gcInterval"] == "12h"
    assert settings["retention"]["policies"][0]["repositories"] == ["acme/**"]


def test_the_periodic_run_goes_on_after_a_failure(tmp_path, monkeypatch, capsys):
    s = load({"REGISTRY_DATA_DIR": str(tmp_path), "REGISTRY_BACKEND": "distribution"})
    runs, sleeps = [], []

    def run_once(settings, dry_run, freeze_wait):
        runs.append(dry_run)
        if len(runs) == 1:
            raise gc.GcError("writes still in flight")
        return {"backend": "distribution", "dry_run": False, "totals": {"manifests": 2}}

    real_sleep = gc.time.sleep

    def sleep(seconds):
        # time.sleep is process-wide: threads other tests left running (a log writer) sleep too
        if threading.current_thread() is not threading.main_thread():
            return real_sleep(seconds)
        sleeps.append(seconds)
        if len(sleeps) > 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(gc, "run_once", run_once)
    monkeypatch.setattr(gc.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        gc.periodic(s, 3600, 10)
    assert sleeps == [3600] * 3 and runs == [False, False]
    err = capsys.readouterr().err.splitlines()
    assert "failed: writes still in flight" in err[0] and "removed 2 manifests" in err[1]
    assert list((tmp_path / "gc").glob("report-*.json"))


def test_run_starts_the_gc_program_only_with_an_interval_and_distribution():
    from tabbify_registry.cli import gc_command, supervisor_env

    env = {"REGISTRY_DATA_DIR": "/d", "REGISTRY_BACKEND": "distribution",
           "REGISTRY_GC_INTERVAL": "2h"}  # fmt: skip
    s = load(env)
    child = supervisor_env(env, s, Path("/d/run/c.json"))
    assert child["TBF_GC_AUTOSTART"] == "true"
    assert not any(k.startswith("REGISTRY_") for k in child)  # only on gc's own command line
    command = gc_command(env, s)
    assert command[:4] == ["env", "REGISTRY_BACKEND=distribution", "REGISTRY_DATA_DIR=/d",
                           "REGISTRY_GC_INTERVAL=2h"]  # fmt: skip
    assert command[-3:] == ["gc", "--every", "7200"]
    for other in ({**env, "REGISTRY_BACKEND": "zot"}, {"REGISTRY_DATA_DIR": "/d"}):
        assert supervisor_env(other, load(other), Path("/x"))["TBF_GC_AUTOSTART"] == "false"


# --- holding instead of refusing -----------------------------------------------------------------


def test_which_writes_are_held():
    held = freeze.held
    assert held("PUT", "manifest", {}) and held("DELETE", "manifest", {})
    assert held("DELETE", "blob", {}) and held("DELETE", "upload", {})
    assert held("PUT", "upload", {"digest": "sha256:" + "a" * 64})  # completes: may only link
    assert held("POST", "upload", {"mount": "sha256:" + "a" * 64, "from": "acme/x"})
    assert held("POST", "upload", {"digest": "sha256:" + "a" * 64})  # monolithic, one request
    assert not held("POST", "upload", {})  # a plain upload start
    assert not held("PATCH", "upload", {})  # upload data: the upload's own area only
    assert not held("GET", "manifest", {}) and not held("HEAD", "blob", {})


def held_flow(method: str, route: str, path: str):
    from mitmproxy.test import tflow, tutils

    from addons.record import record

    flow = tflow.tflow(req=tutils.treq(method=method.encode(), path=path.encode()))
    # A request being served: live, just made, its client still connected (else
    # connections.flow_over rightly counts it as over).
    flow.live, flow.timestamp_created, flow.client_conn.timestamp_end = True, time.time(), None
    rec = record(flow)
    rec.kind, rec.decision, rec.route = "registry", "allow", route
    return flow


def test_a_held_write_waits_for_the_freeze_to_end_and_is_never_refused(tmp_path):
    """A manifest PUT during the freeze waits (no 503) and goes on when the marker goes; an
    upload PATCH is not held at all."""
    import asyncio

    from mitmproxy.test import taddons

    addon = freeze.WriteFreeze()
    marker = tmp_path / freeze.MARKER
    marker.write_text(json.dumps({"id": "x", "until": time.time() + 60, "reason": "gc"}))

    async def scenario() -> tuple[float, float]:
        put = held_flow("PUT", "manifest", "/v2/acme/app/manifests/v1")
        patch = held_flow("PATCH", "upload", "/v2/acme/app/blobs/uploads/abc")
        started = time.monotonic()
        await addon.requestheaders(patch)
        patch_wait = time.monotonic() - started
        asyncio.get_running_loop().call_later(0.6, marker.unlink)
        started = time.monotonic()
        await addon.requestheaders(put)
        assert put.response is None and patch.response is None
        assert addon.in_flight() == 1  # only the held kind is counted
        return patch_wait, time.monotonic() - started

    with taddons.context(addon) as tctx:
        tctx.options.add_option("registry_state_dir", str, str(tmp_path), "")
        patch_wait, put_wait = asyncio.run(scenario())
    assert patch_wait < 0.1 and 0.5 < put_wait < 5


def test_a_dead_gcs_marker_releases_held_writes_when_its_lease_ends(tmp_path):
    import asyncio

    from mitmproxy.test import taddons

    addon = freeze.WriteFreeze()
    marker = tmp_path / freeze.MARKER
    marker.write_text(json.dumps({"id": "x", "until": time.time() + 0.5, "reason": "gc"}))
    flow = held_flow("PUT", "manifest", "/v2/acme/app/manifests/v1")
    with taddons.context(addon) as tctx:
        tctx.options.add_option("registry_state_dir", str, str(tmp_path), "")
        started = time.monotonic()
        asyncio.run(addon.requestheaders(flow))
    assert flow.response is None and 0.3 < time.monotonic() - started < 5
    assert marker.exists()  # nobody removed it: its `until` passed


def test_the_freeze_is_a_short_lease_never_renewed_past_its_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "FREEZE_MAX", 1.5)
    monkeypatch.setattr(gc, "FREEZE_RENEW", 0.2)
    monkeypatch.setattr(gc, "MARGIN", 0.3)
    with gc.Freeze(tmp_path, wait=5) as f:
        marker = freeze.read_marker(tmp_path / freeze.MARKER)
        assert marker["until"] <= f.started + gc.LEASE and marker["until"] <= f.started + 1.5
        assert f.holding()
        time.sleep(1.5)
        assert not f.holding()  # the GC stops removing before the workers stop holding
        assert freeze.read_marker(tmp_path / freeze.MARKER) is None  # expired: writes go on
    assert not (tmp_path / freeze.MARKER).exists()


# --- the sweep -----------------------------------------------------------------------------------


def fake_blob(root: Path, data: bytes, age: float, repos: dict[str, float] | None = None) -> str:
    """A blob as Distribution stores it, written `age` seconds ago, linked into `repos`
    (repository → age of its link)."""
    import hashlib
    import os

    h = hashlib.sha256(data).hexdigest()
    path = root / gc.V2 / "blobs/sha256" / h[:2] / h / "data"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    os.utime(path, (time.time() - age, time.time() - age))
    for repo, link_age in (repos or {}).items():
        link = root / gc.V2 / "repositories" / repo / "_layers/sha256" / h / "link"
        link.parent.mkdir(parents=True)
        link.write_text(f"sha256:{h}")
        os.utime(link, (time.time() - link_age, time.time() - link_age))
    return f"sha256:{h}"


def test_the_sweep_spares_blobs_stored_or_linked_within_the_grace(tmp_path):
    old = fake_blob(tmp_path, b"old", 7200, {"acme/a": 7200})
    linked_again = fake_blob(tmp_path, b"relinked", 7200, {"acme/a": 7200, "acme/b": 10})
    fresh = fake_blob(tmp_path, b"fresh", 10, {"acme/a": 10})
    store = gc.LocalBlobs(tmp_path)
    eligible = {old, linked_again, fresh, "sha256:" + "0" * 64}  # the last: already gone
    stored = store.stored(eligible)
    assert gc.sweepable(eligible, stored, time.time(), 3600) == {old}
    frozen = gc.Freeze(tmp_path / "state")
    frozen.until = time.time() + 60
    removed, young, cut = gc.sweep(store, eligible, frozen, 3600)
    assert (removed, young, cut) == ({old}, {linked_again, fresh}, False)
    h = old.removeprefix("sha256:")
    assert not (tmp_path / gc.V2 / "blobs/sha256" / h[:2] / h).exists()  # as vacuum.RemoveBlob
    assert (tmp_path / gc.V2 / "blobs/sha256" / h[:2]).is_dir()
    frozen.until = time.time()  # the freeze ran out: nothing more is removed
    other = fake_blob(tmp_path, b"other", 7200)
    assert gc.sweep(store, {other}, frozen, 3600) == (set(), set(), True)
