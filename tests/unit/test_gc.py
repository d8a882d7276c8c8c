"""addons/cli/gc.py without a backend: retention from the policy, the freeze protocol,
descriptor sizes, and what `gc` says with Zot."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from addons.cli import gc
from addons.config.settings import load
from addons.decisions import gc_plan, manifest
from addons.decisions.policy import parse
from addons.gateway import freeze
from addons.runstate import write_json

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
    assert manifest.descriptor_sizes(body) == {"sha256:" + "a" * 64: 10, "sha256:" + "b" * 64: 20}
    assert manifest.descriptor_sizes(b"not json") == {}


def write_worker(
    directory: Path,
    n: int,
    seen: str | None,
    in_flight: int,
    links: list[str] | None = None,
    deleting: list[str] | None = None,
) -> None:
    freezing = {"seen": seen, "in_flight": in_flight}
    if seen is not None:
        freezing |= {"links": links, "deleting": (deleting or []) if links is not None else None}
    state = {"time": time.time(), "freeze": freezing}
    write_json(directory / f"worker-{n}.json", state)  # atomic, as workers publish it


A, B, C = ("sha256:" + c * 64 for c in "abc")


def test_the_freeze_waits_for_every_worker_to_report_it_not_for_their_writes(tmp_path):
    """Entered once each live worker reported the freeze (writes still in flight or not),
    with the union of what those writes can link protected; always lifted."""
    write_worker(tmp_path, 0, None, 0)
    write_worker(tmp_path, 1, None, 0)
    (tmp_path / "worker-9.json").write_text(json.dumps({"time": 0}))  # long gone: not waited for
    f = gc.Freeze(tmp_path, wait=5)

    def workers_follow() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            marker = freeze.read_marker(tmp_path / freeze.MARKER)
            if marker:
                write_worker(tmp_path, 0, marker["id"], 1, [A])  # a slow upload: not waited for
                time.sleep(0.5)
                write_worker(tmp_path, 1, marker["id"], 2, [B, C], ["acme/x"])
                return
            time.sleep(0.05)

    t = threading.Thread(target=workers_follow)
    t.start()
    started = time.monotonic()
    with f:
        assert 0.4 <= time.monotonic() - started < 3
        assert freeze.read_marker(tmp_path / freeze.MARKER)["id"] == f.id
        assert f.protected == {A, B, C} and f.deleting == {"acme/x"}
    t.join()
    assert not (tmp_path / freeze.MARKER).exists()


def test_the_freeze_gives_up_on_workers_that_do_not_report_it(tmp_path):
    f = gc.Freeze(tmp_path, wait=0.5)
    write_worker(tmp_path, 0, "someone-else", 0)
    with pytest.raises(gc.GcError, match="nothing was removed"), f:
        pass
    assert not (tmp_path / freeze.MARKER).exists()


def test_a_worker_that_cannot_tell_what_its_writes_link_makes_the_run_remove_nothing(tmp_path):
    write_worker(tmp_path, 0, None, 3)
    f = gc.Freeze(tmp_path, wait=10)

    def follow() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if marker := freeze.read_marker(tmp_path / freeze.MARKER):
                return write_worker(tmp_path, 0, marker["id"], 3, None)
            time.sleep(0.02)

    threading.Thread(target=follow, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(gc.GcError, match=r"cannot be told.*nothing was removed"), f:
        pass
    assert time.monotonic() - started < 3  # at once: nobody waits for those writes
    assert not (tmp_path / freeze.MARKER).exists()


def test_acknowledged_is_the_union_of_fresh_reports_of_this_freeze():
    now = time.time()
    fresh = {"time": now, "freeze": {"seen": "f1", "in_flight": 1, "links": [A], "deleting": []}}
    workers = {
        "worker-0": fresh,
        "worker-1": {"time": now, "freeze": {"seen": "f1", "links": [B], "deleting": ["r"]}},
        "worker-2": {"time": now - 10, "freeze": fresh["freeze"]},  # from before the freeze
        "worker-3": {"time": now, "freeze": {"seen": "f0", "links": [C], "deleting": []}},
        "worker-4": {"time": now, "freeze": {"seen": "f1", "in_flight": 2}},  # no list: unknown
        "worker-5": {"time": now, "freeze": {"seen": "f1", "links": None, "deleting": None}},
    }
    ack = gc.acknowledged(workers, "f1", now - 1)
    assert ack.pending == ["worker-2: not frozen yet", "worker-3: not frozen yet"]
    assert ack.unknown == ["worker-4: 2 writes in flight", "worker-5: ? writes in flight"]
    assert ack.protected == {A, B} and ack.deleting == {"r"}
    both = gc.acknowledged({k: workers[k] for k in ("worker-0", "worker-1")}, "f1", now - 1)
    assert not both.pending and not both.unknown and both.protected == {A, B}


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
    from addons.cli.programs import gc_command, supervisor_env

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


def held_flow(method: str, route: str, path: str, body: bytes = b"", **params: str):
    from mitmproxy.test import tflow, tutils

    from addons.gateway.record import record

    flow = tflow.tflow(req=tutils.treq(method=method.encode(), path=path.encode(), content=body))
    # In progress, as the engine has it: a flow that is done, whose client left, or that is
    # older than any write (tflow's timestamps are of the year 2000) no longer counts.
    flow.live, flow.timestamp_created = True, time.time()
    flow.client_conn.timestamp_end = None
    rec = record(flow)
    rec.kind, rec.decision, rec.route, rec.params = "registry", "allow", route, params
    rec.repository = "acme/app"
    return flow


MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": A,
                   "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": B,
                    "size": 3}],
    }
).encode()  # fmt: skip


def test_a_held_write_waits_for_the_freeze_to_end_and_is_never_refused(tmp_path):
    """A manifest PUT during the freeze waits (no 503) and goes on when the marker goes; an
    upload PATCH is not held at all."""
    import asyncio

    from mitmproxy.test import taddons

    addon = freeze.WriteFreeze()
    marker = tmp_path / freeze.MARKER
    marker.write_text(json.dumps({"id": "x", "until": time.time() + 60, "reason": "gc"}))

    async def scenario() -> tuple[float, float]:
        put = held_flow("PUT", "manifest", "/v2/acme/app/manifests/v1", MANIFEST)
        patch = held_flow("PATCH", "upload", "/v2/acme/app/blobs/uploads/abc")
        started = time.monotonic()
        await addon.requestheaders(patch)
        patch_wait = time.monotonic() - started
        asyncio.get_running_loop().call_later(0.6, marker.unlink)
        started = time.monotonic()
        await addon.requestheaders(put)
        await addon.request(put)
        assert put.response is None and patch.response is None
        assert addon.in_flight() == 1  # only the held kind is counted
        return patch_wait, time.monotonic() - started

    with taddons.context(addon) as tctx:
        tctx.options.add_option("registry_state_dir", str, str(tmp_path), "")
        patch_wait, put_wait = asyncio.run(scenario())
    assert patch_wait < 0.1 and 0.5 < put_wait < 5


def test_what_a_held_write_can_link():
    assert freeze.links("upload", {"digest": A}) == {A}  # completes an upload
    assert freeze.links("upload", {"mount": A, "from": "acme/x", "digest": B}) == {A, B}
    assert freeze.links("manifest", {}) == frozenset()  # a DELETE
    assert freeze.manifest_links(MANIFEST) == {gc.manifest.digest_of(MANIFEST), A, B}
    index = json.dumps({"schemaVersion": 2, "manifests": [{"digest": C, "size": 1}]}).encode()
    assert freeze.manifest_links(index) == {gc.manifest.digest_of(index), C}
    assert freeze.manifest_links(b'{"layers": [{"digest": "x"}]}') is None  # unreadable
    assert freeze.manifest_links(b'{"a": 1, "a": 2}') is None


def test_the_published_set_is_the_union_bounded_and_fails_safe():
    writes = [(frozenset({A}), None), (frozenset({A, B}), None), (frozenset(), "acme/app")]
    assert freeze.published(writes, [C]) == {"links": [A, B, C], "deleting": ["acme/app"]}
    assert freeze.published([], []) == {"links": [], "deleting": []}
    unknown = {"links": None, "deleting": None}
    assert freeze.published([*writes, (None, None)], []) == unknown
    assert freeze.published(writes, [C], bound=3) == unknown  # 3 digests and 1 repository
    assert freeze.published(writes, [C], bound=4)["links"] == [A, B, C]


def test_a_worker_lists_what_its_writes_in_flight_can_link_and_counts_a_manifest_from_its_body(
    tmp_path,
):
    """An upload PUT is listed from its headers; a manifest PUT only once its body is read
    (a dripping body has reached nothing); a write that ended in an error stays listed (the
    backend may still complete it); nothing is listed when no freeze is seen."""
    import asyncio

    from mitmproxy.test import taddons

    addon = freeze.WriteFreeze()
    marker = tmp_path / freeze.MARKER

    async def scenario() -> list[dict]:
        states = []
        upload = held_flow("PUT", "upload", "/v2/acme/app/blobs/uploads/u", digest=C)
        put = held_flow("PUT", "manifest", "/v2/acme/app/manifests/v1", MANIFEST)
        delete = held_flow("DELETE", "manifest", f"/v2/acme/app/manifests/{B}")
        for flow in (upload, put, delete):
            await addon.requestheaders(flow)
        states.append(addon.state())  # no freeze: no list
        marker.write_text(json.dumps({"id": "x", "until": time.time() + 60, "reason": "gc"}))
        states.append(addon.state())  # the manifest's body is not here yet
        marker.unlink()
        await addon.request(put)
        marker.write_text(json.dumps({"id": "y", "until": time.time() + 60, "reason": "gc"}))
        states.append(addon.state())
        upload.error = flow_error()
        addon.error(upload)
        addon.response(put)
        addon.response(delete)
        states.append(addon.state())
        return states

    with taddons.context(addon) as tctx:
        tctx.options.add_option("registry_state_dir", str, str(tmp_path), "")
        none, before_body, all_three, ended = asyncio.run(scenario())
    assert none == {"seen": None, "in_flight": 2}
    assert before_body == {"seen": "x", "in_flight": 2, "links": [C], "deleting": ["acme/app"]}
    mine = gc.manifest.digest_of(MANIFEST)
    assert all_three["in_flight"] == 3 and set(all_three["links"]) == {A, B, C, mine}
    assert ended == {"seen": "y", "in_flight": 0, "links": [C], "deleting": []}


def flow_error():
    from mitmproxy import flow

    return flow.Error("client disconnected")


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


def test_the_sweep_never_removes_what_a_write_in_flight_may_link(tmp_path):
    garbage = fake_blob(tmp_path, b"garbage", 7200, {"acme/a": 7200})
    named = fake_blob(tmp_path, b"named by an upload in flight", 7200, {"acme/a": 7200})
    frozen = gc.Freeze(tmp_path / "state")
    frozen.until, frozen.protected = time.time() + 60, frozenset({named})
    removed, young, cut = gc.sweep(gc.LocalBlobs(tmp_path), {garbage, named}, frozen, 3600)
    assert (removed, young, cut) == ({garbage}, set(), False)
    h = named.removeprefix("sha256:")
    assert (tmp_path / gc.V2 / "blobs/sha256" / h[:2] / h / "data").read_bytes().startswith(b"na")


def test_a_manifest_put_the_gateway_cannot_read_whole_is_refused_not_counted(tmp_path):
    """Chunked or over 4 MiB: refused from its headers (also without tenant isolation), never
    counted: a refused body dripping into the void must not stand in for anything."""
    import asyncio

    from mitmproxy.test import taddons

    from addons.gateway.gate import answered

    addon = freeze.WriteFreeze()
    chunked = held_flow("PUT", "manifest", "/v2/acme/app/manifests/v1", MANIFEST)
    chunked.request.headers["transfer-encoding"] = "chunked"
    del chunked.request.headers["content-length"]
    large = held_flow("PUT", "manifest", "/v2/acme/app/manifests/v2", MANIFEST)
    large.request.headers["content-length"] = str(4 * 1024 * 1024 + 1)
    with taddons.context(addon) as tctx:
        tctx.options.add_option("registry_state_dir", str, str(tmp_path), "")
        for flow in (chunked, large):
            asyncio.run(addon.requestheaders(flow))
            assert answered(flow) and addon.in_flight() == 0
    assert (chunked.metadata["tabbify"].decision, large.metadata["tabbify"].decision) == (
        "deny:manifest-size",
        "deny:manifest-size",
    )


class FakeBackend:
    """Distribution's API as gc.walk_repository and gc.delete_manifests use it."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos, self.deleted = repos, []

    def catalog(self) -> list[str]:
        return list(self.repos)

    def tags(self, repo: str) -> list[str]:
        return list(self.repos[repo])

    def manifest(self, repo: str, ref: str) -> bytes | None:
        bodies = self.repos[repo]
        by_digest = {gc.manifest.digest_of(b): b for b in bodies.values()}
        return bodies.get(ref) or by_digest.get(ref)

    def referrers(self, repo: str, digest: str) -> list[str]:
        return []

    def delete_manifest(self, repo: str, digest: str) -> int:
        self.deleted.append((repo, digest))
        return 202


class FakeLedger:
    def __init__(self, backend: FakeBackend, now: float) -> None:
        self.backend, self.now = backend, now

    def pushes(self, repo: str) -> dict[str, tuple[str, float]]:
        tags = list(self.backend.repos[repo].items())
        return {  # pushed a day ago, an hour apart: v1 first
            tag: (gc.manifest.digest_of(body), self.now - 86400 + 3600 * i)
            for i, (tag, body) in enumerate(tags)
        }

    def holdings(self, holder: str) -> list[str]:
        return []

    def sizes(self, digests: object) -> dict[str, int]:
        return {}


def test_retention_leaves_what_writes_in_flight_name_and_repositories_with_a_delete_in_flight():
    from tests.support.images import image_manifest

    def image(n: int) -> bytes:
        return image_manifest((f"sha256:{n:064x}", 2), [(f"sha256:{n + 100:064x}", 3)])

    backend = FakeBackend(
        {
            "acme/app": {"v1": image(1), "v2": image(2), "v3": image(3)},
            "acme/other": {"v1": image(4), "v2": image(5)},
        }
    )
    now = time.time()
    ledger = FakeLedger(backend, now)
    policy = parse('[[retention]]\nrepositories = ["acme/**"]\nkeep_last = 1\n', "p.toml")
    walk = gc.snapshot(backend, ledger, now)
    plan = gc_plan.plan(walk.snapshot, gc.retention_for(policy, walk.unknown_tags), now)
    v1, v2 = (gc.manifest.digest_of(image(n)) for n in (1, 2))
    assert {d for r, d in plan.manifests if r == "acme/app"} == {v1, v2}
    assert any(r == "acme/other" for r, _ in plan.manifests)
    frozen = gc.Freeze(Path("/nonexistent"))
    frozen.protected, frozen.deleting = frozenset({v1}), frozenset({"acme/other"})
    deleted = gc.delete_manifests(backend, plan, ledger, now, policy, None)
    assert sorted(deleted) == sorted(plan.manifests)  # without a freeze: all of it
    backend.deleted.clear()
    frozen.until = time.time() + 60
    assert gc.delete_manifests(backend, plan, ledger, now, policy, frozen) == [("acme/app", v2)]
    assert backend.deleted == [("acme/app", v2)]


def test_a_manifest_gc_cannot_read_keeps_every_blob_it_might_name():
    """`Layers` is `layers` to Go: the backend links them. gc cannot read that manifest the
    backend's way, so it keeps it and every blob it might name, even a layer an expired
    manifest shares with it."""
    from tests.support.images import image_manifest

    config, shared, own = (f"sha256:{n:064x}" for n in (1, 2, 3))
    folded = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config,
                "size": 2,
            },
            "Layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": shared, "size": 3}
            ],
        }
    ).encode()
    backend = FakeBackend(
        {"acme/app": {"v1": image_manifest((config, 2), [(shared, 3), (own, 4)]), "v2": folded}}
    )
    now = time.time()
    policy = parse('[[retention]]\nrepositories = ["acme/**"]\nkeep_last = 1\n', "p.toml")
    walk = gc.snapshot(backend, FakeLedger(backend, now), now)
    plan = gc_plan.plan(walk.snapshot, gc.retention_for(policy, walk.unknown_tags), now)
    v1 = manifest.digest_of(backend.repos["acme/app"]["v1"])
    assert plan.manifests == (("acme/app", v1),)
    assert set(plan.blobs) == {v1, own}  # the shared layer and the config stay with v2
